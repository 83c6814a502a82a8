"""A grouped-query attention kernel for short query blocks over a long cache (decode steps).

PyTorch's CPU flash-attention kernel is tuned for long query blocks; for 1-16 new tokens against
thousands of cached ones it is slower than two plain matmuls, and eager attention first copies K/V
once per query head (``repeat_kv``). Here each KV head is read once for its whole query group.
Valid for one unpadded sequence per batch row (our case: one session per cache) and for models
without sliding-window layers; the engine only selects it then. Where the CPU has AVX512_BF16 and
the head dim is a multiple of 64, the kernel runs its AVX-512 code (bf16 dot products for the
scores, keys split across threads, a whole prefill row per pass over the cache), with AMX tile
products for blocks of many query rows where the CPU has AMX; elsewhere AVX2.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["GQA_DECODE", "attention_isa", "decode_kernel", "decode_rows_kernel", "gqa_decode_attention",
           "max_query_rows", "register", "set_attention_isa"]

GQA_DECODE = "duplex_gqa_decode"

log = logging.getLogger(__name__)


def gqa_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [b, h, q, d]; key/value [b, kvh, n, d] (the q new positions are the last q of n).
    Returns [b, q, h, d] like transformers' other attention functions. ``window``: a sliding-window
    layer's size (Gemma 3): a query sees itself and the ``window - 1`` positions before it, as
    transformers' sliding-window mask has it (keys before that are masked out)."""
    b, h, q, d = query.shape
    kvh, n = key.shape[1], key.shape[2]
    g = h // kvh
    scale = scaling if scaling is not None else d ** -0.5
    out_dtype = query.dtype
    windowed = window is not None and n > window  # the last query's window starts inside the keys
    if b == 1 and out_dtype == torch.bfloat16 and query.device.type == "cpu" and not windowed:
        kernel = _cpu_decode_kernel()
        if kernel is not None:
            out = kernel(query, key, value, scale)
            if out is not None:
                return out, None
    if query.device.type == "cpu" and out_dtype != torch.float32:
        # CPUs without native bf16 run bf16 batched mat-muls through a slow path (at 4k context
        # 1.3 + 2.2 ms per layer against 0.5 + 0.35 ms in fp32 including the upcast), and fp32
        # scores are also what SDPA accumulates in
        query, key, value = query.float(), key.float(), value.float()
    qg = query.reshape(b, kvh, g * q, d)  # head index = kv_head * g + j, as repeat_kv lays it out
    scores = torch.matmul(qg, key.transpose(-1, -2)) * scale  # [b, kvh, g*q, n]
    if q > 1 or windowed:
        i = torch.arange(q, device=query.device).unsqueeze(1)
        j = torch.arange(n, device=query.device).unsqueeze(0)
        hidden = j > (n - q + i)  # [q, n]: keys after each query's own position
        if windowed:
            hidden |= j < (n - q + i) - window + 1  # and keys that left its window
        scores = scores.masked_fill(hidden.repeat(g, 1), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, kvh, g*q, d]
    return out.reshape(b, h, q, d).transpose(1, 2).to(out_dtype).contiguous(), None


Kernel = Callable[..., "torch.Tensor | None"]

_MAX_SPLIT_TOKENS = 16  # longer blocks are prefill chunks, for the torch path...
# ...except on the AVX2 code, which reads the cache once per query row and beats the torch path
# (fp32 copies of the cache, two mat-muls) at every size measured on an AVX2-only EPYC: 16-128
# queries over 100-4000 keys 1.6-3.7x, 256-512 over 512-4000 2.7-4.8x; and SDPA with a mask
# (what ragged rows took above 16 queries) 1.1-2.1x, at 1 and 2 threads
_AVX2_ISA = 0


def _query_limit(kernel: Any) -> int:
    """The most query tokens one call of ``kernel`` takes on the code it now runs (see above)."""
    return 1 << 30 if kernel.isa() == _AVX2_ISA else _MAX_SPLIT_TOKENS


def max_query_rows() -> int:
    """The most query tokens one C-kernel call takes now (0 without the kernel): what the
    passes that call it (ragged rows, the lean forward's big ticks) may hand it."""
    kernel = _cpu_decode_kernel()
    return 0 if kernel is None else _query_limit(kernel)


@functools.lru_cache(maxsize=1)
def _cpu_decode_kernel() -> Kernel | None:
    """The C kernel of ``decode_attention.c`` for a few bf16 query tokens over a bf16 cache, reading
    the cache in place (no fp32 copies): one call per layer instead of ~12 torch ops, 3-7x faster
    than the torch mat-muls at 4k context and ~50 us less per layer at a short one. It sums in
    another order than the torch path (fp32 inside both), so greedy decoding can flip a near-tie
    the torch path keeps, as the default int8 mat-vec of duplex.engine.int8_kernel can: on by
    default since that one is; ``DUPLEX_DECODE_ATTN_KERNEL=torch`` turns it off. None where it is
    off or cannot be built (no C compiler, no AVX2)."""
    import ctypes
    import os
    import subprocess

    from duplex.engine.int8_kernel import build_c_kernel, isa_cap_from_env

    source = Path(__file__).with_name("decode_attention.c")
    if os.environ.get("DUPLEX_DECODE_ATTN_KERNEL", "c") == "torch" or not source.exists() \
            or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        lib = ctypes.CDLL(str(build_c_kernel(source, ("-ffast-math",))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.info("decode attention kernel unavailable (%s); using torch mat-muls", exc)
        return None
    fn = lib.duplex_gqa_decode_bf16
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.c_int64, ctypes.c_float]
    fn.restype = ctypes.c_int
    rows_fn = lib.duplex_gqa_decode_rows_bf16
    rows_fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] \
        + [ctypes.c_int] * 3 + [ctypes.c_float]
    rows_fn.restype = ctypes.c_int

    def kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
               out: torch.Tensor | None = None) -> torch.Tensor | None:
        """query [1, h, t, d]; key/value [1, kvh, n, d] views with unit stride rows; -> [1, t, h, d]
        (into ``out``, a contiguous bf16 tensor of that size, if given)."""
        _, h, t, d = query.shape
        kvh, n = key.shape[1], key.shape[2]
        if t > _MAX_SPLIT_TOKENS and t > _query_limit(kernel):
            return None  # a long block (chunked prefill): torch mat-muls amortise the cache reads
        if key.dtype != torch.bfloat16 or value.dtype != torch.bfloat16 or key.stride()[2:] != (d, 1) \
                or value.stride() != key.stride():
            return None
        if out is None:
            out = torch.empty(1, t, h, d, dtype=torch.bfloat16)
        q = query.contiguous()
        if fn(q.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), h, kvh, t, n, d, key.stride(1), scale):
            return None
        return out

    kernel.rows = rows_fn  # type: ignore[attr-defined]
    lib.duplex_attn_set_isa.argtypes = [ctypes.c_int]
    lib.duplex_attn_set_isa.restype = ctypes.c_int
    kernel.set_isa = lib.duplex_attn_set_isa  # type: ignore[attr-defined]
    lib.duplex_attn_isa.restype = ctypes.c_int
    kernel.isa = lib.duplex_attn_isa  # type: ignore[attr-defined]
    kernel.set_isa(isa_cap_from_env("DUPLEX_ATTN_AVX512", "DUPLEX_ATTN_AMX"))
    return kernel


_ISA_NAMES = {0: "avx2", 1: "avx512-bf16", 2: "amx-bf16"}
_ISA_LEVELS = {name: level for level, name in _ISA_NAMES.items()}


def attention_isa() -> str | None:
    """``amx-bf16``, ``avx512-bf16`` or ``avx2``: the code the C kernel runs for head dims that are
    multiples of 64 (see :func:`set_attention_isa`); None without the kernel. ``amx-bf16`` is the
    AVX-512 code with AMX tile products for blocks of 6 or more query rows (turn hand-overs, prefill
    pieces); single decode steps stay on the zmm code, where they read the cache at memory speed."""
    kernel = _cpu_decode_kernel()
    if kernel is None:
        return None
    return _ISA_NAMES[kernel.isa()]  # type: ignore[attr-defined]


def set_attention_isa(isa: str) -> str | None:
    """Cap the code the C kernel runs for head dims that are multiples of 64 at ``isa``
    (``amx-bf16``, ``avx512-bf16`` or ``avx2``; the best the CPU and OS allow is the default, and
    ``DUPLEX_ATTN_AVX512=0`` / ``DUPLEX_ATTN_AMX=0`` lower it); returns the one now in use, None
    without the kernel. For A/B runs and tests."""
    kernel = _cpu_decode_kernel()
    if kernel is None:
        return None
    if isa not in _ISA_LEVELS:
        raise ValueError(f"attention isa must be one of {sorted(_ISA_LEVELS)}, not {isa!r}")
    return _ISA_NAMES[kernel.set_isa(_ISA_LEVELS[isa])]  # type: ignore[attr-defined]


def decode_kernel() -> Kernel | None:
    """The C decode-attention kernel (see :func:`_cpu_decode_kernel`): ``f(query, key, value,
    scale, out=None)`` -> [1, t, h, d] bf16, or None for shapes it does not take; None if off."""
    return _cpu_decode_kernel()


def decode_rows_kernel() -> Any:
    """The C kernel's batched form (``duplex_gqa_decode_rows_bf16`` in ``decode_attention.c``):
    one call writes every row's new keys/values into its cache and attends, per row exactly as
    :func:`decode_kernel` after the cache's ``update``. A ctypes function ``f(desc, rows, qkv,
    qkv_stride, out, heads, kv_heads, head_dim, scale)`` -> 0 on success; None where the kernel is off."""
    kernel = _cpu_decode_kernel()
    return None if kernel is None else getattr(kernel, "rows", None)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # the kernel builds its own causal mask


def register() -> str:
    """Register the kernel (idempotent) and return its attention-implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(GQA_DECODE, gqa_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_DECODE, _no_mask)
    return GQA_DECODE
