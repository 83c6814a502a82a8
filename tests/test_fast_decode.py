"""The lean decode forward computes what transformers' forward computes, alone and batched."""

from __future__ import annotations

import pytest
import torch

from duplex.engine.fast_decode import DecodeRow, fast_decoder
from duplex.engine.kv import new_kv_cache
from duplex.engine.models import load_model


def _reference_logits(lm, ids: list[int], start: int, cache) -> torch.Tensor:
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), position_ids=torch.arange(start, start + len(ids)).unsqueeze(0),
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


@pytest.mark.parametrize("dtype,quantize", [("float32", None), ("bfloat16", "int8")])
def test_lean_forward_matches_transformers_over_a_prefill_and_greedy_steps(dtype, quantize):
    lm = load_model("tiny", device="cpu", dtype=dtype, quantize=quantize)
    fast = fast_decoder(lm.model)
    assert fast is not None
    prompt = lm.tokenizer.encode("The lighthouse keeper looked at the sea and said")
    ref_cache, fast_cache = new_kv_cache(lm.model.config), new_kv_cache(lm.model.config)
    ref = _reference_logits(lm, prompt[:-3], 0, ref_cache)  # the generic forward fills both caches' history
    _reference_logits(lm, prompt[:-3], 0, fast_cache)
    ids, pos = prompt[-3:], len(prompt) - 3
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == "float32" else {"rtol": 0.05, "atol": 0.05}
    ref_tokens, fast_tokens = [], []
    for _ in range(10):
        ref = _reference_logits(lm, ids, pos, ref_cache)
        got = fast.forward([DecodeRow(fast_cache, ids, pos)])[0]
        assert got is not None and got.shape == ref.shape
        torch.testing.assert_close(got.float(), ref.float(), **tol)
        ref_tokens.append(int(ref.argmax()))
        fast_tokens.append(int(got.argmax()))
        pos += len(ids)
        ids = [ref_tokens[-1]]
    assert fast_tokens == ref_tokens
    assert fast_cache.get_seq_length() == ref_cache.get_seq_length() == pos


def test_rows_of_several_sequences_in_one_pass_equal_separate_passes(tiny_lm):
    fast = fast_decoder(tiny_lm.model)
    assert fast is not None
    texts = ["Hello there, how are you", "A long time ago in a galaxy far", "Rain"]
    prompts = [tiny_lm.tokenizer.encode(t) for t in texts]
    new = [[11, 12], [13], [14, 15, 16]]
    alone, batched = [], []
    for prompt in prompts:
        for caches in (alone, batched):
            cache = new_kv_cache(tiny_lm.model.config)
            _reference_logits(tiny_lm, prompt, 0, cache)
            caches.append(cache)
    separate = [fast.forward([DecodeRow(cache, ids, len(p), keep=len(ids))])[0]
                for cache, ids, p in zip(alone, new, prompts)]
    together = fast.forward([DecodeRow(cache, ids, len(p), keep=len(ids))
                             for cache, ids, p in zip(batched, new, prompts)])
    for a, b in zip(separate, together):
        assert a is not None and b is not None
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-5, atol=1e-6)
    assert [c.get_seq_length() for c in batched] == [len(p) + len(n) for p, n in zip(prompts, new)]


def test_a_failed_pass_leaves_every_cache_as_it_was(tiny_lm):
    fast = fast_decoder(tiny_lm.model)
    assert fast is not None
    cache = new_kv_cache(tiny_lm.model.config)
    _reference_logits(tiny_lm, [1, 2, 3, 4], 0, cache)
    with pytest.raises(IndexError):
        fast.forward([DecodeRow(cache, [5], 4), DecodeRow(new_kv_cache(tiny_lm.model.config), [10 ** 9], 0)])
    assert cache.get_seq_length() == 4


def test_models_it_does_not_reproduce_keep_the_generic_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, hidden_act="gelu")
    assert fast_decoder(LlamaForCausalLM(config)) is None


def test_fused_int8_forward_matches_the_unfused_lean_forward_alone_and_batched():
    """int8 + bf16 on a CPU with the C helpers: each mat-vec takes its RMS norm, SwiGLU or residual
    add along (the same bf16 roundings, checked bit for bit in test_quant) and rope runs in place;
    logits stay within bf16 noise of the op-by-op lean forward, alone and for ragged rows."""
    lm = load_model("tiny", device="cpu", dtype="bfloat16", quantize="int8")
    fast = fast_decoder(lm.model)
    assert fast is not None
    if fast.fused is None:
        pytest.skip("no C helpers here (no compiler or no AVX2)")
    fused, uniform = fast.fused, fast._uniform
    prompts = [lm.tokenizer.encode(t) for t in ("The lighthouse keeper said", "Once upon a time there", "Rain")]
    new = [[11, 12], [13], [14, 15, 16]]
    results = {}
    for mode in ("program", "fused", "unfused"):  # program: one C call per layer; fused: a few per layer
        fast.fused = fused if mode != "unfused" else None
        fast._uniform = uniform and mode == "program"
        caches = []
        for prompt in prompts:
            cache = new_kv_cache(lm.model.config)
            _reference_logits(lm, prompt, 0, cache)
            caches.append(cache)
        together = fast.forward([DecodeRow(c, ids, len(p), keep=len(ids)) for c, ids, p in zip(caches, new, prompts)])
        alone = fast.forward([DecodeRow(caches[0], [17], len(prompts[0]) + 2)])
        results[mode] = [*together, *alone]
    fast.fused, fast._uniform = fused, uniform
    for a, b in zip(results["program"], results["fused"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same arithmetic, in fewer calls
    for a, b in zip(results["fused"], results["unfused"]):
        assert a is not None and b is not None and a.shape == b.shape
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 0.02
        assert torch.equal(a.float().argmax(-1), b.float().argmax(-1))
