"""Translation from a speech source: SimulEval's speech latency in ms (values computed by hand),
the computation-aware clock of a spoken sentence, and ``translate run --source-audio`` end to end
with the tiny random model and the fake whisper behind the voice pipeline's speech input."""

from __future__ import annotations

import itertools
import json
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from duplex.audio.events import AsrWord
from duplex.audio.fakes import EnergyVad, FakeWhisper

from duplex.cli.main import main
from duplex.translate import speech
from duplex.translate.instances import read_instances, score_instances, score_records
from duplex.translate.metrics import InstanceDelays, speech_latency
from duplex.translate.policies import make_simul_policy
from duplex.translate.speech import source_wav, translate_speech_sentence
from duplex.translate.translator import TargetWord, TranslationModel
from duplex.voice.config import make_speech_input

# One spoken sentence: |X| = 1000 ms of audio, 4 target words, a 3-word reference.
_DELAYS = [300.0, 600.0, 600.0, 1000.0]
_ELAPSED = [320.0, 620.0, 630.0, 1030.0]
_RECORD = {"index": 0, "source": ["0000.wav"], "source_type": "speech", "prediction": "A B C D",
           "delays": _DELAYS, "elapsed": _ELAPSED, "prediction_length": 4, "reference": "A B C",
           "source_length": 1000.0}


def test_speech_latency_is_simulevals_in_ms() -> None:
    out = speech_latency([InstanceDelays(tuple(_DELAYS), 1000.0, 3, tuple(_ELAPSED))])
    # AL, |Y| = 3 (reference): rate 1000/3 ms a word, tau = 4 (d_4 = 1000 = |X|):
    # (300 + (600 - 333.3) + (600 - 666.7) + (1000 - 1000)) / 4 = 500 / 4
    assert out["AL_ms"] == pytest.approx(125.0)
    # LAAL: max(|Y|, |hyp|) = 4, rate 250: (300 + 350 + 100 + 250) / 4
    assert out["LAAL_ms"] == pytest.approx(250.0)
    # StreamLAAL: the sentence is its own segment, starting at 0 -> LAAL
    assert out["StreamLAAL_ms"] == pytest.approx(250.0)
    # AP: 2500 / (1000 * 3)
    assert out["AP"] == pytest.approx(2500 / 3000)
    # DAL, |hyp| = 4, rate 250: d' = 300, 600, 850, 1100 -> (300 + 350 + 350 + 350) / 4
    assert out["DAL_ms"] == pytest.approx(337.5)
    # computation-aware, elapsed in place of the delays on the same |X|:
    # AL_CA: (320 + (620 - 333.3) + (630 - 666.7) + (1030 - 1000)) / 4 = 600 / 4
    assert out["AL_CA_ms"] == pytest.approx(150.0)
    assert out["LAAL_CA_ms"] == out["StreamLAAL_CA_ms"] == pytest.approx((320 + 370 + 130 + 280) / 4)
    assert out["AP_CA"] == pytest.approx(2600 / 3000)
    # DAL_CA: e' = 320, 620, 870, 1120 -> (320 + 370 + 370 + 370) / 4
    assert out["DAL_CA_ms"] == pytest.approx(357.5)


def test_speech_latency_edge_cases_by_hand() -> None:
    # the first word written after the whole source (here on the computation-aware clock):
    # SimulEval's AL/LAAL are then d_1 itself
    late = speech_latency([InstanceDelays((1000.0, 1000.0), 1000.0, 2, (1200.0, 1300.0))])
    assert late["AL_CA_ms"] == late["LAAL_CA_ms"] == late["StreamLAAL_CA_ms"] == pytest.approx(1200.0)
    # AL (delays): rate 500, tau = 1 -> 1000; DAL: d' = 1000, 1500 -> (1000 + 1000) / 2
    assert late["AL_ms"] == pytest.approx(1000.0) and late["DAL_ms"] == pytest.approx(1000.0)
    # no elapsed: no computation-aware keys; no reference: |Y| = |hyp| = 2, rate 400:
    # d = 200, 800 -> (200 + (800 - 400)) / 2 = 300 (tau = 2: 800 >= 800)
    plain = speech_latency([InstanceDelays((200.0, 800.0), 800.0, None)])
    assert plain["AL_ms"] == plain["LAAL_ms"] == pytest.approx(300.0) and "AL_CA_ms" not in plain
    # StreamLAAL on a stream: the sentence starts 5 s in; its delays count from there, clamped at 0
    # (a word written 100 ms before the sentence began counts as 0): (0 + 600 - 250 + ...) as above
    stream = speech_latency([InstanceDelays((4900.0, 5600.0, 5600.0, 6000.0), 1000.0, 3,
                                            source_offset_ms=5000.0)])
    assert stream["StreamLAAL_ms"] == pytest.approx((0 + 350 + 100 + 250) / 4)


def test_score_reads_speech_logs_ours_and_simulevals(tmp_path: Path, capsys) -> None:
    # SimulEval's own speech log has no source_type: its audio `source` says it is speech
    simuleval = {k: v for k, v in _RECORD.items() if k != "source_type"} | {"index": 1, "source": ["/d/x.wav"]}
    log = tmp_path / "instances.log"
    log.write_text("".join(json.dumps(r) + "\n" for r in (_RECORD, simuleval)), encoding="utf-8")
    assert main(["translate", "score", str(log)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source_type"] == "speech" and out["sentences"] == 2
    assert (out["StreamLAAL_ms"], out["LAAL_ms"], out["AL_ms"], out["DAL_ms"]) == (250.0, 250.0, 125.0, 337.5)
    assert (out["StreamLAAL_CA_ms"], out["AL_CA_ms"], out["AP_CA"]) == (275.0, 150.0, pytest.approx(0.867, abs=1e-3))
    assert out["BLEU"] > 0 and "word_interval_ms" not in out and "AL" not in out
    with pytest.raises(ValueError, match="mix"):
        score_records([_RECORD, {"index": 1, "prediction": "a", "delays": [1], "source_length": 1}])


class _Echo(TranslationModel):
    """Translates source word i to its upper case once it is read (nothing beyond the source)."""

    def __init__(self) -> None:
        self.source: list[str] = []
        self.confirmed: list[TargetWord] = []

    def reset(self) -> None:
        self.source, self.confirmed = [], []

    def read(self, words: Sequence[str]) -> None:
        self.source += list(words)

    def next_word(self) -> TargetWord | None:
        i = len(self.confirmed)
        if i >= len(self.source):
            return None
        self.confirmed.append(TargetWord(self.source[i].upper(), (i,)))
        return self.confirmed[-1]

    def hypothesis(self) -> list[TargetWord]:
        return [TargetWord(w.upper(), (i,)) for i, w in enumerate(self.source) if i >= len(self.confirmed)]

    def confirm(self, words: Sequence[TargetWord]) -> None:
        self.confirmed += list(words)


class _ScriptedSpeech:
    """A speech input that commits scripted words after given pushes (and at the flush)."""

    def __init__(self, script: dict[int, list[str]], at_flush: list[str]) -> None:
        self.script, self.at_flush = script, at_flush
        self.pushes = 0

    def reset(self) -> None:
        self.pushes = 0

    def push(self, samples: np.ndarray) -> list[AsrWord]:
        self.pushes += 1
        return [AsrWord("~", 0.0, 0.0, committed=False)] + [
            AsrWord(w, 0.0, 0.0, committed=True) for w in self.script.get(self.pushes, [])]

    def flush(self) -> list[AsrWord]:
        return [AsrWord(w, 0.0, 0.0, committed=True) for w in self.at_flush]


def test_spoken_sentence_delays_are_audio_read_and_elapsed_adds_compute() -> None:
    # 1 s of audio in 100 ms pushes; "a" commits after push 3 (300 ms), "b c" after push 6, "d" at
    # the flush. Every timed step (a push, a translation step) costs 10 ms on the fake timer.
    clock = itertools.count(0.0, 0.010)
    res = translate_speech_sentence(_Echo(), make_simul_policy("wait-k", k=1),
                                    _ScriptedSpeech({3: ["a"], 6: ["b", "c"]}, ["d"]),  # type: ignore[arg-type]
                                    np.zeros(16_000, np.float32), chunk_ms=100, timer=lambda: next(clock))
    assert res.transcript == "a b c d" and res.prediction == "A B C D"
    assert res.source_word_ms == (300.0, 600.0, 600.0, 1000.0)
    assert res.delays_ms == (300.0, 600.0, 600.0, 1000.0) and res.source_duration_ms == 1000.0
    # clock: push k ends at max(clock, 100 k) + 10; push 3 -> 310, "A" -> 320; push 6 -> 610,
    # "B" -> 620, "C" -> 630; push 10 -> 1010; flush -> 1020, "D" -> 1030
    assert res.elapsed_ms == pytest.approx((320.0, 620.0, 630.0, 1030.0))
    assert res.asr_compute_s == pytest.approx(0.11) and res.translate_compute_s == pytest.approx(0.05)
    log = res.to_log()
    assert (log["source_type"], log["source_length"], log["delays"]) == ("speech", 1000.0, list(_DELAYS))
    scores = score_records([log | {"reference": "A B C"}])
    assert (scores["AL_ms"], scores["LAAL_ms"], scores["AL_CA_ms"]) == (125.0, 250.0, 150.0)


def _tone_wav(path: Path, seconds: float, silence_s: float = 0.3) -> None:
    n = int(seconds * 16_000)
    tone = np.sin(np.arange(n) * 2 * np.pi * 220 / 16_000) * 0.3
    pcm = (np.concatenate([tone, np.zeros(int(silence_s * 16_000))]) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(pcm.tobytes())


def _speech_test_set(tmp_path: Path, monkeypatch, pairs: list[tuple[str, str, float]]) -> Path:
    """src.txt / ref.txt and one tone WAV per (source, reference, tone seconds) pair (the WAV is
    0.3 s longer: silence around the tone); the voice pipeline's speech input gets the fake whisper
    (a word per 0.25 s of tone) and an energy VAD. Returns the audio folder."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, (_, _, tone_s) in enumerate(pairs):
        _tone_wav(source_wav(audio, i), tone_s)
    (tmp_path / "src.txt").write_text("".join(f"{src}\n" for src, _, _ in pairs), encoding="utf-8")
    (tmp_path / "ref.txt").write_text("".join(f"{ref}\n" for _, ref, _ in pairs), encoding="utf-8")
    from duplex.translate.session import TranslateSession

    monkeypatch.setattr(speech, "speech_input_factory", lambda *a, **k: lambda: make_speech_input(
        FakeWhisper(word_s=0.25), vad=EnergyVad(), turn_features=None,
        asr_interval_ms=TranslateSession.asr_interval_ms))  # as the real factory
    return audio


def test_run_source_audio_with_the_tiny_model_and_fake_whisper(tmp_path: Path, monkeypatch, capsys) -> None:
    audio = _speech_test_set(tmp_path, monkeypatch, [("where is the station", "dónde está la estación", 1.5),
                                                     ("I like coffee", "me gusta el café", 1.0)])
    out = tmp_path / "run"
    assert main(["translate", "run", "--model", "tiny", "--src", str(tmp_path / "src.txt"), "--ref",
                 str(tmp_path / "ref.txt"), "--source-audio", str(audio), "--policy", "wait-k", "--k", "2",
                 "--out", str(out), "--threads", "1"]) == 0
    scores = json.loads(capsys.readouterr().out)
    records = read_instances(out / "instances.log")
    assert [(r["index"], r["source"], r["source_length"]) for r in records] == [
        (0, [str(source_wav(audio, 0))], 1800.0), (1, [str(source_wav(audio, 1))], 1300.0)]
    # 1.5 s of tone = 6 fake words; LocalAgreement commits them in pairs as passes agree, the last at the end
    assert records[0]["transcript"] == "w0 w1 w2 w3 w4 w5"
    assert records[0]["source_word_delays"] == [1200.0, 1200.0, 1580.0, 1580.0, 1700.0, 1700.0]
    assert records[1]["transcript"] == "w0 w1 w2 w3"
    for r in records:
        assert r["source_type"] == "speech" and r["prediction_length"] == len(r["delays"]) == len(r["elapsed"])
        commits = r["source_word_delays"]
        # wait-k, k = 2: target word i waits for source word min(k + i, |X|), in ms of audio read
        assert all(d >= commits[min(2 + i, len(commits)) - 1] for i, d in enumerate(r["delays"]))
        assert all(d <= r["source_length"] for d in r["delays"])
        assert all(e >= d for e, d in zip(r["elapsed"], r["delays"]))  # compute only adds
    assert scores["policy"] == "wait-k:k=2" and scores["source_type"] == "speech"
    assert json.loads((out / "scores.json").read_text(encoding="utf-8")) == scores
    rescored = score_instances(out / "instances.log")
    assert {k: scores[k] for k in rescored} == rescored
    assert {"StreamLAAL_ms", "LAAL_ms", "AL_ms", "AP", "DAL_ms", "StreamLAAL_CA_ms", "LAAL_CA_ms", "AL_CA_ms",
            "AP_CA", "DAL_CA_ms", "BLEU", "chrF"} <= set(scores)
    assert scores["StreamLAAL_CA_ms"] >= scores["StreamLAAL_ms"] and scores["source_audio_s"] == 3.1


def test_run_source_audio_names_a_missing_wav_before_loading(tmp_path: Path, capsys) -> None:
    (tmp_path / "src.txt").write_text("one\ntwo\n", encoding="utf-8")
    _tone_wav(source_wav(tmp_path, 0), 0.5)
    assert main(["translate", "run", "--model", "tiny", "--src", str(tmp_path / "src.txt"),
                 "--source-audio", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "0001.wav" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.skipif("flite:kal" not in __import__("duplex.eval.voices", fromlist=["x"]).available_voices(),
                    reason="needs flite")
def test_render_speech_writes_one_wav_per_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "src.txt").write_text("Good morning.\n\nWhere is the station?\n", encoding="utf-8")
    assert main(["translate", "render-speech", "--src", str(tmp_path / "src.txt"), "--voice", "flite:kal",
                 "--out", str(tmp_path / "wavs")]) == 0
    assert sorted(p.name for p in (tmp_path / "wavs").iterdir()) == ["0000.wav", "0001.wav", "manifest.json"]
    manifest = json.loads((tmp_path / "wavs" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["sources"] == ["Good morning.", "Where is the station?"] and manifest["voice"] == "flite:kal"
    with wave.open(str(tmp_path / "wavs" / "0001.wav"), "rb") as w:
        assert w.getframerate() == 16_000 and w.getnchannels() == 1
        assert manifest["durations_ms"][1] == round(1000 * w.getnframes() / 16_000, 1) > 500


def test_eval_source_audio_scores_each_policy_and_reports_a_speech_table(tmp_path: Path, monkeypatch,
                                                                           capsys) -> None:
    audio = _speech_test_set(tmp_path, monkeypatch, [("where is the station", "dónde está la estación", 1.5)])
    result_json = tmp_path / "eval.json"
    assert main(["translate", "eval", "--model", "tiny", "--src", str(tmp_path / "src.txt"), "--ref",
                 str(tmp_path / "ref.txt"), "--source-audio", str(audio), "--policies", "wait-k:k=1", "offline",
                 "--instances", str(tmp_path / "inst"), "--json", str(result_json), "--threads", "1"]) == 0
    capsys.readouterr()
    result = json.loads(result_json.read_text(encoding="utf-8"))
    for spec, folder in (("wait-k:k=1", "wait-k_k1"), ("offline", "offline")):
        rescored = score_instances(tmp_path / "inst" / folder / "instances.log")
        assert {k: result["policies"][spec][k] for k in rescored} == rescored
    # offline writes everything once the whole 1.8 s source is heard: every delay is |X|
    offline = read_instances(tmp_path / "inst" / "offline" / "instances.log")[0]
    assert set(offline["delays"]) == {1800.0}
    assert result["policies"]["offline"]["StreamLAAL_ms"] == 1800.0
    assert main(["translate", "report", str(result_json)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| policy | BLEU | chrF | StreamLAAL (s) |") and table[3].startswith("| offline |")
    assert table[3].split("|")[4].strip() == "1.80"
