"""A lean forward for decode steps of Llama-style models: the same arithmetic, far fewer ops.

On the 2-core CPU a decode step of the default 135M model through transformers' generic forward
costs ~39 ms, of which the weight reads (int8) are ~8 ms: the rest is ~400 module calls, masks,
dtype round trips and per-projection kernel launches. This forward walks the same layers with the
same kernels (:class:`~duplex.engine.quant.Int8WeightOnlyLinear`'s mat-vec, the model's own rotary
embedding, :func:`~duplex.engine.attention.gqa_decode_attention`, the cache's ``update``) but:

- **fused projections**: q/k/v and gate/up each run as one mat-vec over weights concatenated once
  at load; the original modules keep views into the fused buffers, so no memory is duplicated and
  both forwards see the same weights;
- **no per-call machinery**: no mask construction, no hooks, no output dataclasses;
- **ragged rows**: several sequences' new tokens (each at its own positions, with its own cache)
  share every weight read, as in :mod:`duplex.engine.ragged`.

With int8 weights and bf16 activations on a CPU with the C helpers of
:mod:`duplex.engine.int8_kernel` (the default model's format), the mat-vecs take their neighbours
along: q/k/v with the input RMS norm and rotary embedding, o with the residual add, gate/up with
the post-attention norm, down with SwiGLU and the residual add. Over preallocated buffers, a
layer is then two C calls: every row's cache write and attention in one
(``duplex_gqa_decode_rows_bf16`` of :mod:`duplex.engine.attention`'s kernel, for caches of
:class:`~duplex.engine.kv.GrowableLayer` grown up front; other caches take each row's ``update``
and the kernel per row, bit-identical) and one C call running o, gate/up, down and
the next layer's q/k/v in one thread team (~8.7 ms per token on the 2-core machine where the
op-by-op forward with PyTorch's int8 kernel took ~36); a second concurrent pass on the same model
runs the fused ops one call each instead.
The fused steps keep every bf16 rounding of the module sequence (bit-identical, tested), so what
differs from transformers' forward is the summation order inside the mat-vecs and attention. Other formats run the same layers op by op. A test
checks logits against the generic forward within bf16 noise. Models it does not recognise (other
layer structures, sliding-window attention, non-SiLU MLPs) return None from :func:`fast_decoder`
and keep the generic forward.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from duplex.engine.attention import (
    decode_kernel,
    decode_rows_kernel,
    gqa_decode_attention,
    max_query_rows,
)
from duplex.engine.int8_kernel import q16_isa
from duplex.engine.kv import GrowableLayer
from duplex.engine.lean_rows import (
    DecodeRow,
    LayerProjections,
    LeanForward,
    layout_rows,
    rope_table,
    split_logits,
)
from duplex.engine.quant import Int8WeightOnlyLinear
from duplex.engine.row_descriptors import new_descriptors, reuse_descriptors

__all__ = ["AMX_MAX_QUERY", "MAX_QUERY", "DecodeRow", "FastDecoder", "fast_decoder"]

log = logging.getLogger(__name__)

# tokens a pass takes in one C program per layer (decode steps, turn hand-overs, a typed question
# with its turn markups); longer: prefill, as bf16 matrix products on dequantized weights where the
# model has them (duplex.engine.quant.add_dense_weights), whose cost grows less with every row than
# the fused int8 mat-vecs'. On the AMX Xeon with the AVX-512 VNNI tiles, one row over 300 cached
# tokens, 2 threads (1 thread): 16 tokens 33 ms in the program against 42 dense (46 / 60), 19
# tokens 36 against 52 (59 / 62), 24 tokens 49 against 52 (67 / 69), 32 tokens 60 against 56 (87 /
# 73). At 16 the program was the limit: 17-19 tokens (a typed question) fell to the per-op fused
# pass, 41 ms
MAX_QUERY = 24
# where the int8 mat-vecs of 4+ rows run on AMX tiles (duplex.engine.int8_kernel.q16_isa
# "amx-int8"), the program pass stays ahead of the dense one up to a few hundred tokens (one row
# over 300 cached, 2 threads: 25 tokens 25 against 57 ms, 64 33 against 55, 128 83 against 104,
# 256 153 against 176, 512 864 against 243; 8 rows x 19 tokens 72 against 87), so it takes them
AMX_MAX_QUERY = 192
_BUFFER_STEP = 32  # passes of more than MAX_QUERY tokens share buffers sized in these steps
_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _Layer(LayerProjections):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        self.norm1 = layer.input_layernorm
        self.norm2 = layer.post_attention_layernorm
        self.q_norm = getattr(self.attn, "q_norm", None)  # Qwen3
        self.k_norm = getattr(self.attn, "k_norm", None)
        _, nk, nv = self.qkv.sizes
        self.fusable = (self.qkv.int8 and self.gate_up.int8 and isinstance(self.o, Int8WeightOnlyLinear)
                        and isinstance(self.down, Int8WeightOnlyLinear) and self.o.bias is None
                        and self.down.bias is None and self.qkv.bias is None and self.gate_up.bias is None
                        and self.q_norm is None and nk == nv
                        and all(n.weight.dtype == torch.bfloat16 for n in (self.norm1, self.norm2)))


class _Buffers:
    """Activation buffers for passes of ``t`` tokens and the C step programs over them: ``first``
    (layer 0's q/k/v + rope) and per layer ``programs[i]`` (o + residual, gate/up + norm, down +
    SwiGLU + residual, then layer i+1's q/k/v + norm + rope)."""

    def __init__(self, dec: FastDecoder, t: int) -> None:
        ops = dec.fused
        assert ops is not None
        layers = dec.layers
        first = layers[0]
        d, nh, nkv = first.head_dim, first.n_heads, first.n_kv
        bf16 = torch.bfloat16
        self.t = t
        self.x = torch.empty(t, dec.embed.weight.shape[1], dtype=bf16)
        self.qkv = torch.empty(t, first.qkv.weight.shape[0], dtype=bf16)
        self.attn = torch.empty(t, nh * d, dtype=bf16)
        self.gate_up = torch.empty(t, first.gate_up.weight.shape[0], dtype=bf16)
        self.cos = torch.empty(t, d, dtype=bf16)
        self.sin = torch.empty(t, d, dtype=bf16)
        self._rows: dict[tuple[tuple[int, int], ...], list[torch.Tensor]] = {}
        rope = (nh + nkv, d, self.cos, self.sin)

        def qkv(layer: _Layer) -> Any:
            return ops.step(self.x, layer.qkv.weight, layer.qkv.scales, self.qkv, ops.RMSNORM, layer.norm1.weight,
                            layer.norm1.variance_epsilon, rope=rope)

        self.first = ops.program([qkv(first)])
        self.programs = []
        for i, layer in enumerate(layers):
            steps = [ops.step(self.attn, layer.o.weight_int8, layer.o.scales, self.x, residual=self.x),
                     ops.step(self.x, layer.gate_up.weight, layer.gate_up.scales, self.gate_up, ops.RMSNORM,
                              layer.norm2.weight, layer.norm2.variance_epsilon),
                     ops.step(self.gate_up, layer.down.weight_int8, layer.down.scales, self.x, ops.SWIGLU,
                              residual=self.x)]
            if i + 1 < len(layers):
                steps.append(qkv(layers[i + 1]))
            self.programs.append(ops.program(steps))

    def attn_rows(self, bounds: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per row, its tokens' part of the attention buffer as [1, tokens, heads, head_dim]."""
        key = tuple(bounds)
        views = self._rows.get(key)
        if views is None:
            views = [self.attn[s:e].view(1, e - s, -1, self.cos.shape[1]) for s, e in bounds]
            if len(self._rows) < 64:
                self._rows[key] = views
        return views


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastDecoder(LeanForward):
    """The lean forward of one loaded model (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        # the rotary embedding's cos/sin per position, computed once by the module itself (see _rope)
        rope_type = str(getattr(self.rotary, "rope_type", "default"))
        self._rope_static = "dynamic" not in rope_type and rope_type != "longrope"
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.final_norm = inner.norm
        self.head = model.lm_head
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.fused = _fused_ops() if (self.embed.weight.dtype == torch.bfloat16 and all(l.fusable for l in self.layers)
                                      and isinstance(self.head, Int8WeightOnlyLinear) and self.head.bias is None
                                      and self.final_norm.weight.dtype == torch.bfloat16) else None
        shapes = {(l.qkv.weight.shape, l.gate_up.weight.shape, l.head_dim, l.n_heads, l.n_kv) for l in self.layers}
        self._uniform = len(shapes) == 1  # every layer can share one set of activation buffers
        self._buffers: dict[int, _Buffers] = {}
        self._lock = threading.Lock()  # the buffers serve one forward at a time; others take _forward_fused
        # dequantized weights everywhere (duplex.engine.quant.add_dense_weights): passes of many
        # tokens then run op by op on them, the matrix engine's work, not the fused mat-vecs'
        self.dense = all(l.qkv.dense is not None and l.gate_up.dense is not None
                         and getattr(l.o, "weight_dense", None) is not None
                         and getattr(l.down, "weight_dense", None) is not None for l in self.layers)
        # the most tokens the program pass takes; more go to the dense pass where there is one.
        # AMX_MAX_QUERY where the int8 mat-vecs run on AMX tiles, and where there are no dense
        # weights and the attention's C code takes query blocks of any length (its AVX2 code): the
        # other passes run the same int8 mat-vecs one call at a time, with a cache update and an
        # attention call per row and layer (eight typed questions at once, ~150 tokens, on an AVX2
        # EPYC at 2 threads: 364-462 ms in the program pass against 472-565 in the per-op one)
        long_passes = q16_isa() == "amx-int8" or (not self.dense and max_query_rows() >= AMX_MAX_QUERY)
        self.max_query = AMX_MAX_QUERY if self.fused is not None and long_passes else MAX_QUERY

    def _rope(self, x: torch.Tensor, positions: list[int],
              out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding's cos and sin ([t, head_dim], x's dtype) at ``positions`` (into
        ``out`` if given). Where the embedding cannot change at run time (not a dynamic or longrope
        type), rows of a table that the module computed: the module call (~0.2-0.35 ms in a decode
        step on the 2-core EPYC, with its decorator, casts and concatenation) becomes one gather.
        Its values are elementwise functions of the position, computed in blocks small enough to
        run on one thread with no vector tail, as every call of a forward runs: the same bits."""
        if not self._rope_static or x.device.type != "cpu" or not positions:
            cos, sin = self.rotary(x, torch.tensor([positions], dtype=torch.long, device=x.device))
            cos, sin = cos[0].contiguous(), sin[0].contiguous()
            if out is not None:
                out[0].copy_(cos)
                out[1].copy_(sin)
            return cos, sin
        table = self._rope_table
        top = max(positions) + 1
        if table is None or top > table[0].shape[0] or table[0].dtype != x.dtype:
            table = self._rope_table = rope_table(self.rotary, x, top, table if table is not None
                                                  and table[0].dtype == x.dtype else None)
        index = torch.tensor(positions, dtype=torch.long)
        if out is None:
            return table[0].index_select(0, index), table[1].index_select(0, index)
        torch.index_select(table[0], 0, index, out=out[0])
        torch.index_select(table[1], 0, index, out=out[1])
        return out

    batched_attention = True  # one C call per layer for every row's cache write + attention (if caches allow)
    direct_max_query = MAX_QUERY  # the most tokens of a sequence's own call (SharedSequence.forward_direct)

    @staticmethod
    def accepts(cache: Any) -> bool:
        """True if the forward takes ``cache``: plain appending layers (no sliding window)."""
        layers = getattr(cache, "layers", None)
        return layers is not None and all(type(layer) in (GrowableLayer, DynamicLayer) for layer in layers)

    def _rows_plan(self, rows: Sequence[DecodeRow], bounds: list[tuple[int, int]],
                   k: torch.Tensor, v: torch.Tensor) -> tuple[Any, torch.Tensor, list[list[GrowableLayer]]] | None:
        """For :meth:`_forward_program`: the batched kernel and its per-layer row descriptors
        ([layers, rows, 6] int64, see ``duplex_gqa_decode_rows_bf16``) with every row's cache
        grown up front for its new tokens, or None (caches at most grown) where some row needs the
        per-row path: caches other than all-:class:`~duplex.engine.kv.GrowableLayer` bf16 CPU
        buffers, a cache in two rows, an empty row, or the C kernel off."""
        if not self.batched_attention:
            return None
        fn = decode_rows_kernel()
        if fn is None:
            return None
        first = self.layers[0]
        d, nh, nkv = first.head_dim, first.n_heads, first.n_kv
        if d % 8 or d > 256 or nh % nkv:
            return None
        n_layers = len(self.layers)
        seen: set[int] = set()
        all_layers: list[list[GrowableLayer]] = []
        desc = np.empty((n_layers, len(rows), 6), dtype=np.int64)  # layer-major, as the kernel reads it
        for r, (row, (s, e)) in enumerate(zip(rows, bounds)):
            cache = row.cache
            layers = getattr(cache, "layers", None)
            if (s == e or id(cache) in seen or type(cache).update is not DynamicCache.update
                    or getattr(cache, "offloading", False) or layers is None or len(layers) != n_layers):
                return None
            seen.add(id(cache))
            if not (reuse_descriptors(cache, layers, s, e, desc[:, r])
                    or new_descriptors(cache, layers, s, e, k, v, nkv, d, desc[:, r])):
                return None
            all_layers.append(layers)
        return fn, torch.from_numpy(desc.reshape(-1)), all_layers

    def _forward_program(self, rows: Sequence[DecodeRow]) -> list[torch.Tensor | None]:
        """:meth:`_forward_fused` over preallocated buffers, with each layer's o, gate/up and down
        mat-vecs and the next layer's q/k/v and rope in one C call (:meth:`FusedOps.run`): per
        layer, that call, the cache update and the attention kernel."""
        ops = self.fused
        assert ops is not None
        ids, positions, bounds = layout_rows(rows)
        t = len(ids)
        # buffers for exactly t tokens up to MAX_QUERY (the common sizes), else for the next
        # multiple of _BUFFER_STEP, whose first t rows the programs run over: a few sets of
        # buffers, not one per size up to max_query
        size = t if t <= MAX_QUERY else -(-t // _BUFFER_STEP) * _BUFFER_STEP
        buf = self._buffers.get(size)
        if buf is None:
            buf = self._buffers[size] = _Buffers(self, size)
        x = buf.x[:t]
        torch.index_select(self.embed.weight, 0, torch.tensor(ids, dtype=torch.long), out=x)
        self._rope(x, positions, out=(buf.cos[:t], buf.sin[:t]))
        ops.run(buf.first, t)
        first = self.layers[0]
        d, nh, nkv = first.head_dim, first.n_heads, first.n_kv
        qkv = buf.qkv[:t]
        q = qkv[:, :nh * d].view(1, t, nh, d).transpose(1, 2)
        k = qkv[:, nh * d:(nh + nkv) * d].view(1, t, nkv, d).transpose(1, 2)
        v = qkv[:, (nh + nkv) * d:].view(1, t, nkv, d).transpose(1, 2)
        plan = self._rows_plan(rows, bounds, k, v)
        if plan is not None:  # every row's cache write and attention of a layer in one C call
            fn, desc, all_layers = plan
            n = len(rows)
            step = n * 6 * 8  # bytes of one layer's descriptors
            desc_ptr, qkv_ptr, attn_ptr = desc.data_ptr(), buf.qkv.data_ptr(), buf.attn.data_ptr()
            stride = buf.qkv.stride(0)
            for i, (layer, program) in enumerate(zip(self.layers, buf.programs)):
                rc = fn(desc_ptr + i * step, n, qkv_ptr, stride, attn_ptr, nh, nkv, d, layer.scaling)
                if rc:
                    raise MemoryError("decode attention: out of memory") if rc == -2 else RuntimeError(
                        f"decode attention kernel refused the rows ({rc})")
                ops.run(program, t)
            for layers, (s, e) in zip(all_layers, bounds):
                for layer in layers:
                    layer.advance(e - s)
            return self._logits(rows, bounds, x, t)
        kernel = decode_kernel()
        for layer, program in zip(self.layers, buf.programs):
            for row, (s, e), out in zip(rows, bounds, buf.attn_rows(bounds)):
                ks, vs = (k, v) if len(rows) == 1 else (k[:, :, s:e], v[:, :, s:e])
                qs = q if len(rows) == 1 else q[:, :, s:e]
                keys, values = row.cache.update(ks, vs, layer.index)
                if kernel is None or kernel(qs, keys, values, layer.scaling, out=out) is None:
                    att, _ = gqa_decode_attention(layer.attn, qs, keys, values, None, scaling=layer.scaling)
                    out.copy_(att)
            ops.run(program, t)
        return self._logits(rows, bounds, x, t)

    def _forward_dense(self, rows: Sequence[DecodeRow]) -> list[torch.Tensor | None] | None:
        """A pass of many tokens (prefill chunks, a tick batching several sessions' new input) on
        the dequantized weights: the linears are matrix products (the matrix engine's work, which
        the int8 mat-vecs would do row by row), every row's cache write and attention of a layer
        is one call of the batched C kernel, and norms, SwiGLU and residuals are a few torch ops
        per layer. None (nothing done) where the batched kernel cannot take the rows' caches."""
        ops = self.fused
        assert ops is not None
        ids, positions, bounds = layout_rows(rows)
        t = len(ids)
        first = self.layers[0]
        d, nh, nkv = first.head_dim, first.n_heads, first.n_kv
        x = self.embed(torch.tensor(ids, dtype=torch.long))  # [t, hidden] bf16, our own buffer
        cos, sin = self._rope(x, positions)

        def qkv_of(layer: _Layer) -> torch.Tensor:
            qkv = F.linear(_rms_norm(layer.norm1, x), layer.qkv.dense)
            ops.rope(qkv, nh + nkv, d, cos, sin)  # q and k heads are adjacent: one pass
            return qkv

        qkv = qkv_of(first)
        k = qkv[:, nh * d:(nh + nkv) * d].view(1, t, nkv, d).transpose(1, 2)
        v = qkv[:, (nh + nkv) * d:].view(1, t, nkv, d).transpose(1, 2)
        plan = self._rows_plan(rows, bounds, k, v)
        if plan is None:
            return None
        fn, desc, all_layers = plan
        n = len(rows)
        step = n * 6 * 8  # bytes of one layer's descriptors
        attn = torch.empty(t, nh * d, dtype=x.dtype)
        for i, layer in enumerate(self.layers):
            if i:
                qkv = qkv_of(layer)
            rc = fn(desc.data_ptr() + i * step, n, qkv.data_ptr(), qkv.stride(0), attn.data_ptr(), nh, nkv, d,
                    layer.scaling)
            if rc:
                raise MemoryError("decode attention: out of memory") if rc == -2 else RuntimeError(
                    f"decode attention kernel refused the rows ({rc})")
            x += F.linear(attn, layer.o.weight_dense)
            gate_up = F.linear(_rms_norm(layer.norm2, x), layer.gate_up.dense)
            n_gate = layer.gate_up.sizes[0]
            x += F.linear(F.silu(gate_up[:, :n_gate]) * gate_up[:, n_gate:], layer.down.weight_dense)
        for layers, (s, e) in zip(all_layers, bounds):
            for layer in layers:
                layer.advance(e - s)
        return self._logits(rows, bounds, x, t)

    def _logits(self, rows: Sequence[DecodeRow], bounds: list[tuple[int, int]], x: torch.Tensor,
                t: int) -> list[torch.Tensor | None]:
        ops = self.fused
        assert ops is not None
        wanted = [i for row, (_, e) in zip(rows, bounds) for i in range(e - row.keep, e)]
        if not wanted:
            return [None] * len(rows)
        h = x[wanted] if len(wanted) < t else x
        logits = ops.gemv(h, self.head.weight_int8, self.head.scales, ops.RMSNORM, self.final_norm.weight,
                          self.final_norm.variance_epsilon)  # [len(wanted), vocab], new storage
        return split_logits(rows, logits)

    def _forward_fused(self, rows: Sequence[DecodeRow]) -> list[torch.Tensor | None]:
        """:meth:`_forward` for int8 weights and bf16 activations on a CPU with the C helpers: each
        mat-vec takes its RMS norm, SwiGLU or residual add along (same bf16 roundings), the rotary
        embedding runs in place on the q/k output, and the hidden state is a [tokens, hidden]
        buffer updated in place. Only the cache updates and attention stay torch calls."""
        ops = self.fused
        assert ops is not None
        ids, positions, bounds = layout_rows(rows)
        t = len(ids)
        x = self.embed(torch.tensor(ids, dtype=torch.long))  # [t, hidden] bf16, our own buffer
        cos, sin = self._rope(x, positions)  # [t, d]
        single = len(rows) == 1
        for layer in self.layers:
            d, nh, nkv = layer.head_dim, layer.n_heads, layer.n_kv
            qkv = ops.gemv(x, layer.qkv.weight, layer.qkv.scales, ops.RMSNORM, layer.norm1.weight,
                           layer.norm1.variance_epsilon)  # [t, (nh + 2 nkv) d]
            ops.rope(qkv, nh + nkv, d, cos, sin)  # q and k heads are adjacent: one pass
            q = qkv[:, :nh * d].view(1, t, nh, d).transpose(1, 2)
            k = qkv[:, nh * d:(nh + nkv) * d].view(1, t, nkv, d).transpose(1, 2)
            v = qkv[:, (nh + nkv) * d:].view(1, t, nkv, d).transpose(1, 2)
            if single:
                keys, values = rows[0].cache.update(k, v, layer.index)
                attn, _ = gqa_decode_attention(layer.attn, q, keys, values, None, scaling=layer.scaling)
            else:
                outs = []
                for row, (s, e) in zip(rows, bounds):
                    keys, values = row.cache.update(k[:, :, s:e], v[:, :, s:e], layer.index)
                    out, _ = gqa_decode_attention(layer.attn, q[:, :, s:e], keys, values, None, scaling=layer.scaling)
                    outs.append(out)
                attn = torch.cat(outs, dim=1)
            attn = attn.reshape(t, nh * d)
            ops.gemv(attn, layer.o.weight_int8, layer.o.scales, residual=x, out=x)
            gate_up = ops.gemv(x, layer.gate_up.weight, layer.gate_up.scales, ops.RMSNORM, layer.norm2.weight,
                               layer.norm2.variance_epsilon)
            ops.gemv(gate_up, layer.down.weight_int8, layer.down.scales, ops.SWIGLU, residual=x, out=x)
        wanted = [i for row, (_, e) in zip(rows, bounds) for i in range(e - row.keep, e)]
        if not wanted:
            return [None] * len(rows)
        h = x[wanted] if len(wanted) < t else x
        logits = ops.gemv(h, self.head.weight_int8, self.head.scales, ops.RMSNORM, self.final_norm.weight,
                          self.final_norm.variance_epsilon)  # [len(wanted), vocab]
        return split_logits(rows, logits)

    def _forward(self, rows: Sequence[DecodeRow]) -> list[torch.Tensor | None]:
        many = self.dense and sum(len(row.ids) for row in rows) > self.max_query
        if many and self.fused is not None:
            out = self._forward_dense(rows)
            if out is not None:
                return out
        if self.fused is not None and not many:
            if (self._uniform and sum(len(row.ids) for row in rows) <= self.max_query
                    and self._lock.acquire(blocking=False)):
                try:
                    return self._forward_program(rows)
                finally:
                    self._lock.release()
            return self._forward_fused(rows)
        device = self.embed.weight.device
        ids, positions, bounds = layout_rows(rows)
        x = self.embed(torch.tensor([ids], dtype=torch.long, device=device))  # [1, T, hidden]
        cos, sin = self.rotary(x, torch.tensor([positions], dtype=torch.long, device=device))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, T, d]
        t = len(ids)
        for layer in self.layers:
            d = layer.head_dim
            h = _rms_norm(layer.norm1, x)
            nq, nk, _ = layer.qkv.sizes
            qkv = layer.qkv(h)
            q = qkv[..., :nq].view(1, t, -1, d).transpose(1, 2)
            k = qkv[..., nq:nq + nk].view(1, t, -1, d).transpose(1, 2)
            v = qkv[..., nq + nk:].view(1, t, -1, d).transpose(1, 2)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q.transpose(1, 2)).transpose(1, 2), layer.k_norm(k.transpose(1, 2)).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            outs = []
            for row, (s, e) in zip(rows, bounds):
                keys, values = row.cache.update(k[:, :, s:e], v[:, :, s:e], layer.index)
                out, _ = gqa_decode_attention(layer.attn, q[:, :, s:e], keys, values, None,
                                              scaling=layer.attn.scaling)
                outs.append(out)
            attn = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).reshape(1, t, -1)
            x = x + layer.o(attn)
            h = _rms_norm(layer.norm2, x)
            gate_up = layer.gate_up(h)
            n_gate = layer.gate_up.sizes[0]
            x = x + layer.down(F.silu(gate_up[..., :n_gate]) * gate_up[..., n_gate:])
        wanted = [i for row, (_, e) in zip(rows, bounds) for i in range(e - row.keep, e)]
        if not wanted:
            return [None] * len(rows)
        h = _rms_norm(self.final_norm, x[:, wanted])
        logits = self.head(h)[0]  # [len(wanted), vocab]
        return split_logits(rows, logits)


def _fused_ops() -> Any:
    from duplex.engine.int8_kernel import fused_ops

    return fused_ops()


_decoders: weakref.WeakKeyDictionary[nn.Module, FastDecoder | None] = weakref.WeakKeyDictionary()


def _supported(model: nn.Module) -> str | None:
    """None if the lean forward reproduces ``model``'s; else why not."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _MODEL_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "rope_scaling", None) and (cfg.rope_scaling or {}).get("rope_type") == "longrope":
        return "longrope"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "rotary_emb", "norm", "layers")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "unexpected attention layout"
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            return "unexpected MLP layout"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or type(norm).forward.__qualname__.split(".")[0] not in (
                    "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"):
                return f"norm {type(norm).__name__}"
    return None


def fast_decoder(model: nn.Module) -> FastDecoder | None:
    """The lean forward for ``model`` (built once; fuses its projections in place), or None when
    the model is not one it reproduces, or with ``DUPLEX_FAST_DECODE=0``. On CUDA it pays too: a
    decode step there is bound by kernel launches, and fusing cuts them. Gemma 3 text models get
    :class:`~duplex.engine.gemma_decode.GemmaDecoder` (same ``forward``, ``accepts`` and limits)."""
    if model in _decoders:
        return _decoders[model]
    from duplex.engine.gemma_decode import GemmaDecoder, gemma_supported

    decoder: Any = None
    device = next(model.parameters()).device
    gemma = getattr(getattr(model, "config", None), "model_type", None) == "gemma3_text"
    why = "off ($DUPLEX_FAST_DECODE=0)" if os.environ.get("DUPLEX_FAST_DECODE", "1") == "0" else (
        f"device {device.type}" if device.type not in ("cpu", "cuda") else
        gemma_supported(model) if gemma else _supported(model))
    if why is None:
        try:
            decoder = GemmaDecoder(model) if gemma else FastDecoder(model)
        except (TypeError, AttributeError) as exc:
            why = str(exc)
    if decoder is None:
        log.info("lean decode forward not used (%s): the generic transformers forward runs", why)
    _decoders[model] = decoder
    return decoder
