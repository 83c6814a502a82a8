"""One forward pass over several sequences' new tokens, each attending to its own KV cache.

Decode on this hardware is bound by reading the weights, so N sessions that each decode one token
should share one pass over the weights instead of paying N. The rows are laid out flat, as one
``[1, T]`` input (vLLM style): per-token ``position_ids``, the linear layers see all T tokens at
once, and two small hooks keep the sequences apart:

- :class:`RaggedCache` stands in for the transformers cache for one pass: its ``update`` writes
  each row's keys/values into that row's own cache (in place, :class:`~duplex.engine.kv.GrowableLayer`)
  and hands the attention function one ``(keys, values)`` view per row, so no history is copied;
- :func:`ragged_attention` (registered as an attention implementation) attends each row's
  queries to its own keys, causally.

A row may be one decode token or a prefill chunk. Models with sliding-window layers (Gemma 3) are
not batched: :func:`supports` says no and the scheduler runs their rows one by one.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from duplex.engine.attention import gqa_decode_attention, max_query_rows
from duplex.engine.kv import GrowableLayer
from duplex.engine.lean_rows import split_logits

__all__ = ["RAGGED", "RaggedCache", "Row", "ragged_attention", "ragged_forward", "register", "supports"]

RAGGED = "duplex_ragged"
# up to this many queries per row (or what the C kernel takes, attention.max_query_rows: any number
# on its AVX2 code): the GQA kernel; above: SDPA with a mask
_SHORT_QUERY = 16


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's part of a ragged pass: ``ids`` at positions ``start_pos``..; ``keep`` = how
    many trailing positions need logits (0: none, an intermediate prefill chunk)."""

    cache: Any
    ids: tuple[int, ...]
    start_pos: int
    keep: int = 1
    type: str = "ragged_row"


class _PerRow:
    """Per-row key (or value) views handed from the cache to the attention function."""

    __slots__ = ("bounds", "parts")

    def __init__(self, parts: list[torch.Tensor], bounds: list[tuple[int, int]]) -> None:
        self.parts = parts
        self.bounds = bounds


class RaggedCache:
    """The ``cache`` argument for one ragged pass (duck-typed: the model only calls ``update``)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.caches = [row.cache for row in rows]
        self.bounds: list[tuple[int, int]] = []
        t = 0
        for row in rows:
            self.bounds.append((t, t + len(row.ids)))
            t += len(row.ids)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[_PerRow, _PerRow]:
        """key/value_states [1, kvh, T, d] -> each row appended to its own cache; per-row views back."""
        keys, values = [], []
        for cache, (s, e) in zip(self.caches, self.bounds):
            k, v = cache.update(key_states[:, :, s:e], value_states[:, :, s:e], layer_idx)
            keys.append(k)
            values.append(v)
        return _PerRow(keys, self.bounds), _PerRow(values, self.bounds)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions come from position_ids; nothing may infer them from the cache


def ragged_attention(module: Any, query: torch.Tensor, key: Any, value: Any, attention_mask: Any,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [1, h, T, d]; key/value: per-row [1, kvh, n_i, d] (the row's new positions last).
    Returns [1, T, h, d] like transformers' attention functions."""
    if not isinstance(key, _PerRow):
        # A plain forward of the shared model while this implementation is still set (the ragged
        # pass leaves it set; a direct caller need not know): unpadded rows, causal, the queries
        # the last positions of key/value. The GQA kernel does exactly that.
        return gqa_decode_attention(module, query, key, value, None, scaling=scaling)
    outs = []
    for (s, e), k, v in zip(key.bounds, key.parts, value.parts):
        q = query[:, :, s:e]
        if e - s <= max(_SHORT_QUERY, max_query_rows()):
            out, _ = gqa_decode_attention(module, q, k, v, None, scaling=scaling)
        else:
            n = k.shape[-2]
            i = torch.arange(e - s, device=q.device).unsqueeze(1)
            j = torch.arange(n, device=q.device).unsqueeze(0)
            allowed = j <= n - (e - s) + i  # [q, n]: causal, the row's queries are its last positions
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling,
                                                 enable_gqa=True).transpose(1, 2)
        outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def register() -> str:
    """Register :func:`ragged_attention` (idempotent). No mask function is registered, so
    transformers skips building a causal mask for this implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(RAGGED, ragged_attention)
    return RAGGED


def supports(model: Any, cache: Any) -> bool:
    """True if ``cache`` only has full-attention layers that append (no sliding window)."""
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    return all(type(layer) in (GrowableLayer, DynamicLayer) for layer in layers)


@functools.cache
def _cache_kwarg(model_type: type) -> str:
    """``cache`` (transformers >= 5.x renamed it) or ``past_key_values`` (older)."""
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _restore(rows: Sequence[Row]) -> None:
    """After a failed pass: crop every layer of every row's cache back to the row's start."""
    for row in rows:
        for layer in getattr(row.cache, "layers", ()):
            extra = int(layer.get_seq_length()) - row.start_pos
            if extra > 0:
                layer.crop(-extra)


@torch.inference_mode()
def ragged_forward(model: Any, rows: Sequence[Row]) -> list[torch.Tensor | None]:
    """Run ``rows`` in one pass; per row the logits of its last ``keep`` positions ([vocab] for
    keep 1, [keep, vocab] above, None for 0). On an error the caches are restored and it re-raises."""
    device = next(model.parameters()).device
    ids: list[int] = []
    positions: list[int] = []
    wanted: list[int] = []
    for row in rows:
        end = len(ids) + len(row.ids)
        ids.extend(row.ids)
        positions.extend(range(row.start_pos, row.start_pos + len(row.ids)))
        wanted.extend(range(end - row.keep, end))
    if not wanted:
        wanted = [len(ids) - 1]  # the model needs some position to project; its logits are dropped
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    position_ids = torch.tensor([positions], dtype=torch.long, device=device)
    keep_idx = torch.tensor(wanted, dtype=torch.long, device=device)
    if model.config._attn_implementation != RAGGED:
        # left set afterwards: switching walks every module; SharedSequence.forward_direct
        # switches back when it runs (the only other caller of the model)
        model.set_attn_implementation(RAGGED)
    try:
        cache_kw = {_cache_kwarg(type(model)): RaggedCache(rows)}
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=keep_idx,
                    **cache_kw)
    except BaseException:
        _restore(rows)
        raise
    return split_logits(rows, out.logits[0])  # [len(wanted), vocab]: each row's own fp32 storage
