"""Clause chunking, token <-> audio alignment, cancellation, and the real TTS engines."""

from __future__ import annotations

import re
import shutil
import threading

import numpy as np
import pytest

from duplex.audio import tts as tts_module
from duplex.audio.clauses import ClauseChunker
from duplex.audio.events import TtsChunk
from duplex.audio.fakes import FakeTts
from duplex.audio.playback import PlaybackLedger
from duplex.audio.tts import EspeakTts, FliteTts, PiperTts, StreamingTts, load_tts

TOKENS = ["Hello", ",", " my", " friend", ".", " It", " costs", " 3", ".", "5", " dollars", "!",
          " Bye"]


def _push_all(target, tokens: list[str]) -> list:
    out = []
    for i, tok in enumerate(tokens):
        out += target.push(tok, i, i + 1)
    return out + target.flush()


def test_clause_boundaries_cover_all_tokens() -> None:
    clauses = _push_all(ClauseChunker(), TOKENS)
    assert [c.text for c in clauses] == ["Hello,", " my friend.", " It costs 3.5 dollars!", " Bye"]
    assert clauses[0].token_start == 0 and clauses[-1].token_end == len(TOKENS)
    for a, b in zip(clauses, clauses[1:]):
        assert a.token_end == b.token_start
    assert clauses[2].token_char_offsets == (0, 3, 9, 11, 12, 13, 21)


def test_clause_word_limit_and_multi_token_delta() -> None:
    chunker = ClauseChunker(max_words=5, first_max_words=3)
    words = [" w" + str(i) for i in range(12)]
    clauses = _push_all(chunker, words)
    assert [c.token_end - c.token_start for c in clauses] == [3, 5, 4]
    chunker = ClauseChunker()
    # one delta covering 3 tokens (e.g. a multi-byte character): offsets spread evenly
    (clause,) = chunker.push("abc!", 10, 13)
    assert clause.token_char_offsets == (0, 1, 2)
    with pytest.raises(ValueError, match="non-contiguous"):
        chunker.push("x", 20, 21)
        chunker.push("y", 5, 6)


def test_whitespace_only_text_waits_for_words() -> None:
    chunker = ClauseChunker()
    assert chunker.push("\n", 0, 1) == []
    assert chunker.push("\n", 1, 2) == []
    (clause,) = chunker.push("Hi!", 2, 3)
    assert clause.token_start == 0 and clause.text == "\n\nHi!"


def test_token_at_monotonic_and_covers_span() -> None:
    chunk = TtsChunk(pcm=np.zeros(1000, np.int16), sample_rate_hz=16000, text="a b c d",
                     token_start=5, token_end=9, token_offsets_samples=(0, 100, 400, 700))
    values = [chunk.token_at(p) for p in range(0, 1100)]
    assert values == sorted(values)
    assert values[0] == 5 and chunk.token_at(99) == 5 and chunk.token_at(100) == 6
    assert chunk.token_at(699) == 7 and chunk.token_at(999) == 8
    assert chunk.token_at(1000) == 9 and chunk.token_at(10**6) == 9
    with pytest.raises(ValueError):
        TtsChunk(np.zeros(10, np.int16), 16000, "x", 0, 2, (0,))
    with pytest.raises(ValueError):
        TtsChunk(np.zeros(10, np.int16), 16000, "x", 0, 2, (5, 1))


def _check_chunks(chunks: list[TtsChunk], n_tokens: int) -> None:
    assert chunks[0].token_start == 0 and chunks[-1].token_end == n_tokens
    for a, b in zip(chunks, chunks[1:]):
        assert a.token_end == b.token_start
    for c in chunks:
        assert len(c.token_offsets_samples) == c.token_end - c.token_start
        assert all(0 <= o <= len(c.pcm) for o in c.token_offsets_samples)
        heard = [c.token_at(p) for p in range(0, len(c.pcm) + 1, 97)]
        assert heard == sorted(heard)
        assert heard[0] >= c.token_start
        assert c.token_at(len(c.pcm)) == c.token_end
        assert c.token_at(0) == c.token_start or len(c.pcm) == 0


def test_streaming_tts_chunks_with_fake_engine() -> None:
    chunks = _push_all(StreamingTts(FakeTts()), TOKENS)
    assert len(chunks) == 4
    _check_chunks(chunks, len(TOKENS))
    # character proportion: "It costs 3.5 dollars!" - "dollars" starts ~13/21 in
    c = chunks[2]
    assert c.token_offsets_samples[6] / len(c.pcm) == pytest.approx(21 / 22, abs=0.06)


def test_playback_ledger_maps_marks_across_chunks() -> None:
    chunks = _push_all(StreamingTts(FakeTts()), TOKENS)
    ledger = PlaybackLedger()
    assert ledger.heard_token(0) is None
    for c in chunks:
        ledger.append(c)
    marks = range(0, ledger.queued_samples + 1, 50)
    heard = [ledger.heard_token(m) for m in marks]
    assert heard == sorted(heard)
    assert heard[0] == 0 and ledger.heard_token(ledger.queued_samples) == len(TOKENS)
    assert ledger.heard_token(len(chunks[0].pcm)) == chunks[0].token_end


class _GatedTts(FakeTts):
    """Synthesis that runs until the test opens the gate: the cancel lands mid-synthesis on any
    machine (a fixed delay could run out before a loaded machine's main thread got to cancel)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def synthesize_speech(self, text, should_stop=None):
        self.started.set()
        assert self.gate.wait(30)  # hang guard only
        return super().synthesize_speech(text, should_stop)


def test_cancel_drops_pending_text_and_in_flight_synthesis() -> None:
    engine = _GatedTts()
    tts = StreamingTts(engine)
    assert tts.push("Hello there", 0, 2) == []
    tts.cancel()
    assert tts.flush() == []  # pending text was dropped

    results: list = []
    worker = threading.Thread(target=lambda: results.extend(tts.push("Stop me now.", 0, 3) +
                                                             tts.push(" More", 3, 4)))
    worker.start()
    assert engine.started.wait(30)
    tts.cancel()  # while synthesis runs on the worker thread
    engine.gate.set()
    worker.join(30)
    assert not worker.is_alive() and results == []
    # after a cancel the stage is usable again, from any token index
    assert [c.token_end for c in tts.push("Again!", 7, 8)] == [8]


def test_load_tts_falls_back_with_warning(monkeypatch, caplog) -> None:
    def broken(*args, **kwargs):
        raise ImportError("piper missing")

    monkeypatch.setitem(tts_module._ENGINES, "piper", broken)
    monkeypatch.setitem(tts_module._ENGINES, "espeak-ng", lambda: FakeTts())
    with caplog.at_level("WARNING"):
        engine = load_tts(None)
    assert engine.name == "fake"
    assert "piper" in caplog.text and "fallback" in caplog.text
    with pytest.raises(ValueError, match="unknown TTS"):
        load_tts("nonesuch")


@pytest.mark.integration
def test_piper_aligned_chunks() -> None:
    engine = PiperTts()
    pcm, rate = engine.synthesize("Hello there, my friend.")
    assert rate == 22050 and pcm.dtype == np.int16 and len(pcm) > rate // 2
    speech = engine.synthesize_speech("The quick brown fox jumps over the lazy dog.")
    starts = speech.word_starts_samples
    if starts is None:
        pytest.skip("piper alignments need the onnx package")
    assert len(starts) == 9 and list(starts) == sorted(starts)
    tokens = re.findall(r"\s*\w+|[^\w\s]", "The quick brown fox jumps over the lazy dog. Bye now!")
    chunks = _push_all(StreamingTts(engine), tokens)
    _check_chunks(chunks, len(tokens))
    first = chunks[0]
    again = engine.synthesize_speech(first.text).word_starts_samples
    assert again is not None
    # token " over" (index 5) starts near piper's onset of "over" (VITS durations are
    # sampled, so two syntheses differ slightly)
    assert abs(first.token_offsets_samples[5] - again[5]) < 0.25 * rate


@pytest.mark.integration
@pytest.mark.parametrize("engine_cls", [EspeakTts, FliteTts])
def test_command_line_fallbacks(engine_cls) -> None:
    if shutil.which(engine_cls.binary) is None:
        pytest.skip(f"{engine_cls.binary} not installed")
    pcm, rate = engine_cls().synthesize("Testing one two three.")
    assert pcm.dtype == np.int16 and rate in (8000, 16000, 22050)
    assert len(pcm) > rate // 2 and np.abs(pcm).max() > 1000
    assert len(engine_cls().synthesize("...")[0]) == 0


def test_word_deltas_cut_the_first_clause_at_its_quota() -> None:
    chunker = ClauseChunker(first_max_words=2, word_deltas=True)
    assert chunker.push("The", 0, 1) == []
    (clause,) = chunker.push(" capital", 1, 3)  # no need to wait for the third word
    assert clause.text == "The capital" and (clause.token_start, clause.token_end) == (0, 3)
    assert ClauseChunker(first_max_words=2).push("The capital", 0, 2) == []  # plain deltas: wait


def test_cached_tts_reuses_short_clauses_only() -> None:
    from duplex.audio import CachedTts
    from duplex.audio.fakes import FakeTts

    calls: list[str] = []

    class CountingTts(FakeTts):
        def synthesize_speech(self, text, should_stop=None):  # type: ignore[override]
            calls.append(text)
            return super().synthesize_speech(text, should_stop)

    tts = CachedTts(CountingTts(), max_words=2, max_entries=2)
    first = tts.synthesize_speech("Sure,")
    assert tts.synthesize_speech("Sure,") is first and calls == ["Sure,"]  # a lookup, not a synthesis
    tts.synthesize_speech("and then it rained all day")
    tts.synthesize_speech("and then it rained all day")
    assert calls.count("and then it rained all day") == 2  # long clauses are never cached
    tts.synthesize_speech("The")
    tts.synthesize_speech("I")  # evicts the least recently used entry ("Sure,")
    tts.synthesize_speech("Sure,")
    assert calls.count("Sure,") == 2 and tts.hits == 1
    assert tts.name == "fake" and tts.sample_rate_hz == CountingTts().sample_rate_hz
    # a synthesis cut off by a barge-in is never remembered
    tts.synthesize_speech("Hello", should_stop=lambda: True)
    tts.synthesize_speech("Hello")
    assert calls.count("Hello") == 2
