"""One voice conversation, transport-agnostic: audio in, session events and agent audio out.

``VoiceSession`` glues the speech input (VAD + streaming whisper, on its own thread), a
:class:`~duplex.session.core.Session` with ``audio_output=True``, and streaming TTS (on its own
thread) together. A transport (local devices, WebSocket, a benchmark's replay) only has to
``push_audio``, consume ``outputs()``, play the :class:`AudioOut` chunks, and report how much of
each agent turn it has played with ``report_played``; playback positions become exact heard-token
counts (``PlaybackMark``) through a :class:`~duplex.audio.PlaybackLedger`, so a barge-in rolls the
cache back to what the listener actually heard.

Two choices that matter for latency and correctness:

- The words of one ASR pass go to the session as one ``AsrWord`` phrase, so they are prefilled in
  one forward step instead of one per word.
- ``SpeechStopped`` is held back until the utterance's final ASR pass has delivered its words: the
  session never answers a turn whose last words are still tentative (the reply would miss them),
  and its silence gap starts from a transcript that is complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from duplex.audio.clauses import ClauseChunker
from duplex.audio.events import SpeechStarted, SpeechStopped, TtsChunk
from duplex.audio.playback import PlaybackLedger
from duplex.audio.asr import StreamingAsr
from duplex.audio.speech_input import AsyncSpeechInput, SpeechEvent, SpeechInput, merge_words
from duplex.audio.tts import StreamingTts, TtsEngine
from duplex.audio.vad import FrameVad, VadSegmenter, WebRtcVad
from duplex.session.clock import Clock, MonotonicClock
from duplex.engine.worker import Engine
from duplex.session.events import AgentTextDelta, Cancel, Interrupted, PlaybackMark, SessionEvent, TurnEnded, TurnStarted
from duplex.session.core import DEFAULT_INSTRUCTIONS, Session, SessionConfig

__all__ = ["VAD_MIN_SILENCE_MS", "VOICE_POLICY", "VOICE_POLICY_PARAMS", "AudioCleared", "AudioDone", "AudioOut",
           "SpeechFinalized", "VoiceConfig", "VoiceOutput", "VoiceSession", "default_voice_config",
           "make_speech_input", "voice_session_config"]

log = logging.getLogger(__name__)

_SR = 16_000

# Voice turn-taking defaults (``duplex talk``, the server's voice sessions, ``bench pipeline``): the
# VAD's 300 ms and the final ASR pass already are the acoustic gap, so the model's end-of-turn
# belief only adds time when the words look unfinished.
VAD_MIN_SILENCE_MS = 300
VOICE_POLICY = "eou"
VOICE_POLICY_PARAMS: dict[str, Any] = {"short_gap_ms": 0.0, "long_gap_ms": 700.0, "confident": 0.2,
                                       "unlikely": 0.02}


@dataclass(frozen=True, slots=True)
class VoiceConfig:
    """``first_clause_words``: the first TTS clause of a reply is cut after this many words so
    audio starts early; later clauses follow punctuation (up to ``clause_words`` words)."""

    session: SessionConfig = field(default_factory=SessionConfig)
    first_clause_words: int = 2
    clause_words: int = 14
    hold_stop_for_final_words: bool = True
    type: str = "voice_config"


def voice_session_config(policy: str = VOICE_POLICY, **overrides: Any) -> SessionConfig:
    """Session settings for a voice conversation: the voice policy gets its tuned parameters."""
    params = dict(VOICE_POLICY_PARAMS) if policy == VOICE_POLICY else {}
    overrides.setdefault("instructions", DEFAULT_INSTRUCTIONS)
    overrides.setdefault("policy_params", params)
    return SessionConfig(policy=policy, **overrides)


def default_voice_config(policy: str = VOICE_POLICY, **session_overrides: Any) -> VoiceConfig:
    """The voice defaults in one place (talk, server and the pipeline benchmark use them)."""
    return VoiceConfig(session=voice_session_config(policy, **session_overrides), first_clause_words=2)


def make_speech_input(whisper: Any, min_silence_ms: int = VAD_MIN_SILENCE_MS, vad: FrameVad | None = None,
                      **speech_options: Any) -> SpeechInput:
    """VAD (WebRTC unless given) + streaming whisper with the voice defaults."""
    segmenter = VadSegmenter(vad if vad is not None else WebRtcVad(), min_silence_ms=min_silence_ms)
    return SpeechInput(segmenter, StreamingAsr(whisper), **speech_options)


@dataclass(frozen=True, slots=True)
class SpeechFinalized:
    """The final ASR pass of the utterance that ended at ``t_s`` (stream seconds) is done."""

    t_s: float
    type: str = "speech_finalized"


@dataclass(frozen=True, slots=True, eq=False)
class AudioOut:
    """Agent audio: play it after everything before it. ``offset_samples``: where the chunk
    starts within the audio of agent turn ``turn`` (what ``report_played`` counts)."""

    turn: int
    chunk: TtsChunk
    offset_samples: int
    t: float
    type: str = "audio_out"


@dataclass(frozen=True, slots=True)
class AudioCleared:
    """Barge-in or cancel: drop every queued sample of ``turn`` now, then ``report_played`` once."""

    turn: int
    t: float
    type: str = "audio_cleared"


@dataclass(frozen=True, slots=True)
class AudioDone:
    """All audio of agent turn ``turn`` has been produced: ``total_samples`` long."""

    turn: int
    total_samples: int
    t: float
    type: str = "audio_done"


VoiceOutput = SessionEvent | SpeechStarted | SpeechStopped | SpeechFinalized | AudioOut | AudioCleared | AudioDone


class _PhraseInput:
    """Wraps a ``SpeechInput``: merges the words of each pass into one phrase and marks the end
    of each utterance's final pass with :class:`SpeechFinalized`.

    ``segment``/``close_turn`` run on the event loop and ``recognize``/``flush`` on the ASR
    thread (see ``AsyncSpeechInput``); a stop is finalized only once the inner pipeline reports
    its final pass done (``finalized_until_s``), whichever thread saw it first."""

    def __init__(self, inner: SpeechInput) -> None:
        self.inner = inner
        self._stops: list[float] = []
        self._lock = threading.Lock()

    def segment(self, samples_16k: np.ndarray) -> list[SpeechEvent]:
        return self._note_stops(self.inner.segment(samples_16k))

    def close_turn(self) -> list[SpeechEvent]:
        return self._note_stops(self.inner.close_turn())

    def recognize(self) -> list[SpeechEvent | SpeechFinalized]:
        out: list[SpeechEvent | SpeechFinalized] = list(merge_words(self.inner.recognize()))
        return out + self._finalized()

    def flush(self) -> list[SpeechEvent | SpeechFinalized]:
        events = self._note_stops(self.inner.close_turn())
        out: list[SpeechEvent | SpeechFinalized] = [*events, *merge_words(self.inner.recognize())]
        return out + self._finalized()

    def _note_stops(self, events: list[SpeechEvent]) -> list[SpeechEvent]:
        stops = [e.t_s for e in events if isinstance(e, SpeechStopped)]
        if stops:
            with self._lock:
                self._stops += stops
        return events

    def _finalized(self) -> list[SpeechFinalized]:
        done_s = self.inner.finalized_until_s
        with self._lock:
            ready = [t for t in self._stops if t <= done_s]
            self._stops = [t for t in self._stops if t > done_s]
        return [SpeechFinalized(t) for t in ready]


@dataclass(slots=True)
class _TurnAudio:
    """Playback book-keeping of one agent turn."""

    ledger: PlaybackLedger = field(default_factory=PlaybackLedger)
    n_tokens: int = 0  # content tokens covered by text deltas so far
    audio_done: bool = False
    interrupted: bool = False
    heard: int = -1  # last heard-token count submitted


@dataclass(frozen=True, slots=True)
class _TtsText:
    turn: int
    text: str
    token_start: int
    token_end: int


@dataclass(frozen=True, slots=True)
class _TtsFlush:
    turn: int


class VoiceSession:
    """Speech in, session events + agent audio out. ``start``, ``push_audio``, iterate
    ``outputs()``, ``report_played``, ``close``. ``tts=None`` gives a text-only voice session."""

    def __init__(self, engine: Engine, speech: SpeechInput, tts: TtsEngine | None,
                 config: VoiceConfig | None = None, clock: Clock | None = None) -> None:
        self.config = config or VoiceConfig()
        self.clock = clock or MonotonicClock()
        session_config = dataclasses.replace(self.config.session, audio_output=tts is not None)
        self.session = Session(engine, session_config, clock=self.clock)
        self._speech = AsyncSpeechInput(cast(SpeechInput, _PhraseInput(speech)))
        self.tts: StreamingTts | None = None
        if tts is not None:
            chunker = ClauseChunker(max_words=self.config.clause_words,
                                    first_max_words=self.config.first_clause_words,
                                    word_deltas=True)  # session deltas end on word boundaries
            self.tts = StreamingTts(tts, chunker)
        self._tts_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-tts")
        self._tts_inbox: asyncio.Queue[_TtsText | _TtsFlush] = asyncio.Queue()
        self._out: asyncio.Queue[VoiceOutput | None] = asyncio.Queue()
        self._turns: dict[int, _TurnAudio] = {}
        self._held_stop: SpeechStopped | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # ---- public API ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.session.start()
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._pump_speech(), name=f"voice-speech-{self.session.id}"),
                asyncio.create_task(self._pump_session(), name=f"voice-session-{self.session.id}"),
                asyncio.create_task(self._pump_tts(), name=f"voice-tts-{self.session.id}"),
            ]

    async def push_audio(self, samples_16k: np.ndarray) -> None:
        """Queue float32 16 kHz mono microphone audio; returns at once."""
        await self._speech.push(samples_16k)

    async def feed_audio(self, samples_16k: np.ndarray, chunk_ms: int = 20, realtime: bool = True) -> float:
        """Push a recording in ``chunk_ms`` blocks, each when it would have finished arriving on
        ``self.clock`` (real time on the monotonic clock, virtual time on a ``ManualClock``).
        Returns the clock time of the recording's first sample."""
        step = _SR * chunk_ms // 1000
        t0 = self.clock.now()
        for i, start in enumerate(range(0, len(samples_16k), step)):
            if realtime:
                delay = t0 + (i + 1) * chunk_ms / 1000 - self.clock.now()
                if delay > 0:
                    await self.clock.sleep(delay)
            await self.push_audio(samples_16k[start:start + step])
        return t0

    async def end_of_stream(self) -> None:
        """No more audio: close an open utterance and commit its words."""
        await self._speech.flush()

    def cancel(self) -> None:
        """Stop the agent's reply (a button, a key); audio is cleared via ``AudioCleared``."""
        self.session.submit(Cancel())

    def report_played(self, turn: int, played_samples: int) -> None:
        """The listener has heard ``played_samples`` of agent turn ``turn``'s audio."""
        state = self._turns.get(turn)
        if state is None:
            return
        total = state.ledger.queued_samples
        done = state.audio_done and played_samples >= total
        heard = state.n_tokens if done else (state.ledger.heard_token(played_samples) or 0)
        if heard == state.heard and not done and not state.interrupted:
            return
        state.heard = heard
        # After an interruption the first report is the transport's final word (``final``): the
        # session rolls back to it at once.
        self.session.submit(PlaybackMark(turn, heard, done=done and not state.interrupted, final=state.interrupted))
        if done or state.interrupted:
            del self._turns[turn]  # the session has its final word on this turn

    def playback_done(self, turn: int) -> None:
        """The transport finished playing every chunk of ``turn`` it received."""
        state = self._turns.get(turn)
        if state is not None:
            self.report_played(turn, state.ledger.queued_samples)

    async def outputs(self) -> AsyncIterator[VoiceOutput]:
        """Session events, speech events and agent audio, in order, until :meth:`close`."""
        while True:
            item = await self._out.get()
            if item is None:
                return
            yield item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tts is not None:
            self.tts.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        await self._speech.aclose()
        await self.session.close()
        self._tts_executor.shutdown(wait=False, cancel_futures=True)
        self._out.put_nowait(None)

    # ---- speech -> session ---------------------------------------------------------------------
    async def _pump_speech(self) -> None:
        async for ev in self._speech.events():
            ev_any: object = ev
            if isinstance(ev_any, SpeechFinalized):
                self._emit(ev_any)
                if self._held_stop is not None and self._held_stop.t_s <= ev_any.t_s:
                    self.session.submit(self._held_stop)
                    self._held_stop = None
                continue
            self._emit(ev)
            if isinstance(ev, SpeechStopped) and self.config.hold_stop_for_final_words:
                self._held_stop = ev
                continue
            if isinstance(ev, SpeechStarted) and self._held_stop is not None:
                self._held_stop = None  # the user went on: the session never saw the pause
                continue
            self.session.submit(ev)

    # ---- session -> outputs and TTS ------------------------------------------------------------
    async def _pump_session(self) -> None:
        async for ev in self.session.events():
            self._emit(ev)
            if self.tts is None:
                continue
            if isinstance(ev, TurnStarted) and ev.speaker == "agent":
                self._turns[ev.turn] = _TurnAudio()
            elif isinstance(ev, AgentTextDelta):
                state = self._turns.get(ev.turn)
                if state is not None and not state.interrupted:
                    state.n_tokens = max(state.n_tokens, ev.token_end)
                    self._tts_inbox.put_nowait(_TtsText(ev.turn, ev.text, ev.token_start, ev.token_end))
            elif isinstance(ev, TurnEnded) and ev.speaker == "agent" and ev.reason != "interrupted":
                self._tts_inbox.put_nowait(_TtsFlush(ev.turn))
            elif isinstance(ev, Interrupted):
                self._interrupt(ev.turn)

    def _interrupt(self, turn: int) -> None:
        """Stop synthesis now and tell the transport to drop queued audio."""
        assert self.tts is not None
        self.tts.cancel()
        state = self._turns.get(turn)
        if state is None:
            return
        state.interrupted = True
        self._emit(AudioCleared(turn, self.clock.now()))
        if state.ledger.queued_samples == 0:
            self.report_played(turn, 0)  # nothing was ever played: no need to wait for the transport

    async def _pump_tts(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._tts_inbox.get()
            tts = self.tts
            state = self._turns.get(item.turn)
            if tts is None or state is None or state.interrupted:
                continue
            if isinstance(item, _TtsText):
                chunks = await loop.run_in_executor(self._tts_executor, tts.push, item.text, item.token_start,
                                                    item.token_end)
            else:
                chunks = await loop.run_in_executor(self._tts_executor, tts.flush)
            if state.interrupted or self._turns.get(item.turn) is not state:
                continue  # cut off while synthesising
            for chunk in chunks:
                offset = state.ledger.queued_samples
                state.ledger.append(chunk)
                self._emit(AudioOut(item.turn, chunk, offset, self.clock.now()))
            if isinstance(item, _TtsFlush):
                state.audio_done = True
                self._emit(AudioDone(item.turn, state.ledger.queued_samples, self.clock.now()))
                if state.ledger.queued_samples == 0:
                    self.report_played(item.turn, 0)  # silent turn: it is "played" already

    def _emit(self, item: VoiceOutput) -> None:
        self._out.put_nowait(item)
