"""The q16 int8 mat-vec over 1-16 activation rows (a batched decode step) equals a float reference
within the tolerance of its load check, for every row-tile remainder and ragged K, and a row's
result does not depend on the rows batched with it."""

from __future__ import annotations

import pytest
import torch


def _case(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = (torch.rand(n, generator=gen) / 50 + 1e-3).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen)
    x[:, k // 3] *= 40  # an outlier channel: the one row scale must still leave the rest precise
    return x.to(torch.bfloat16), w, scales


@pytest.fixture(scope="module")
def ops():
    from duplex.engine.int8_kernel import fused_ops, int8_gemv

    if int8_gemv("q16") is None or fused_ops() is None:
        pytest.skip("no C compiler or no AVX2: the PyTorch kernel is used")
    return fused_ops()


@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 16, 19])
@pytest.mark.parametrize("n,k", [(7, 24), (33, 200), (64, 577), (130, 1536), (9, 4500)])
def test_q16_rows_match_the_float_product(ops, m, n, k):
    """Odd N leaves a one-row weight tile, K % 16 a zero-padded tail, K > 4096 a second int32
    chunk; 19 rows a second sweep over the weights."""
    from duplex.engine.int8_kernel import Q_TOLERANCE, relative_error

    x, w, scales = _case(m, n, k, seed=m * 1000 + k)
    y = ops.gemv(x, w, scales)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert relative_error(y, x, w, scales) <= Q_TOLERANCE["q16"]
    for i in (0, m - 1):  # each row alone (other tile shapes) gives the same bits
        assert torch.equal(ops.gemv(x[i:i + 1], w, scales), y[i:i + 1])


@pytest.mark.parametrize("m", [1, 4, 5, 8])
def test_q16_residual_and_prologues_keep_their_roundings(ops, m):
    """With a residual (in place) and with the SwiGLU prologue, the result is the plain mat-vec of
    the prologue's bf16 output, added to the residual in bf16."""
    import torch.nn.functional as F

    x, w, scales = _case(m, 40, 2 * 96, seed=m)
    residual = torch.randn(m, 40).to(torch.bfloat16)
    gate, up = x[:, :96], x[:, 96:]
    act = (F.silu(gate.float()).to(torch.bfloat16).float() * up.float()).to(torch.bfloat16)
    plain = ops.gemv(act, w[:, :96].contiguous(), scales)
    out = residual.clone()
    ops.gemv(x, w[:, :96].contiguous(), scales, ops.SWIGLU, residual=out, out=out)
    torch.testing.assert_close(out, (residual.float() + plain.float()).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 17, 40])
@pytest.mark.parametrize("n,k", [(7, 24), (33, 200), (130, 1536), (5, 8300), (96, 100), (64, 8300)])
def test_wide_tiles_give_the_avx2_bits(ops, m, n, k):
    """Where the CPU has AVX-512 VNNI the q16 kernel runs other tiles (4 x 4, 32 k per step, a
    zero-padded tail of K % 32, two int32 chunks past 4096), and where it has AMX, batches of 2+
    rows run on int8 tiles (each int16 activation split into 256 hi + lo, 32 weight rows a pass,
    the rest of a thread's rows on the VNNI tiles, a masked tail of K % 64, rows padded to 16): the
    sums are exact integers on every path, so the outputs are equal bit for bit, with a residual
    and a prologue too."""
    from duplex.engine.int8_kernel import q16_isa, set_q16_isa

    best = q16_isa()
    if best == "avx2":
        pytest.skip("this CPU has no AVX-512 VNNI: only the AVX2 tiles run")
    isas = ["avx2", "avx512-vnni"] + (["amx-int8"] if best == "amx-int8" else [])
    x, w, scales = _case(m, n, 2 * k, seed=m + n + k)
    residual = torch.randn(m, n).to(torch.bfloat16)
    outs = {}
    try:
        for isa in isas:
            assert set_q16_isa(isa) == isa
            fused = residual.clone()
            ops.gemv(x, w[:, :k].contiguous(), scales, ops.SWIGLU, residual=fused, out=fused)
            outs[isa] = (ops.gemv(x[:, :k].contiguous(), w[:, :k].contiguous(), scales), fused)
    finally:
        set_q16_isa(None)
    for isa in isas[1:]:
        assert torch.equal(outs["avx2"][0], outs[isa][0]), isa
        assert torch.equal(outs["avx2"][1], outs[isa][1]), isa
