"""The shared sequence on the tiny model: streaming equals offline, exact rollback, bounded memory."""

from __future__ import annotations

import pytest
import torch

from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import SequenceConfig, SharedSequence, Speaker, Status
from duplex.engine.template import TurnTemplate

TEXT = "The quick brown fox jumps over the lazy dog while the band plays a slow song in the park."


def _seq(lm, **cfg) -> SharedSequence:
    return SharedSequence(lm, TurnTemplate.from_tokenizer(lm.tokenizer), SequenceConfig(**cfg) if cfg else None)


def _full_logits(lm, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_streaming_prefill_equals_offline(tiny_lm, chunk):
    seq = _seq(tiny_lm)
    seq.add_message(Speaker.SYSTEM, "You are terse.")
    seq.begin_turn(Speaker.USER)
    ids = tiny_lm.tokenizer.encode(TEXT, add_special_tokens=False)
    for i in range(0, len(ids), chunk):
        seq.append(ids[i:i + chunk])
    assert seq.cache_length == len(seq) == len(seq.ids)
    offline = _full_logits(tiny_lm, seq.ids)
    torch.testing.assert_close(seq.logits, offline, rtol=1e-4, atol=1e-4)


def test_rollback_then_reappend_is_identical(tiny_lm):
    seq = _seq(tiny_lm)
    seq.add_message(Speaker.SYSTEM, "sys")
    seq.begin_turn(Speaker.USER)
    seq.append_text(TEXT)
    before_logits = seq.logits.clone()
    before_spans = seq.spans()
    before_ids = seq.ids
    tail = before_ids[-5:]
    seq.rollback(5)
    assert len(seq) == seq.cache_length == len(before_ids) - 5
    seq.append(tail)
    assert seq.ids == before_ids
    assert seq.spans() == before_spans
    torch.testing.assert_close(seq.logits, before_logits, rtol=0, atol=1e-5)


def test_rollback_lazily_recomputes_logits(tiny_lm):
    seq = _seq(tiny_lm)
    seq.add_message(Speaker.SYSTEM, "sys")
    seq.begin_turn(Speaker.USER)
    seq.append_text(TEXT)
    seq.rollback(4)
    torch.testing.assert_close(seq.logits, _full_logits(tiny_lm, seq.ids), rtol=1e-4, atol=1e-4)


def test_rollback_cannot_touch_system_prompt(tiny_lm):
    seq = _seq(tiny_lm)
    seq.add_message(Speaker.SYSTEM, "sys")
    with pytest.raises(ValueError):
        seq.rollback(1)


def test_turn_markers_come_from_chat_template(tiny_lm):
    seq = _seq(tiny_lm)
    seq.add_message(Speaker.SYSTEM, "Be kind.")
    seq.add_message(Speaker.USER, "Hi there")
    expected = tiny_lm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}], tokenize=False
    )
    assert seq.text() == expected


def test_eviction_keeps_memory_bounded_over_long_stream(tiny_lm):
    seq = _seq(tiny_lm, max_tokens=512, keep_recent_tokens=256, prefill_chunk_tokens=64)
    seq.add_message(Speaker.SYSTEM, "You are a very patient listener.")
    sink = seq.ids
    ids = tiny_lm.tokenizer.encode(TEXT, add_special_tokens=False)
    streamed = 0
    peak = 0
    while streamed < 10_000:
        seq.begin_turn(Speaker.USER)
        for i in range(0, len(ids), 5):
            seq.append(ids[i:i + 5])
            peak = max(peak, seq.cache_length)
        seq.end_turn(Speaker.USER)
        streamed += len(ids)
        assert seq.cache_length == len(seq)
    assert peak <= 512 + 5
    assert seq.evicted_tokens >= 10_000 - 512
    assert seq.ids[:len(sink)] == sink  # the system prompt (attention sink) survives
    # the kept positions were renumbered from the start without a re-encode: the first layer's
    # keys (token and position only) equal a fresh pass's over the kept tokens; deeper layers keep
    # what they computed with the evicted tokens in view
    fresh = _fresh_cache(tiny_lm, seq.ids)
    torch.testing.assert_close(seq._cache.layers[0].keys, fresh.layers[0].keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seq._cache.layers[0].values, fresh.layers[0].values, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(seq.logits).all()


def _fresh_cache(lm, ids: list[int]):
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return cache


def test_compacting_a_cache_rotates_each_kept_key_to_its_new_position(tiny_lm):
    """Eviction keeps a sink and a recent window and moves them to positions 0..n-1: every kept
    key is rotated by how far it moved, so the cache equals one written at the new positions
    for what depends on token and position alone (the first layer); values move as they are."""
    from duplex.engine.kv import compact_rotated, new_kv_cache

    ids = tiny_lm.tokenizer.encode(TEXT * 10, add_special_tokens=False)[:120]
    cache = new_kv_cache(tiny_lm.model.config)
    with torch.inference_mode():
        tiny_lm.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    kept = list(range(8)) + list(range(50, 120))
    before_v = [layer.values[..., kept, :].clone() for layer in cache.layers]
    assert compact_rotated(cache, kept, tiny_lm.model.model.rotary_emb)
    assert cache.get_seq_length() == len(kept)
    fresh = _fresh_cache(tiny_lm, [ids[i] for i in kept])
    torch.testing.assert_close(cache.layers[0].keys, fresh.layers[0].keys, rtol=1e-4, atol=1e-4)
    for layer, v in zip(cache.layers, before_v):
        assert torch.equal(layer.values, v)
    # a key that did not move is untouched; one that moved is not its old self
    assert not torch.allclose(cache.layers[1].keys[..., 8:, :], fresh.layers[1].keys[..., 8:, :], atol=1e-3)


def _generate(lm, seed: int, **kw) -> list[int]:
    seq = _seq(lm)
    seq.add_message(Speaker.USER, "Tell me a story")
    seq.begin_turn(Speaker.AGENT)
    sampler = Sampler(SamplingConfig(seed=seed, **kw))
    return [seq.step(sampler) for _ in range(12)]


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 50},
                                {"temperature": 0.8, "top_p": 0.9}])
def test_decoding_is_deterministic_under_seed(tiny_lm, kw):
    assert _generate(tiny_lm, 7, **kw) == _generate(tiny_lm, 7, **kw)


def test_different_seeds_differ_when_sampling(tiny_lm):
    assert _generate(tiny_lm, 1, temperature=1.5) != _generate(tiny_lm, 2, temperature=1.5)


def test_generated_tokens_are_unspoken_until_marked(tiny_lm):
    seq = _seq(tiny_lm)
    seq.add_message(Speaker.USER, "Hi")
    turn = seq.begin_turn(Speaker.AGENT)
    sampler = Sampler(SamplingConfig())
    for _ in range(4):
        seq.step(sampler)
    pos = seq.positions(turn, Status.UNSPOKEN)
    assert len(pos) == 4
    seq.set_status(pos[0], pos[2], Status.SPOKEN)
    assert len(seq.positions(turn, Status.SPOKEN)) == 2


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_append_and_hand_over_equals_the_two_step_path(tiny_lm):
    """The one-forward path (user words + footer + agent header) gives the same ledger, cache,
    next-token logits and end-of-turn belief as appending and then handing over."""
    ids = tiny_lm.tokenizer.encode("what time is it", add_special_tokens=False)
    two = _seq(tiny_lm)
    two.add_message(Speaker.SYSTEM, "sys")
    two.begin_turn(Speaker.USER)
    two.append(ids)
    eou_two = two.turn_end()
    turn_two = two.hand_over(Speaker.AGENT)
    one = _seq(tiny_lm)
    one.add_message(Speaker.SYSTEM, "sys")
    one.begin_turn(Speaker.USER)
    turn_one, eou_one = one.append_and_hand_over(ids, Speaker.AGENT)
    assert (turn_one, one.ids, one.spans(), one.open_turn) == (turn_two, two.ids, two.spans(), two.open_turn)
    assert one.cache_length == len(one)
    assert eou_one.eou == pytest.approx(eou_two.eou, rel=1e-4, abs=1e-6)
    assert eou_one.sentence_break == pytest.approx(eou_two.sentence_break, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(one.logits, two.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one.logits, _full_logits(tiny_lm, one.ids), rtol=1e-4, atol=1e-4)


def test_opening_the_turn_in_the_same_forward_equals_the_three_step_path(tiny_lm, monkeypatch):
    """``open_as``: header, words, footer and the agent header in ONE forward (a typed message
    under load then waits one scheduler tick, not two), same ledger, cache and logits."""
    ids = tiny_lm.tokenizer.encode("what time is it", add_special_tokens=False)
    two = _seq(tiny_lm)
    two.add_message(Speaker.SYSTEM, "sys")
    user_two = two.begin_turn(Speaker.USER)
    turn_two, eou_two = two.append_and_hand_over(ids, Speaker.AGENT)
    one = _seq(tiny_lm)
    one.add_message(Speaker.SYSTEM, "sys")
    forwards = []
    original = type(one)._forward

    def counting(self, *args, **kwargs):
        forwards.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(one), "_forward", counting)
    turn_one, eou_one = one.append_and_hand_over(ids, Speaker.AGENT, open_as=Speaker.USER)
    monkeypatch.undo()
    assert len(forwards) == 1
    assert turn_one - 1 == user_two
    assert (turn_one, one.ids, one.spans(), one.open_turn) == (turn_two, two.ids, two.spans(), two.open_turn)
    assert one.cache_length == len(one)
    assert eou_one.eou == pytest.approx(eou_two.eou, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(one.logits, two.logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="still open"):
        one.begin_turn(Speaker.USER)  # the agent's turn is open, as after the two-step path


def _reference_nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    """The top-p set by sorting the whole vocabulary (what the sampler did before its shortlist)."""
    probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
    keep = torch.cumsum(probs, dim=-1) - probs <= top_p
    return set(order[keep].tolist())


@pytest.mark.parametrize("scale, top_p", [(8.0, 0.9), (8.0, 0.3), (0.05, 0.9), (0.05, 0.999)])
def test_top_p_samples_only_from_the_nucleus_whether_or_not_the_shortlist_holds_it(scale, top_p):
    # scale 8: a peaked distribution, the nucleus is inside the 256-token shortlist; scale 0.05:
    # nearly flat over 5000 tokens, the shortlist falls short and the whole vocabulary is sorted
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(3)) * scale
    nucleus = _reference_nucleus(logits, top_p)
    sampler = Sampler(SamplingConfig(temperature=1.0, top_p=top_p, seed=0))
    drawn = {sampler(logits.clone()) for _ in range(300)}
    assert drawn <= nucleus
    assert len(drawn) > (1 if len(nucleus) > 1 else 0)  # it samples, not argmax


def test_temperature_sampling_follows_the_distribution():
    # three tokens at 0.7 / 0.2 / 0.1, the rest at zero probability: the draw (an inverted
    # cumulative sum) never picks a zero-probability token and matches the frequencies
    logits = torch.full((1000,), float("-inf"))
    logits[[10, 500, 999]] = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=1))
    draws = [sampler(logits.clone()) for _ in range(4000)]
    assert set(draws) <= {10, 500, 999}
    for token, p in ((10, 0.7), (500, 0.2), (999, 0.1)):
        assert abs(draws.count(token) / len(draws) - p) < 0.03


def test_the_template_knows_the_tokenizers_line_breaks_and_never_a_turn_marker(tiny_lm):
    template = TurnTemplate.from_tokenizer(tiny_lm.tokenizer)
    newline = tiny_lm.tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and newline[0] in template.break_ids
    assert template.end_of_user_turn_id not in template.break_ids
    plain = TurnTemplate._plain(tiny_lm.tokenizer, template.eos_ids)  # its user footer IS "\n"
    from duplex.engine.template import _break_ids

    assert plain.end_of_user_turn_id not in _break_ids(tiny_lm.tokenizer, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_picks_what_torch_argmax_picks_ties_and_nan_included(dtype):
    greedy = Sampler(SamplingConfig(temperature=0.0))
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.randn(49152, generator=gen).to(dtype)
        assert greedy(logits) == int(torch.argmax(logits.float()))
    tied = torch.zeros(1000, dtype=dtype)
    tied[[7, 300, 999]] = 2.0
    assert greedy(tied) == 7 == int(torch.argmax(tied.float()))  # the first of equal maxima
    nan = torch.zeros(1000, dtype=dtype)
    nan[[5, 40]] = float("nan")
    assert greedy(nan) == 5 == int(torch.argmax(nan.float()))
