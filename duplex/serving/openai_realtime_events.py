"""Realtime API session settings and the validation of ``session.update`` / ``response.create``.

Pure and synchronous. Every field the Realtime API defines is either honoured, accepted because
it changes nothing here (``voice``: the server has one TTS voice), or refused with a
:class:`GaError` that names it. A client never silently gets less than it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from duplex.serving.openai_turns import TurnDetection, TurnDetectionError, parse_turn_detection

if TYPE_CHECKING:
    from duplex.serving.server import DuplexServer

__all__ = ["MAX_OUTPUT_TOKENS", "GaError", "RealtimeSettings", "ResponseParams", "parse_response_create",
           "parse_session"]

MAX_OUTPUT_TOKENS = 4096
_PCM = {"type": "audio/pcm", "rate": 24_000}


class GaError(Exception):
    """A client event we cannot act on: becomes an ``error`` event (the connection stays open)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass(frozen=True, slots=True)
class RealtimeSettings:
    """What the client configured, in Realtime terms (the session holds the duplex side)."""

    audio_output: bool = True  # output_modalities ["audio"] (audio + transcript) vs ["text"]
    instructions: str = ""
    max_output_tokens: int | None = None  # None = "inf"
    turn_detection: TurnDetection = field(default_factory=TurnDetection)
    transcription: dict[str, Any] | None = None  # on: conversation.item.input_audio_transcription.* events
    voice: str = "duplex"
    model: str | None = None
    type: str = "realtime_settings"

    def max_output_tokens_wire(self) -> int | str:
        return "inf" if self.max_output_tokens is None else self.max_output_tokens

    def describe(self, session_id: str, server: DuplexServer) -> dict[str, Any]:
        return {
            "type": "realtime", "object": "realtime.session", "id": f"sess_{session_id}",
            "model": self.model or server.engine.lm.name,
            "output_modalities": ["audio" if self.audio_output else "text"],
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens_wire(),
            "audio": {"input": {"format": dict(_PCM), "transcription": self.transcription, "noise_reduction": None,
                                "turn_detection": self.turn_detection.to_wire()},
                      "output": {"format": dict(_PCM), "voice": self.voice, "speed": 1.0}},
            "tools": [], "tool_choice": "auto", "tracing": None, "truncation": "auto", "prompt": None,
            "include": None,
        }


def _check_format(fmt: Any, param: str) -> None:
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm" \
            or fmt.get("rate", 24_000) != 24_000 or set(fmt) - {"type", "rate"}:
        raise GaError("unsupported_audio_format", f"{param}: only {{type: audio/pcm, rate: 24000}} is supported "
                      "(no G.711 pcmu/pcma)", param)


def _modalities(value: Any, param: str) -> bool:
    if value not in (["audio"], ["text"]):
        raise GaError("invalid_value", f"{param} must be [\"audio\"] or [\"text\"]", param)
    return value == ["audio"]


def _max_tokens(value: Any, param: str) -> int | None:
    if value == "inf":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_TOKENS:
        raise GaError("invalid_value", f"{param} must be an integer in [1, {MAX_OUTPUT_TOKENS}] or \"inf\"", param)
    return value


def _refuse_unless(obj: dict[str, Any], key: str, allowed: tuple[Any, ...], what: str) -> None:
    if key in obj and obj[key] not in allowed:
        raise GaError("unsupported_parameter", f"{what}{key} is not supported by duplex (see docs/openai.md)",
                      f"{what}{key}")


def parse_session(raw: Any, current: RealtimeSettings, *, audio_available: bool) -> RealtimeSettings:
    """``session.update``'s ``session`` object -> new settings (unset fields keep their value)."""
    if not isinstance(raw, dict):
        raise GaError("invalid_value", "session.update needs a 'session' object", "session")
    known = {"type", "model", "instructions", "output_modalities", "audio", "max_output_tokens", "tools",
             "tool_choice", "tracing", "truncation", "include", "prompt", "parallel_tool_calls", "reasoning"}
    extra = sorted(set(raw) - known)
    if extra:
        raise GaError("unknown_parameter", f"session.{extra[0]} is not a Realtime session field", f"session.{extra[0]}")
    if raw.get("type", "realtime") != "realtime":
        raise GaError("unsupported_parameter", "only realtime sessions are supported (no transcription sessions)",
                      "session.type")
    for key, allowed in (("tools", ([],)), ("tool_choice", ("auto", "none")), ("tracing", (None,)),
                         ("truncation", ("auto",)), ("include", (None, [])), ("prompt", (None,)),
                         ("parallel_tool_calls", (None, False)), ("reasoning", (None,))):
        _refuse_unless(raw, key, allowed, "session.")
    new = current
    if isinstance(raw.get("model"), str):
        new = replace(new, model=raw["model"])
    if "instructions" in raw:
        if not isinstance(raw["instructions"], str):
            raise GaError("invalid_value", "session.instructions must be a string", "session.instructions")
        new = replace(new, instructions=raw["instructions"])
    if "output_modalities" in raw:
        audio = _modalities(raw["output_modalities"], "session.output_modalities")
        if audio and not audio_available:
            raise GaError("audio_output_unavailable", "this server runs without TTS (--tts none): use [\"text\"]",
                          "session.output_modalities")
        new = replace(new, audio_output=audio)
    if "max_output_tokens" in raw:
        new = replace(new, max_output_tokens=_max_tokens(raw["max_output_tokens"], "session.max_output_tokens"))
    audio = raw.get("audio")
    if audio is not None:
        if not isinstance(audio, dict) or set(audio) - {"input", "output"}:
            raise GaError("invalid_value", "session.audio has only 'input' and 'output'", "session.audio")
        new = _parse_audio_input(audio.get("input"), new)
        out = audio.get("output")
        if out is not None:
            if not isinstance(out, dict) or set(out) - {"format", "voice", "speed"}:
                raise GaError("invalid_value", "session.audio.output has format, voice, speed", "session.audio.output")
            _check_format(out.get("format"), "session.audio.output.format")
            _refuse_unless(out, "speed", (1, 1.0), "session.audio.output.")
            if isinstance(out.get("voice"), str):
                new = replace(new, voice=out["voice"])  # one TTS voice serves every name
    return new


def _parse_audio_input(inp: Any, new: RealtimeSettings) -> RealtimeSettings:
    if inp is None:
        return new
    if not isinstance(inp, dict) or set(inp) - {"format", "transcription", "noise_reduction", "turn_detection"}:
        raise GaError("invalid_value", "session.audio.input has format, transcription, noise_reduction, "
                      "turn_detection", "session.audio.input")
    _check_format(inp.get("format"), "session.audio.input.format")
    _refuse_unless(inp, "noise_reduction", (None,), "session.audio.input.")
    if "transcription" in inp:
        tr = inp["transcription"]
        if tr is not None and (not isinstance(tr, dict) or set(tr) - {"model", "language", "prompt"}):
            raise GaError("invalid_value", "transcription takes model, language, prompt (duplex's own ASR runs "
                          "whatever the model name)", "session.audio.input.transcription")
        new = replace(new, transcription=tr)
    if "turn_detection" in inp:
        try:
            new = replace(new, turn_detection=parse_turn_detection(inp["turn_detection"], new.turn_detection))
        except TurnDetectionError as exc:
            raise GaError("invalid_value", str(exc), f"session.audio.input.{exc.param}") from exc
    return new


@dataclass(frozen=True, slots=True)
class ResponseParams:
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, Any] | None = None
    type: str = "response_params"


def parse_response_create(raw: Any, settings: RealtimeSettings) -> ResponseParams:
    """``response.create``'s ``response`` object (optional) -> what this response overrides."""
    if raw is None:
        return ResponseParams()
    if not isinstance(raw, dict):
        raise GaError("invalid_value", "response must be an object", "response")
    known = {"instructions", "max_output_tokens", "metadata", "output_modalities", "conversation", "input", "tools",
             "tool_choice", "audio", "prompt", "parallel_tool_calls", "reasoning"}
    extra = sorted(set(raw) - known)
    if extra:
        raise GaError("unknown_parameter", f"response.{extra[0]} is not a response field", f"response.{extra[0]}")
    for key, allowed in (("conversation", ("auto",)), ("input", (None,)), ("tools", ([],)),
                         ("tool_choice", ("auto", "none")), ("prompt", (None,)), ("parallel_tool_calls", (None, False)),
                         ("reasoning", (None,))):
        _refuse_unless(raw, key, allowed, "response.")
    if "output_modalities" in raw and _modalities(raw["output_modalities"], "response.output_modalities") \
            != settings.audio_output:
        raise GaError("unsupported_parameter", "a response cannot change output_modalities; use session.update",
                      "response.output_modalities")
    audio = raw.get("audio")
    if audio is not None:
        out = audio.get("output") if isinstance(audio, dict) else None
        if not isinstance(audio, dict) or set(audio) - {"output"} or (out is not None and not isinstance(out, dict)):
            raise GaError("invalid_value", "response.audio takes {output: {format, voice}}", "response.audio")
        _check_format((out or {}).get("format"), "response.audio.output.format")
    instructions = raw.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise GaError("invalid_value", "response.instructions must be a string", "response.instructions")
    metadata = raw.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise GaError("invalid_value", "response.metadata must be an object", "response.metadata")
    tokens = _max_tokens(raw["max_output_tokens"], "response.max_output_tokens") if "max_output_tokens" in raw else None
    return ResponseParams(instructions, tokens, metadata)
