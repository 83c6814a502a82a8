"""Streaming ASR (LocalAgreement-2) and the VAD-gated speech input, with fakes and for real."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import jiwer
import numpy as np
import pytest

from duplex.audio.asr import StreamingAsr, load_whisper
from duplex.audio.commands import librivox_samples, normalize_text
from duplex.audio.convert import read_wav, to_mono_16k
from duplex.audio.events import AsrWord, SpeechStarted, SpeechStopped
from duplex.audio.fakes import EnergyVad, FakeWhisper
from duplex.audio.speech_input import AsyncSpeechInput, SpeechInput
from duplex.audio.vad import VadSegmenter, WebRtcVad

SR = 16000


def _tone(seconds: float) -> np.ndarray:
    return (0.3 * np.sin(np.arange(int(SR * seconds)) * 0.2)).astype(np.float32)


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(SR * seconds), np.float32)


def _noise(seconds: float, amp: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0, amp, int(SR * seconds)), -1, 1).astype(np.float32)


def _feed(pipeline: SpeechInput, audio: np.ndarray, chunk: int = 1600) -> list:
    events = []
    for i in range(0, len(audio), chunk):
        events += pipeline.push(audio[i : i + chunk])
    return events + pipeline.flush()


# -- LocalAgreement with a scripted whisper -------------------------------------------------


def test_local_agreement_commits_after_two_agreeing_passes() -> None:
    asr = StreamingAsr(FakeWhisper())
    asr.push(_tone(0.6), t_s=10.0)
    first = asr.process()
    assert first and not any(w.committed for w in first)  # nothing agreed yet
    asr.push(_tone(0.6))
    second = asr.process()
    committed = [w for w in second if w.committed]
    assert [w.text for w in committed] == ["w0"]
    assert committed[0].start_s == pytest.approx(10.0) and committed[0].end_s == pytest.approx(10.5)
    final = asr.finish()
    assert all(w.committed for w in final)
    assert [w.text for w in final] == ["w1", "w2~19200"]
    assert asr.committed_text.startswith("w0 w1")
    assert asr.finish() == []


def test_long_utterance_keeps_buffer_bounded_and_times_increasing() -> None:
    asr = StreamingAsr(FakeWhisper(), buffer_trim_s=4.0, max_buffer_s=6.0)
    committed: list[AsrWord] = []
    for _ in range(40):  # 40 s of continuous "speech"
        asr.push(_tone(1.0))
        committed += [w for w in asr.process() if w.committed]
        assert asr.buffer_s <= 7.0
    committed += asr.finish()
    starts = [w.start_s for w in committed]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert starts[-1] > 35.0  # times are absolute, not buffer-relative


def _buffer_with_words(asr: StreamingAsr, seconds: float, committed: list, tentative: list) -> None:
    asr.push(_tone(seconds), t_s=0.0)
    asr._commit(committed)
    asr._previous = tentative


def test_trim_keeps_committed_context_and_cuts_between_aligned_words() -> None:
    from duplex.audio.asr import _Word

    asr = StreamingAsr(FakeWhisper(), buffer_trim_s=4.0, trim_context_s=1.5)
    words = [_Word(f"c{i}", 0.5 * i, 0.5 * i + 0.45) for i in range(10)]  # committed up to 4.95 s
    _buffer_with_words(asr, 6.0, words, [_Word("t0", 5.0, 5.5)])
    asr._maybe_trim([])
    # the latest gap at least 1.5 s before the last committed word's end (4.95 - 1.5 = 3.45)
    assert asr._offset_s == pytest.approx(2.975, abs=1e-3)
    assert asr.buffer_s == pytest.approx(6.0 - 2.975, abs=1e-3)
    assert [w.text for w in asr._committed_in_buffer][:2] == ["c6", "c7"]  # the context, heard again


def test_trim_never_cuts_through_shared_out_times_or_an_uncommitted_word() -> None:
    from duplex.audio.asr import _Word

    untimed = StreamingAsr(FakeWhisper(), buffer_trim_s=4.0, trim_context_s=1.5)
    words = [_Word(f"c{i}", 0.5 * i, 0.5 * i + 0.5, timed=False) for i in range(10)]
    _buffer_with_words(untimed, 6.0, words, [])
    untimed._maybe_trim([])
    assert untimed._offset_s == 0.0  # no aligned gap to cut at: the buffer stays whole

    early = StreamingAsr(FakeWhisper(), buffer_trim_s=4.0, trim_context_s=1.5)
    words = [_Word(f"c{i}", 0.5 * i, 0.5 * i + 0.45) for i in range(10)]
    _buffer_with_words(early, 6.0, words, [_Word("t0", 1.2, 1.6)])  # whisper revised its times
    early._maybe_trim([])
    assert early._offset_s <= 1.0  # before the uncommitted word (less 0.2 s)


def test_an_untimed_final_pass_commits_every_word_once_in_order() -> None:
    """The turn-end passes skip whisper's word alignment: their words are matched to the
    committed ones by text, so nothing is committed twice or lost."""
    timed, untimed = StreamingAsr(FakeWhisper()), StreamingAsr(FakeWhisper())
    out: dict[int, list[AsrWord]] = {}
    for asr in (timed, untimed):
        words: list[AsrWord] = []
        for _ in range(3):
            asr.push(_tone(0.6))
            words += [w for w in asr.process() if w.committed]
        asr.push(_tone(0.4))
        words += asr.finish(word_times=asr is timed)
        out[id(asr)] = words
    assert [c.get("word_timestamps") for c in untimed.model.calls][-1] is False
    ref, got = out[id(timed)], out[id(untimed)]
    assert [w.text.split("~")[0] for w in got] == [w.text.split("~")[0] for w in ref]
    starts = [w.start_s for w in got]
    assert starts == sorted(starts)


def test_untimed_words_follow_the_committed_text_even_if_whisper_revises_a_word() -> None:
    from duplex.audio.asr import _Word

    asr = StreamingAsr(FakeWhisper())
    committed = [_Word("Can", 0.0, 0.2), _Word("you", 0.2, 0.4), _Word("help", 0.4, 0.7)]
    asr._commit(committed)
    hypothesis = [_Word(t, i * 0.1, i * 0.1 + 0.1) for i, t in enumerate(["Can", "you", "kelp", "me", "write?"])]
    kept = asr._drop_committed(hypothesis, timed=False)
    assert [w.text for w in kept] == ["me", "write?"]
    assert all(w.start_s >= 0.7 for w in kept)  # after the last committed word


def test_a_word_whose_aligned_start_moved_back_is_not_taken_as_committed() -> None:
    """Alignment times jitter between passes: a new word starting before the last committed
    word's end is still new if the text says so (it was lost when times decided)."""
    from duplex.audio.asr import _Word

    asr = StreamingAsr(FakeWhisper())
    asr._commit([_Word("Unless", 0.6, 0.9), _Word("to", 0.9, 1.1), _Word("be", 1.1, 1.3), _Word("rather", 1.3, 2.0)])
    texts = ["Unless", "to", "be", "rather", "cold-hearted", "and", "rather", "selfish"]
    starts = [0.6, 0.9, 1.1, 1.3, 1.85, 2.5, 2.7, 3.0]
    hypothesis = [_Word(t, s0, s0 + 0.3) for t, s0 in zip(texts, starts)]
    kept = asr._drop_committed(hypothesis, timed=True)
    assert [w.text for w in kept] == ["cold-hearted", "and", "rather", "selfish"]
    assert kept[0].start_s >= 2.0


def test_a_decoding_loop_is_kept_once_and_real_repeats_stay() -> None:
    from duplex.audio.asr import _Word

    def words(text: str) -> list[_Word]:
        return [_Word(t, i * 0.2, i * 0.2 + 0.2) for i, t in enumerate(text.split())]

    def kept(text: str) -> str:
        return " ".join(w.text for w in StreamingAsr._drop_loop(words(text)))

    loop = "Where did you buy those shoes? Where did you buy those shoes? Where did you buy those"
    assert kept(loop) == "Where did you buy those shoes?"
    assert kept("So, good morning. How did you sleep? Good morning. How did you sleep? Good morning.") == \
        "So, good morning. How did you sleep?"
    for real in ("Thank you, thank you.", "no no no no", "Can you help me carry these bags?",
                 "I think, I think so"):
        assert kept(real) == real


def test_hallucination_filter_drops_no_speech_segments() -> None:
    asr = StreamingAsr(FakeWhisper(no_speech_prob=0.9))
    asr.push(_tone(2.0))
    assert asr.process() == [] and asr.finish() == []


# -- VAD-gated pipeline ----------------------------------------------------------------------


def test_speech_input_gates_whisper_with_vad() -> None:
    whisper = FakeWhisper()
    pipeline = SpeechInput(VadSegmenter(EnergyVad()), StreamingAsr(whisper), asr_interval_ms=500)
    assert _feed(pipeline, _silence(3.0)) == []
    assert whisper.calls == []  # silence never reaches whisper

    audio = np.concatenate([_silence(1.0), _tone(2.0), _silence(1.0), _tone(1.2), _silence(1.0)])
    events = _feed(pipeline, audio, chunk=777)
    kinds = [type(e).__name__ for e in events if not isinstance(e, AsrWord)]
    assert kinds == ["SpeechStarted", "SpeechStopped"] * 2
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert starts[0].t_s == pytest.approx(4.0, abs=0.05)  # stream time continues across pushes
    words = [e for e in events if isinstance(e, AsrWord) and e.committed]
    assert len(words) >= 5
    for w in words:  # every word lies inside a turn (plus prefix padding)
        assert any(s.t_s - 0.35 <= w.start_s and w.end_s <= e.t_s + 0.05
                   for s, e in zip(starts, stops)), w
    # whisper only ever saw one turn at a time (<= 2 s + padding + trailing silence)
    assert max(c["n_samples"] for c in whisper.calls) <= SR * 3.0


def test_noise_produces_no_turn_and_no_words() -> None:
    whisper = FakeWhisper()
    pipeline = SpeechInput(VadSegmenter(WebRtcVad()), StreamingAsr(whisper))
    assert _feed(pipeline, _noise(4.0, amp=0.2)) == []
    assert whisper.calls == []


async def test_async_speech_input_events_and_close() -> None:
    pipeline = SpeechInput(VadSegmenter(EnergyVad()), StreamingAsr(FakeWhisper()), 500)
    audio = np.concatenate([_silence(0.5), _tone(1.5), _silence(1.0)])
    async with AsyncSpeechInput(pipeline) as speech:
        for i in range(0, len(audio), 1600):
            await speech.push(audio[i : i + 1600])
        await speech.flush()
        seen: list = []
        async with asyncio.timeout(30):  # hang guard only
            async for event in speech:
                seen.append(event)
                # the turn's final words come right after SpeechStopped (one last pass)
                if any(isinstance(e, SpeechStopped) for e in seen[:-1]) and isinstance(event, AsrWord):
                    break
    assert isinstance(seen[0], SpeechStarted)
    assert any(isinstance(e, AsrWord) and e.committed for e in seen)
    with pytest.raises(RuntimeError, match="closed"):
        await speech.push(audio)


async def test_async_speech_input_cancellable_mid_pass() -> None:
    whisper = FakeWhisper(delay_s=0.5)
    speech = AsyncSpeechInput(SpeechInput(VadSegmenter(EnergyVad()), StreamingAsr(whisper), 200))
    await speech.push(np.concatenate([_tone(1.0), _silence(0.2)]))
    first = await speech.get()
    assert isinstance(first, SpeechStarted)
    await asyncio.sleep(0.05)  # a whisper pass is now running on the worker thread
    await speech.aclose()
    rest = [e async for e in speech]
    assert all(not isinstance(e, SpeechStarted) for e in rest)
    with pytest.raises(EOFError):
        await speech.get()


# -- real models -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper():
    return load_whisper()


def _speech_input(model) -> SpeechInput:
    return SpeechInput(VadSegmenter(WebRtcVad()), StreamingAsr(model))


@pytest.mark.integration
def test_streaming_wer_on_librivox(whisper) -> None:
    try:
        samples = librivox_samples()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    refs, hyps = [], []
    pipeline = _speech_input(whisper)
    for path, ref in samples:
        audio = np.concatenate([_silence(0.5), read_wav(path), _silence(1.0)])
        events = _feed(pipeline, audio)
        assert sum(isinstance(e, SpeechStarted) for e in events) >= 1
        words = [e.text for e in events if isinstance(e, AsrWord) and e.committed]
        refs.append(normalize_text(ref))
        hyps.append(normalize_text(" ".join(words)))
    wer = jiwer.wer(refs, hyps)
    assert wer <= 0.15, (wer, hyps)


@pytest.mark.integration
def test_tts_to_asr_round_trip(whisper) -> None:
    from duplex.audio.tts import PiperTts

    sentence = "Please turn on the kitchen lights and set a timer for ten minutes."
    pcm, rate = PiperTts().synthesize(sentence)
    audio = np.concatenate([_silence(0.5), to_mono_16k(pcm, rate), _silence(1.0)])
    events = _feed(_speech_input(whisper), audio)
    words = [e.text for e in events if isinstance(e, AsrWord) and e.committed]
    assert jiwer.wer(normalize_text(sentence), normalize_text(" ".join(words))) <= 0.15, words


@pytest.mark.integration
def test_real_pipeline_ignores_noise_and_silence(whisper) -> None:
    pipeline = _speech_input(whisper)
    audio = np.concatenate([_silence(1.0), _noise(3.0, 0.05), _noise(2.0, 0.3, seed=3)])
    assert _feed(pipeline, audio) == []
    assert pipeline.asr.passes == 0


# -- latency structure (no timing asserts: ordering and pass counts only) -------------------


def _speech(speculate: bool) -> tuple[SpeechInput, FakeWhisper]:
    whisper = FakeWhisper()
    spec = 150.0 if speculate else None
    pipeline = SpeechInput(VadSegmenter(EnergyVad(), min_silence_ms=500), StreamingAsr(whisper), asr_interval_ms=400,
                           speculate_after_silence_ms=spec)
    return pipeline, whisper


def test_speculative_final_pass_is_reused_at_turn_end() -> None:
    audio = np.concatenate([_silence(0.5), _tone(1.7), _silence(1.0)])
    words: dict[bool, list[str]] = {}
    for speculate in (False, True):
        pipeline, whisper = _speech(speculate)
        events: list = []
        stop_needed_pass = False
        for i in range(0, len(audio), 320):
            n_calls = len(whisper.calls)
            out = pipeline.push(audio[i : i + 320])
            if any(isinstance(e, SpeechStopped) for e in out):
                stop_needed_pass = len(whisper.calls) > n_calls
            events += out
        events += pipeline.flush()
        # (the fake names a cut-off last word by buffer length: compare the words themselves)
        words[speculate] = [e.text.split("~")[0] for e in events if isinstance(e, AsrWord) and e.committed]
        # with speculation the final words were ready when the VAD confirmed the end
        assert stop_needed_pass is not speculate
    assert words[True] == words[False] and words[True]


def test_speculation_is_not_reused_when_speech_resumes() -> None:
    pipeline, whisper = _speech(True)
    audio = np.concatenate([_silence(0.5), _tone(1.0), _silence(0.3), _tone(1.0), _silence(1.0)])
    events = _feed(pipeline, audio, chunk=320)
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert len(stops) == 1  # a 300 ms pause is not a turn end at 500 ms
    words = [e for e in events if isinstance(e, AsrWord) and e.committed]
    # the early pass at the pause was not taken for the final one: the second part is there too
    assert words[-1].end_s == pytest.approx(stops[0].t_s, abs=0.05)


def test_no_periodic_pass_in_a_pause() -> None:
    audio = np.concatenate([_silence(0.5), _tone(0.5), _silence(0.6)])
    calls = {}
    for skip in (None, 100.0):
        whisper = FakeWhisper()
        pipeline = SpeechInput(VadSegmenter(EnergyVad(), min_silence_ms=500), StreamingAsr(whisper),
                               asr_interval_ms=1000, skip_pass_after_silence_ms=skip, speculate_after_silence_ms=None)
        _feed(pipeline, audio, chunk=320)
        calls[skip] = len(whisper.calls)
    # 1 s of fed audio (padding + speech) is only reached in the pause: that pass is skipped
    assert calls == {None: 2, 100.0: 1}


@dataclass
class _GatedWhisper(FakeWhisper):
    gate: threading.Event = field(default_factory=threading.Event)

    def transcribe(self, audio: np.ndarray, **kwargs: Any) -> Any:
        self.gate.wait(30)  # hang guard only
        return super().transcribe(audio, **kwargs)


async def test_vad_events_do_not_wait_for_whisper() -> None:
    whisper = _GatedWhisper()
    speech = AsyncSpeechInput(SpeechInput(VadSegmenter(EnergyVad(), min_silence_ms=300), StreamingAsr(whisper), 200))
    audio = np.concatenate([_silence(0.3), _tone(1.0), _silence(0.6)])
    try:
        for i in range(0, len(audio), 320):
            await speech.push(audio[i : i + 320])
        async with asyncio.timeout(30):  # hang guard only
            first, second = await speech.get(), await speech.get()
        assert isinstance(first, SpeechStarted) and isinstance(second, SpeechStopped)
        assert not whisper.gate.is_set()  # the stop came while every whisper pass was still blocked
        whisper.gate.set()
        async with asyncio.timeout(30):
            while not (isinstance(ev := await speech.get(), AsrWord) and ev.committed):
                pass
    finally:
        whisper.gate.set()
        await speech.aclose()


def test_bench_asr_sentence_set_scores_one_turn_end_pass_each(tmp_path) -> None:
    import io
    import json
    import wave

    from duplex.audio.commands import _turn_end_passes

    assert "skipped" in _turn_end_passes(FakeWhisper(), tmp_path, io.StringIO())
    sources = ["w0 w1", "w0 w1 w2"]
    for i, text in enumerate(sources):
        pcm = (np.concatenate([_silence(0.2), _tone(0.5 * len(text.split())), _silence(0.3)]) * 32767).astype(np.int16)
        with wave.open(str(tmp_path / f"{i:04d}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SR)
            w.writeframes(pcm.tobytes())
    (tmp_path / "manifest.json").write_text(json.dumps({"voice": "fake", "sources": sources}), encoding="utf-8")
    out = _turn_end_passes(FakeWhisper(), tmp_path, io.StringIO())
    assert out["sentences"] == 2
    for label in ("loop_guard", "no_loop_guard"):
        assert out[label]["wer"] == 0.0  # the fake names its words w0, w1, ... as the sources do
        assert out[label]["longer_than_reference_by_3_words"] == 0


def test_words_carry_whispers_probability_and_merged_phrases_their_mean() -> None:
    from duplex.audio.speech_input import merge_words

    asr = StreamingAsr(FakeWhisper())  # the fake's words come back at probability 0.9
    asr.push(_tone(0.6), t_s=0.0)
    asr.process()
    asr.push(_tone(0.6))
    words = asr.process() + asr.finish()
    assert words and all(w.probability == pytest.approx(0.9) for w in words)
    merged = merge_words([AsrWord("you are", 0.0, 0.2, True, 0.2), AsrWord("you", 0.2, 0.3, True, 0.5)])
    assert len(merged) == 1 and merged[0].text == "you are you"
    assert merged[0].probability == pytest.approx(0.3)  # (0.2 * 2 + 0.5) / 3
