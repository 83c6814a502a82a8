"""A KV cache whose full-attention layers grow in place instead of by concatenation.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which copies
the whole history of every layer on every token: O(history) bytes per step, and on a 2-core CPU a
visible share of a decode step once the conversation is a few hundred tokens long. A
:class:`GrowableLayer` keeps one buffer per layer with spare room (+25 % when full) and writes
new positions in place; ``keys``/``values`` are views of the filled part, so attention, masks,
``crop`` (barge-in rollback) and ``get_seq_length`` behave exactly as before. Sliding-window layers
(Gemma 3) keep transformers' own implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowableLayer", "compact_rotated", "kv_bytes_per_token", "new_kv_cache"]


class GrowableLayer(DynamicLayer):
    """``DynamicLayer`` with amortised O(new tokens) appends: ``[batch, heads, capacity, head_dim]``
    buffers, of which ``keys``/``values`` view the first ``length`` positions."""

    initial_capacity = 256
    _views_stale = False  # advance() counted positions: keys/values are re-sliced at their next use

    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor | None:
        if self._views_stale:
            self._refresh_views()
        return self._keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if self._views_stale:
            self._refresh_views()
        self._keys = value

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor | None:
        if self._views_stale:
            self._refresh_views()
        return self._values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if self._views_stale:
            self._refresh_views()
        self._values = value

    def _refresh_views(self) -> None:
        self._views_stale = False
        assert self._k is not None and self._v is not None
        self._keys = self._k[..., :self._length, :]
        self._values = self._v[..., :self._length, :]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self._length + n
        if self._k is None or end > self._k.shape[-2]:
            self._grow(key_states, value_states, end)
        assert self._k is not None and self._v is not None
        self._k[..., self._length:end, :].copy_(key_states)
        self._v[..., self._length:end, :].copy_(value_states)
        self._length = end
        self._views_stale = False  # both views set here
        self.keys = self._k[..., :end, :]
        self.values = self._v[..., :end, :]
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        current = self._k.shape[-2] if self._k is not None else 0
        # +25 % (at least initial_capacity) per growth: amortised O(1) appends, and at most a quarter
        # of spare memory per session, where doubling could waste as much as the cache itself
        capacity = max(needed, current + max(self.initial_capacity, current // 4))
        k_shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
        v_shape = (*value_states.shape[:-2], capacity, value_states.shape[-1])
        k = torch.empty(k_shape, dtype=key_states.dtype, device=key_states.device)
        v = torch.empty(v_shape, dtype=value_states.dtype, device=value_states.device)
        if self._k is not None and self._v is not None and self._length:
            k[..., :self._length, :].copy_(self._k[..., :self._length, :])
            v[..., :self._length, :].copy_(self._v[..., :self._length, :])
        self._k, self._v = k, v

    def reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, tokens: int) -> None:
        """Make room for ``tokens`` more positions (states shaped like an ``update``'s, for dtype
        and head shape), without writing them: a batched decode pass writes the new keys/values
        itself (:mod:`duplex.engine.fast_decode`), then calls :meth:`advance`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._length + tokens
        if self._k is None or end > self._k.shape[-2]:
            self._grow(key_states, value_states, end)

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` more positions, already written in place after the filled part (within
        the capacity :meth:`reserve` made)."""
        self._length += tokens
        self._views_stale = True  # sliced when read: most passes never look at them

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def crop(self, max_length: int) -> None:
        """As ``DynamicLayer.crop``: keep the first ``max_length`` positions; a negative value
        drops that many trailing ones."""
        if not self.is_initialized or self._k is None or self._v is None:
            return
        if max_length < 0:
            max_length = self._length + max_length
        if self._length <= max_length:
            return
        self._length = max(0, max_length)
        self._views_stale = False  # both views set here
        self.keys = self._k[..., :self._length, :]
        self.values = self._v[..., :self._length, :]

    def reset(self) -> None:
        self._views_stale = False  # the views are dropped below
        self._k = self._v = None
        self._length = 0
        super().reset()


def new_kv_cache(config: Any) -> DynamicCache:
    """transformers' ``DynamicCache`` for ``config``, its plain full-attention layers growable."""
    cache = DynamicCache(config=config)
    layers = getattr(cache, "layers", None)
    if layers:
        cache.layers = [GrowableLayer() if type(layer) is DynamicLayer else layer for layer in layers]
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowableLayer  # layers created on first use
    return cache


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one sequence position costs in the KV cache of a model with ``config``: keys and values
    of every layer (a sliding-window layer is counted in full: an upper bound)."""
    text = getattr(config, "text_config", None) or config
    layers = int(text.num_hidden_layers)
    heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    return 2 * layers * heads * head_dim * torch.empty(0, dtype=dtype).element_size()


@torch.inference_mode()
def compact_rotated(cache: Any, kept: list[int], rotary: Any) -> bool:
    """Keep only the cache positions ``kept`` (ascending), moved to positions 0..len(kept)-1, in
    place: each kept key is rotated back by how far it moves (RoPE is a rotation by position, so
    R(p - d) = R(-d) R(p)) and values are just moved. What a conversation's eviction needs,
    without re-encoding the kept window: on 2 CPU cores a 1000-token re-encode takes seconds,
    during which that session cannot answer. (The kept keys and values were computed with the
    evicted tokens in view, as in StreamingLLM; a re-encode would forget those.)

    Only for caches of :class:`GrowableLayer` (full attention) and a rotary embedding without an
    attention scale that covers the whole head; returns False (nothing changed) otherwise."""
    layers = getattr(cache, "layers", None)
    if not layers or rotary is None or float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        return False
    if not all(type(layer) is GrowableLayer and layer.is_initialized and layer._k is not None for layer in layers):
        return False
    first = layers[0]._k
    device = first.device
    index = torch.tensor(kept, dtype=torch.long, device=device)
    shift = index - torch.arange(len(kept), dtype=torch.long, device=device)
    cos, sin = rotary(first, shift.unsqueeze(0))  # the rotation by +shift; we apply its inverse
    d = first.shape[-1]
    if cos.shape[-1] != d or d % 2:
        return False
    cos, sin = cos[0].float(), sin[0].float()  # [n, d]
    n = len(kept)
    for layer in layers:
        k = layer._k.index_select(-2, index).float()
        half = d // 2
        rotated_half = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        k = k * cos - rotated_half * sin  # R(-shift) k: cos(-x) = cos x, sin(-x) = -sin x
        v = layer._v.index_select(-2, index)
        layer._k[..., :n, :].copy_(k.to(layer._k.dtype))
        layer._v[..., :n, :].copy_(v)
        layer._length = n
        layer.keys = layer._k[..., :n, :]
        layer.values = layer._v[..., :n, :]
    return True
