"""The batched decode pass (one C call per layer for every row's cache write and attention) is
bit-identical to the per-row path (cache ``update`` + attention kernel per row and layer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from duplex.engine.attention import decode_rows_kernel
from duplex.engine.fast_decode import DecodeRow, FastDecoder, fast_decoder
from duplex.engine.kv import GrowableLayer, new_kv_cache
from duplex.engine.models import load_model
from duplex.engine.quant import quantize_int8


def _prefill(model, ids: list[int], cache) -> None:
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids)).unsqueeze(0),
              past_key_values=cache, use_cache=True, logits_to_keep=1)


def _decoder(model) -> FastDecoder:
    fast = fast_decoder(model)
    assert fast is not None
    if fast.fused is None or not fast._uniform or decode_rows_kernel() is None:
        pytest.skip("no C helpers here (no compiler or no AVX2)")
    return fast


@pytest.fixture(scope="module")
def int8_lm():
    return load_model("tiny", device="cpu", dtype="bfloat16", quantize="int8")


@pytest.fixture(scope="module")
def wide_group_model():
    """16 query heads per KV head: a 6-token row's query rows exceed one kernel call's 48 (3
    tokens per call), so the kernel splits the block as the per-row wrapper does."""
    config = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=1, max_position_embeddings=4096)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    quantize_int8(model)
    return model


def _run(fast: FastDecoder, model, prompts, new, keeps, batched: bool, monkeypatch, plain=()):
    """Fresh caches prefilled with ``prompts``, then two passes: all rows, then each row's next token.
    ``plain``: rows whose cache is transformers' own (DynamicLayer), for the per-row fallback."""
    caches = []
    for i, prompt in enumerate(prompts):
        cache = DynamicCache() if i in plain else new_kv_cache(model.config)
        _prefill(model, prompt, cache)
        caches.append(cache)
    used = []
    original = FastDecoder._rows_plan

    def spy(self, *args):
        plan = original(self, *args)
        used.append(plan is not None)
        return plan

    monkeypatch.setattr(FastDecoder, "_rows_plan", spy)
    monkeypatch.setattr(FastDecoder, "batched_attention", batched)
    out = fast.forward([DecodeRow(c, ids, len(p), keep=k) for c, ids, p, k in zip(caches, new, prompts, keeps)])
    out2 = fast.forward([DecodeRow(c, [7 + i], len(p) + len(ids)) for i, (c, ids, p) in enumerate(zip(caches, new, prompts))])
    monkeypatch.undo()
    return [*out, *out2], caches, used


def _assert_same(a, b) -> None:
    (logits_a, caches_a, _), (logits_b, caches_b, _) = a, b
    for x, y in zip(logits_a, logits_b):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)
    for ca, cb in zip(caches_a, caches_b):
        assert ca.get_seq_length() == cb.get_seq_length()
        for la, lb in zip(ca.layers, cb.layers):
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def _prompts(n: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, n, (length,), generator=g).tolist() for length in lengths]


def test_batched_rows_equal_the_per_row_path_bit_for_bit(int8_lm, monkeypatch):
    """1-token rows at mixed positions, a 6-token hand-over, logits for several positions or none,
    and a row whose cache must grow during the pass (253 cached + 6 new > 256 capacity)."""
    model = int8_lm.model
    fast = _decoder(model)
    prompts = _prompts(200, [5, 40, 253, 17, 120])
    new = [[11], [12, 13, 14, 15, 16, 17], [18, 19, 20, 21, 22, 23], [24], [25, 26]]
    keeps = [1, 6, 1, 0, 2]
    capacity = GrowableLayer.initial_capacity
    assert len(prompts[2]) <= capacity < len(prompts[2]) + len(new[2])
    batched = _run(fast, model, prompts, new, keeps, True, monkeypatch)
    per_row = _run(fast, model, prompts, new, keeps, False, monkeypatch)
    assert batched[2] == [True, True] and per_row[2] == [False, False]
    assert batched[1][2].layers[0]._k.shape[-2] > capacity  # it grew
    _assert_same(batched, per_row)
    assert [c.get_seq_length() for c in batched[1]] == [len(p) + len(n) + 1 for p, n in zip(prompts, new)]


def test_a_single_row_and_a_split_token_block_equal_the_per_row_path(wide_group_model, monkeypatch):
    fast = _decoder(wide_group_model)
    for prompts, new in ((_prompts(300, [30]), [[5]]),  # one row alone
                         (_prompts(300, [30, 9, 70], seed=1), [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]])):
        keeps = [len(n) for n in new]
        batched = _run(fast, wide_group_model, prompts, new, keeps, True, monkeypatch)
        per_row = _run(fast, wide_group_model, prompts, new, keeps, False, monkeypatch)
        assert batched[2] == [True, True]
        _assert_same(batched, per_row)


def test_caches_it_does_not_take_run_the_per_row_path(int8_lm, monkeypatch):
    """A transformers DynamicLayer cache among the rows, or one cache in two rows: per-row path."""
    model = int8_lm.model
    fast = _decoder(model)
    prompts = _prompts(200, [8, 12])
    new = [[11], [12, 13]]
    mixed = _run(fast, model, prompts, new, [1, 1], True, monkeypatch, plain=(1,))
    assert mixed[2] == [False, False]
    assert type(mixed[1][1].layers[0]) is not GrowableLayer
    reference = _run(fast, model, prompts, new, [1, 1], False, monkeypatch)
    for x, y in zip(mixed[0], reference[0]):
        assert torch.equal(x, y)
    cache = new_kv_cache(model.config)
    _prefill(model, prompts[0], cache)
    assert fast._rows_plan([DecodeRow(cache, [1], 8), DecodeRow(cache, [2], 9)], [(0, 1), (1, 2)], None, None) is None


def test_a_batched_pass_leaves_caches_that_crop_reset_and_update_as_before(int8_lm, monkeypatch):
    """The batched pass counts new positions without re-slicing ``keys``/``values`` (done at their
    next read): crop, reset and a later per-row update still see the right views."""
    model = int8_lm.model
    fast = _decoder(model)
    prompts = _prompts(200, [10, 20])
    new = [[11, 12], [13]]
    (_, caches, used) = _run(fast, model, prompts, new, [1, 1], True, monkeypatch)
    assert used == [True, True]
    a, b = caches
    layer = a.layers[0]
    assert layer.keys.shape[-2] == layer.get_seq_length() == 13
    full_keys = layer.keys.clone()
    a.crop(-2)
    assert layer.keys.shape[-2] == 11 and torch.equal(layer.keys, full_keys[..., :11, :])
    fast.forward([DecodeRow(b, [40], 22)])  # batched again, then a per-row update on top
    monkeypatch.setattr(FastDecoder, "batched_attention", False)
    fast.forward([DecodeRow(b, [41], 23)])
    assert all(lay.keys.shape[-2] == lay.values.shape[-2] == 24 for lay in b.layers)
    b.reset()
    assert b.get_seq_length() == 0 and b.layers[0].keys is None


def test_a_fresh_cache_starts_in_the_batched_pass_as_in_the_per_row_path(int8_lm, monkeypatch):
    model = int8_lm.model
    fast = _decoder(model)
    results = {}
    for batched in (True, False):
        monkeypatch.setattr(FastDecoder, "batched_attention", batched)
        fresh, other = new_kv_cache(model.config), new_kv_cache(model.config)
        _prefill(model, [5, 6, 7], other)
        out = fast.forward([DecodeRow(fresh, [1, 2, 3, 4], 0), DecodeRow(other, [8], 3)])
        results[batched] = (out, fresh)
    (a, ca), (b, cb) = results[True], results[False]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert ca.get_seq_length() == cb.get_seq_length() == 4
    for la, lb in zip(ca.layers, cb.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_a_long_program_pass_equals_the_per_op_pass_and_shares_bucketed_buffers(int8_lm):
    """Passes past MAX_QUERY tokens (eight typed questions at once) take the program pass where it
    is allowed to (AMX tiles, or the attention's AVX2 code with no dense weights): the same logits
    and caches, bit for bit, as the per-op pass; their buffers are sized in _BUFFER_STEP steps, so
    45 and 50 tokens share one set."""
    from duplex.engine import fast_decode

    model = int8_lm.model
    fast = _decoder(model)
    saved = fast.max_query
    fast.max_query = fast_decode.AMX_MAX_QUERY
    try:
        for lengths in ([20, 25], [24, 26]):
            prompts = _prompts(200, [30, 50], seed=len(lengths) + lengths[0])
            new = _prompts(200, lengths, seed=7)
            results = []
            for program in (True, False):
                caches = []
                for prompt in prompts:
                    cache = new_kv_cache(model.config)
                    _prefill(model, prompt, cache)
                    caches.append(cache)
                rows = [DecodeRow(c, ids, len(p), keep=1) for c, ids, p in zip(caches, new, prompts)]
                with torch.inference_mode():
                    out = fast._forward_program(rows) if program else fast._forward_fused(rows)
                results.append((out, caches, []))
            _assert_same(*results)
        step = fast_decode._BUFFER_STEP
        assert -(-45 // step) * step in fast._buffers and 45 not in fast._buffers and 50 not in fast._buffers
    finally:
        fast.max_query = saved


def test_a_cache_keeps_its_row_descriptors_until_its_buffers_change(int8_lm, monkeypatch):
    """The second pass over a cache takes its descriptors from the first (no per-layer checks);
    a pass that must grow the buffers, a reset or an eviction's uneven layers build them anew, and
    the kept descriptors hold no buffer alive: every pass stays equal to the per-row path."""
    import gc
    import weakref

    from duplex.engine import fast_decode

    model = int8_lm.model
    fast = _decoder(model)
    built = []
    original = fast_decode.new_descriptors

    def counting(*args):
        built.append(args[0])
        return original(*args)

    monkeypatch.setattr(fast_decode, "new_descriptors", counting)
    prompts = _prompts(200, [30, 250])
    new = [[11], [12]]
    batched = _run(fast, model, prompts, new, [1, 1], True, monkeypatch)
    assert [id(c) for c in built] == [id(c) for c in batched[1]]  # the second pass reused them
    monkeypatch.setattr(fast_decode, "new_descriptors", counting)
    per_row = _run(fast, model, prompts, new, [1, 1], False, monkeypatch)
    _assert_same(batched, per_row)

    a, b = batched[1]
    built.clear()
    old_buffer = weakref.ref(b.layers[0]._k)
    monkeypatch.setattr(fast_decode, "new_descriptors", counting)
    fast.forward([DecodeRow(a, [5], 32), DecodeRow(b, list(range(3, 10)), 252)])  # b grows past 256
    assert built == [b]
    del batched, per_row
    gc.collect()
    assert old_buffer() is None  # the descriptors kept for the old buffer do not keep it alive
    built.clear()
    b.layers[1].crop(-1)  # layers of uneven length: not taken from the kept descriptors
    assert not fast_decode.reuse_descriptors(b, b.layers, 0, 1, np.empty((len(b.layers), 6), dtype=np.int64))
    b.reset()
    fast.forward([DecodeRow(b, [1, 2], 0)])
    assert built == [b] and b.get_seq_length() == 2


def test_several_rows_get_their_logits_in_their_own_fp32_storage(int8_lm):
    model = int8_lm.model
    fast = _decoder(model)
    prompts = _prompts(200, [6, 9, 12])
    caches = []
    for prompt in prompts:
        cache = new_kv_cache(model.config)
        _prefill(model, prompt, cache)
        caches.append(cache)
    out = fast.forward([DecodeRow(c, [4], len(p), keep=k) for c, p, k in zip(caches, prompts, [1, 0, 2])])
    assert out[1] is None and out[0].shape == (model.config.vocab_size,) and out[2].shape == (2, model.config.vocab_size)
    assert out[0].dtype == out[2].dtype == torch.float32
    assert out[0].untyped_storage().data_ptr() != out[2].untyped_storage().data_ptr()
    assert out[0].untyped_storage().nbytes() == 4 * model.config.vocab_size  # not a view of the batch


def test_the_rotary_table_gives_the_modules_bits_at_any_position(int8_lm):
    model = int8_lm.model
    fast = _decoder(model)
    x = torch.zeros(1, model.config.hidden_size, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    for t in (1, 5, 24, 70):
        positions = torch.randint(0, 3000, (t,), generator=g).tolist()
        cos, sin = fast._rope(x, positions)
        ref_cos, ref_sin = model.model.rotary_emb(x, torch.tensor([positions]))
        assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    assert fast._rope_table is not None and fast._rope_table[0].shape[0] >= 3000
    out = (torch.empty(2, cos.shape[1], dtype=torch.bfloat16), torch.empty(2, cos.shape[1], dtype=torch.bfloat16))
    fast._rope(x, [7, 4000], out=out)  # grows the table
    ref_cos, ref_sin = model.model.rotary_emb(x, torch.tensor([[7, 4000]]))
    assert torch.equal(out[0], ref_cos[0]) and torch.equal(out[1], ref_sin[0])
