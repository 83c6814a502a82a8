"""What both lean forwards share (:mod:`duplex.engine.fast_decode` for Llama-style models,
:mod:`duplex.engine.gemma_decode` for Gemma 3): the rows of a pass and their flat layout, the fused
projections (q/k/v, gate/up: one mat-vec over weights concatenated once, the modules keeping views),
the per-row logits, the rotary tables, and the crop-back that leaves no half-written row after a
failed pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duplex.engine.quant import Int8WeightOnlyLinear, int8_matmul

__all__ = ["DecodeRow", "FusedProjection", "LayerProjections", "LeanForward", "layout_rows", "rope_table", "split_logits"]

_ROPE_BLOCK = 256  # positions per call of the rotary module that fills a table (see rope_table)


@dataclass(frozen=True, slots=True)
class DecodeRow:
    """One sequence's part of a pass: ``ids`` at positions ``start_pos``.. appended to ``cache``;
    logits wanted for the last ``keep`` positions (0: none)."""

    cache: Any
    ids: Sequence[int]
    start_pos: int
    keep: int = 1


class FusedProjection:
    """One projection over concatenated weights (int8 + scales, or a float matrix)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        self.dense: torch.Tensor | None = None  # dequantized int8 weights for many-row inputs
        if all(isinstance(p, Int8WeightOnlyLinear) for p in parts):
            self.int8 = True
            self.weight = torch.cat([p.weight_int8 for p in parts]).contiguous()
            self.scales = torch.cat([p.scales for p in parts]).contiguous()
            if all(p.weight_dense is not None for p in parts):
                self.dense = torch.cat([p.weight_dense for p in parts]).contiguous()
            offset = 0
            for p in parts:  # the modules keep views: one copy of the weights in memory
                n = p.weight_int8.shape[0]
                p.weight_int8 = self.weight[offset:offset + n]
                p.scales = self.scales[offset:offset + n]
                if self.dense is not None:
                    p.weight_dense = self.dense[offset:offset + n]
                offset += n
        elif all(type(p) is nn.Linear for p in parts):
            self.int8 = False
            self.weight = torch.cat([p.weight.data for p in parts]).contiguous()
            self.scales = None
            offset = 0
            for p in parts:
                n = p.weight.shape[0]
                p.weight.data = self.weight[offset:offset + n]
                offset += n
        else:
            raise TypeError("mixed projection types")
        biases = [getattr(p, "bias", None) for p in parts]
        if any(b is not None for b in biases):
            if any(b is None for b in biases):
                raise TypeError("some projections have a bias, some not")
            self.bias: torch.Tensor | None = torch.cat([b.data for b in biases if b is not None])
        else:
            self.bias = None
        self.sizes = [p.weight_int8.shape[0] if self.int8 else p.weight.shape[0] for p in parts]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8:
            assert self.scales is not None
            y = int8_matmul(x, self.weight, self.scales.to(x.dtype), self.dense)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

def layout_rows(rows: Sequence[DecodeRow]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """The rows laid out flat: token ids, their positions, and each row's [start, end) in them."""
    ids: list[int] = []
    positions: list[int] = []
    bounds: list[tuple[int, int]] = []
    for row in rows:
        bounds.append((len(ids), len(ids) + len(row.ids)))
        ids.extend(row.ids)
        positions.extend(range(row.start_pos, row.start_pos + len(row.ids)))
    return ids, positions, bounds


def split_logits(rows: Sequence[Any], logits: torch.Tensor) -> list[torch.Tensor | None]:
    """[sum of keeps, vocab] -> per row (anything with ``keep``: a DecodeRow, a ragged Row) [vocab]
    (keep 1), [keep, vocab], or None (keep 0), in fp32.

    The conversion is done here, once for the tick on its own thread (exact from bf16): the
    sessions' jobs then sample with no torch op of 49k elements each, which opened a parallel
    region on every job thread's own OpenMP team (~0.3 ms a session in a loaded server, in the gap
    between two batched ticks). Each row of several is converted into its own storage (a row's
    logits must not keep the batch's alive): one pass over each, where converting the batch and
    then cloning each row made two."""
    convert = logits.device.type == "cpu" and logits.dtype != torch.float32
    single = len(rows) == 1
    if single and convert:
        logits = logits.float()
    results: list[torch.Tensor | None] = []
    i = 0
    for row in rows:
        if row.keep == 0:
            results.append(None)
            continue
        part = logits[i:i + row.keep]
        i += row.keep
        if not single:
            part = part.float() if convert else part.clone()  # its own storage either way
        results.append(part[0] if row.keep == 1 else part)
    return results

def forward_restoring(forward: Any, rows: Sequence[DecodeRow]) -> list[torch.Tensor | None]:
    """``forward(rows)``; on an error every row's cache is cropped back to the row's start (a pass
    may have written some layers) and the error re-raised: a failed tick leaves no half-written row."""
    try:
        return forward(rows)
    except BaseException:
        for row in rows:
            for layer in getattr(row.cache, "layers", ()):
                extra = int(layer.get_seq_length()) - row.start_pos
                if extra > 0:
                    layer.crop(-extra)
        raise


def rope_table(rotary: Any, x: torch.Tensor, top: int, table: tuple[torch.Tensor, torch.Tensor] | None,
               *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A rotary module's cos/sin for positions 0..at least ``top`` - 1 (doubling ``table``'s size when
    it grows), computed by the module itself (``rotary(x, positions, *args)``) in blocks of
    ``_ROPE_BLOCK`` positions: small enough to run on one thread with no vector tail, as every call
    of a forward runs, so each position gets the bits a forward's call gives it (tested)."""
    have = table[0].shape[0] if table is not None else 0
    size = -(-max(top, 2 * have, _ROPE_BLOCK) // _ROPE_BLOCK) * _ROPE_BLOCK
    blocks = [rotary(x[:1], torch.arange(b, b + _ROPE_BLOCK, device=x.device).unsqueeze(0), *args)
              for b in range(0, size, _ROPE_BLOCK)]
    return torch.cat([c[0] for c, _ in blocks]), torch.cat([s[0] for _, s in blocks])


class LayerProjections:
    """A decoder layer's attention geometry and projections as both lean forwards read them: q/k/v
    and gate/up fused (:class:`FusedProjection`), o and down as the modules are."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.index = int(attn.layer_idx)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.qkv = FusedProjection([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = attn.o_proj
        self.gate_up = FusedProjection([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj
        nq, nk, _ = self.qkv.sizes
        self.n_heads, self.n_kv = nq // self.head_dim, nk // self.head_dim


class LeanForward:
    """The public call of a lean forward: subclasses implement ``_forward(rows)``."""

    @torch.inference_mode()
    def forward(self, rows: Sequence[DecodeRow]) -> list[torch.Tensor | None]:
        """Append every row's ids to its cache; per row the logits of its last ``keep`` positions
        ([vocab] for keep 1, [keep, vocab] above, None for 0). On an error the caches are cropped
        back to each row's start and the error re-raised."""
        return forward_restoring(self._forward, rows)

    def _forward(self, rows: Sequence[DecodeRow]) -> list[torch.Tensor | None]:
        raise NotImplementedError
