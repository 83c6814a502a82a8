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


@pytest.mark.parametrize("n,k", [(1, 8), (7, 64), (40, 576), (1536, 576), (576, 1536), (13, 24)])
def test_int8_gemv_kernel_is_bit_identical_to_torch(n, k):
    from duplex.engine.int8_kernel import int8_gemv

    gemv = int8_gemv()
    if gemv is None:
        pytest.skip("no C compiler or not an AVX2 build of PyTorch: the PyTorch kernel is used")
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = (torch.rand(n, generator=gen) / 50).to(torch.bfloat16)
    x = (torch.randn(1, k, generator=gen) * 3).to(torch.bfloat16)
    assert torch.equal(gemv(x, w, scales), torch._weight_int8pack_mm(x, w, scales))


def test_int8_decode_with_the_fast_kernel_equals_torch_kernel_decode(monkeypatch):
    """Greedy decoding of the int8 tiny model gives the same logits, bit for bit, with and
    without the C mat-vec (one-token steps take it, prefill chunks keep PyTorch's kernel)."""
    from duplex.engine import quant
    from duplex.engine.sampling import Sampler, SamplingConfig
    from duplex.engine.sequence import SharedSequence, Speaker
    from duplex.engine.template import TurnTemplate

    lm = load_model("tiny", device="cpu", dtype="bfloat16", quantize="int8")

    def decode() -> tuple[list[int], torch.Tensor]:
        seq = SharedSequence(lm, TurnTemplate.from_tokenizer(lm.tokenizer))
        seq.add_message(Speaker.USER, "Tell me a story about a lighthouse.")
        seq.begin_turn(Speaker.AGENT)
        sampler = Sampler(SamplingConfig())
        return [seq.step(sampler) for _ in range(12)], seq.logits.clone()

    fast_ids, fast_logits = decode()
    monkeypatch.setattr(quant, "_cpu_gemv", lambda: None)
    ref_ids, ref_logits = decode()
    assert fast_ids == ref_ids
    assert torch.equal(fast_logits, ref_logits)
