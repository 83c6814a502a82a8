"""One conversation as the server holds it: a :class:`~duplex.session.core.Session` plus its speech input,
its streaming TTS, the playback ledger that maps played audio back to tokens, and the outbox.

A ``ServerSession`` outlives its WebSocket connection: when the socket drops it keeps running,
detached, for a TTL, buffering (bounded) what it says, so a client can resume it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from duplex.audio import AsyncSpeechInput, AudioFormatError, PlaybackLedger, SpeechInput, StreamingTts, to_mono_16k
from duplex.audio.events import SpeechStarted, SpeechStopped, TtsChunk
from duplex.engine.worker import Engine
from duplex.session.events import (AgentTextDelta, Cancel, Interrupted, PlaybackMark, SessionEvent, TextInput, TurnEnded,
                     TurnStarted, UpdateSession)
from duplex.serving.protocol import EventMapper, InputText, PlaybackMarkMsg, ProtocolError, SessionUpdate, Truncate, error_event, item_id
from duplex.serving.outbox import Outbox, OutboxOverflow
from duplex.session.core import Session, SessionConfig

__all__ = ["ServerLimits", "ServerSession"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Per-connection bounds. Byte rates apply to all incoming frames (PCM16 16 kHz = 32 kB/s)."""

    max_message_bytes: int = 1 << 20
    max_queued_events: int = 4096
    max_queued_audio_bytes: int = 2 << 20
    replay_events: int = 512
    messages_per_s: float = 200.0
    messages_burst: float = 400.0
    bytes_per_s: float = 256_000.0
    bytes_burst: float = 2 << 20
    resume_ttl_s: float = 60.0
    ping_interval_s: float | None = 20.0
    ping_timeout_s: float | None = 20.0
    close_timeout_s: float = 2.0
    send_buffer_bytes: int | None = None  # SO_SNDBUF per connection; None = kernel autotuning
    type: str = "server_limits"


@dataclass(slots=True)
class _TurnAudio:
    ledger: PlaybackLedger = field(default_factory=PlaybackLedger)
    samples: int = 0
    sample_rate_hz: int = 0
    tokens: int = 0  # highest agent token index seen in text deltas
    interrupted: bool = False


@dataclass(frozen=True, slots=True)
class _TtsText:
    turn: int
    text: str
    token_start: int
    token_end: int


@dataclass(frozen=True, slots=True)
class _TtsEnd:
    turn: int


class ServerSession:
    """Drive with :meth:`start`; feed with the ``handle_*`` methods; a connection drains ``outbox``."""

    def __init__(self, engine: Engine, config: SessionConfig, *, limits: ServerLimits,
                 tts: Any | None = None, tts_executor: Executor | None = None,
                 speech_factory: Callable[[], SpeechInput] | None = None,
                 on_overflow: Callable[[ServerSession], None] | None = None,
                 session_id: str | None = None) -> None:
        self.engine = engine
        self.config = config
        self.limits = limits
        self.id = session_id or secrets.token_hex(8)
        self.resume_token = secrets.token_urlsafe(24)
        self.outbox = Outbox(limits.max_queued_events, limits.max_queued_audio_bytes, limits.replay_events)
        self._tts_engine = tts
        self._tts_executor = tts_executor
        self._speech_factory = speech_factory
        self._on_overflow = on_overflow
        self.session: Session | None = None
        self.owner: object | None = None  # the connection currently draining the outbox
        self.detached_at: float | None = None
        self.closed = False
        self.close_reason: str | None = None
        self.input_sample_rate_hz = 16_000
        self.input_channels = 1
        self._mapper = EventMapper()
        self._tts: StreamingTts | None = None
        self._tts_queue: asyncio.Queue[_TtsText | _TtsEnd] = asyncio.Queue()
        self._turns: dict[int, _TurnAudio] = {}
        self._agent_turn: int | None = None
        self._speech: AsyncSpeechInput | None = None
        self._pump: asyncio.Task[None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # ---- lifecycle ------------------------------------------------------------------------
    @property
    def audio_output(self) -> bool:
        return self.config.audio_output

    def describe(self) -> dict[str, Any]:
        sr = getattr(self._tts_engine, "sample_rate_hz", None)
        return {
            "id": self.id, "resume_token": self.resume_token, "policy": self.config.policy,
            "instructions": self.config.instructions,
            "output_modalities": ["text", "audio"] if self.audio_output else ["text"],
            "input_audio_format": {"encoding": "pcm16", "sample_rate_hz": self.input_sample_rate_hz,
                                   "channels": self.input_channels},
            "audio_input_available": self._speech_factory is not None,
            "audio_output_available": self._tts_engine is not None,
            "output_audio_format": {"encoding": "pcm16", "sample_rate_hz": sr, "channels": 1} if sr else None,
            "max_text_chars": self.config.max_text_chars,
            "resume_ttl_s": self.limits.resume_ttl_s,
        }

    async def start(self) -> None:
        self.session = Session(self.engine, self.config, session_id=self.id)
        await self.session.start()
        self._pump = asyncio.create_task(self._pump_events(self.session), name=f"pump-{self.id}")
        if self.audio_output and self._tts_engine is not None:
            self._tts = StreamingTts(self._tts_engine)
            self._tasks["tts"] = asyncio.create_task(self._run_tts(), name=f"tts-{self.id}")

    async def close(self, reason: str = "closed") -> None:
        """Stop everything; queue a final ``session.closed`` for a still-attached reader."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        await self._stop_session()
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - already logged by the task; closing anyway
                pass
        self._tasks.clear()
        if self._speech is not None:
            await self._speech.aclose()
            self._speech = None
        if self._tts is not None:
            self._tts.cancel()
        self._put({"type": "session.closed", "reason": reason})

    async def _stop_session(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except asyncio.CancelledError:
                pass
            self._pump = None

    def detach(self) -> None:
        """The connection is gone. An agent that is being *heard* stops at what was played."""
        self.owner = None
        self.detached_at = time.monotonic()
        if self.audio_output and self.session is not None and self._agent_turn is not None:
            self.session.submit(Cancel())

    # ---- outgoing -------------------------------------------------------------------------
    def _put(self, event: dict[str, Any]) -> None:
        if self.outbox.overflowed:
            return  # the connection is being closed for it (close code 1008); the session with it
        try:
            self.outbox.put_event(event)
        except OutboxOverflow:
            log.warning("session %s: send queue overflow", self.id)
            if self._on_overflow is not None:
                self._on_overflow(self)

    def send_error(self, code: str, message: str) -> None:
        self._put(error_event(code, message))

    def send(self, event: dict[str, Any]) -> None:
        self._put(event)

    async def _pump_events(self, session: Session) -> None:
        async for ev in session.events():
            try:
                self._side_effects(ev)
            except Exception:  # noqa: BLE001 - a TTS bookkeeping bug must not stop text delivery
                log.exception("session %s: side effect of %s failed", self.id, ev.type)
            for wire in self._mapper.map(ev):
                self._put(wire)

    def _side_effects(self, ev: SessionEvent) -> None:
        if isinstance(ev, TurnStarted) and ev.speaker == "agent":
            self._agent_turn = ev.turn
            self._turns[ev.turn] = _TurnAudio()
            for old in [t for t in self._turns if t < ev.turn - 8]:
                del self._turns[old]
        elif isinstance(ev, AgentTextDelta):
            audio = self._turns.get(ev.turn)
            if audio is not None:
                audio.tokens = max(audio.tokens, ev.token_end)
            if self._tts is not None:
                self._tts_queue.put_nowait(_TtsText(ev.turn, ev.text, ev.token_start, ev.token_end))
        elif isinstance(ev, Interrupted):
            audio = self._turns.get(ev.turn)
            if audio is not None:
                audio.interrupted = True
            if self._tts is not None:
                self._tts.cancel()  # thread-safe: a synthesis in flight yields nothing more
            self.outbox.purge_audio(ev.turn)
        elif isinstance(ev, TurnEnded) and ev.speaker == "agent":
            audio = self._turns.get(ev.turn)
            if self._tts is not None and ev.reason != "interrupted" and not (audio and audio.interrupted):
                self._tts_queue.put_nowait(_TtsEnd(ev.turn))
            if ev.reason == "interrupted" or not self.audio_output:
                self._agent_turn = None
            elif self.owner is None and self.session is not None:
                self.session.submit(Cancel())  # detached: nobody is listening to this turn

    # ---- TTS ------------------------------------------------------------------------------
    async def _run_tts(self) -> None:
        assert self._tts is not None
        loop = asyncio.get_running_loop()
        tts = self._tts
        current: int | None = None
        while True:
            item = await self._tts_queue.get()
            audio = self._turns.get(item.turn)
            if audio is None or audio.interrupted:
                continue
            if item.turn != current:
                current = item.turn
                tts.cancel()  # new turn: drop any text left over from the previous one
            try:
                if isinstance(item, _TtsText):
                    chunks = await loop.run_in_executor(self._tts_executor, tts.push, item.text,
                                                        item.token_start, item.token_end)
                else:
                    chunks = await loop.run_in_executor(self._tts_executor, tts.flush)
            except Exception as exc:  # noqa: BLE001 - report, keep the session alive (text still flows)
                log.exception("session %s: TTS failed", self.id)
                self.send_error("tts_failed", f"{type(exc).__name__}: {exc}")
                chunks = []
            if audio.interrupted:
                continue
            for chunk in chunks:
                self._send_chunk(item.turn, audio, chunk)
            if isinstance(item, _TtsEnd):
                self._put({"type": "response.output_audio.done", "turn": item.turn, "item_id": item_id(item.turn),
                           "samples": audio.samples, "sample_rate_hz": audio.sample_rate_hz,
                           "audio_end_ms": self._ms(audio, audio.samples)})
                if audio.samples == 0 and self.session is not None:
                    self.session.submit(PlaybackMark(item.turn, audio.tokens, done=True))

    @staticmethod
    def _ms(audio: _TurnAudio, samples: int) -> float:
        return round(1000.0 * samples / audio.sample_rate_hz, 3) if audio.sample_rate_hz else 0.0

    def _send_chunk(self, turn: int, audio: _TurnAudio, chunk: TtsChunk) -> None:
        audio.ledger.append(chunk)
        audio.sample_rate_hz = chunk.sample_rate_hz
        n = len(chunk.pcm)
        if n:
            header = {"type": "response.output_audio.delta", "turn": turn, "item_id": item_id(turn),
                      "token_start": chunk.token_start, "token_end": chunk.token_end,
                      "token_offsets_samples": list(chunk.token_offsets_samples),
                      "sample_rate_hz": chunk.sample_rate_hz, "sample_offset": audio.samples, "samples": n,
                      "text": chunk.text}
            self.outbox.put_audio(header, chunk.pcm.astype("<i2").tobytes(), turn, n)
        audio.samples += n

    def _heard_tokens(self, turn: int, audio_end_ms: float) -> int:
        audio = self._turns.get(turn)
        if audio is None or not audio.sample_rate_hz:
            return 0
        heard = audio.ledger.heard_token(int(round(audio_end_ms * audio.sample_rate_hz / 1000.0)))
        return heard or 0

    # ---- incoming -------------------------------------------------------------------------
    def _require_session(self) -> Session:
        if self.session is None or self.closed:
            raise ProtocolError("session_closed", "this session is closed")
        return self.session

    def handle_text(self, msg: InputText) -> None:
        session = self._require_session()
        session.submit(TextInput(msg.text, final=msg.final))

    def handle_cancel(self) -> None:
        self._require_session().submit(Cancel())

    def handle_mark(self, msg: PlaybackMarkMsg) -> None:
        session = self._require_session()
        heard = msg.heard_tokens if msg.heard_tokens is not None else self._heard_tokens(msg.turn, msg.audio_end_ms or 0.0)
        session.submit(PlaybackMark(msg.turn, heard, done=msg.done))
        if msg.done and msg.turn == self._agent_turn:
            self._agent_turn = None

    def handle_truncate(self, msg: Truncate) -> None:
        """The client stopped playing ``turn`` at ``audio_end_ms``: stop there and roll back to it."""
        session = self._require_session()
        heard = self._heard_tokens(msg.turn, msg.audio_end_ms)
        audio = self._turns.get(msg.turn)
        if msg.turn == self._agent_turn and audio is not None and not audio.interrupted:
            session.submit(Cancel())
        session.submit(PlaybackMark(msg.turn, heard, final=True))

    async def handle_update(self, msg: SessionUpdate) -> None:
        self._require_session()
        if msg.input_sample_rate_hz is not None or msg.input_channels is not None:
            rate = msg.input_sample_rate_hz or self.input_sample_rate_hz
            channels = msg.input_channels or self.input_channels
            try:
                to_mono_16k(b"", rate, channels)
            except AudioFormatError as exc:
                raise ProtocolError("invalid_audio_format", str(exc)) from exc
            self.input_sample_rate_hz, self.input_channels = rate, channels
        if msg.output_modalities is not None:
            want_audio = "audio" in msg.output_modalities
            if want_audio and self._tts_engine is None:
                raise ProtocolError("audio_output_unavailable", "this server runs without TTS (--tts none)")
            if want_audio != self.audio_output:
                await self._set_audio_output(want_audio)
        update = UpdateSession(instructions=msg.instructions, policy=msg.policy, policy_params=msg.policy_params,
                               temperature=msg.temperature, max_reply_tokens=msg.max_reply_tokens)
        if any(v is not None for v in (msg.instructions, msg.policy, msg.policy_params, msg.temperature,
                                        msg.max_reply_tokens)):
            if not self._require_session().submit(update):
                return  # the session queued an error event explaining why
            changes = {k: v for k, v in (("instructions", msg.instructions), ("policy", msg.policy),
                                         ("policy_params", msg.policy_params)) if v is not None}
            self.config = dataclasses.replace(self.config, **changes)
        self._put({"type": "session.updated", "session": self.describe()})

    async def _set_audio_output(self, enabled: bool) -> None:
        """Switch agent audio on/off between agent turns (the session reads ``config.audio_output``
        live: with audio on, tokens count as heard only through playback marks)."""
        session = self._require_session()
        if session.state != "listening" or self._agent_turn is not None:
            raise ProtocolError("invalid_state", "output_modalities can only change while the agent is not speaking")
        self.config = dataclasses.replace(self.config, audio_output=enabled)
        session.submit(UpdateSession(audio_output=enabled))
        task = self._tasks.pop("tts", None)
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tts = None
        if enabled and self._tts_engine is not None:
            self._tts = StreamingTts(self._tts_engine)
            self._tasks["tts"] = asyncio.create_task(self._run_tts(), name=f"tts-{self.id}")

    async def handle_audio(self, pcm: bytes) -> None:
        """Upstream audio in the declared input format -> VAD/ASR (created on first use)."""
        if self._speech_factory is None:
            raise ProtocolError("audio_input_unavailable", "this server runs without speech recognition")
        self._require_session()
        try:
            samples = to_mono_16k(pcm, self.input_sample_rate_hz, self.input_channels)
        except AudioFormatError as exc:
            raise ProtocolError("invalid_audio", str(exc)) from exc
        if self._speech is None:
            self._speech = AsyncSpeechInput(self._speech_factory())
            self._tasks["speech"] = asyncio.create_task(self._run_speech(self._speech), name=f"speech-{self.id}")
        await self._speech.push(samples)

    async def handle_commit(self) -> None:
        if self._speech is not None:
            await self._speech.flush()

    async def _run_speech(self, speech: AsyncSpeechInput) -> None:
        try:
            async for ev in speech:
                session = self.session
                if session is None or self.closed:
                    return
                session.submit(ev)
                if isinstance(ev, SpeechStarted):
                    self._put({"type": "input_audio_buffer.speech_started", "audio_start_ms": round(ev.t_s * 1000)})
                elif isinstance(ev, SpeechStopped):
                    self._put({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": round(ev.t_s * 1000)})
        except Exception as exc:  # noqa: BLE001 - the ASR worker failed: say so, keep text working
            log.exception("session %s: speech input failed", self.id)
            self.send_error("asr_failed", f"{type(exc).__name__}: {exc}")
