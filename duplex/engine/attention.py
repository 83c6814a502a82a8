"""A grouped-query attention kernel for short query blocks over a long cache (decode steps).

PyTorch's CPU flash-attention kernel is tuned for long query blocks; for 1-16 new tokens against
thousands of cached ones it is slower than two plain matmuls, and eager attention first copies K/V
once per query head (``repeat_kv``). Here each KV head is read once for its whole query group.
Valid for one unpadded sequence per batch row (our case: one session per cache) and for models
without sliding-window layers; the engine only selects it then.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GQA_DECODE", "gqa_decode_attention", "register"]

GQA_DECODE = "duplex_gqa_decode"


def gqa_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [b, h, q, d]; key/value [b, kvh, n, d] (the q new positions are the last q of n).
    Returns [b, q, h, d] like transformers' other attention functions."""
    b, h, q, d = query.shape
    kvh, n = key.shape[1], key.shape[2]
    g = h // kvh
    scale = scaling if scaling is not None else d ** -0.5
    out_dtype = query.dtype
    if query.device.type == "cpu" and out_dtype != torch.float32:
        # CPUs without native bf16 run bf16 batched mat-muls through a slow path (at 4k context
        # 1.3 + 2.2 ms per layer against 0.5 + 0.35 ms in fp32 including the upcast), and fp32
        # scores are also what SDPA accumulates in
        query, key, value = query.float(), key.float(), value.float()
    qg = query.reshape(b, kvh, g * q, d)  # head index = kv_head * g + j, as repeat_kv lays it out
    scores = torch.matmul(qg, key.transpose(-1, -2)) * scale  # [b, kvh, g*q, n]
    if q > 1:
        i = torch.arange(q, device=query.device).unsqueeze(1)
        j = torch.arange(n, device=query.device).unsqueeze(0)
        future = j > (n - q + i)  # [q, n]: keys after each query's own position
        scores = scores.masked_fill(future.repeat(g, 1), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, kvh, g*q, d]
    return out.reshape(b, h, q, d).transpose(1, 2).to(out_dtype).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # the kernel builds its own causal mask


def register() -> str:
    """Register the kernel (idempotent) and return its attention-implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(GQA_DECODE, gqa_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_DECODE, _no_mask)
    return GQA_DECODE
