"""Int8 weight-only linears match float ones closely and halve the bytes read per token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from duplex.engine.models import load_model
from duplex.engine.quant import (
    Int8WeightOnlyLinear,
    decode_bytes_per_token,
    quantize_int8,
)


def test_int8_linear_matches_float_linear():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=True)
    q = Int8WeightOnlyLinear(lin)
    x = torch.randn(3, 5, 64)
    ref = lin(x)
    out = q(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() / ref.abs().max() < 0.02


def test_quantized_tiny_model_keeps_its_greedy_prediction(tiny_lm):
    ids = tiny_lm.tokenizer.encode("The weather today is", return_tensors="pt")
    with torch.inference_mode():
        ref = tiny_lm.model(ids).logits[0, -1]
    fresh = load_model("tiny", device="cpu", dtype="float32", quantize="int8")
    with torch.inference_mode():
        out = fresh.model(ids).logits[0, -1]
    assert fresh.quantization == "int8"
    assert torch.topk(out, 5).indices.tolist()[:1] == torch.topk(ref, 5).indices.tolist()[:1]


def test_decode_bytes_counts_tied_head_once_and_int8_halves_bf16():
    lm = load_model("tiny", device="cpu", dtype="bfloat16", quantize=None)
    bf16 = decode_bytes_per_token(lm.model)
    params = sum(p.numel() for p in lm.model.parameters())
    assert abs(bf16 - params * 2) < 1024  # tied embedding/head counted once (plus tiny rotary buffers)
    quantize_int8(lm.model)
    int8 = decode_bytes_per_token(lm.model)
    assert int8 < 0.6 * bf16


def test_unknown_quantization_is_rejected():
    with pytest.raises(ValueError, match="quantization"):
        load_model("tiny", quantize="int3")


def _gemv_case(m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(m * 100000 + n * 1000 + k)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = (torch.rand(n, generator=gen) / 50).to(torch.bfloat16)
    x = (torch.randn(m, k, generator=gen) * 3).to(torch.bfloat16)
    return x, w, scales


_SHAPES = [(1, 7, 64), (1, 40, 576), (1, 1536, 576), (1, 576, 1536), (1, 13, 24), (1, 9, 100), (2, 40, 576),
           (3, 1536, 576), (5, 64, 1536), (16, 96, 576), (16, 13, 40)]


@pytest.mark.parametrize("kind,factor", [("q16", 1.2), ("q8", 10.0)])
@pytest.mark.parametrize("m,n,k", _SHAPES)
def test_int8_quantized_activation_kernels_are_within_tolerance_of_the_exact_product(m, n, k, kind, factor):
    """The C kernels quantize activations (q16, the default: to int16 with one scale per row;
    q8: to int8 per block of 32, llama.cpp's Q8_0): not bit-identical to PyTorch, but each output row within
    Q_TOLERANCE (relative L2) of the fp32 product. q16's error is PyTorch's own bf16 rounding
    (~0.2 %), q8 adds its 8-bit rounding (~0.5 %)."""
    from duplex.engine.int8_kernel import Q_TOLERANCE, int8_gemv, relative_error

    gemv = int8_gemv(kind)
    if gemv is None:
        pytest.skip("no C compiler or no AVX2: the PyTorch kernel is used")
    x, w, scales = _gemv_case(m, n, k)
    y = gemv(x, w, scales)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    err = relative_error(y, x, w, scales)
    assert err <= Q_TOLERANCE[kind]
    if k % 8 == 0 and n % 16 == 0:  # (PyTorch's kernel is wrong for other K; its AVX-512 form crashes for other N)
        assert err <= factor * relative_error(torch._weight_int8pack_mm(x, w, scales), x, w, scales) + 1e-4
    # each activation row is computed on its own: a row gives the same result alone or batched
    assert torch.equal(gemv(x[-1:], w, scales), y[-1:])


@pytest.mark.parametrize("m,n,k", [s for s in _SHAPES if s[2] % 8 == 0 and s[1] % 16 == 0])
def test_int8_exact_gemv_kernel_is_bit_identical_to_torch(m, n, k):
    from duplex.engine.int8_kernel import int8_gemv

    gemv = int8_gemv("exact")
    if gemv is None:
        pytest.skip("no C compiler or not an AVX2 build of PyTorch: the PyTorch kernel is used")
    x, w, scales = _gemv_case(m, n, k)
    assert torch.equal(gemv(x, w, scales), torch._weight_int8pack_mm(x, w, scales))


def test_int8_kernel_choice_follows_the_environment(monkeypatch):
    from duplex.engine.int8_kernel import int8_gemv, kernel_choice

    monkeypatch.delenv("DUPLEX_INT8_KERNEL", raising=False)
    assert kernel_choice() == "q16"
    monkeypatch.setenv("DUPLEX_INT8_KERNEL", "q8")
    assert kernel_choice() == "q8"
    monkeypatch.setenv("DUPLEX_INT8_KERNEL", "exact")
    assert kernel_choice() == "exact"
    monkeypatch.setenv("DUPLEX_INT8_KERNEL", "aten")
    assert kernel_choice() == "aten" and int8_gemv("aten") is None


def _greedy_decode(lm, steps: int = 12) -> tuple[list[int], torch.Tensor]:
    from duplex.engine.sampling import Sampler, SamplingConfig
    from duplex.engine.sequence import SharedSequence, Speaker
    from duplex.engine.template import TurnTemplate

    seq = SharedSequence(lm, TurnTemplate.from_tokenizer(lm.tokenizer))
    seq.add_message(Speaker.USER, "Tell me a story about a lighthouse.")
    seq.begin_turn(Speaker.AGENT)
    sampler = Sampler(SamplingConfig())
    return [seq.step(sampler) for _ in range(steps)], seq.logits.clone()


def test_int8_decode_with_the_exact_kernel_equals_torch_kernel_decode(monkeypatch):
    """Greedy decoding of the int8 tiny model gives the same logits, bit for bit, with the exact C
    mat-vec and with PyTorch's kernel (one-token steps take it, prefill chunks keep PyTorch's)."""
    from duplex.engine import quant
    from duplex.engine.int8_kernel import int8_gemv

    if int8_gemv("exact") is None:
        pytest.skip("no exact C kernel here")
    lm = load_model("tiny", device="cpu", dtype="bfloat16", quantize="int8")
    monkeypatch.setattr(quant, "_cpu_gemv", lambda rows: int8_gemv("exact") if rows <= quant._GEMV_MAX_ROWS else None)
    fast_ids, fast_logits = _greedy_decode(lm)
    monkeypatch.setattr(quant, "_cpu_gemv", lambda rows: None)
    ref_ids, ref_logits = _greedy_decode(lm)
    assert fast_ids == ref_ids
    assert torch.equal(fast_logits, ref_logits)


@pytest.mark.parametrize("kind,tolerance", [("q16", 0.01), ("q8", 0.03)])
def test_int8_decode_with_quantized_activation_kernels_stays_close_to_torch_kernel_decode(monkeypatch, kind,
                                                                                          tolerance):
    """The C mat-vecs change logits by about the bf16 rounding, not the greedy tokens."""
    from duplex.engine import quant
    from duplex.engine.int8_kernel import int8_gemv

    if int8_gemv(kind) is None:
        pytest.skip("no C kernel here")
    lm = load_model("tiny", device="cpu", dtype="bfloat16", quantize="int8")
    monkeypatch.setattr(quant, "_cpu_gemv", lambda rows: int8_gemv(kind))
    fast_ids, fast_logits = _greedy_decode(lm)
    monkeypatch.setattr(quant, "_cpu_gemv", lambda rows: None)
    ref_ids, ref_logits = _greedy_decode(lm)
    assert fast_ids == ref_ids
    rel = ((fast_logits.float() - ref_logits.float()).norm() / ref_logits.float().norm()).item()
    assert rel < tolerance


def test_fused_helpers_equal_the_torch_op_sequences_they_replace():
    """RMS norm / SwiGLU prologues, the residual epilogue and rope keep transformers' bf16
    roundings: equal bit for bit to the op-by-op computation around the same q16 mat-vec."""
    import torch.nn.functional as F

    from duplex.engine.int8_kernel import fused_ops, int8_gemv

    ops, gemv = fused_ops(), int8_gemv("q16")
    if ops is None or gemv is None:
        pytest.skip("no C helpers here")
    gen = torch.Generator().manual_seed(0)
    m, n, k = 3, 200, 96
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    s = (torch.rand(n, generator=gen) / 64).bfloat16()
    x = (torch.randn(m, k, generator=gen) * 4).bfloat16()
    norm_w = (torch.rand(k, generator=gen) + 0.5).bfloat16()
    h = x.float()
    h = norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(ops.gemv(x, w, s, ops.RMSNORM, norm_w, 1e-5), gemv(h, w, s))
    gate_up = (torch.randn(m, 2 * k, generator=gen) * 2).bfloat16()
    assert torch.equal(ops.gemv(gate_up, w, s, ops.SWIGLU), gemv(F.silu(gate_up[:, :k]) * gate_up[:, k:], w, s))
    residual = torch.randn(m, n, generator=gen).bfloat16()
    expected = residual + gemv(x, w, s)
    assert ops.gemv(x, w, s, residual=residual, out=residual) is residual
    assert torch.equal(residual, expected)
    t, heads, d = 3, 5, 16
    qk = torch.randn(t, heads * d + 7, generator=gen).bfloat16()
    cos, sin = torch.randn(t, d, generator=gen).bfloat16(), torch.randn(t, d, generator=gen).bfloat16()
    q = qk[:, :heads * d].view(t, heads, d)
    expected = q * cos[:, None] + torch.cat((-q[..., d // 2:], q[..., :d // 2]), -1) * sin[:, None]
    tail = qk[:, heads * d:].clone()
    ops.rope(qk, heads, d, cos, sin)
    assert torch.equal(qk[:, :heads * d].view(t, heads, d), expected)
    assert torch.equal(qk[:, heads * d:], tail)


@pytest.mark.parametrize("kind,tiles", [("q16", True), ("exact", False)])
def test_many_rows_without_dense_weights_take_the_tiled_c_kernel(monkeypatch, kind, tiles):
    """A prefill pass of more than 16 rows and no dense copy: the q16 tiles take it (PyTorch's
    _weight_int8pack_mm ran half as fast on an AVX2 EPYC); with the exact kernel PyTorch's own, the
    same bits, takes it as before. Counted by which kernel ran."""
    from duplex.engine import int8_kernel, quant

    if int8_kernel.int8_gemv("q16") is None:
        pytest.skip("no C kernel here")
    monkeypatch.setenv("DUPLEX_INT8_KERNEL", kind)
    ran = []
    real = quant.torch_int8_mm
    monkeypatch.setattr(quant, "torch_int8_mm", lambda *a: ran.append("torch") or real(*a))
    real_pick = quant._cpu_gemv

    def pick(rows):  # the real choice, counted when it runs
        gemv = real_pick(rows)
        return None if gemv is None else (lambda *args: ran.append("c") or gemv(*args))

    monkeypatch.setattr(quant, "_cpu_gemv", pick)
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (64, 96), dtype=torch.int8, generator=g)
    scales = (torch.rand(64, generator=g) / 50).bfloat16()
    x = torch.randn(40, 96, generator=g).bfloat16()
    y = quant.int8_matmul(x, w, scales)
    assert ran == (["c"] if tiles else ["torch"])
    ref = x.float() @ (w.float() * scales.float()[:, None]).T
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.01
