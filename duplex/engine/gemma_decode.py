"""A lean forward for Gemma 3 text models (the packaged translation model): the same arithmetic as
transformers' ``Gemma3ForCausalLM``, far fewer ops, several sequences per pass.

Gemma 3 differs from the Llama layout that :class:`~duplex.engine.fast_decode.FastDecoder` runs:
RMS norms scale by ``1 + weight`` in fp32, q and k are RMS-normed per head, attention and MLP
outputs are normed before their residual adds (four norms a layer), the MLP is GELU (tanh), five
layers in six attend over a 512-token sliding window with their own RoPE base, and the embedding is
scaled. Through transformers' generic forward a one-token step of Gemma 3 270M took ~66 ms on the
2-core EPYC, ~55 of them per-call machinery (masks for two attention types, hooks, module calls):
its int8 weights read in ~4 ms and its 262k-row output layer in ~10.

Here a pass is the same modules' arithmetic written out: q/k/v and gate/up as one int8 mat-mul
each over weights concatenated at load (the modules keep views), q and k normed together, the
rotary cos/sin from tables that the model's own rotary module filled, each row's cache written by
its layer's ``update`` (a sliding-window layer keeps transformers' own), and attention by
:func:`~duplex.engine.attention.gqa_decode_attention` (its C kernel, or a masked torch path where
a query's window ends inside the keys). Rows of several sequences share every weight read, so the
scheduler batches translation sessions as it batches chat sessions.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from duplex.engine.attention import gqa_decode_attention
from duplex.engine.int8_kernel import fused_ops
from duplex.engine.lean_rows import (
    DecodeRow,
    FusedProjection,
    LayerProjections,
    LeanForward,
    layout_rows,
    rope_table,
    split_logits,
)
from duplex.engine.kv import GrowableLayer
from duplex.engine.quant import Int8WeightOnlyLinear

__all__ = ["GemmaDecoder", "gemma_supported"]

_MODEL_TYPES = ("gemma3_text",)
_CACHE_LAYERS = (GrowableLayer, DynamicLayer, DynamicSlidingWindowLayer)


def gemma_supported(model: nn.Module) -> str | None:
    """None if :class:`GemmaDecoder` reproduces ``model``'s forward; else why not."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _MODEL_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r}"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention"
    if getattr(cfg, "hidden_activation", None) != "gelu_pytorch_tanh":
        return f"activation {getattr(cfg, 'hidden_activation', None)!r}"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "rotary_emb", "norm", "layers")):
        return "unexpected module layout"
    if not hasattr(model, "lm_head"):
        return "no output layer"
    for table in getattr(cfg, "rope_parameters", {}).values():
        if table and table.get("rope_type", "default") != "default":
            return f"rope type {table.get('rope_type')!r}"  # scaled types change with the input
    names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(
                hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")):
            return "unexpected attention layout"
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            return "unexpected MLP layout"
        if not all(type(getattr(layer, n, None)).__name__ == "Gemma3RMSNorm" for n in names):
            return "unexpected norms"
    return None


class _Norm:
    """transformers' ``Gemma3RMSNorm``, op for op: fp32 inside, ``1 + weight`` computed once."""

    def __init__(self, norm: nn.Module) -> None:
        self.scale = 1.0 + norm.weight.detach().float()
        self.eps = float(norm.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d]; with a [heads, d] scale (q and k heads together), x's rows cycle through them."""
        h = x.float()
        if self.scale.dim() == 2:
            h = h.view(-1, *self.scale.shape)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.scale).to(x.dtype).view(x.shape)


class _Layer(LayerProjections):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        attn = layer.self_attn
        self.window = int(attn.sliding_window) if getattr(attn, "sliding_window", None) else None
        self.rope_type = str(attn.layer_type)
        self.act = layer.mlp.act_fn
        self.norm_in = _Norm(layer.input_layernorm)
        self.norm_attn = _Norm(layer.post_attention_layernorm)
        self.norm_pre_mlp = _Norm(layer.pre_feedforward_layernorm)
        self.norm_post_mlp = _Norm(layer.post_feedforward_layernorm)
        # q and k heads normed in one pass: each head's row scaled by its own norm's 1 + weight
        q_norm, k_norm = _Norm(attn.q_norm), _Norm(attn.k_norm)
        if q_norm.eps != k_norm.eps:
            raise TypeError("q and k norms with different eps")
        self.qk_norm = q_norm
        self.qk_norm.scale = torch.cat([q_norm.scale.expand(self.n_heads, -1), k_norm.scale.expand(self.n_kv, -1)])


class GemmaDecoder(LeanForward):
    """The lean forward of one loaded Gemma 3 text model (see the module docstring); the same
    ``forward(rows)`` as :class:`~duplex.engine.fast_decode.FastDecoder`."""

    dense = False  # no dequantized weights: every pass runs the int8 mat-muls
    fused = None
    # tokens per pass the scheduler hands it (more: the generic forward). Its passes run the same
    # int8 mat-muls as the generic forward at any length, so prefill pieces take it too
    max_query = 64
    direct_max_query = 64  # the same for a sequence's own calls (SharedSequence.forward_direct)

    def __init__(self, model: nn.Module) -> None:
        why = gemma_supported(model)
        if why is not None:
            raise TypeError(why)
        self.model = model
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.final_norm = _Norm(inner.norm)
        self.head = model.lm_head
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.layers = [_Layer(layer) for layer in inner.layers]
        self._ops = fused_ops() if self.embed.weight.dtype == torch.bfloat16 else None  # C rope, bf16 only
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tables_lock = threading.Lock()

    @staticmethod
    def accepts(cache: Any) -> bool:
        """True if the forward takes ``cache``: transformers' own layers or growable ones, the
        sliding ones not recording their past (their ``update`` must return the visible keys)."""
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer) in _CACHE_LAYERS and not getattr(layer, "record_past", False)
                                    for layer in layers)

    def _rope(self, x: torch.Tensor, rope_type: str, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ([t, head_dim], x's dtype) of ``rope_type`` at ``positions``, from a table the
        rotary module computed in blocks (so every position's values are the bits that module gives
        it in a forward; tested)."""
        top = max(positions) + 1
        table = self._tables.get(rope_type)
        if table is None or top > table[0].shape[0] or table[0].dtype != x.dtype:
            with self._tables_lock:
                table = self._tables.get(rope_type)
                if table is None or top > table[0].shape[0] or table[0].dtype != x.dtype:
                    keep = table if table is not None and table[0].dtype == x.dtype else None
                    table = self._tables[rope_type] = rope_table(self.rotary, x, top, keep, rope_type)
        index = torch.tensor(positions, dtype=torch.long, device=x.device)
        return table[0].index_select(0, index), table[1].index_select(0, index)

    def _forward(self, rows: Sequence[DecodeRow]) -> list[torch.Tensor | None]:
        device = self.embed.weight.device
        ids, positions, bounds = layout_rows(rows)
        t = len(ids)
        x = self.embed(torch.tensor(ids, dtype=torch.long, device=device))  # [t, hidden], scaled
        ropes = {kind: self._rope(x, kind, positions) for kind in {layer.rope_type for layer in self.layers}}
        single = len(rows) == 1
        ops = self._ops if x.dtype == torch.bfloat16 and device.type == "cpu" else None
        if ops is not None:  # the C mat-vecs without the modules' per-call casts (same kernel)
            def mm(h: torch.Tensor, proj: Any) -> torch.Tensor:
                if isinstance(proj, FusedProjection):
                    return ops.gemv(h, proj.weight, proj.scales) if proj.int8 and proj.bias is None else proj(h)
                if isinstance(proj, Int8WeightOnlyLinear) and proj.bias is None:
                    return ops.gemv(h, proj.weight_int8, proj.scales)
                return proj(h)

            def norm(n: _Norm, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
                # one C call (~5 us) for the module's eight torch ops (~65 us); ulp-rare differences
                # in the mean's summation order
                return ops.gemma_norm(h, n.scale, n.eps, out=residual, residual=residual)
        else:
            def mm(h: torch.Tensor, proj: Any) -> torch.Tensor:
                return proj(h)

            def norm(n: _Norm, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
                return n(h) if residual is None else residual + n(h)
        for layer in self.layers:
            d, nh, nkv = layer.head_dim, layer.n_heads, layer.n_kv
            qkv = mm(norm(layer.norm_in, x), layer.qkv)  # [t, (nh + 2 nkv) d]
            qk = norm(layer.qk_norm, qkv[:, :(nh + nkv) * d].reshape(t * (nh + nkv), d)).view(t, (nh + nkv) * d)
            cos, sin = ropes[layer.rope_type]
            if ops is not None:
                ops.rope(qk, nh + nkv, d, cos, sin)  # in place, q and k heads in one pass
            else:
                h = qk.view(t, nh + nkv, d)
                half = d // 2
                rotated = torch.cat((-h[..., half:], h[..., :half]), dim=-1)
                qk = ((h * cos.unsqueeze(1)) + (rotated * sin.unsqueeze(1))).view(t, (nh + nkv) * d)
            q = qk[:, :nh * d].view(1, t, nh, d).transpose(1, 2)
            k = qk[:, nh * d:].view(1, t, nkv, d).transpose(1, 2)
            v = qkv[:, (nh + nkv) * d:].view(1, t, nkv, d).transpose(1, 2)
            outs = []
            for row, (s, e) in zip(rows, bounds):
                ks, vs, qs = (k, v, q) if single else (k[:, :, s:e], v[:, :, s:e], q[:, :, s:e])
                keys, values = row.cache.update(ks, vs, layer.index)
                out, _ = gqa_decode_attention(layer.attn, qs, keys, values, None, scaling=layer.scaling,
                                              window=layer.window)
                outs.append(out)
            attn = (outs[0] if single else torch.cat(outs, dim=1)).reshape(t, nh * d)
            x = norm(layer.norm_attn, mm(attn, layer.o), residual=x)
            gate_up = mm(norm(layer.norm_pre_mlp, x), layer.gate_up)
            n_gate = layer.gate_up.sizes[0]
            x = norm(layer.norm_post_mlp, mm(layer.act(gate_up[:, :n_gate]) * gate_up[:, n_gate:], layer.down), residual=x)
        wanted = [i for row, (_, e) in zip(rows, bounds) for i in range(e - row.keep, e)]
        if not wanted:
            return [None] * len(rows)
        h = norm(self.final_norm, x[wanted] if len(wanted) < t else x)
        logits = mm(h, self.head)  # [len(wanted), vocab]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return split_logits(rows, logits)
