"""The one voice pipeline: speech in, session events and token-aligned agent audio out.

``VoicePipeline`` is the only place where speech meets the session: VAD + streaming whisper (on
their own thread) -> :class:`~duplex.session.core.Session` -> clause-chunked streaming TTS (on a
TTS thread), plus the playback ledger that turns played audio back into heard tokens. ``serve``
(WebSocket), ``talk`` (sounddevice), the benchmarks and the evaluation are transports around it:
they push audio or text, play :class:`AudioOut` chunks, and report how much of each agent turn
they have played; a barge-in then rolls the cache back to what the listener actually heard.

Two choices that matter for latency and correctness:

- The words of one ASR pass go to the session as one ``AsrWord`` phrase, so they are prefilled in
  one forward step instead of one per word.
- ``SpeechStopped`` is held back until the utterance's final ASR pass has delivered its words: the
  session never answers a turn whose last words are still tentative, and its silence gap starts
  from a transcript that is complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from duplex.audio.clauses import ClauseChunker
from duplex.audio.events import AsrWord, SpeechStarted, SpeechStopped, TtsChunk
from duplex.audio.playback import PlaybackLedger
from duplex.audio.speech_input import (
    AsyncSpeechInput,
    SpeechEvent,
    SpeechInput,
    merge_words,
)
from duplex.audio.tts import StreamingTts, TtsEngine
from duplex.audio.turn_features import TurnAudioFeatures
from duplex.cpu import speech_stage
from duplex.engine.worker import Engine
from duplex.session.clock import Clock, MonotonicClock
from duplex.session.core import Session
from duplex.session.events import (
    AgentBackchannel,
    AgentPaused,
    AgentResumed,
    AgentTextDelta,
    Cancel,
    ErrorEvent,
    Interrupted,
    PlaybackMark,
    TextInput,
    TranscriptStatus,
    TurnEnded,
    TurnStarted,
    UpdateSession,
)
from duplex.tasks import cancel_and_wait
from duplex.voice.config import VoiceConfig
from duplex.voice.outputs import (
    AudioCleared,
    AudioDone,
    AudioOut,
    AudioPaused,
    AudioResumed,
    BackchannelAudio,
    SpeechFinalized,
    VoiceOutput,
)

__all__ = ["VoicePipeline", "VoiceUnavailable"]

log = logging.getLogger(__name__)

_SR = 16_000


class VoiceUnavailable(RuntimeError):
    """The pipeline was built without the stage a request needs (no ASR, no TTS)."""


class _PhraseInput:
    """Wraps a ``SpeechInput``: merges the words of each pass into one phrase and marks the end
    of each utterance's final pass with :class:`SpeechFinalized`.

    ``segment``/``close_turn`` run on the event loop and ``recognize``/``flush`` on the ASR
    thread (see ``AsyncSpeechInput``); a stop is finalized only once the inner pipeline reports
    its final pass done (``finalized_until_s``), whichever thread saw it first."""

    def __init__(self, inner: SpeechInput, wants_audio_features: Callable[[], bool] | None = None) -> None:
        self.inner = inner
        self.wants_audio_features = wants_audio_features
        self._stops: list[float] = []
        self._lock = threading.Lock()
        self._held: list[SpeechEvent] = []  # committed words of a speculative pass (ASR thread only)

    def segment(self, samples_16k: np.ndarray) -> list[SpeechEvent]:
        return self._note_stops(self.inner.segment(samples_16k))

    def close_turn(self) -> list[SpeechEvent]:
        return self._note_stops(self.inner.close_turn())

    def turn_analysis_due(self) -> bool:
        """Only when the session's policy reads acoustic features: Smart Turn at every pause
        would otherwise take CPU from the final ASR pass on the end-of-speech path for nothing."""
        if self.wants_audio_features is not None and not self.wants_audio_features():
            return False
        return bool(getattr(self.inner, "turn_analysis_due", lambda: False)())

    def analyze_turn(self) -> list[TurnAudioFeatures]:
        return list(getattr(self.inner, "analyze_turn", lambda: [])())

    def recognize(self) -> list[SpeechEvent | SpeechFinalized]:
        return self._phrases(self.inner.recognize())

    def flush(self) -> list[SpeechEvent | SpeechFinalized]:
        events = self._note_stops(self.inner.close_turn())
        return [*events, *self._phrases(self.inner.recognize())]

    def _phrases(self, events: list[SpeechEvent]) -> list[SpeechEvent | SpeechFinalized]:
        """Merge each pass's words into phrases. Words a speculative pass commits (the user has
        just gone quiet) are held until the next pass: usually the turn's final one, which then
        arrives with the rest of the words, so the session prefills them, and the hand-over, in
        one forward pass instead of two back to back."""
        events, self._held = [*self._held, *events], []
        if getattr(self.inner, "last_pass_speculative", False):
            self._held = [e for e in events if isinstance(e, AsrWord) and e.committed]
            events = [e for e in events if not (isinstance(e, AsrWord) and e.committed)]
        out: list[SpeechEvent | SpeechFinalized] = list(merge_words(events))
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
    sample_rate_hz: int = 0
    n_tokens: int = 0  # content tokens covered by text deltas so far
    audio_done: bool = False
    interrupted: bool = False
    heard: int = -1  # last heard-token count submitted
    paused: bool = False  # audio produced meanwhile waits in ``held`` until the resume
    held: list[AudioOut | AudioDone] = field(default_factory=list)
    sent_samples: int = 0  # audio handed to the transport so far


@dataclass(frozen=True, slots=True)
class _TtsText:
    turn: int
    text: str
    token_start: int
    token_end: int


@dataclass(frozen=True, slots=True)
class _TtsFlush:
    turn: int


class VoicePipeline:
    """Speech or text in; session events, speech events and agent audio out.

    ``start``; feed with ``push_audio`` / ``send_text``; iterate ``outputs()``; report playback
    with ``report_played`` (or ``truncate`` after a stop); ``close``. ``speech_factory=None``: no
    audio input; ``tts=None``: text-only output. ``tts_executor`` lets a server share one TTS
    thread between sessions (synthesis is CPU-bound; more threads than cores only oversubscribe).
    ``audio_output``: start with agent audio on (default: whenever there is a TTS).
    ``asr_executor``/``turn_executor``: where whisper and the turn features run (default: a thread
    each); with ``clock`` and ``tts_executor``, what the evaluation's simulated clock replaces.
    """

    def __init__(self, engine: Engine, config: VoiceConfig | None = None, *,
                 speech_factory: Callable[[], SpeechInput] | None = None, tts: TtsEngine | None = None,
                 tts_executor: Executor | None = None, clock: Clock | None = None,
                 session_id: str | None = None, audio_output: bool | None = None,
                 asr_executor: Executor | None = None, turn_executor: Executor | None = None) -> None:
        self.config = config or VoiceConfig()
        self.clock = clock or MonotonicClock()
        self.tts_engine = tts
        self._audio_on = tts is not None and (audio_output is None or audio_output)
        session_config = dataclasses.replace(self.config.session, audio_output=self._audio_on)
        self.config = dataclasses.replace(self.config, session=session_config)
        self.session = Session(engine, session_config, clock=self.clock, session_id=session_id)
        self._speech_factory = speech_factory
        self._speech: AsyncSpeechInput | None = None
        self._asr_executor, self._turn_executor = asr_executor, turn_executor
        self.tts: StreamingTts | None = None
        if tts is not None:
            chunker = ClauseChunker(max_words=self.config.clause_words,
                                    first_max_words=self.config.first_clause_words,
                                    word_deltas=True)  # session deltas end on word boundaries
            self.tts = StreamingTts(tts, chunker)
        self._own_executor = tts_executor is None
        self._tts_executor = tts_executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-tts")
        self._tts_inbox: asyncio.Queue[_TtsText | _TtsFlush] = asyncio.Queue()
        self._out: asyncio.Queue[VoiceOutput | None] = asyncio.Queue()
        self._turns: dict[int, _TurnAudio] = {}
        self.agent_turn: int | None = None  # the agent turn being generated or played
        self._held_stop: SpeechStopped | None = None
        self._early_stop_t: float | None = None  # an overlap's stop sent ahead of its final words
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    # ---- properties ----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.session.id

    @property
    def audio_input_available(self) -> bool:
        return self._speech_factory is not None

    @property
    def audio_output(self) -> bool:
        return self._audio_on

    @property
    def output_sample_rate_hz(self) -> int | None:
        sr = getattr(self.tts_engine, "sample_rate_hz", None)
        return int(sr) if sr else None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.session.on_turn_undecided = self._turn_undecided  # here: a caller may swap the session in first
        await self.session.start()
        if "session" not in self._tasks:  # audio pushed before the start has spawned its speech pump already
            self._spawn("session", self._pump_session())
            self._spawn("tts", self._pump_tts())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tts is not None:
            self.tts.cancel()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(*tasks, what="pipeline task")  # errors were already reported as outputs
        if self._speech is not None:
            await self._speech.aclose()
        await self.session.close()
        if self._own_executor:
            self._tts_executor.shutdown(wait=False, cancel_futures=True)
        self._out.put_nowait(None)

    def _spawn(self, name: str, coro: Any) -> None:
        task = asyncio.create_task(coro, name=f"voice-{name}-{self.session.id}")
        task.add_done_callback(self._task_ended)
        self._tasks[name] = task

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        """A pump that dies must say so at once (a dead TTS pump means a silent agent), not when
        the pipeline closes: log it and tell the transport."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("session %s: %s failed", self.id, task.get_name(), exc_info=exc)
        self._emit(ErrorEvent("internal_error", f"{task.get_name()}: {type(exc).__name__}: {exc}", self.clock.now()))

    # ---- input ---------------------------------------------------------------------------------
    async def push_audio(self, samples_16k: np.ndarray) -> None:
        """Queue float32 16 kHz mono microphone audio; returns at once (the ASR thread paces it)."""
        if self._speech is None:
            if self._speech_factory is None:
                raise VoiceUnavailable("this pipeline has no speech recognition")
            speech = self._speech_factory()
            interval = getattr(self.session, "asr_interval_ms", None)  # a session that wants words sooner
            if interval is not None:
                speech.asr_interval_ms = interval
            phrases = _PhraseInput(speech, self._wants_turn_features)
            self._speech = AsyncSpeechInput(cast(SpeechInput, phrases), executor=self._asr_executor,
                                            turn_executor=self._turn_executor)
            self._spawn("speech", self._pump_speech(self._speech))
        await self._speech.push(samples_16k)

    def _wants_turn_features(self) -> bool:
        """Smart Turn and prosody run for a policy that reads them (or for the decision log), and
        only once the session is undecided after the user's final words: when the words settle
        the turn, the reply starts without them (``Session.awaiting_turn_decision``)."""
        if not (self.config.turn_features_always or getattr(self.session.policy, "needs_audio_features", False)):
            return False
        return self.session.awaiting_turn_decision

    def _turn_undecided(self) -> None:
        if self._speech is not None:
            self._speech.analyze_turn_if_due()  # now, not at the next audio block

    async def feed_audio(self, samples_16k: np.ndarray, chunk_ms: int = 20, realtime: bool = True) -> float:
        """Push a recording in ``chunk_ms`` blocks, each when it would have finished arriving on
        ``self.clock``. Returns the clock time of the recording's first sample."""
        step = _SR * chunk_ms // 1000
        t0 = self.clock.now()
        for i, start in enumerate(range(0, len(samples_16k), step)):
            if realtime:
                delay = t0 + (i + 1) * chunk_ms / 1000 - self.clock.now()
                if delay > 0:
                    await self.clock.sleep(delay)
            await self.push_audio(samples_16k[start:start + step])
        return t0

    async def end_of_speech(self) -> None:
        """End the open utterance now (push-to-talk commit, end of stream) and finalize its words."""
        if self._speech is not None:
            await self._speech.flush()

    def send_text(self, text: str, final: bool = True) -> bool:
        """Typed user text; ``final`` ends the user's turn. False: rejected (an error is emitted)."""
        return self.session.submit(TextInput(text, final=final))

    def update(self, update: UpdateSession) -> bool:
        return self.session.submit(update)

    def cancel(self) -> None:
        """Stop the agent's reply (a button, a key); audio is cleared via ``AudioCleared``."""
        self.session.submit(Cancel())

    def set_audio_output(self, enabled: bool) -> None:
        """Switch agent audio on/off between agent turns (with audio on, tokens count as heard only
        through playback reports)."""
        if enabled and self.tts is None:
            raise VoiceUnavailable("this pipeline has no TTS")
        if self.agent_turn is not None or self.session.state != "listening":
            raise RuntimeError("audio output can only change while the agent is not speaking")
        if enabled == self._audio_on:
            return
        self._audio_on = enabled
        self.config = self.config.with_session(audio_output=enabled)
        self.session.submit(UpdateSession(audio_output=enabled))

    # ---- playback reports ----------------------------------------------------------------------
    def played_samples_at(self, turn: int, audio_end_ms: float) -> int:
        """``audio_end_ms`` on turn ``turn``'s audio timeline -> samples of that turn."""
        state = self._turns.get(turn)
        if state is None or not state.sample_rate_hz:
            return 0
        return int(round(audio_end_ms * state.sample_rate_hz / 1000.0))

    def report_played(self, turn: int, played_samples: int, done: bool = False) -> None:
        """The listener has heard ``played_samples`` of agent turn ``turn``'s audio (``done``: the
        transport finished playing all of it)."""
        state = self._turns.get(turn)
        if state is None:
            return
        done = done or (state.audio_done and played_samples >= state.ledger.queued_samples)
        heard = state.n_tokens if done else (state.ledger.heard_token(played_samples) or 0)
        self._report_heard(turn, state, heard, done)

    def report_heard_tokens(self, turn: int, heard_tokens: int, done: bool = False) -> None:
        """Like ``report_played`` for transports that count heard tokens themselves."""
        state = self._turns.get(turn)
        if state is not None:  # text-only turns are never tracked: the session counts them heard
            self._report_heard(turn, state, max(0, heard_tokens), done)

    def playback_done(self, turn: int) -> None:
        """The transport finished playing every chunk of ``turn`` it received."""
        state = self._turns.get(turn)
        if state is not None:
            self.report_played(turn, state.ledger.queued_samples, done=True)

    def truncate(self, turn: int, played_samples: int) -> None:
        """The transport stopped playing ``turn`` at ``played_samples`` (after an interruption, or
        on its own): stop the agent if it still speaks, and roll back to exactly what was heard."""
        state = self._turns.get(turn)
        if state is None:
            return
        if not state.interrupted:
            state.interrupted = True
            self.session.submit(Cancel())
        self.report_played(turn, played_samples)

    def _report_heard(self, turn: int, state: _TurnAudio, heard: int, done: bool) -> None:
        if heard == state.heard and not done and not state.interrupted:
            return
        state.heard = heard
        # After an interruption the first report is the transport's final word (``final``): the
        # session rolls back to it at once.
        self.session.submit(PlaybackMark(turn, heard, done=done and not state.interrupted, final=state.interrupted))
        if done or state.interrupted:
            del self._turns[turn]  # the session has its final word on this turn
            if self.agent_turn == turn:
                self.agent_turn = None

    async def outputs(self) -> AsyncIterator[VoiceOutput]:
        """Session events, speech events and agent audio, in order, until :meth:`close`."""
        while True:
            item = await self._out.get()
            if item is None:
                return
            yield item

    # ---- speech -> session ---------------------------------------------------------------------
    async def _pump_speech(self, speech: AsyncSpeechInput) -> None:
        try:
            async for ev in speech.events():
                self._on_speech(ev)
        except Exception as exc:  # noqa: BLE001 - the ASR worker failed: say so, keep text working
            log.exception("session %s: speech input failed", self.id)
            self._emit(ErrorEvent("asr_failed", f"{type(exc).__name__}: {exc}", self.clock.now()))

    def _on_speech(self, ev: object) -> None:
        if isinstance(ev, TurnAudioFeatures):
            self.session.submit(ev)  # for the policy's Observation only; no transport needs it
            return
        if isinstance(ev, SpeechFinalized):
            self._emit(ev)
            if self._held_stop is not None and self._held_stop.t_s <= ev.t_s:
                self.session.submit(self._held_stop)
                self._held_stop = None
            if self._early_stop_t is not None and self._early_stop_t <= ev.t_s:
                self._early_stop_t = None
                self.session.submit(TranscriptStatus(False, ev.t_s))
            return
        speech_ev = cast(SpeechEvent, ev)
        self._emit(speech_ev)
        if isinstance(speech_ev, SpeechStopped) and self.config.hold_stop_for_final_words:
            if self.agent_turn is None:
                self._held_stop = speech_ev  # a turn end is only seen with its final words
                return
            # Over the agent, the sound's end bounds the overlap now (a slow final pass must not
            # stretch a backchannel into a barge-in); the decision waits for the words instead.
            self._early_stop_t = speech_ev.t_s
            self.session.submit(TranscriptStatus(True, speech_ev.t_s))
        if isinstance(speech_ev, SpeechStarted) and self._held_stop is not None:
            self._held_stop = None  # the user went on: the session never saw the pause
            return
        self.session.submit(speech_ev)

    # ---- session -> outputs and TTS ------------------------------------------------------------
    async def _pump_session(self) -> None:
        async for ev in self.session.events():
            if not isinstance(ev, (AgentPaused, AgentResumed)):
                self._emit(ev)  # the audio-level pause events below replace these two
            if isinstance(ev, TurnStarted) and ev.speaker == "agent":
                self.agent_turn = ev.turn
                if self._audio_on:
                    self._turns[ev.turn] = _TurnAudio()
            elif isinstance(ev, AgentTextDelta):
                state = self._turns.get(ev.turn)
                if state is not None and not state.interrupted:
                    state.n_tokens = max(state.n_tokens, ev.token_end)
                    self._tts_inbox.put_nowait(_TtsText(ev.turn, ev.text, ev.token_start, ev.token_end))
            elif isinstance(ev, Interrupted):
                self._interrupt(ev.turn)
            elif isinstance(ev, (AgentPaused, AgentResumed)):
                self._pause_or_resume(ev)
            elif isinstance(ev, AgentBackchannel) and self._audio_on and self.tts_engine is not None:
                previous = self._tasks.get("backchannel")
                if previous is None or previous.done():  # one at a time: a second would only overlap
                    self._spawn("backchannel", self._speak_backchannel(ev))
            elif isinstance(ev, TurnEnded) and ev.speaker == "agent":
                if ev.reason == "interrupted" or ev.turn not in self._turns:
                    if self.agent_turn == ev.turn:
                        self.agent_turn = None
                else:
                    self._tts_inbox.put_nowait(_TtsFlush(ev.turn))

    async def _speak_backchannel(self, ev: AgentBackchannel) -> None:
        """Synthesise the acknowledgement on the TTS thread (a cache hit after the first time)."""
        engine = self.tts_engine
        assert engine is not None
        loop = asyncio.get_running_loop()
        try:
            speech = await loop.run_in_executor(self._tts_executor, speech_stage(engine.synthesize_speech), ev.text)
        except Exception as exc:  # noqa: BLE001 - a lost "mm-hm" must not end the session
            self._emit(ErrorEvent("tts_failed", f"{type(exc).__name__}: {exc}", self.clock.now()))
            return
        if self.agent_turn is None:  # the agent may have taken the turn meanwhile: then stay quiet
            self._emit(BackchannelAudio(ev.text, speech.pcm, speech.sample_rate_hz, self.clock.now()))

    def _pause_or_resume(self, ev: AgentPaused | AgentResumed) -> None:
        """Pause: the transport stops playing at once and keeps its queue; audio synthesised
        meanwhile is held here. Resume: play on, then hand over what was held, in order."""
        state = self._turns.get(ev.turn)
        if state is None or state.interrupted:
            return
        if isinstance(ev, AgentPaused):
            if not state.paused:
                state.paused = True
                self._emit(AudioPaused(ev.turn, state.sent_samples, state.sample_rate_hz, ev.t, ev.reason))
            return
        if not state.paused:
            return
        state.paused = False
        self._emit(AudioResumed(ev.turn, ev.t, ev.reason))
        held, state.held = state.held, []
        for item in held:
            self._deliver(state, item)

    def _deliver(self, state: _TurnAudio, item: AudioOut | AudioDone) -> None:
        """Hand agent audio (or its end) to the transport, unless the turn is paused."""
        if state.paused:
            state.held.append(item)
            return
        if isinstance(item, AudioOut):
            state.sent_samples = item.offset_samples + len(item.chunk.pcm)
        self._emit(item)
        if isinstance(item, AudioDone) and item.total_samples == 0:
            self.report_played(item.turn, 0, done=True)  # silent turn: it is "played" already

    def _interrupt(self, turn: int) -> None:
        """Stop synthesis now and tell the transport to drop queued audio."""
        self.session.release_decoding()
        if self.tts is not None:
            self.tts.cancel()  # thread-safe: a synthesis in flight yields nothing more
        if self.agent_turn == turn:
            self.agent_turn = None
        state = self._turns.get(turn)
        if state is None:
            if self._audio_on:
                self._emit(AudioCleared(turn, self.clock.now()))
            return
        state.interrupted = True
        state.paused = False
        state.held.clear()  # synthesised during the pause, never played: the rollback drops it
        self._emit(AudioCleared(turn, self.clock.now()))
        if state.ledger.queued_samples == 0:
            self.report_played(turn, 0)  # nothing was ever played: no need to wait for the transport

    async def _pump_tts(self) -> None:
        current: int | None = None
        while True:
            item = await self._tts_inbox.get()
            tts = self.tts
            state = self._turns.get(item.turn)
            if tts is None or state is None or state.interrupted:
                continue
            if item.turn != current:
                current = item.turn
                tts.cancel()  # new turn: drop any text left over from the previous one
            # The reply's first clause (one word) is on the end-of-speech -> first-audio path: decode
            # steps wait for it rather than compete with it for the CPU (bounded in the session).
            first = (isinstance(item, _TtsText) and state.ledger.queued_samples == 0 and bool(item.text.strip())
                     and self.config.first_clause_words <= 1 and self.config.hold_decode_for_first_audio)
            if first:
                self.session.hold_decoding()
            try:
                chunks = (tts.iter_push(item.text, item.token_start, item.token_end) if isinstance(item, _TtsText)
                          else tts.iter_flush())
                await self._synthesize(chunks, item.turn, state)
            except Exception as exc:  # noqa: BLE001 - report, keep the session alive (text still flows)
                log.exception("session %s: TTS failed", self.id)
                self._emit(ErrorEvent("tts_failed", f"{type(exc).__name__}: {exc}", self.clock.now()))
            finally:
                if first:
                    self.session.release_decoding()
            if isinstance(item, _TtsFlush) and not state.interrupted and self._turns.get(item.turn) is state:
                state.audio_done = True
                self._deliver(state, AudioDone(item.turn, state.ledger.queued_samples, state.sample_rate_hz,
                                               self.clock.now()))

    async def _synthesize(self, chunks: Iterator[TtsChunk], turn: int, state: _TurnAudio) -> None:
        """Pull chunks off the TTS thread one at a time, so the first clause plays while the next
        is being synthesised."""
        loop = asyncio.get_running_loop()
        while True:
            chunk = await loop.run_in_executor(self._tts_executor, speech_stage(next), chunks, None)
            if chunk is None:
                return
            if state.interrupted or self._turns.get(turn) is not state:
                return  # cut off while synthesising
            offset = state.ledger.queued_samples
            state.ledger.append(chunk)
            state.sample_rate_hz = chunk.sample_rate_hz
            self._deliver(state, AudioOut(turn, chunk, offset, self.clock.now()))

    def _emit(self, item: VoiceOutput) -> None:
        self._out.put_nowait(item)
