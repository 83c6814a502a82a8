"""VoicePipeline with fakes: speech in -> text + token-aligned audio out; playback marks and
barge-in roll the sequence back to exactly the heard tokens; cancel stops TTS; close is clean."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from duplex.audio.asr import StreamingAsr
from duplex.audio.fakes import EnergyVad, FakeTts, FakeWhisper
from duplex.audio.playback import PlaybackLedger
from duplex.audio.speech_input import SpeechInput
from duplex.audio.vad import VadSegmenter
from duplex.engine.worker import Engine
from duplex.session.events import AgentTextDelta, Interrupted, TurnEnded, TurnStarted, UserTranscript
from duplex.engine.sampling import SamplingConfig
from duplex.engine.sequence import Status
from duplex.session.core import TRUNCATION_MARKER, SessionConfig
from duplex.voice.config import VoiceConfig
from duplex.voice.outputs import AudioCleared, AudioDone, AudioOut, SpeechFinalized
from duplex.voice.pipeline import VoicePipeline

SR = 16000
HANG_GUARD_S = 60.0  # only catches a hang; nothing here asserts on timing


def _tone(seconds: float) -> np.ndarray:
    return (0.3 * np.sin(np.arange(int(SR * seconds)) * 0.2)).astype(np.float32)


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(SR * seconds), np.float32)


class _Reader:
    """Reads a VoicePipeline's outputs in order and keeps everything it saw."""

    def __init__(self, voice: VoicePipeline) -> None:
        self._it: AsyncIterator[Any] = voice.outputs().__aiter__()
        self.seen: list[Any] = []

    async def until(self, pred: Callable[[Any], bool]) -> Any:
        async def go() -> Any:
            while True:
                item = await self._it.__anext__()
                self.seen.append(item)
                if pred(item):
                    return item
        return await asyncio.wait_for(go(), HANG_GUARD_S)


def _voice(engine: Engine, whisper: FakeWhisper, tts: FakeTts | None, max_tokens: int = 12,
           first_clause_words: int = 2, clause_words: int = 14) -> VoicePipeline:
    speech = SpeechInput(VadSegmenter(EnergyVad(), prefix_padding_ms=100, min_silence_ms=200, min_speech_ms=60),
                         StreamingAsr(whisper), asr_interval_ms=400)
    session = SessionConfig(policy="silence", policy_params={"gap_ms": 0.0}, truncate_wait_ms=30_000,
                            sampling=SamplingConfig(temperature=1.0, seed=0, max_tokens=max_tokens))
    config = VoiceConfig(session=session, first_clause_words=first_clause_words, clause_words=clause_words)
    return VoicePipeline(engine, config, speech_factory=lambda: speech, tts=tts)


async def _user_says(voice: VoicePipeline, seconds: float) -> None:
    await voice.feed_audio(np.concatenate([_silence(0.2), _tone(seconds), _silence(0.5)]), realtime=False)


async def test_speech_in_gives_text_and_token_aligned_audio(tiny_engine: Engine) -> None:
    voice = _voice(tiny_engine, FakeWhisper(), FakeTts(sample_rate_hz=SR))
    await voice.start()
    out = _Reader(voice)
    try:
        await _user_says(voice, 1.0)
        started = await out.until(lambda e: isinstance(e, TurnStarted) and e.speaker == "agent")
        done = await out.until(lambda e: isinstance(e, AudioDone) and e.turn == started.turn)
        user = [e for e in out.seen if isinstance(e, UserTranscript) and e.committed]
        assert user and user[-1].text.split()[:2] == ["w0", "w1"]
        # the session saw the turn end only after the final ASR pass delivered its words
        assert any(isinstance(e, SpeechFinalized) for e in out.seen)
        deltas = [e for e in out.seen if isinstance(e, AgentTextDelta) and e.turn == started.turn]
        chunks = [e for e in out.seen if isinstance(e, AudioOut) and e.turn == started.turn]
        assert deltas and chunks
        n_tokens = max(d.token_end for d in deltas)
        # chunks tile the turn's tokens and its audio without gaps or overlaps
        assert chunks[0].chunk.token_start == 0 and chunks[-1].chunk.token_end == n_tokens
        for a, b in zip(chunks, chunks[1:]):
            assert a.chunk.token_end == b.chunk.token_start
            assert b.offset_samples == a.offset_samples + len(a.chunk.pcm)
        assert done.total_samples == chunks[-1].offset_samples + len(chunks[-1].chunk.pcm)
        assert "".join(c.chunk.text for c in chunks) == "".join(d.text for d in deltas)

        # playing everything marks the whole turn spoken and hands the floor back
        voice.report_played(started.turn, done.total_samples)
        await out.until(lambda e: getattr(e, "type", "") == "state_changed" and e.state == "listening")
        seq = voice.session.seq
        assert seq is not None
        assert len(seq.positions(started.turn, Status.SPOKEN)) == n_tokens
        assert not seq.positions(started.turn, Status.UNSPOKEN)
    finally:
        await voice.close()


async def test_playback_mark_then_barge_in_keeps_exactly_the_heard_tokens(tiny_engine: Engine) -> None:
    whisper = FakeWhisper()
    voice = _voice(tiny_engine, whisper, FakeTts(sample_rate_hz=SR), max_tokens=16, first_clause_words=1,
                   clause_words=2)
    await voice.start()
    out = _Reader(voice)
    try:
        await _user_says(voice, 1.0)
        started = await out.until(lambda e: isinstance(e, TurnStarted) and e.speaker == "agent")
        turn = started.turn
        await out.until(lambda e: isinstance(e, AudioDone) and e.turn == turn)
        chunks = [e.chunk for e in out.seen if isinstance(e, AudioOut) and e.turn == turn]
        n_tokens = chunks[-1].token_end
        assert len(chunks) >= 2 and n_tokens >= 3
        ledger = PlaybackLedger()
        for c in chunks:
            ledger.append(c)
        # the listener heard the first chunk and part of the second
        played = len(chunks[0].pcm) + len(chunks[1].pcm) // 2
        heard = ledger.heard_token(played)
        assert heard is not None and 0 < heard < n_tokens
        voice.report_played(turn, played)

        whisper.word_namer = lambda i: "wait"  # the user barges in with a stop word
        await _user_says(voice, 1.0)
        interrupted = await out.until(lambda e: isinstance(e, Interrupted))
        assert interrupted.turn == turn and interrupted.kept_tokens == heard
        await out.until(lambda e: isinstance(e, AudioCleared) and e.turn == turn)
        voice.report_played(turn, played)  # the transport's final word after clearing its queue
        ended = await out.until(lambda e: isinstance(e, TurnEnded) and e.turn == turn and e.reason == "interrupted")

        seq = voice.session.seq
        assert seq is not None
        assert len(seq.positions(turn, Status.SPOKEN)) == heard
        assert not seq.positions(turn, Status.UNSPOKEN)
        assert ended.text == interrupted.kept_text
        assert ended.text + TRUNCATION_MARKER in voice.session.transcript
    finally:
        await voice.close()


async def test_cancel_stops_tts_and_drops_queued_audio(tiny_engine: Engine) -> None:
    # slow TTS + short clauses: many clauses are still pending when the cancel arrives
    tts = FakeTts(sample_rate_hz=SR, delay_s=0.05)
    voice = _voice(tiny_engine, FakeWhisper(), tts, max_tokens=60, first_clause_words=1, clause_words=1)
    await voice.start()
    out = _Reader(voice)
    try:
        await _user_says(voice, 1.0)
        first = await out.until(lambda e: isinstance(e, AudioOut))
        voice.cancel()
        cleared = await out.until(lambda e: isinstance(e, AudioCleared))
        assert cleared.turn == first.turn
        interrupted = next(e for e in out.seen if isinstance(e, Interrupted))
        assert interrupted.reason == "cancelled"
        voice.report_played(first.turn, 0)  # nothing was played
        await out.until(lambda e: isinstance(e, TurnEnded) and e.reason == "interrupted")
        after = out.seen[out.seen.index(cleared):]
        assert not any(isinstance(e, (AudioOut, AudioDone)) and e.turn == first.turn for e in after)
        seq = voice.session.seq
        assert seq is not None and not seq.positions(first.turn, Status.SPOKEN)
    finally:
        await voice.close()


async def test_text_only_voice_session_has_no_audio(tiny_engine: Engine) -> None:
    voice = _voice(tiny_engine, FakeWhisper(), None, max_tokens=4)
    await voice.start()
    out = _Reader(voice)
    try:
        await _user_says(voice, 1.0)
        await out.until(lambda e: isinstance(e, TurnEnded) and e.speaker == "agent")
        assert not any(isinstance(e, AudioOut) for e in out.seen)
    finally:
        await voice.close()


async def test_close_leaves_no_tasks(tiny_engine: Engine) -> None:
    before = asyncio.all_tasks()
    voice = _voice(tiny_engine, FakeWhisper(), FakeTts(sample_rate_hz=SR, delay_s=0.05), max_tokens=40)
    await voice.start()
    out = _Reader(voice)
    await _user_says(voice, 1.0)
    await out.until(lambda e: isinstance(e, AudioOut))  # close mid-reply, TTS busy
    await voice.close()
    await voice.close()  # idempotent
    assert asyncio.all_tasks() - before == set()
    with pytest.raises(StopAsyncIteration):
        while True:
            await out.until(lambda e: False)


async def test_a_translation_session_gets_words_on_its_own_pass_schedule(tiny_engine: Engine) -> None:
    """Chat takes ASR passes every second (VoiceConfig); a translation, whose latency is counted
    per source word, asks for its own interval, and the pipeline's ASR runs on it."""
    from duplex.translate.session import TranslateSession

    made: list[SpeechInput] = []

    def factory() -> SpeechInput:
        made.append(SpeechInput(VadSegmenter(EnergyVad()), StreamingAsr(FakeWhisper()), asr_interval_ms=1000))
        return made[-1]

    chat = VoicePipeline(tiny_engine, VoiceConfig(), speech_factory=factory)
    translate = VoicePipeline(tiny_engine, VoiceConfig(), speech_factory=factory)
    translate.session = TranslateSession(tiny_engine)
    for voice in (chat, translate):
        await voice.push_audio(_silence(0.1))
        await voice.close()
    assert [s.asr_interval_ms for s in made] == [1000, TranslateSession.asr_interval_ms]
    assert TranslateSession.asr_interval_ms < VoiceConfig().asr_interval_ms
