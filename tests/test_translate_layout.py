"""The two cache layouts of :class:`SimulTranslator` on the tiny random model: re-encode (the target
turn re-opened after each new source word) and interleaved (source and target chunks alternate,
nothing re-encoded); the policies on both; the layout through config, CLI and the eval JSON."""

from __future__ import annotations

import pytest
import torch

from duplex.cli.main import main
from duplex.engine.models import LoadedModel
from duplex.engine.sequence import SharedSequence, Speaker
from duplex.translate.evaluate import evaluate, translate_sentence
from duplex.translate.policies import make_simul_policy
from duplex.translate.prompt import _CHUNKS, _SHOTS, make_prompt
from duplex.translate.session import TranslateConfig
from duplex.translate.translator import SimulTranslator

_SENTENCE = "where is the train station today"


def _enc(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer.encode(text, add_special_tokens=False)


def _count_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Token counts of every model call, whichever forward runs it."""
    calls: list[int] = []
    original = SharedSequence.forward_direct

    def counting(self, ids, start_pos, keep=1):  # type: ignore[no-untyped-def]
        calls.append(len(ids))
        return original(self, ids, start_pos, keep)

    monkeypatch.setattr(SharedSequence, "forward_direct", counting)
    return calls


def _same_as_fresh_prefill(lm: LoadedModel, tr: SimulTranslator) -> bool:
    """The cache after all the crops and appends predicts what a fresh prefill of its ids does."""
    logits = tr.seq.logits.clone()
    fresh = SharedSequence(lm, tr.template)
    fresh.begin_turn(Speaker.USER)  # no header: the ids already start with the prompt's BOS
    fresh.append(tr.seq.ids)
    return torch.allclose(fresh.logits, logits, atol=1e-4)


def test_interleaved_shots_are_the_full_shots_cut_into_chunks() -> None:
    for pair, shots in _CHUNKS.items():
        assert [(" ".join(s for s, _ in c), " ".join(t for _, t in c)) for c in shots] == list(_SHOTS[pair])
        assert all(s and t for c in shots for s, t in c)  # no empty chunk: the cache never holds one
    prefix = make_prompt().interleaved_prefix
    assert prefix.startswith("English: Where is the\nSpanish: ¿Dónde está\nEnglish: train\n")
    assert prefix.endswith("Spanish: del mar.\n\nEnglish:")


def test_interleaved_never_reencodes_a_read_is_one_forward_and_a_write_only_decodes(
        tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = make_prompt()
    tr = SimulTranslator(tiny_lm, prompt, max_word_tokens=3, max_target_ratio=3.0, layout="interleaved")
    header, src_header = _enc(tiny_lm, prompt.target_header), _enc(tiny_lm, prompt.source_header)
    prompt_ids = tr.seq.ids
    calls = _count_forwards(monkeypatch)
    tr.read(["where"])
    assert calls == [len(_enc(tiny_lm, " where")) + len(header)]  # the word and the target header together
    calls.clear()
    tr.read(["is"])  # nothing written: the header is cropped (no forward), the chunk grows
    assert calls == [len(_enc(tiny_lm, " is")) + len(header)]
    calls.clear()
    first = tr.next_word()
    assert first is not None
    assert calls == [1] * len(first.ids)  # decode steps only: no target re-open
    calls.clear()
    tr.read(["the"])  # after a target chunk: source header, word, target header in ONE forward
    assert calls == [len(src_header) + len(_enc(tiny_lm, " the")) + len(header)]
    calls.clear()
    second = tr.next_word()
    assert second is not None and calls == [1] * len(second.ids)
    assert tr.stats.reencoded_tokens == 0
    assert tr.stats.forwards == 3 + len(first.ids) + len(second.ids)
    # the cache, token for token: the confirmed words stay where they were written
    assert tr.seq.ids == [*prompt_ids, *_enc(tiny_lm, " where"), *_enc(tiny_lm, " is"), *header, *first.ids,
                          *src_header, *_enc(tiny_lm, " the"), *header, *second.ids]
    assert tr.confirmed == [first, second]
    assert _same_as_fresh_prefill(tiny_lm, tr)


def test_reencode_costs_a_forward_per_write_that_interleaved_saves(tiny_lm: LoadedModel) -> None:
    words = _SENTENCE.split()
    counts = {}
    for layout in ("reencode", "interleaved"):
        tr = SimulTranslator(tiny_lm, make_prompt(), max_word_tokens=3, max_target_ratio=3.0, layout=layout)
        written = []
        for w in words:  # wait-k, k = 1: one read, one write
            tr.read([w])
            word = tr.next_word()
            assert word is not None
            written.append(word)
        decoded = sum(len(w.ids) for w in written)
        counts[layout] = tr.stats.forwards - decoded
        # re-encode: write i forces the i words confirmed before it again, after the new word
        reencoded = sum(sum(len(x.ids) for x in written[:i]) for i in range(len(written)))
        assert tr.stats.reencoded_tokens == (reencoded if layout == "reencode" else 0)
    assert counts == {"reencode": 2 * len(words), "interleaved": len(words)}


def test_interleaved_hypothesis_tokens_roll_back_and_confirmed_ones_stay(tiny_lm: LoadedModel) -> None:
    prompt = make_prompt()
    tr = SimulTranslator(tiny_lm, prompt, max_word_tokens=2, max_target_ratio=3.0, layout="interleaved")
    header, src_header = _enc(tiny_lm, prompt.target_header), _enc(tiny_lm, prompt.source_header)
    tr.read(["where", "is"])
    hyp = tr.hypothesis()
    assert len(hyp) >= 2
    tr.confirm(hyp[:1])
    tr.read(["the"])
    tail = [*hyp[0].ids, *src_header, *_enc(tiny_lm, " the"), *header]
    assert tr.seq.ids[-len(tail):] == tail  # hyp[1:] is gone, hyp[0] stays before the new chunk
    assert tr.stats.reencoded_tokens == 0
    assert _same_as_fresh_prefill(tiny_lm, tr)
    with pytest.raises(ValueError, match="prefix of the last hypothesis"):
        tr.confirm(hyp[1:2])  # the read dropped that hypothesis


def test_reset_restores_the_prompt_only_cache(tiny_lm: LoadedModel) -> None:
    for layout in ("reencode", "interleaved"):
        fresh = SimulTranslator(tiny_lm, make_prompt(), max_word_tokens=3, layout=layout)
        prompt_ids, prompt_logits = fresh.seq.ids, fresh.seq.logits.clone()
        tr = SimulTranslator(tiny_lm, make_prompt(), max_word_tokens=3, layout=layout)
        translate_sentence(tr, make_simul_policy("local-agreement"), _SENTENCE)
        tr.reset()
        assert tr.seq.ids == prompt_ids and tr.source == [] and tr.confirmed == []
        assert torch.allclose(tr.seq.logits, prompt_logits, atol=1e-4)
        # and the next sentence translates as on a fresh translator
        again = translate_sentence(tr, make_simul_policy("wait-k", k=2), "see you")
        assert again.prediction == translate_sentence(fresh, make_simul_policy("wait-k", k=2), "see you").prediction
    interleaved = SimulTranslator(tiny_lm, make_prompt(), layout="interleaved")
    reencode = SimulTranslator(tiny_lm, make_prompt())
    assert tiny_lm.tokenizer.decode(interleaved.seq.ids, skip_special_tokens=True) == make_prompt().interleaved_prefix
    assert tiny_lm.tokenizer.decode(reencode.seq.ids, skip_special_tokens=True) == make_prompt().prefix


@pytest.mark.parametrize("layout", ["reencode", "interleaved"])
@pytest.mark.parametrize("policy", ["wait-k", "local-agreement", "retranslate", "offline"])
def test_every_policy_translates_with_both_layouts(tiny_lm: LoadedModel, layout: str, policy: str) -> None:
    tr = SimulTranslator(tiny_lm, make_prompt(), max_word_tokens=3, max_target_ratio=1.0, layout=layout)
    res = translate_sentence(tr, make_simul_policy(policy), _SENTENCE)
    n = len(_SENTENCE.split())
    assert res.prediction and len(res.delays) == len(tr.confirmed) >= 1
    assert list(res.delays) == sorted(res.delays) and all(1 <= d <= n for d in res.delays)
    assert res.prediction == tr.target_text
    if policy == "wait-k":  # k = 3: target word i after min(k + i - 1, |X|) source words at the earliest
        assert all(d >= min(3 + i, n) for i, d in enumerate(res.delays))
    if layout == "interleaved":
        assert tr.stats.reencoded_tokens == 0


def test_interleaved_wait_k_beyond_the_source_equals_offline(tiny_lm: LoadedModel) -> None:
    """Nothing is written before the end, so the headers cropped after each word leave exactly the
    offline cache: source chunk, header, then the whole translation."""
    tr = SimulTranslator(tiny_lm, make_prompt(), max_word_tokens=4, max_target_ratio=1.0, layout="interleaved")
    offline = translate_sentence(tr, make_simul_policy("offline"), _SENTENCE)
    waitk = translate_sentence(tr, make_simul_policy("wait-k", k=10), _SENTENCE)
    assert waitk.prediction == offline.prediction and waitk.delays == offline.delays


def test_interleaved_on_a_full_sliding_window_stays_exact(tiny_lm: LoadedModel) -> None:
    """Gemma 3's sliding layers (window 8 here, far below the prompt) cannot be cropped: the
    hypothesis rollbacks re-encode instead, and the cache still matches a fresh prefill."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(tiny_lm.tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=1024)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).eval()
    lm = LoadedModel(model=model, tokenizer=tiny_lm.tokenizer, name="tiny-gemma3", device=torch.device("cpu"),
                     dtype=torch.float32)
    tr = SimulTranslator(lm, make_prompt(), max_word_tokens=2, max_target_ratio=2.0, layout="interleaved")
    policy = make_simul_policy("local-agreement")
    policy.reset()
    for n, word in enumerate(_SENTENCE.split()[:4], 1):
        tr.read([word])
        policy.on_source(tr, n, False)
    assert _same_as_fresh_prefill(lm, tr)


def test_unknown_layout_is_refused_everywhere(tiny_lm: LoadedModel, capsys) -> None:
    with pytest.raises(ValueError, match="unknown translation layout 'rows'; available: reencode, interleaved"):
        SimulTranslator(tiny_lm, make_prompt(), layout="rows")
    with pytest.raises(ValueError, match="unknown translation layout 'rows'"):
        TranslateConfig(layout="rows").validate()
    TranslateConfig(layout="interleaved").validate()
    with pytest.raises(SystemExit):
        main(["translate", "eval", "--model", "tiny", "--layout", "rows"])
    assert "invalid choice: 'rows'" in capsys.readouterr().err


def test_eval_json_records_layout_and_forwards(tiny_lm: LoadedModel) -> None:
    sources, refs = ["where is the station", "I like coffee"], ["dónde está la estación", "me gusta"]
    per_layout = {}
    for layout in ("reencode", "interleaved"):
        model = SimulTranslator(tiny_lm, make_prompt(), max_word_tokens=3, max_target_ratio=1.0, layout=layout)
        model.read(["warm", "up"])  # counters from before the run are not charged to it
        out = evaluate(model, sources, refs, ["wait-k:k=2"])["wait-k:k=2"]
        assert out["layout"] == layout
        assert out["forwards_per_source_word"] == round(out["forwards"] / 7, 3)
        assert out["forwards"] >= 7 + out["decoded_tokens"]  # at least a forward per source word and token
        per_layout[layout] = out
    assert per_layout["interleaved"]["reencoded_tokens"] == 0 < per_layout["reencode"]["reencoded_tokens"]
