"""One conversation as the server holds it: a :class:`~duplex.voice.pipeline.VoicePipeline` (the
same pipeline ``talk``, the benchmarks and the evaluation use) plus its outbox. This module only
translates: wire messages in, pipeline outputs to wire events out.

A ``ServerSession`` outlives its WebSocket connection: when the socket drops it keeps running,
detached, for a TTL, buffering (bounded) what it says, so a client can resume it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from duplex.audio import AudioFormatError, SpeechInput, to_mono_16k
from duplex.audio.events import SpeechStarted, SpeechStopped
from duplex.engine.worker import Engine
from duplex.serving.outbox import Outbox, OutboxOverflow
from duplex.serving.protocol import (
    EventMapper,
    InputText,
    PlaybackMarkMsg,
    ProtocolError,
    SessionUpdate,
    Truncate,
    error_event,
    item_id,
)
from duplex.session.core import Session
from duplex.session.events import TurnEnded, TurnStarted, UpdateSession
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
from duplex.voice.pipeline import VoicePipeline

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
    max_sessions: int | None = None  # live + detached; None = sized to the machine (admission.py)
    max_detached_sessions: int | None = None  # None = half of max_sessions
    max_kv_mb: float | None = None  # all sessions' KV caches at their context window; None = half the RAM, 0 = off
    type: str = "server_limits"




class ServerSession:
    """Drive with :meth:`start`; feed with the ``handle_*`` methods; a connection drains ``outbox``."""

    def __init__(self, engine: Engine, config: VoiceConfig, *, limits: ServerLimits,
                 tts: Any | None = None, tts_executor: Executor | None = None,
                 speech_factory: Callable[[], SpeechInput] | None = None,
                 on_overflow: Callable[[ServerSession], None] | None = None,
                 session_id: str | None = None, translate: Any | None = None) -> None:
        self.limits = limits
        # what a mode change (duplex.translate.serving) needs to build the next pipeline
        self.translate = translate
        self.mode = "chat"
        self.translate_config: Any | None = None
        self._engine, self._chat_config, self._tts, self._tts_executor = engine, config, tts, tts_executor
        self._speech_factory = speech_factory
        self.id = session_id or secrets.token_hex(8)
        self.resume_token = secrets.token_urlsafe(24)
        self.outbox = Outbox(limits.max_queued_events, limits.max_queued_audio_bytes, limits.replay_events)
        self.pipeline = VoicePipeline(engine, config, speech_factory=speech_factory, tts=tts,
                                      tts_executor=tts_executor, session_id=self.id,
                                      audio_output=config.session.audio_output)
        self._on_overflow = on_overflow
        self.owner: object | None = None  # the connection currently draining the outbox
        self.detached_at: float | None = None
        self.closed = False
        self.close_reason: str | None = None
        self.input_sample_rate_hz = 16_000
        self.input_channels = 1
        self._mapper = EventMapper()
        self._pump: asyncio.Task[None] | None = None
        self._agent_turns: collections.deque[int] = collections.deque(maxlen=256)  # recent agent turn ids

    # ---- lifecycle ------------------------------------------------------------------------
    @property
    def config(self) -> VoiceConfig:
        return self.pipeline.config

    @property
    def audio_output(self) -> bool:
        return self.pipeline.audio_output

    @property
    def session(self) -> Session:
        return self.pipeline.session

    def describe(self) -> dict[str, Any]:
        sr = self.pipeline.output_sample_rate_hz
        session = self.config.session
        return {
            "id": self.id, "resume_token": self.resume_token, "policy": session.policy,
            "instructions": session.instructions,
            "output_modalities": ["text", "audio"] if self.audio_output else ["text"],
            "input_audio_format": {"encoding": "pcm16", "sample_rate_hz": self.input_sample_rate_hz,
                                   "channels": self.input_channels},
            "audio_input_available": self.pipeline.audio_input_available,
            "audio_output_available": self.pipeline.tts_engine is not None,
            "output_audio_format": {"encoding": "pcm16", "sample_rate_hz": sr, "channels": 1} if sr else None,
            "max_text_chars": session.max_text_chars,
            "max_instructions_chars": session.max_instructions_chars,
            "resume_ttl_s": self.limits.resume_ttl_s,
            "mode": self.mode,
            **({"translate": _describe_translate(self.translate_config)} if self.mode == "translate" else {}),
        }

    async def start(self) -> None:
        await self.pipeline.start()
        self._pump = asyncio.create_task(self._pump_outputs(), name=f"pump-{self.id}")

    @property
    def busy(self) -> bool:
        """A turn is open (generating, or its audio still playing)."""
        return self.pipeline.agent_turn is not None or self.session.state != "listening"

    @property
    def tts_available(self) -> bool:
        return self._tts is not None

    async def replace_pipeline(self, *, session: Any | None, tts: Any | None, audio_output: bool) -> None:
        """Swap the voice pipeline between turns (a mode change): ``session`` takes the chat
        Session's place (None: a fresh chat Session); ``tts`` replaces the server's (None: the server's)."""
        if self.mode == "chat":
            self._chat_config = self.pipeline.config
        await self._stop_pump()
        await self.pipeline.close()
        tts = tts if tts is not None else self._tts
        pipeline = VoicePipeline(self._engine, self._chat_config, speech_factory=self._speech_factory, tts=tts,
                                 tts_executor=self._tts_executor, session_id=self.id,
                                 audio_output=audio_output and tts is not None)
        if session is not None:
            pipeline.session = session  # before start(): the pipeline drives this session instead
        self.pipeline = pipeline
        await pipeline.start()
        self._pump = asyncio.create_task(self._pump_outputs(), name=f"pump-{self.id}")

    async def close(self, reason: str = "closed") -> None:
        """Stop everything; queue a final ``session.closed`` for a still-attached reader."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        await self.pipeline.close()
        await self._stop_pump()
        self._put({"type": "session.closed", "reason": reason})

    async def _stop_pump(self) -> None:
        """Cancel the task that forwards the pipeline's outputs, and wait for it to end."""
        pump, self._pump = self._pump, None
        await cancel_and_wait(pump, what="output pump")

    def detach(self) -> None:
        """The connection is gone. An agent that is being *heard* stops at what was played."""
        self.owner = None
        self.detached_at = time.monotonic()
        if self.audio_output and self.pipeline.agent_turn is not None:
            self.pipeline.cancel()

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

    def send_error(self, code: str, message: str, param: str | None = None) -> None:
        """``param``: the offending field, in ``error`` and at the top level like ``code``."""
        extra = {"param": param} if param else {}
        self._put({**error_event(code, message, **extra), **extra})

    def send(self, event: dict[str, Any]) -> None:
        self._put(event)

    async def _pump_outputs(self) -> None:
        async for out in self.pipeline.outputs():
            try:
                self._translate(out)
            except Exception:  # noqa: BLE001 - a bookkeeping bug must not stop text delivery
                log.exception("session %s: forwarding %s failed", self.id, out.type)

    def _translate(self, out: VoiceOutput) -> None:
        if isinstance(out, AudioOut):
            self._send_chunk(out)
        elif isinstance(out, AudioCleared):
            self.outbox.purge_audio(out.turn)
        elif isinstance(out, AudioDone):
            self._put({"type": "response.output_audio.done", "turn": out.turn, "item_id": item_id(out.turn),
                       "samples": out.total_samples, "sample_rate_hz": out.sample_rate_hz,
                       "audio_end_ms": _ms(out.total_samples, out.sample_rate_hz)})
        elif isinstance(out, AudioPaused):
            self._put({"type": "response.output_audio.paused", "turn": out.turn, "item_id": item_id(out.turn),
                       "audio_end_ms": _ms(out.sent_samples, out.sample_rate_hz) if out.sample_rate_hz else 0,
                       "reason": out.reason})
        elif isinstance(out, BackchannelAudio):
            n = len(out.pcm)
            if n:
                header = {"type": "response.backchannel.audio", "text": out.text, "turn": -1,
                          "sample_rate_hz": out.sample_rate_hz, "samples": n}
                self.outbox.put_audio(header, out.pcm.astype("<i2").tobytes(), -1, n)
        elif isinstance(out, AudioResumed):
            self._put({"type": "response.output_audio.resumed", "turn": out.turn, "item_id": item_id(out.turn),
                       "reason": out.reason})
        elif isinstance(out, SpeechStarted):
            self._put({"type": "input_audio_buffer.speech_started", "audio_start_ms": round(out.t_s * 1000)})
        elif isinstance(out, SpeechStopped):
            self._put({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": round(out.t_s * 1000)})
        elif isinstance(out, SpeechFinalized):
            pass
        else:
            if isinstance(out, TurnStarted) and out.speaker == "agent":
                self._agent_turns.append(out.turn)
            for wire in self._mapper.map(out):
                self._put(wire)
            if (isinstance(out, TurnEnded) and out.speaker == "agent" and out.reason != "interrupted"
                    and self.owner is None and self.audio_output):
                self.pipeline.cancel()  # detached: nobody is listening to this turn

    def _send_chunk(self, out: AudioOut) -> None:
        chunk = out.chunk
        n = len(chunk.pcm)
        if n:
            header = {"type": "response.output_audio.delta", "turn": out.turn, "item_id": item_id(out.turn),
                      "token_start": chunk.token_start, "token_end": chunk.token_end,
                      "token_offsets_samples": list(chunk.token_offsets_samples),
                      "sample_rate_hz": chunk.sample_rate_hz, "sample_offset": out.offset_samples, "samples": n,
                      "text": chunk.text}
            self.outbox.put_audio(header, chunk.pcm.astype("<i2").tobytes(), out.turn, n)

    # ---- incoming -------------------------------------------------------------------------
    def _require_open(self) -> VoicePipeline:
        if self.closed:
            raise ProtocolError("session_closed", "this session is closed")
        return self.pipeline

    def handle_text(self, msg: InputText) -> None:
        self._require_open().send_text(msg.text, final=msg.final)

    def handle_cancel(self) -> None:
        self._require_open().cancel()

    async def wait_for_room(self) -> None:
        """Backpressure: returns once the session's input queue can take another message."""
        if not self.closed:
            await self.session.wait_for_room()

    def _require_agent_turn(self, turn: int, what: str) -> None:
        if turn not in self._agent_turns:
            raise ProtocolError("item_not_found", f"{what}: item_id {item_id(turn)!r} (turn {turn}) is not a "
                                "recent agent turn of this session; use the item_id of a response.created event")

    def handle_mark(self, msg: PlaybackMarkMsg) -> None:
        pipeline = self._require_open()
        self._require_agent_turn(msg.turn, "playback.mark")
        if msg.heard_tokens is not None:
            pipeline.report_heard_tokens(msg.turn, msg.heard_tokens, done=msg.done)
        else:
            pipeline.report_played(msg.turn, pipeline.played_samples_at(msg.turn, msg.audio_end_ms or 0.0),
                                   done=msg.done)

    def handle_truncate(self, msg: Truncate) -> None:
        """The client stopped playing ``turn`` at ``audio_end_ms``: stop there and roll back to it."""
        pipeline = self._require_open()
        self._require_agent_turn(msg.turn, "conversation.item.truncate")
        pipeline.truncate(msg.turn, pipeline.played_samples_at(msg.turn, msg.audio_end_ms))

    async def handle_update(self, msg: SessionUpdate) -> None:
        pipeline = self._require_open()
        if msg.input_sample_rate_hz is not None or msg.input_channels is not None:
            rate = msg.input_sample_rate_hz or self.input_sample_rate_hz
            channels = msg.input_channels or self.input_channels
            try:
                to_mono_16k(b"", rate, channels)
            except AudioFormatError as exc:
                raise ProtocolError("invalid_audio_format", str(exc)) from exc
            self.input_sample_rate_hz, self.input_channels = rate, channels
        if msg.mode is not None or self.mode == "translate":
            from duplex.translate.serving import update_mode

            if await update_mode(self, msg):
                return
        if msg.output_modalities is not None:
            want_audio = "audio" in msg.output_modalities
            if want_audio and pipeline.tts_engine is None:
                raise ProtocolError("audio_output_unavailable", "this server runs without TTS (--tts none)")
            try:
                pipeline.set_audio_output(want_audio)
            except RuntimeError as exc:
                raise ProtocolError("invalid_state", "output_modalities can only change while the agent is "
                                    "not speaking") from exc
        fields = (msg.instructions, msg.policy, msg.policy_params, msg.temperature, msg.max_reply_tokens)
        if any(v is not None for v in fields):
            update = UpdateSession(instructions=msg.instructions, policy=msg.policy, policy_params=msg.policy_params,
                                   temperature=msg.temperature, max_reply_tokens=msg.max_reply_tokens)
            if not pipeline.update(update):
                return  # the session queued an error event explaining why
            changes = {k: v for k, v in (("instructions", msg.instructions), ("policy", msg.policy),
                                         ("policy_params", msg.policy_params)) if v is not None}
            pipeline.config = pipeline.config.with_session(**changes)
        self._put({"type": "session.updated", "session": self.describe()})

    async def handle_audio(self, pcm: bytes) -> None:
        """Upstream audio in the declared input format -> the pipeline's VAD/ASR."""
        pipeline = self._require_open()
        if not pipeline.audio_input_available:
            raise ProtocolError("audio_input_unavailable", "this server runs without speech recognition")
        try:
            samples = to_mono_16k(pcm, self.input_sample_rate_hz, self.input_channels)
        except AudioFormatError as exc:
            raise ProtocolError("invalid_audio", str(exc)) from exc
        await pipeline.push_audio(samples)

    async def handle_commit(self) -> None:
        await self._require_open().end_of_speech()


def _describe_translate(config: Any) -> dict[str, Any] | None:
    from duplex.translate.serving import describe_translate

    return describe_translate(config)


def _ms(samples: int, sample_rate_hz: int) -> float:
    return round(1000.0 * samples / sample_rate_hz, 3) if sample_rate_hz else 0.0
