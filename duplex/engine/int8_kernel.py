"""A faster int8 weight-only mat-vec for single-token CPU decode, bit-identical to PyTorch's.

``torch._weight_int8pack_mm`` on AVX2 CPUs applies one activation row to 4 weight rows at a time
and converts the activation from bf16 once per 4 rows. ``int8_gemv.c`` keeps the exact per-output
arithmetic (same fma order, same reduction tree, same bf16 rounding) but converts the activation
once and runs 8 independent weight rows per pass: 1.2-1.7x faster per core on one-token decode
mat-vecs here. It is compiled with the system C compiler at first use into the duplex cache and
checked against PyTorch's kernel before use; anything missing or different (no compiler, an
AVX-512 build of PyTorch whose kernel sums in another order) leaves PyTorch's kernel in place.
``DUPLEX_INT8_KERNEL=aten`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["build_c_kernel", "int8_gemv"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int8_gemv.c")
Gemv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build_c_kernel(source: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` (AVX2, OpenMP) once into the duplex cache, keyed by its hash and flags;
    return the shared library's path. Raises OSError, RuntimeError or SubprocessError."""
    from duplex.engine.models import cache_dir

    digest = hashlib.sha256(source.read_bytes() + repr(extra_flags).encode()).hexdigest()[:12]
    target = cache_dir() / "kernels" / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", *extra_flags, "-o", tmp,
                        str(source), "-lm"],
                       check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent first uses never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _agrees_with_torch(gemv: Gemv) -> bool:
    gen = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 40, 64), (1, 13, 24), (1, 1536, 576), (3, 40, 64), (5, 1536, 576)):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        scales = (torch.rand(n, generator=gen) / 64).to(torch.bfloat16)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        if not torch.equal(gemv(x, w, scales), torch._weight_int8pack_mm(x, w, scales)):
            return False
    return True


@functools.lru_cache(maxsize=1)
def int8_gemv() -> Gemv | None:
    """``f(x [M, K] bf16, w [N, K] int8, scales [N] bf16) -> [M, N] bf16``, equal bit for bit to
    ``torch._weight_int8pack_mm``; None where it cannot be built or does not match."""
    if os.environ.get("DUPLEX_INT8_KERNEL", "auto") == "aten":
        return None
    # the C kernel reproduces the summation order of PyTorch's AVX2 kernel only
    if torch.backends.cpu.get_cpu_capability() != "AVX2" or not _SOURCE.exists():
        return None
    try:
        lib = ctypes.CDLL(str(build_c_kernel(_SOURCE)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.info("int8 mat-vec kernel unavailable (%s); using torch._weight_int8pack_mm", exc)
        return None
    fn = lib.duplex_int8_gemv_bf16
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    fn.restype = ctypes.c_int

    def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        m = x.shape[0]
        out = torch.empty(m, n, dtype=torch.bfloat16)
        x = x.contiguous()
        if fn(x.data_ptr(), w.data_ptr(), scales.data_ptr(), out.data_ptr(), m, n, k) != 0:
            return torch._weight_int8pack_mm(x, w, scales)
        return out

    if not _agrees_with_torch(gemv):
        log.warning("int8 mat-vec kernel differs from torch._weight_int8pack_mm here; not using it")
        return None
    return gemv
