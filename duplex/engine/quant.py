"""Int8 weight-only quantization for CPU decode (per-output-channel scales, gpt-fast style).

Decode is memory-bound: each token reads every weight once. Int8 weights halve the bytes of bf16.
Activations stay in the model dtype. Embedding lookups stay unquantized (one row per token).
Decode steps (up to 16 rows, bf16 activations, CPU) run the C mat-vec of
:mod:`duplex.engine.int8_kernel`, which rounds each activation row to int16 with one scale
(exact integer sums; the error is below the bf16 rounding the inputs already carry) and streams
the weights at memory speed (the engine's lean forward, :mod:`duplex.engine.fast_decode`, calls
the same kernels fused with their norms for ticks of up to ~96 tokens); longer inputs (prefill, ticks that batch many sessions) are compute-bound, not memory-bound:
where the CPU multiplies bf16 matrices fast (AMX or AVX512-BF16 through oneDNN) they run on a
dequantized bf16 copy of the weights (:func:`add_dense_weights`, chosen by a probe at load: 4-8x
PyTorch's ``_weight_int8pack_mm`` at 64-256 rows on an AMX Xeon), elsewhere on
``_weight_int8pack_mm``. Weights are rounded to [-127, 127] (symmetric; the C kernel relies on it).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duplex.cpu import time_interleaved

__all__ = ["DENSE_MIN_ROWS", "Int8WeightOnlyLinear", "add_dense_weights", "decode_bytes_per_token",
           "dense_matmul_pays", "int8_matmul", "quantize_int8", "torch_int8_mm"]

log = logging.getLogger(__name__)

# the exact C mat-vec (PyTorch's arithmetic) takes at most this many activation rows; PyTorch's own
# kernel, the same bits, takes more. The q16/q8 tiles take any number, 16 rows per sweep of the
# weights: on an AVX2-only EPYC at one thread they ran 29-33 GMAC/s from 16 to 512 rows against
# 14-16 for _weight_int8pack_mm (1536 x 576 weights), so many-row passes without a dense copy
# (prefill, eight questions at once) take them too
_GEMV_MAX_ROWS = 16
# from this many activation rows a dense copy of the weights (where present) beats the int8 kernels:
# over the default model's linears on an AMX Xeon, 8 rows cost the same either way (~17-19 ms),
# 16 rows 19 ms dense against 32 ms for the C mat-vec, 64 rows 36 ms against 159 ms int8pack
DENSE_MIN_ROWS = 12


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (w_int8 * scale).T + b, computed by a fused kernel without dequantizing w."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # the dequantized weights for many-row inputs, where add_dense_weights judged them faster
        self.register_buffer("weight_dense", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.weight_int8, self.scales.to(x.dtype), self.weight_dense)
        return y if self.bias is None else y + self.bias


def int8_matmul(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor,
                dense: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ (weight_int8 [N, K] * scales [N]).T`` in ``x``'s dtype. A few tokens (decode
    steps, batched or not) and, where there is no ``dense``, any number of rows take the faster
    kernel of duplex.engine.int8_kernel (activations rounded to int16 per row;
    ``DUPLEX_INT8_KERNEL=exact`` for PyTorch's arithmetic, whose own kernel then takes more than
    ``_GEMV_MAX_ROWS`` rows); from :data:`DENSE_MIN_ROWS` rows, ``dense`` (those weights
    dequantized), where given.
    ``weight_int8`` must lie in [-127, 127] (what :class:`Int8WeightOnlyLinear` stores)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if dense is not None and rows.shape[0] >= DENSE_MIN_ROWS and dense.dtype == x.dtype:
        return F.linear(x, dense)
    gemv = _cpu_gemv(rows.shape[0]) if x.dtype == torch.bfloat16 and x.device.type == "cpu" else None
    y = gemv(rows, weight_int8, scales) if gemv else torch_int8_mm(rows, weight_int8, scales)
    return y.reshape(*shape[:-1], weight_int8.shape[0])


def torch_int8_mm(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused ``_weight_int8pack_mm`` where it is safe: its AVX-512 CPU kernel reads past
    the weights when N is not a multiple of 16 (a segfault at 16 rows x N 13 on a Xeon), so other
    shapes take the dequantized product instead (same result up to the summation order)."""
    if weight_int8.shape[0] % 16 == 0 or x.device.type != "cpu":
        return torch._weight_int8pack_mm(x, weight_int8, scales)
    return x @ (weight_int8.to(x.dtype) * scales.to(x.dtype)[:, None]).T


def _cpu_gemv(rows: int) -> Any:
    from duplex.engine.int8_kernel import Q_TOLERANCE, int8_gemv, kernel_choice

    if rows > _GEMV_MAX_ROWS and kernel_choice() not in Q_TOLERANCE:
        return None
    return int8_gemv()


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear (the LM head included) in place; returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8WeightOnlyLinear(child))
    return model


def add_dense_weights(model: nn.Module) -> int:
    """Give every :class:`Int8WeightOnlyLinear` of ``model`` its weights dequantized (int8 x scale,
    in the scales' dtype), which :func:`int8_matmul` uses for many-row inputs; returns the bytes
    added. Prefill is compute-bound: a matrix engine (AMX, AVX512-BF16) multiplies bf16 several
    times faster than the int8 kernels, and decode steps still stream the int8 weights."""
    added = 0
    for module in model.modules():
        if isinstance(module, Int8WeightOnlyLinear) and module.weight_dense is None:
            dtype = module.scales.dtype
            module.weight_dense = (module.weight_int8.to(dtype) * module.scales[:, None]).contiguous()
            added += module.weight_dense.numel() * module.weight_dense.element_size()
    return added


@functools.cache
def dense_matmul_pays(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether, on this CPU, a 64-row product with dense ``dtype`` weights is at least 1.5x
    faster than the int8 kernel prefill would take (a probe of a few ms at one thread;
    ``DUPLEX_DENSE_PREFILL`` = 1 or 0 overrides). Without a matrix engine bf16 products are
    emulated and slower."""
    forced = os.environ.get("DUPLEX_DENSE_PREFILL", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (1536, 576), dtype=torch.int8, generator=gen)
    scales = (torch.rand(1536, generator=gen) / 50).to(dtype)
    dense = w.to(dtype) * scales[:, None]
    x = torch.randn(64, 576, generator=gen).to(dtype)

    with torch.inference_mode():
        # one thread, every round timing both (see time_interleaved): the decode-format probe,
        # timed one after another at the stage's threads, picked wrongly under a busy neighbour
        times = time_interleaved({"int8": lambda: int8_matmul(x, w, scales), "dense": lambda: F.linear(x, dense)},
                                 rounds=6)
    int8_s, dense_s = times["int8"], times["dense"]
    pays = dense_s * 1.5 <= int8_s
    log.info("64-row product: dense %s %.2f ms, int8 %.2f ms: dense prefill %s", dtype, dense_s * 1e3,
             int8_s * 1e3, "on" if pays else "off")
    return pays


def decode_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear (LM head included) and norm, but only
    one row of the embedding table (so an untied/quantized head is not double counted)."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            seen.add(module.weight.data_ptr())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        seen.discard(head.weight.data_ptr())  # tied head: the table is read in full as the head
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + [
            b for name, b in module.named_buffers(recurse=False) if name != "weight_dense"]  # prefill's copy
        for t in tensors:
            if t.data_ptr() in seen or not t.is_floating_point() and t.dtype != torch.int8:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
