"""The duplex wire protocol, I/O-free: parse client messages, map session events to wire events,
and frame agent audio with its token alignment. ``docs/protocol.md`` is the human-readable spec.

Event names follow the OpenAI Realtime API where the meaning is the same. Everything here is
pure and synchronous so the socket code stays a thin shell around it (websockets' sans-I/O idea).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from duplex.session.events import (AgentBackchannel, AgentTextDelta, ErrorEvent, InstructionsUpdated, Interrupted,
                                   PolicyDecided, SessionEvent, StateChanged, TurnEnded, TurnStarted, UserTranscript)
from duplex.session.validation import MAX_TEMPERATURE
from duplex.translate.prompt import LAYOUTS as TRANSLATE_LAYOUTS

__all__ = [
    "AudioAppend", "AudioCommit", "ClientMessage", "EventMapper", "InputText", "PROTOCOL_VERSION",
    "PlaybackMarkMsg", "ProtocolError", "ResponseCancel", "SessionResume", "SessionUpdate", "Truncate",
    "decode_audio_frame", "encode_audio_frame", "error_event", "item_id", "parse_client_message", "turn_of_item",
]

PROTOCOL_VERSION = 1
_HEADER_LEN = struct.Struct("<I")
_MAX_HEADER_BYTES = 64 * 1024
_MAX_NESTING = 32  # JSON deeper than this is refused before any field is read


class ProtocolError(ValueError):
    """A client message we cannot act on; ``code`` goes into the ``error`` event, and ``param``
    (the offending field, e.g. ``session.target_language``) with it when there is one."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


# ---- client -> server -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SessionUpdate:
    instructions: str | None = None
    policy: str | None = None
    policy_params: dict[str, Any] | None = None
    temperature: float | None = None
    max_reply_tokens: int | None = None
    output_modalities: tuple[str, ...] | None = None
    input_sample_rate_hz: int | None = None
    input_channels: int | None = None
    mode: str | None = None  # chat | translate (docs/protocol.md, "Translate mode")
    source_language: str | None = None
    target_language: str | None = None
    k: int | None = None
    layout: str | None = None  # translate mode: reencode | interleaved (how source and target share the cache)
    type: str = "session.update"


@dataclass(frozen=True, slots=True)
class InputText:
    text: str
    final: bool = True
    type: str = "input_text"


@dataclass(frozen=True, slots=True)
class AudioAppend:
    pcm: bytes = field(repr=False)
    type: str = "input_audio_buffer.append"


@dataclass(frozen=True, slots=True)
class AudioCommit:
    type: str = "input_audio_buffer.commit"


@dataclass(frozen=True, slots=True)
class ResponseCancel:
    type: str = "response.cancel"


@dataclass(frozen=True, slots=True)
class Truncate:
    """The client stopped playing agent turn ``turn`` at ``audio_end_ms`` of that turn's audio."""

    turn: int
    audio_end_ms: float
    type: str = "conversation.item.truncate"


@dataclass(frozen=True, slots=True)
class PlaybackMarkMsg:
    """Played position of turn ``turn``: ``heard_tokens`` or ``audio_end_ms`` (one is required)."""

    turn: int
    heard_tokens: int | None = None
    audio_end_ms: float | None = None
    done: bool = False
    type: str = "playback.mark"


@dataclass(frozen=True, slots=True)
class SessionResume:
    session_id: str
    resume_token: str
    last_seq: int | None = None
    type: str = "session.resume"


ClientMessage = (SessionUpdate | InputText | AudioAppend | AudioCommit | ResponseCancel | Truncate
                 | PlaybackMarkMsg | SessionResume)


def item_id(turn: int) -> str:
    """Realtime-style conversation item id for a turn of the shared sequence."""
    return f"item_{turn}"


def turn_of_item(value: Any) -> int:
    if isinstance(value, str) and value.startswith("item_") and value[5:].isdigit():
        return int(value[5:])
    raise ProtocolError("invalid_value", f"unknown item_id {value!r}; expected 'item_<turn>'")


def _get(msg: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None,
         required: bool = False) -> Any:
    if key not in msg or msg[key] is None:
        if required:
            raise ProtocolError("missing_field", f"{msg.get('type')}: field '{key}' is required")
        return default
    value = msg[key]
    # bool is an int subclass: never accept true/false where a number is expected
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError("invalid_value", f"{msg.get('type')}: field '{key}' must not be a boolean")
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ProtocolError("invalid_value", f"{msg.get('type')}: field '{key}' must be {names}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError("invalid_value", f"{msg.get('type')}: field '{key}' must be a finite number, not {value}")
    return value


def _check_text(value: Any, path: str, depth: int = 0) -> None:
    """Refuse what JSON can carry but UTF-8 cannot: lone surrogates (``"\\ud800"``) anywhere in
    the message, and absurd nesting. Everything downstream (tokenizer, socket) needs valid UTF-8."""
    if depth > _MAX_NESTING:
        raise ProtocolError("invalid_value", f"field '{path}' is nested deeper than {_MAX_NESTING} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ProtocolError("invalid_value", f"field '{path}' is not valid Unicode text (a lone surrogate "
                                f"at character {exc.start})") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, f"{path}.<key>", depth + 1)
            _check_text(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{path}[{i}]", depth + 1)


def _turn(msg: dict[str, Any]) -> int:
    if msg.get("turn") is not None:
        turn = _get(msg, "turn", int)
    elif msg.get("item_id") is not None:
        turn = turn_of_item(msg["item_id"])
    else:
        raise ProtocolError("missing_field", f"{msg.get('type')}: 'turn' or 'item_id' is required")
    if turn < 0:
        raise ProtocolError("invalid_value", "turn must be >= 0")
    return int(turn)


MAX_AUDIO_MS = 86_400_000.0  # one day: a played position beyond that is a client bug


def _non_negative(value: float | None, name: str, limit: float | None = None) -> float | None:
    if value is not None and value < 0:
        raise ProtocolError("invalid_value", f"{name} must be >= 0")
    if value is not None and limit is not None and value > limit:
        raise ProtocolError("invalid_value", f"{name} must be <= {limit:g}, got {value:g}")
    return value


def _parse_session_update(msg: dict[str, Any]) -> SessionUpdate:
    s = msg.get("session", msg)
    if not isinstance(s, dict):
        raise ProtocolError("invalid_value", "session.update: 'session' must be an object")
    modalities = s.get("output_modalities", s.get("modalities"))
    if modalities is not None:
        if not isinstance(modalities, list) or not all(m in ("text", "audio") for m in modalities):
            raise ProtocolError("invalid_value", "output_modalities must be a list of 'text' / 'audio'")
        modalities = tuple(modalities)
    fmt = s.get("input_audio_format")
    rate = channels = None
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise ProtocolError("invalid_value", "input_audio_format must be an object "
                                "{sample_rate_hz, channels}")
        rate = _get(fmt, "sample_rate_hz", int)
        channels = _get(fmt, "channels", int)
        if fmt.get("encoding", "pcm16") != "pcm16":
            raise ProtocolError("invalid_audio_format", "only pcm16 (little-endian) input audio is supported")
    max_tokens = s.get("max_reply_tokens", s.get("max_output_tokens", s.get("max_response_output_tokens")))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ProtocolError("invalid_value", "max_reply_tokens must be a positive integer")
    temperature = _get(s, "temperature", (int, float))
    if temperature is not None and not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise ProtocolError("invalid_value", f"session.update: field 'temperature' must be between 0 and "
                            f"{MAX_TEMPERATURE:g}, got {temperature}")
    k = s.get("k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ProtocolError("invalid_value", "session.update: 'k' must be a positive integer", "session.k")
    layout = _get(s, "layout", str)
    if layout is not None and layout not in TRANSLATE_LAYOUTS:
        raise ProtocolError("invalid_value", f"session.update: 'layout' must be one of {', '.join(TRANSLATE_LAYOUTS)}, "
                            f"got {layout!r}", "session.layout")
    return SessionUpdate(
        mode=_get(s, "mode", str), source_language=_get(s, "source_language", str),
        target_language=_get(s, "target_language", str), k=k, layout=layout,
        instructions=_get(s, "instructions", str), policy=_get(s, "policy", str),
        policy_params=_get(s, "policy_params", dict),
        temperature=float(temperature) if temperature is not None else None,
        max_reply_tokens=max_tokens, output_modalities=modalities, input_sample_rate_hz=rate,
        input_channels=channels)


def _parse_item_create(msg: dict[str, Any]) -> InputText:
    item = _get(msg, "item", dict, required=True)
    if item.get("role", "user") != "user":
        raise ProtocolError("invalid_value", "conversation.item.create: only role 'user' is supported")
    parts = item.get("content")
    if not isinstance(parts, list) or not parts:
        raise ProtocolError("invalid_value", "conversation.item.create: 'item.content' must be a non-empty list")
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "text") \
                or not isinstance(part.get("text"), str):
            raise ProtocolError("invalid_value", "conversation.item.create: only input_text content is supported")
        texts.append(part["text"])
    return InputText(" ".join(texts), final=True)


def _parse_audio_append(msg: dict[str, Any]) -> AudioAppend:
    data = _get(msg, "audio", str, required=True)
    try:
        pcm = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("invalid_audio", f"input_audio_buffer.append: 'audio' is not base64 ({exc})") from exc
    return AudioAppend(pcm)


def parse_client_message(text: str) -> ClientMessage:
    """One JSON text frame -> a typed message; raises :class:`ProtocolError` with a clear code."""
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("invalid_json", f"message is not valid JSON: {exc}") from exc
    if not isinstance(msg, dict):
        raise ProtocolError("invalid_event", "message must be a JSON object with a 'type'")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_event", "message has no string 'type' field")
    _check_text(msg, "")
    if kind == "session.update":
        return _parse_session_update(msg)
    if kind == "input_text":
        return InputText(_get(msg, "text", str, required=True), bool(_get(msg, "final", bool, True)))
    if kind == "conversation.item.create":
        return _parse_item_create(msg)
    if kind == "input_audio_buffer.append":
        return _parse_audio_append(msg)
    if kind == "input_audio_buffer.commit":
        return AudioCommit()
    if kind == "response.cancel":
        return ResponseCancel()
    if kind == "conversation.item.truncate":
        end_ms = _non_negative(_get(msg, "audio_end_ms", (int, float), required=True), "audio_end_ms", MAX_AUDIO_MS)
        return Truncate(_turn(msg), float(end_ms or 0.0))
    if kind == "playback.mark":
        heard = _non_negative(_get(msg, "heard_tokens", int), "heard_tokens")
        end_ms = _non_negative(_get(msg, "audio_end_ms", (int, float)), "audio_end_ms", MAX_AUDIO_MS)
        if heard is None and end_ms is None:
            raise ProtocolError("missing_field", "playback.mark needs 'heard_tokens' or 'audio_end_ms'")
        return PlaybackMarkMsg(_turn(msg), None if heard is None else int(heard),
                               None if end_ms is None else float(end_ms), bool(_get(msg, "done", bool, False)))
    if kind == "session.resume":
        last = _get(msg, "last_seq", int)
        return SessionResume(_get(msg, "session_id", str, required=True),
                             _get(msg, "resume_token", str, required=True), last)
    raise ProtocolError("unknown_event_type", f"unknown event type {kind!r}")


# ---- server -> client -----------------------------------------------------------------------
@dataclass(slots=True)
class _UserTurnText:
    committed: str = ""


class EventMapper:
    """Session events -> wire events (dicts without ``seq``). Tracks the committed part of each
    user turn so tentative words can be told apart from committed ones."""

    def __init__(self) -> None:
        self._user: dict[int, _UserTurnText] = {}

    def map(self, ev: SessionEvent) -> list[dict[str, Any]]:
        if isinstance(ev, AgentTextDelta):
            return [{"type": "response.output_text.delta", "turn": ev.turn, "item_id": item_id(ev.turn),
                     "response_id": f"resp_{ev.turn}", "delta": ev.text,
                     "token_start": ev.token_start, "token_end": ev.token_end}]
        if isinstance(ev, UserTranscript):
            state = self._user.setdefault(ev.turn, _UserTurnText())
            if ev.committed:
                state.committed = ev.text
                tentative = ""
            else:
                tentative = ev.text[len(state.committed):].strip() if ev.text.startswith(state.committed) \
                    else ev.text
            return [{"type": "conversation.item.input_audio_transcription.delta", "turn": ev.turn,
                     "item_id": item_id(ev.turn), "text": ev.text, "committed_text": state.committed,
                     "tentative_text": tentative, "committed": ev.committed}]
        if isinstance(ev, TurnStarted):
            if ev.speaker != "agent":
                return []
            return [{"type": "response.created", "turn": ev.turn, "item_id": item_id(ev.turn),
                     "response": {"id": f"resp_{ev.turn}", "status": "in_progress"}}]
        if isinstance(ev, TurnEnded):
            if ev.speaker == "user":
                self._user.pop(ev.turn, None)
                return [{"type": "conversation.item.input_audio_transcription.completed", "turn": ev.turn,
                         "item_id": item_id(ev.turn), "transcript": ev.text}]
            return [{"type": "response.done", "turn": ev.turn, "item_id": item_id(ev.turn),
                     "response": {"id": f"resp_{ev.turn}", "status": ev.reason}, "text": ev.text,
                     "reason": ev.reason}]
        if isinstance(ev, Interrupted):
            return [{"type": "response.interrupted", "turn": ev.turn, "item_id": item_id(ev.turn),
                     "kept_text": ev.kept_text, "kept_tokens": ev.kept_tokens,
                     "dropped_tokens": ev.dropped_tokens, "reason": ev.reason}]
        if isinstance(ev, StateChanged):
            return [{"type": "state.changed", "state": ev.state}]
        if isinstance(ev, ErrorEvent):
            return [{"type": "error", "error": {"code": ev.code, "message": ev.message},
                     "code": ev.code, "message": ev.message}]
        if isinstance(ev, PolicyDecided):
            return [{"type": "policy.decided", "observation": ev.observation, "action": ev.action}]
        if isinstance(ev, AgentBackchannel):
            return [{"type": "response.backchannel", "text": ev.text}]
        if isinstance(ev, InstructionsUpdated):
            return [{"type": "session.instructions_updated", "status": ev.status}]
        if getattr(ev, "type", None) == "translation_updated":  # duplex.translate.session.TranslationUpdated
            return [{"type": "translation.updated", "turn": ev.turn, "item_id": item_id(ev.turn),
                     "source": ev.source, "target": ev.target, "hypothesis": ev.hypothesis}]
        return []


def error_event(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The ``error`` wire event: Realtime nests ``error``; top-level copies keep clients simple."""
    return {"type": "error", "error": {"code": code, "message": message, **extra}, "code": code,
            "message": message}



# ---- agent audio frames ---------------------------------------------------------------------
def encode_audio_frame(header: dict[str, Any], pcm16: bytes) -> bytes:
    """``<u32 LE header length><UTF-8 JSON header><PCM16LE mono payload>``."""
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return _HEADER_LEN.pack(len(head)) + head + pcm16


def decode_audio_frame(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of :func:`encode_audio_frame` (used by the Python client and tests)."""
    if len(data) < _HEADER_LEN.size:
        raise ProtocolError("invalid_audio_frame", "binary frame shorter than its length prefix")
    (n,) = _HEADER_LEN.unpack_from(data)
    if n > _MAX_HEADER_BYTES or _HEADER_LEN.size + n > len(data):
        raise ProtocolError("invalid_audio_frame", f"bad audio header length {n}")
    header = json.loads(data[_HEADER_LEN.size:_HEADER_LEN.size + n].decode("utf-8"))
    return header, bytes(data[_HEADER_LEN.size + n:])
