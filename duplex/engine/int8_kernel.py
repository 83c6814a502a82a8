"""Int8 weight-only mat-vecs for CPU decode steps (1-16 activation rows), in C.

Decode reads every weight once per token, so a mat-vec should run at DRAM speed. PyTorch's
``torch._weight_int8pack_mm`` does not on AVX2: per 8 weights it widens, converts, scales and
fmas, ~11 GB/s of weights on this 2-core machine against ~25 GB/s for an fp32 sum. The kernels of
``int8_gemv.c`` are compiled with the system C compiler at first use into the duplex cache:

- ``q16`` (the default): each activation row is quantized once per call to int16 with one scale
  per row (round to nearest: each value off by at most max|row| / 65534, and since max|row| <=
  sqrt(K) * rms(row) that is below the bf16 rounding the inputs already carry); dot products are
  exact integer arithmetic (weights sign-extended once, ``vpmaddwd``, int32 accumulators over the
  whole row), converted to float once per output and scaled by the row's and the weight row's
  scales. Tiles of 2 weight rows x 4 activation rows share every load, so extra decode rows cost
  little: over the 135M model's linears (1 thread) 8 rows take ~2x one row instead of ~2.6x, 16
  rows ~4.3x instead of ~5.3x (one row is bound by the weight stream). Its results differ from
  PyTorch's by summation order and the activation rounding: the relative error against an fp32
  reference is PyTorch's own (~0.2 %, the bf16 output rounding), and a row's result does not
  depend on the other rows of the batch.
  Where the CPU has AVX512BW and AVX512-VNNI (Ice Lake and later Xeons, Zen 4) the same tiles run
  on zmm registers with ``vpdpwssd`` (32 int16 products and their sum per instruction, tiles of
  4 x 4): the extra rows of a batched tick cost less (``bench decode``'s batched forward at 1
  thread on the Xeon: 8 rows 2.37x one row, 3.05x on the AVX2 tiles in the same run, alternating
  per repetition: ``bench/results/xeon/decode.json``). The sums are exact integers on both paths,
  so the bits are the same; ``DUPLEX_INT8_AVX512=0`` keeps the AVX2 tiles.
- ``q8`` (``DUPLEX_INT8_KERNEL=q8``): llama.cpp's Q8_0 scheme, activations rounded to int8 per
  block of 32 and ``vpmaddubsw`` with the sign trick. Not faster than ``q16`` here (both stream
  at memory speed; at 4-16 rows q16 is 5-10 % faster) and 3x the error (~0.5 % per output on
  random data), enough to flip a greedy token of the 135M model after 7-30 tokens: kept for
  comparison.
- ``exact`` (``DUPLEX_INT8_KERNEL=exact``): PyTorch's AVX2 arithmetic in a better schedule,
  equal bit for bit (checked at load), ~14 GB/s; to reproduce the generic forward exactly.

Each kernel is checked at load (:func:`_within_tolerance`: the relative error of each output row
against an fp32 reference at most :data:`Q_TOLERANCE`; ``exact``: equality) and PyTorch's kernel
stays in place if it fails. Weights must lie in [-127, 127], as
:func:`duplex.engine.quant.quantize_int8` makes them (the q8 sign trick overflows on -128).
``DUPLEX_INT8_KERNEL=aten`` turns them off. A machine without a C compiler or AVX2 keeps
PyTorch's kernel.
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
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["KINDS", "Q_TOLERANCE", "FusedOps", "Step", "build_c_kernel", "fused_ops", "int8_gemv", "kernel_choice", "q16_isa",
           "relative_error", "set_q16_isa"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int8_gemv.c")
Gemv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build_c_kernel(source: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` (AVX2, OpenMP) once into the duplex cache, keyed by its hash, the headers
    beside it (``amx_tiles.h``, which the kernels share) and the flags; return the shared library's
    path. Raises OSError, RuntimeError or SubprocessError."""
    from duplex.engine.models import cache_dir

    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + repr(extra_flags).encode()).hexdigest()[:12]
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


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    """The compiled ``int8_gemv.c``, its q16 tiles on the ISA :func:`q16_isa` reports."""
    lib = ctypes.CDLL(str(build_c_kernel(_SOURCE)))
    lib.duplex_q16_set_isa.argtypes = [ctypes.c_int]
    lib.duplex_q16_set_isa.restype = ctypes.c_int
    lib.duplex_q16_isa.restype = ctypes.c_int
    lib.duplex_q16_set_isa(isa_cap_from_env("DUPLEX_INT8_AVX512", "DUPLEX_INT8_AMX"))
    return lib


def isa_cap_from_env(avx512_var: str, amx_var: str) -> int:
    """The cap a C kernel's ``*_set_isa`` takes from its two switches: 0 (AVX2) where ``avx512_var``
    is 0, 1 (AVX-512, no AMX) where ``amx_var`` is, else -1 (the best the CPU and OS allow)."""
    if os.environ.get(avx512_var, "1").strip() == "0":
        return 0
    return 1 if os.environ.get(amx_var, "1").strip() == "0" else -1


_Q16_ISA_NAMES = {0: "avx2", 1: "avx512-vnni", 2: "amx-int8"}


def q16_isa() -> str | None:
    """Which tiles the q16 kernel runs: ``amx-int8`` (the AVX-512 VNNI tiles, and AMX tiles for
    batches of 4+ rows, where the CPU and OS allow them), ``avx512-vnni`` (AVX512BW and VNNI) or
    ``avx2``; ``$DUPLEX_INT8_AMX=0`` / ``$DUPLEX_INT8_AVX512=0`` lower it. None without the
    compiled kernel. All give the same bits: the sums are exact integers on every path."""
    try:
        lib = _library()
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    return _Q16_ISA_NAMES[lib.duplex_q16_isa()]


def set_q16_isa(isa: str | None = None) -> str:
    """Cap the q16 tiles at ``isa`` (``amx-int8``, ``avx512-vnni`` or ``avx2``; None: the best the
    CPU has), for A/B runs and tests; returns :func:`q16_isa`'s name for the path now in use."""
    levels = {name: level for level, name in _Q16_ISA_NAMES.items()}
    if isa is not None and isa not in levels:
        raise ValueError(f"q16 isa must be one of {sorted(levels)}, not {isa!r}")
    return _Q16_ISA_NAMES[_library().duplex_q16_set_isa(-1 if isa is None else levels[isa])]


Q_TOLERANCE = {"q16": 0.005, "q8": 0.02}  # relative L2 error per output row vs an fp32 reference
KINDS = ("q16", "q8", "exact", "aten")


def _cases() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    cases = []
    for m, n, k in ((1, 40, 64), (1, 13, 24), (1, 1536, 576), (3, 40, 64), (5, 1536, 576), (16, 64, 200)):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        scales = (torch.rand(n, generator=gen) / 64).to(torch.bfloat16)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        cases.append((x, w, scales))
    return cases


def relative_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> float:
    """Largest relative L2 error of an output row of ``y`` against ``x @ (w * scales).T`` in fp32."""
    ref = x.float() @ (w.float() * scales.float()[:, None]).T
    return float(((y.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-30)).max())


def _within_tolerance(gemv: Gemv, tolerance: float) -> bool:
    return all(relative_error(gemv(x, w, s), x, w, s) <= tolerance for x, w, s in _cases())


def _agrees_with_torch(gemv: Gemv) -> bool:
    return all(torch.equal(gemv(x, w, s), torch._weight_int8pack_mm(x, w, s)) for x, w, s in _cases()
               if x.shape[1] % 8 == 0 and w.shape[0] % 16 == 0)


def kernel_choice() -> str:
    """One of :data:`KINDS`, from ``$DUPLEX_INT8_KERNEL`` (default ``q16``)."""
    choice = os.environ.get("DUPLEX_INT8_KERNEL", "q16").strip().lower() or "q16"
    if choice not in KINDS:
        log.warning("unknown DUPLEX_INT8_KERNEL=%r; using q16", choice)
        return "q16"
    return choice


@functools.lru_cache(maxsize=None)
def int8_gemv(kind: str | None = None) -> Gemv | None:
    """``f(x [M, K] bf16, w [N, K] int8, scales [N] bf16) -> [M, N] bf16`` for ``kind`` (default:
    :func:`kernel_choice`): ``q16``/``q8`` within :data:`Q_TOLERANCE` of the exact product,
    ``exact`` equal bit for bit to ``torch._weight_int8pack_mm``; None where it cannot be built or
    fails its check (PyTorch's kernel then runs)."""
    kind = kind or kernel_choice()
    if kind == "aten" or not _SOURCE.exists():
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    # the exact kernel reproduces the summation order of PyTorch's AVX2 kernel only
    if capability not in (("AVX2",) if kind == "exact" else ("AVX2", "AVX512")):
        return None
    try:
        lib = _library()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.info("int8 mat-vec kernel unavailable (%s); using torch._weight_int8pack_mm", exc)
        return None
    fn = getattr(lib, "duplex_int8_gemv_bf16" if kind == "exact" else f"duplex_int8_{kind}_gemv_bf16")
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    fn.restype = ctypes.c_int

    def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        m = x.shape[0]
        out = torch.empty(m, n, dtype=torch.bfloat16)
        x = x.contiguous()
        if fn(x.data_ptr(), w.data_ptr(), scales.data_ptr(), out.data_ptr(), m, n, k) != 0:
            from duplex.engine.quant import torch_int8_mm

            return torch_int8_mm(x, w, scales)
        return out

    if kind in Q_TOLERANCE and not _within_tolerance(gemv, Q_TOLERANCE[kind]):
        log.warning("int8 %s mat-vec kernel is off by more than %.1f %% here; not using it", kind,
                    Q_TOLERANCE[kind] * 100)
        return None
    if kind == "exact" and not _agrees_with_torch(gemv):
        log.warning("int8 mat-vec kernel differs from torch._weight_int8pack_mm here; not using it")
        return None
    return gemv


class Step(ctypes.Structure):
    """One mat-vec of :meth:`FusedOps.run` (``q16_step`` in int8_gemv.c): pointers to bf16 tensors
    (``w``: int8) that must stay alive and in place while it is used."""

    _fields_ = [("a", ctypes.c_void_p), ("lda", ctypes.c_int64), ("w", ctypes.c_void_p), ("s", ctypes.c_void_p),
                ("c", ctypes.c_void_p), ("r", ctypes.c_void_p), ("aux", ctypes.c_void_p), ("cos", ctypes.c_void_p),
                ("sin", ctypes.c_void_p), ("eps", ctypes.c_float), ("n", ctypes.c_int), ("k", ctypes.c_int),
                ("mode", ctypes.c_int), ("rope_heads", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("wp", ctypes.c_void_p)]


class FusedOps:
    """The decode-step helpers of ``int8_gemv.c`` around the q16 mat-vec (bf16 tensors, CPU).

    - :meth:`gemv`: ``(residual +) prologue(x) @ (w * scales).T``, where the prologue is nothing,
      an RMS norm (LlamaRMSNorm, with its bf16 roundings) or SwiGLU's ``silu(gate) * up`` over a
      fused gate/up output: one call instead of 5-10 small torch ops around each mat-vec.
    - :meth:`rope`: transformers' rotary embedding on bf16 q/k heads in place, bit for bit.
    - :meth:`step` / :meth:`run`: several such mat-vecs (and a rope) in one call and one thread
      team, each reading what the previous wrote: a decode layer's tail and the next layer's head.
    """

    PLAIN, RMSNORM, SWIGLU = 0, 1, 2

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._gemv = lib.duplex_int8_q16_gemv_fused
        self._gemv.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4 + [
            ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
        self._gemv.restype = ctypes.c_int
        self._rope = lib.duplex_rope_bf16
        self._rope.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2
        self._rope.restype = ctypes.c_int
        self._gemma_norm = lib.duplex_gemma_norm_bf16
        self._gemma_norm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
                                     ctypes.c_int64]
        self._gemma_norm.restype = ctypes.c_int
        self._steps = lib.duplex_int8_q16_steps
        self._steps.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self._steps.restype = ctypes.c_int
        self._packed_bytes = lib.duplex_q16_packed_bytes
        self._packed_bytes.argtypes = [ctypes.c_int, ctypes.c_int]
        self._packed_bytes.restype = ctypes.c_int64
        self._pack = lib.duplex_q16_pack
        self._pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        self._pack.restype = ctypes.c_int
        # id(weight) -> (weakref to it, its packed copy): made at a weight's first use, kept while it lives
        self._packs: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def packed(self, w: torch.Tensor) -> torch.Tensor | None:
        """``w`` [N, K] int8 in the layout of the AMX tiles (``duplex_q16_pack``), made once per
        weight and kept while the weight lives; None where those tiles are not in use (then the
        kernel reads ``w`` itself). Costs a second copy of the int8 weights."""
        nbytes = self._packed_bytes(w.shape[0], w.shape[1])
        if nbytes <= 0:
            return None
        hit = self._packs.get(id(w))
        if hit is not None and hit[0]() is w:
            return hit[1]
        out = torch.empty(nbytes, dtype=torch.int8)
        if self._pack(w.data_ptr(), w.shape[0], w.shape[1], out.data_ptr()) != 0:
            return None
        self._packs = {k: v for k, v in self._packs.items() if v[0]() is not None}
        self._packs[id(w)] = (weakref.ref(w), out)
        return out

    def step(self, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, mode: int = 0,
             aux: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
             rope: tuple[int, int, torch.Tensor, torch.Tensor] | None = None) -> Step:
        """A :class:`Step` computing what :meth:`gemv` would (then ``rope``: heads, head_dim, cos,
        sin as in :meth:`rope`) over the buffers given; ``x`` [M, lda], ``out`` [M, N] contiguous."""
        heads, head_dim, cos, sin = rope if rope is not None else (0, 0, None, None)
        ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
        return Step(x.data_ptr(), x.stride(0), w.data_ptr(), scales.data_ptr(), out.data_ptr(), ptr(residual),
                    ptr(aux), ptr(cos), ptr(sin), eps, w.shape[0], w.shape[1], mode, heads, head_dim,
                    ptr(self.packed(w)))

    @staticmethod
    def program(steps: list[Step]) -> Any:
        """A C array of steps for :meth:`run`."""
        return (Step * len(steps))(*steps)

    def run(self, program: Any, rows: int) -> None:
        """Run a :meth:`program` over ``rows`` activation rows."""
        if self._steps(ctypes.addressof(program), len(program), rows) != 0:
            raise MemoryError("int8 fused mat-vec steps failed")

    def gemv(self, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mode: int = 0,
             aux: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] (SWIGLU: [M, 2K]) bf16 with unit column stride; -> [M, N] bf16 (``out``, which
        may be ``residual`` itself)."""
        n, k = w.shape
        m = x.shape[0]
        if out is None:
            out = torch.empty(m, n, dtype=torch.bfloat16)
        packed = self.packed(w) if m > 1 else None
        rc = self._gemv(x.data_ptr(), x.stride(0), w.data_ptr(), scales.data_ptr(), out.data_ptr(), m, n, k, mode,
                        aux.data_ptr() if aux is not None else None, eps,
                        residual.data_ptr() if residual is not None else None,
                        packed.data_ptr() if packed is not None else None)
        if rc != 0:
            raise MemoryError("int8 fused mat-vec failed")
        return out

    def gemma_norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float, out: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
        """transformers' Gemma3RMSNorm over the last dim of x [rows, d] bf16 (unit column stride), with
        ``scale`` = 1 + weight in fp32: [d], or [h, d] for rows that cycle through h heads (q and k
        heads in one call). With ``residual`` [rows, d]: ``residual + norm(x)`` (bf16 add). ``out``
        may be x or residual; new storage if None."""
        rows, d = x.shape
        if out is None:
            out = torch.empty(rows, d, dtype=torch.bfloat16)
        scale_rows = 1 if scale.dim() == 1 else scale.shape[0]
        rc = self._gemma_norm(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), rows, d, scale.data_ptr(),
                              scale_rows, eps, residual.data_ptr() if residual is not None else None,
                              residual.stride(0) if residual is not None else 0)
        if rc != 0:
            raise ValueError(f"gemma_norm: bad shape {tuple(x.shape)}")
        return out

    def rope(self, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """In place on the first ``heads * head_dim`` columns of each row of x [t, width];
        cos/sin [t, head_dim] contiguous."""
        if self._rope(x.data_ptr(), x.shape[0], heads, head_dim, x.stride(0), cos.data_ptr(), sin.data_ptr()) != 0:
            raise ValueError(f"rope: unsupported head_dim {head_dim}")


@functools.lru_cache(maxsize=1)
def fused_ops() -> FusedOps | None:
    """The fused decode helpers where the q16 kernel is the one in use (None otherwise: no
    compiler, no AVX2, or ``$DUPLEX_INT8_KERNEL`` other than q16)."""
    if kernel_choice() != "q16" or int8_gemv("q16") is None:
        return None
    try:
        return FusedOps(_library())
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        log.info("fused decode helpers unavailable (%s)", exc)
        return None
