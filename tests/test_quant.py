"""Int8 weight-only linears match float ones closely and halve the bytes read per token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from duplex.engine.models import load_model
from duplex.engine.quant import Int8WeightOnlyLinear, decode_bytes_per_token, quantize_int8


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
