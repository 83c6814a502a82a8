"""Simultaneous translation: SimulEval metrics by hand, policy schedules on a fake model, the real
translator on the tiny random model, and the sliding-window cache crop on a tiny random Gemma 3."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence

import pytest
import torch

from duplex.engine.models import LoadedModel
from duplex.engine.sequence import SharedSequence, Speaker
from duplex.engine.template import RoleMarkers, TurnTemplate
from duplex.translate.evaluate import (
    _stable_prefix_delays,
    load_test_set,
    translate_sentence,
)
from duplex.translate.metrics import (
    InstanceDelays,
    al,
    ap,
    corpus_latency,
    corpus_quality,
    dal,
    laal,
)
from duplex.translate.policies import available_simul_policies, make_simul_policy
from duplex.translate.prompt import UnsupportedLanguagePair, make_prompt
from duplex.translate.translator import SimulTranslator, TargetWord, TranslationModel


# ---- metrics, against values computed by hand ------------------------------------------------
def test_al_laal_ap_dal_by_hand() -> None:
    d = [2, 3, 4, 4]
    # |X| = 4, |Y| = 4: lags 2, 3-1, 4-2 (τ = 3, the first d_i >= |X|) -> 6/3
    assert al(d, 4, 4) == pytest.approx(2.0)
    # |Y| = 3 (reference shorter): rate 4/3: 2 + (3 - 4/3) + (4 - 8/3) = 5 -> 5/3
    assert al(d, 4, 3) == pytest.approx(5 / 3)
    # LAAL uses max(|Y|, |hyp|) = 4
    assert laal(d, 4, 3) == pytest.approx(2.0)
    assert ap(d, 4, 4) == pytest.approx(13 / 16)
    assert ap(d, 4, 3) == pytest.approx(13 / 12)
    # DAL (|Y| = |hyp| = 4, rate 1): d' = 2, 3, 4, 5 -> (2 + 2 + 2 + 2) / 4
    assert dal(d, 4, 3) == pytest.approx(2.0)
    # writing ahead: AL can reach 0; DAL's d' forbids it: d' = 1, 2, 3 -> (1 + 1 + 1) / 3
    assert al([1, 1, 1], 3, 3) == pytest.approx(0.0)
    assert dal([1, 1, 1], 3) == pytest.approx(1.0)
    # first word after the whole source: AL = d_1
    assert al([5, 5], 4, 2) == 5.0
    # offline (everything after |X|): AL = LAAL = DAL = |X|
    assert al([6] * 5, 6, 7) == laal([6] * 5, 6, 7) == dal([6] * 5, 6) == 6.0


def test_corpus_latency_is_the_sentence_mean_with_computation_aware_variants() -> None:
    a = InstanceDelays((2, 3, 4, 4), 4, 4, elapsed_ms=(700.0, 1000.0, 1300.0, 1300.0), source_duration_ms=1200.0)
    b = InstanceDelays((1, 1, 1), 3, 3, elapsed_ms=(400.0, 450.0, 500.0), source_duration_ms=900.0)
    out = corpus_latency([a, b])
    assert out["AL"] == pytest.approx((2.0 + 0.0) / 2)
    assert out["DAL"] == pytest.approx((2.0 + 1.0) / 2)
    # CA AL of a: rate 1200/4 = 300 ms: 700 + (1000 - 300) + (1300 - 600) (τ = 3) -> 2100/3
    # CA AL of b: rate 300: 400 + (450 - 300) + (500 - 600) (never >= 900) -> 450/3
    assert out["AL_CA_ms"] == pytest.approx((700.0 + 150.0) / 2)
    assert "AP_CA" in out and "LAAL_CA_ms" in out


def test_bleu_chrf_match_the_sacrebleu_cli(tmp_path) -> None:
    hyps = ["Estoy buscando una farmacia cerca.", "El autobús llega tarde hoy."]
    refs = ["Estoy buscando una farmacia cerca de aquí.", "El autobús llega tarde otra vez hoy."]
    (tmp_path / "hyp").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    (tmp_path / "ref").write_text("\n".join(refs) + "\n", encoding="utf-8")
    ours = corpus_quality(hyps, refs)
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref"), "-i", str(tmp_path / "hyp"),
                          "-m", "bleu", "chrf", "-b", "-w", "2"], capture_output=True, text=True, check=True)
    bleu, chrf = json.loads(cli.stdout)
    assert (ours["BLEU"], ours["chrF"]) == (pytest.approx(bleu, abs=0.01), pytest.approx(chrf, abs=0.01))


# ---- policies on a fake model ----------------------------------------------------------------
class FakeTranslation(TranslationModel):
    """Translates word i of the source to WORD_I (upper case) once it is read; the hypothesis adds
    a guess for the next word that is always wrong ("?n"), so consecutive hypotheses agree exactly
    on the words already read."""

    def __init__(self) -> None:
        self.source: list[str] = []
        self.confirmed: list[TargetWord] = []
        self.last: list[TargetWord] = []
        self.finished = False

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def read(self, words: Sequence[str]) -> None:
        self.source += list(words)

    def _word(self, i: int) -> TargetWord:
        return TargetWord(self.source[i].upper(), (i,))

    def next_word(self) -> TargetWord | None:
        i = len(self.confirmed)
        if i >= len(self.source):
            return None
        self.confirmed.append(self._word(i))
        return self.confirmed[-1]

    def hypothesis(self) -> list[TargetWord]:
        known = [self._word(i) for i in range(len(self.confirmed), len(self.source))]
        self.last = known + [TargetWord(f"?{len(self.source)}", (-1,))]
        return self.last

    def confirm(self, words: Sequence[TargetWord]) -> None:
        assert list(words) == self.last[:len(words)]
        self.confirmed += list(words)
        self.last = self.last[len(words):]


class FinishingFake(FakeTranslation):
    """At the end of the source the guess disappears (the model knows the sentence is over)."""

    def hypothesis(self) -> list[TargetWord]:
        hyp = super().hypothesis()
        return hyp[:-1] if self.finished else hyp


def test_retranslation_delays_are_when_each_word_became_stable() -> None:
    # displays after reads 1..3 and at the end: word 1 is stable from read 1, word 2 from read 3
    # (read 2 showed "X"), word 3 only at the end; 2 displayed words were later changed
    shown = [(1, 100.0, ["A", "?"]), (2, 200.0, ["A", "X", "?"]), (3, 300.0, ["A", "B", "?"]),
             (3, 350.0, ["A", "B", "C"])]
    delays, elapsed, revisions = _stable_prefix_delays(["A", "B", "C"], shown)
    assert delays == [1, 3, 3] and elapsed == [100.0, 300.0, 350.0]
    assert revisions == 1 + 2 + 1


def test_wait_k_reads_k_then_alternates() -> None:
    policy = make_simul_policy("wait-k", k=2)
    fake = FakeTranslation()
    schedule = []
    for n, w in enumerate(["a", "b", "c", "d", "e"], start=1):
        fake.read([w])
        schedule.append((n, [t.text for t in policy.on_source(fake, n, False)]))
    fake.finished = True
    schedule.append((5, [t.text for t in policy.on_source(fake, 5, True)]))
    assert schedule == [(1, []), (2, ["A"]), (3, ["B"]), (4, ["C"]), (5, ["D"]), (5, ["E", "?5"])]


def test_wait_k_delays_and_k_larger_than_the_source() -> None:
    fake_policy = make_simul_policy("wait-k", k=3)
    fake = FinishingFake()
    delays = []
    for n, w in enumerate(["a", "b", "c", "d", "e"], start=1):
        fake.read([w])
        delays += [n] * len(fake_policy.on_source(fake, n, False))
    fake.finished = True
    delays += [5] * len(fake_policy.on_source(fake, 5, True))
    assert delays == [3, 4, 5, 5, 5]  # d_i = min(k + i - 1, |X|)
    policy = make_simul_policy("wait-k", k=9)
    fake = FinishingFake()
    fake.read(["a", "b"])
    assert policy.on_source(fake, 2, False) == []


def test_local_agreement_confirms_the_common_prefix_of_two_hypotheses() -> None:
    policy = make_simul_policy("local-agreement")
    fake = FinishingFake()
    schedule = []
    for n, w in enumerate(["a", "b", "c", "d"], start=1):
        fake.read([w])
        schedule.append([t.text for t in policy.on_source(fake, n, False)])
        assert policy.hypothesis[-1] == f"?{n}"  # the unconfirmed guess is shown, not confirmed
    fake.finished = True
    schedule.append([t.text for t in policy.on_source(fake, 4, True)])
    # hypotheses [A ?1], [A B ?2], [A B C ?3], ...: two in a row agree on all but the guess
    assert schedule == [[], ["A"], ["B"], ["C"], ["D"]]


def test_retranslation_confirms_only_at_the_end_and_offline_reads_everything() -> None:
    policy = make_simul_policy("retranslate")
    fake = FinishingFake()
    for n, w in enumerate(["a", "b", "c"], start=1):
        fake.read([w])
        assert policy.on_source(fake, n, False) == []
        assert policy.hypothesis == [x.upper() for x in ["a", "b", "c"][:n]] + [f"?{n}"]
    fake.finished = True
    assert [t.text for t in policy.on_source(fake, 3, True)] == ["A", "B", "C"]
    offline = make_simul_policy("offline")
    fake = FinishingFake()
    fake.read(["a"])
    assert offline.on_source(fake, 1, False) == []
    fake.finished = True
    assert [t.text for t in offline.on_source(fake, 1, True)] == ["A"]


def test_policy_registry_and_errors() -> None:
    assert {"wait-k", "local-agreement", "retranslate", "offline"} <= set(available_simul_policies())
    with pytest.raises(ValueError, match="unknown translation policy"):
        make_simul_policy("nope")
    with pytest.raises(ValueError):
        make_simul_policy("wait-k", k=0)
    with pytest.raises(UnsupportedLanguagePair, match="en->es"):
        make_prompt("en", "xx")


def test_test_set_is_parallel() -> None:
    src, ref = load_test_set()
    assert len(src) == len(ref) >= 100
    assert all(s.strip() and r.strip() for s, r in zip(src, ref)), "no blank lines"
    assert len(set(src)) == len(src), "no duplicate sources"
    # alignment spot-check: a question stays a question, an exclamation stays one
    for s, r in zip(src, ref):
        assert s.rstrip().endswith("?") == r.rstrip().endswith("?"), (s, r)
        if r.rstrip().endswith("?"):
            assert "\u00bf" in r, r  # Spanish opens a question with ¿
        if "!" in r:
            assert "\u00a1" in r, r


# ---- the real translator on the tiny random model ---------------------------------------------
def test_translator_streaming_equals_offline_and_rollback_is_exact(tiny_lm: LoadedModel) -> None:
    """wait-k with k >= |X| writes nothing before the end, so it must equal offline; and after a
    hypothesis + read, the cache equals a fresh prefill of the same ids (rollback is exact)."""
    tr = SimulTranslator(tiny_lm, make_prompt(), max_word_tokens=4, max_target_ratio=1.0)
    sentence = "where is the station"
    offline = translate_sentence(tr, make_simul_policy("offline"), sentence)
    waitk = translate_sentence(tr, make_simul_policy("wait-k", k=10), sentence)
    assert waitk.prediction == offline.prediction
    assert waitk.delays == offline.delays == (4,) * len(offline.delays)
    la = translate_sentence(tr, make_simul_policy("local-agreement"), sentence)
    assert la.delays == tuple(sorted(la.delays)) and all(1 <= d <= 4 for d in la.delays)
    tr.reset()
    tr.read(["where", "is"])
    tr.confirm(tr.hypothesis()[:1])
    tr.read(["the"])
    logits = tr.seq.logits.clone()
    fresh = SharedSequence(tiny_lm, tr.template)
    fresh.begin_turn(Speaker.USER)  # no header: the ids already start with the prompt's BOS
    fresh.append(tr.seq.ids)
    assert torch.allclose(fresh.logits, logits, atol=1e-4)


# ---- Gemma 3 sliding-window layers ---------------------------------------------------------
def _tiny_gemma3(tokenizer) -> LoadedModel:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-gemma3", device=torch.device("cpu"),
                       dtype=torch.float32)


def test_rollback_past_a_full_sliding_window_reencodes_exactly(tiny_lm: LoadedModel) -> None:
    lm = _tiny_gemma3(tiny_lm.tokenizer)
    empty = RoleMarkers((), ())
    template = TurnTemplate(system=empty, user=empty, agent=empty, eos_ids=(0,))
    ids = list(range(100, 130))
    seq = SharedSequence(lm, template)
    seq.begin_turn(Speaker.USER)
    seq.append(ids[:20])  # 20 > window 8: the sliding layer has dropped positions
    seq.append(ids[20:])
    seq.rollback(12)  # back to 18 tokens: a plain crop would raise
    seq.append(ids[18:25])
    ref = SharedSequence(lm, template)
    ref.begin_turn(Speaker.USER)
    ref.append(ids[:25])
    assert seq.ids == ref.ids
    assert torch.allclose(seq.logits, ref.logits, atol=1e-5)
    seq.rollback(1)  # and the lazy logits after a rollback
    ref2 = SharedSequence(lm, template)
    ref2.begin_turn(Speaker.USER)
    ref2.append(ids[:24])
    assert torch.allclose(seq.logits, ref2.logits, atol=1e-5)


# ---- the session with a speech source (committed ASR words) --------------------------------
async def test_translate_session_reads_committed_asr_words_and_ends_at_speech_stopped(tiny_engine) -> None:
    from duplex.session.events import AgentTextDelta, AsrWord, SpeechStopped, TurnEnded
    from duplex.translate.session import (
        TranslateConfig,
        TranslateSession,
        TranslationUpdated,
    )

    session = TranslateSession(tiny_engine, TranslateConfig(policy="wait-k", k=1))
    await session.start()
    try:
        for i, word in enumerate(["where", "is", "the", "station"]):
            session.submit(AsrWord(word, 0.3 * i, 0.3 * i + 0.2, committed=True))
        session.submit(AsrWord("maybe", 1.5, 1.7, committed=False))  # tentative: shown, never read
        session.submit(SpeechStopped(2.0))
        events = []

        async def collect() -> None:
            async for ev in session.events():
                events.append(ev)
                if isinstance(ev, TurnEnded) and ev.speaker == "agent":
                    return

        await asyncio.wait_for(collect(), 60)
    finally:
        await session.close()
    user = next(e for e in events if isinstance(e, TurnEnded) and e.speaker == "user")
    assert user.text == "where is the station"
    agent = events[-1]
    assert agent.text == "".join(e.text for e in events if isinstance(e, AgentTextDelta))
    updates = [e for e in events if isinstance(e, TranslationUpdated)]
    assert [u.source for u in updates][:4] == ["where", "where is", "where is the", "where is the station"]
    assert session.lines == [(user.text, agent.text)]


def test_translate_session_has_every_session_member_the_voice_pipeline_uses() -> None:
    """The pipeline drives a TranslateSession as if it were the chat Session: every
    ``self.session.X`` it touches must exist (a missing ``hold_decoding`` once killed the TTS pump
    silently, so translate mode with audio output never spoke)."""
    import re
    from pathlib import Path

    import duplex.voice.pipeline as pipeline_module
    from duplex.translate.session import TranslateSession

    used = set(re.findall(r"self\.session\.([A-Za-z_]\w*)", Path(pipeline_module.__file__).read_text()))
    assert used, "the pipeline no longer reaches the session as self.session: update this test"
    instance_attrs = {"id", "policy", "state", "config", "engine", "clock"}  # set in __init__
    missing = sorted(name for name in used if not hasattr(TranslateSession, name) and name not in instance_attrs)
    assert not missing, f"TranslateSession lacks {missing}"


async def test_translate_session_step_waits_for_a_decode_hold_bounded(tiny_engine) -> None:
    from duplex.session.events import TextInput, TurnEnded
    from duplex.translate.session import TranslateConfig, TranslateSession

    session = TranslateSession(tiny_engine, TranslateConfig(policy="offline", max_decode_hold_s=0.3),
                               translator_factory=lambda lm, prompt: FakeTranslation())
    await session.start()
    try:
        session.hold_decoding()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        session.submit(TextInput("where is it", final=True))

        async def until_done() -> float:
            async for ev in session.events():
                if isinstance(ev, TurnEnded) and ev.speaker == "agent":
                    return loop.time() - t0
            raise AssertionError("closed")

        waited = await asyncio.wait_for(until_done(), 30)
        assert waited >= 0.25  # the hold held the first step, then gave up on its own
        # a hold now lasts 20 s, so that a turn that waited for it stands out from a slow machine's
        session.config = dataclasses.replace(session.config, max_decode_hold_s=20.0)
        session.hold_decoding()
        session.release_decoding()  # a release before the step: no wait at all
        t0 = loop.time()
        session.submit(TextInput("where is it", final=True))
        assert await asyncio.wait_for(until_done(), 60) < 10.0
    finally:
        await session.close()


def test_plot_draws_bleu_and_chrf_against_laal_from_a_tiny_eval_json(tmp_path) -> None:
    from duplex.translate.plot import curve_points

    def scores(bleu: float, chrf: float, laal: float) -> dict[str, float]:
        return {"BLEU": bleu, "chrF": chrf, "LAAL": laal, "LAAL_CA_ms": 1000 * laal + 500}

    text = {"policies": {"wait-k:k=3": scores(20, 45, 2.9), "wait-k:k=1": scores(10, 35, 1.1),
                         "offline": scores(30, 55, 7.0), "local-agreement": scores(25, 50, 4.0)}}
    speech = {"policies": {"wait-k:k=1": scores(8, 30, 1.5), "offline": {"BLEU": 28.0, "chrF": 52.0}}}
    (tmp_path / "text.json").write_text(json.dumps(text))
    (tmp_path / "speech.json").write_text(json.dumps(speech))
    points = curve_points(text)
    assert [p.policy for p in points] == ["wait-k:k=1", "wait-k:k=3", "local-agreement", "offline"]
    assert [p.latency for p in curve_points(text, "LAAL_CA_ms")][:2] == [1.6, 3.4]  # ms -> s
    out = tmp_path / "curve.png"
    run = subprocess.run([sys.executable, "-m", "duplex.cli.main", "translate", "plot", str(tmp_path / "text.json"),
                          str(tmp_path / "speech.json"), "--labels", "text", "speech", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = run.stdout.splitlines()
    assert len(lines) == 5  # 4 text points + the speech wait-k (its offline entry has no LAAL)
    assert lines[0].split("\t")[:2] == ["text", "wait-k:k=1"] and "BLEU=10.00" in lines[0]
    # one latency per file: text in words, speech on the computation-aware clock, each its own column
    both = tmp_path / "both.png"
    run = subprocess.run([sys.executable, "-m", "duplex.cli.main", "translate", "plot", str(tmp_path / "text.json"),
                          str(tmp_path / "speech.json"), "--labels", "text", "speech", "--latency", "LAAL",
                          "LAAL_CA_ms", "--out", str(both)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    speech_lines = [ln for ln in run.stdout.splitlines() if ln.startswith("speech\t")]
    assert speech_lines == ["speech\twait-k:k=1\tLAAL_CA_ms=2.000\tBLEU=8.00\tchrF=30.00"]
    run = subprocess.run([sys.executable, "-m", "duplex.cli.main", "translate", "plot", str(tmp_path / "text.json"),
                          "--latency", "LAAL", "AL", "--out", str(both)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "2 latency keys for 1 files" in run.stderr


def test_translator_forwards_per_step(tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost model: a source word is one forward without the output layer (keep 0: nothing
    samples after it); a write re-opens the target (header + confirmed prefix) in one forward,
    then one forward per decoded token."""
    tr = SimulTranslator(tiny_lm, make_prompt(), max_word_tokens=3, max_target_ratio=2.0)
    from duplex.engine.sequence import SharedSequence

    calls: list[tuple[int, int]] = []
    original = SharedSequence.forward_direct

    def counting(self, ids, start_pos, keep=1):  # type: ignore[no-untyped-def]
        # one model call, whichever forward runs it (the lean decode one or transformers')
        calls.append((len(ids), keep))
        return original(self, ids, start_pos, keep)

    monkeypatch.setattr(SharedSequence, "forward_direct", counting)
    tr.read(["where"])
    assert [keep for _, keep in calls] == [0] and tr.stats.forwards == 1
    calls.clear()
    word = tr.next_word()
    assert word is not None
    header = len(tiny_lm.tokenizer.encode(make_prompt().target_header, add_special_tokens=False))
    assert calls[0] == (header, 1)  # the target header alone (nothing confirmed yet), then decode steps
    assert len(calls) == 1 + len(word.ids)
    calls.clear()
    tr.read(["is"])
    tr.next_word()
    assert calls[0][1] == 0 and calls[1] == (header + len(word.ids), 1)  # word; header + confirmed in ONE forward


async def test_translation_sessions_forwards_share_the_engines_ticks(tiny_engine) -> None:
    """Two live translations at once: their forwards go through the engine's scheduler, each session
    in its own lane, so their rows share ticks (one forward for both). Before, each session's steps
    ran their forwards on a job thread of their own, one session after the other."""
    from duplex.session.events import TextInput, TurnEnded
    from duplex.translate.session import TranslateConfig, TranslateSession

    sessions = [TranslateSession(tiny_engine, TranslateConfig(policy="wait-k", k=1)) for _ in range(2)]
    for session in sessions:
        await session.start()
    try:
        owners = {id(session.translator.seq) for session in sessions}
        tiny_engine.scheduler.trace.clear()
        for word in ["where", "is", "the", "old", "station"]:
            for session in sessions:
                session.submit(TextInput(word + " ", final=False))
        for session in sessions:
            session.submit(TextInput("", final=True))

        async def until_done(session: TranslateSession) -> None:
            async for ev in session.events():
                if isinstance(ev, TurnEnded) and ev.speaker == "agent":
                    return

        await asyncio.wait_for(asyncio.gather(*(until_done(s) for s in sessions)), 60)
    finally:
        for session in sessions:
            await session.close()
    ticks = list(tiny_engine.scheduler.trace)
    assert {r.owner for t in ticks for r in t.rows} == owners  # every forward went through the ticks
    shared = [t for t in ticks if {r.owner for r in t.rows} == owners]
    assert shared and all(t.forwards == 1 for t in shared)
