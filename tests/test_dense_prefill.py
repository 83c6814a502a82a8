"""Many-token passes on dequantized weights (the matrix engine's work) agree with the int8 path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duplex.engine.fast_decode import DecodeRow, FastDecoder
from duplex.engine.kv import new_kv_cache
from duplex.engine.models import load_model
from duplex.engine.quant import (
    DENSE_MIN_ROWS,
    Int8WeightOnlyLinear,
    add_dense_weights,
    decode_bytes_per_token,
    dense_matmul_pays,
    quantize_int8,
)


def test_many_rows_use_the_dense_weights_and_match_the_int8_product():
    torch.manual_seed(0)
    q = Int8WeightOnlyLinear(nn.Linear(96, 80, bias=False).to(torch.bfloat16))
    added = add_dense_weights(nn.Sequential(q))
    assert added == 96 * 80 * 2
    exact = q.weight_int8.float() * q.scales.float()[:, None]
    assert torch.equal(q.weight_dense, exact.to(torch.bfloat16))
    x = torch.randn(DENSE_MIN_ROWS + 5, 96).to(torch.bfloat16)
    y = q(x)
    assert torch.equal(y, F.linear(x, q.weight_dense))  # the dense branch ran
    ref = x.float() @ exact.T
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.01
    few = x[:2]  # decode steps keep the int8 kernels, same product
    assert ((q(few).float() - ref[:2]).norm() / ref[:2].norm()).item() < 0.01


def test_the_probe_can_be_forced(monkeypatch):
    dense_matmul_pays.cache_clear()
    monkeypatch.setenv("DUPLEX_DENSE_PREFILL", "0")
    assert dense_matmul_pays(torch.bfloat16) is False
    dense_matmul_pays.cache_clear()
    monkeypatch.setenv("DUPLEX_DENSE_PREFILL", "1")
    assert dense_matmul_pays(torch.bfloat16) is True
    dense_matmul_pays.cache_clear()


def test_the_probe_times_both_products_in_every_round_at_one_thread(monkeypatch):
    """Like the decode-format probe: one after another at the stage's threads, a busy neighbour
    decided the pick; now every round times the int8 and the dense product, at one thread."""
    import types

    from duplex.engine import quant

    calls: list[tuple[str, int]] = []

    def fake_int8(x, w, scales, dense=None):
        calls.append(("int8", torch.get_num_threads()))

    def fake_linear(x, w):
        calls.append(("dense", torch.get_num_threads()))

    monkeypatch.delenv("DUPLEX_DENSE_PREFILL", raising=False)
    monkeypatch.setattr(quant, "int8_matmul", fake_int8)
    monkeypatch.setattr(quant, "F", types.SimpleNamespace(linear=fake_linear))
    before = torch.get_num_threads()
    dense_matmul_pays.cache_clear()
    try:
        assert isinstance(dense_matmul_pays(torch.bfloat16), bool)
    finally:
        dense_matmul_pays.cache_clear()
    assert [k for k, _ in calls] == ["int8", "dense"] * 6
    assert {t for _, t in calls} == {1}
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def dense_lm():
    lm = load_model("tiny", device="cpu", dtype="bfloat16", quantize="int8")
    if not any(m.weight_dense is not None for m in lm.model.modules() if isinstance(m, Int8WeightOnlyLinear)):
        add_dense_weights(lm.model)  # the probe judged them slower here: the path is still tested
    return lm


def test_fused_projections_keep_one_copy_of_the_dense_weights(dense_lm):
    fast = FastDecoder(dense_lm.model)
    assert fast.dense
    layer = fast.layers[0]
    q_proj = layer.attn.q_proj
    start = layer.qkv.dense.data_ptr()
    assert start <= q_proj.weight_dense.data_ptr() < start + layer.qkv.dense.numel() * 2


def test_a_long_pass_on_dense_weights_agrees_with_the_fused_int8_pass(dense_lm):
    """Same rows through both paths: the same greedy tokens and logits within bf16/int8 noise."""
    model = dense_lm.model
    fast = FastDecoder(model)
    outs = {}
    for dense in (False, True):
        fast.dense = dense
        caches = [new_kv_cache(model.config) for _ in range(3)]
        for i, c in enumerate(caches):
            fast.forward([DecodeRow(c, list(range(10 + i, 30 + i)), 0, 0)])
        rows = [DecodeRow(caches[0], [5], 20), DecodeRow(caches[1], [6], 20),
                DecodeRow(caches[2], list(range(40, 40 + fast.max_query + 9)), 20, keep=2)]
        outs[dense] = (fast.forward(rows), [c.get_seq_length() for c in caches])
    (int8_logits, int8_lens), (dense_logits, dense_lens) = outs[False], outs[True]
    assert int8_lens == dense_lens == [21, 21, 20 + fast.max_query + 9]
    for a, b in zip(int8_logits, dense_logits):
        assert a.shape == b.shape
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert ((a.float() - b.float()).norm() / a.float().norm()).item() < 0.03


def test_quantize_without_dense_weights_keeps_the_int8_path():
    model = nn.Sequential(nn.Linear(16, 16))
    quantize_int8(model)
    q = model[0]
    assert q.weight_dense is None
    x = torch.randn(DENSE_MIN_ROWS + 1, 16)
    exact = x @ (q.weight_int8.float() * q.scales.float()[:, None]).T + q.bias
    assert torch.allclose(q(x), exact, rtol=1e-4, atol=1e-4)  # the int8 product, not a dense copy


def test_decode_bytes_do_not_count_the_prefill_copy():
    """Decode steps stream the int8 weights only: bench decode's bound must not grow with the copy."""
    lm = load_model("tiny", device="cpu", dtype="bfloat16", quantize=None)
    quantize_int8(lm.model)
    before = decode_bytes_per_token(lm.model)
    assert add_dense_weights(lm.model) > 0
    assert decode_bytes_per_token(lm.model) == before
