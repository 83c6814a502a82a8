"""OpenAI Realtime ``turn_detection`` expressed in duplex terms: a turn policy plus VAD settings.

The Realtime API decides when to answer with ``server_vad`` (a silence gap), ``semantic_vad`` (a
model's belief that the user has finished) or ``null`` (only ``response.create``), and qualifies
them with ``create_response`` / ``interrupt_response``. duplex already has those decisions as
policies, so :class:`RealtimeTurnPolicy` (registered as ``"realtime"``) only composes them:
``silence`` for server_vad, ``eou`` (the model's own end-of-turn belief; its ``long_gap_ms`` is what
``eagerness`` sets) for semantic_vad,
and an ``armed`` flag that a ``response.create`` sets. It stays a pure ``decide(obs)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from duplex.policies import (Action, BargeInRules, Continue, EouPolicy, Listen, Observation, SilencePolicy, Speak,
                             register_policy)
from duplex.voice.config import VAD_MIN_SILENCE_MS, EOU_VOICE_PARAMS

__all__ = ["EAGERNESS_LONG_GAP_MS", "RealtimeTurnPolicy", "ThresholdVad", "TurnDetection", "parse_turn_detection"]

# semantic_vad eagerness -> how long an unfinished-looking turn may pause (the eou policy's long gap)
EAGERNESS_LONG_GAP_MS = {"high": 350.0, "medium": float(EOU_VOICE_PARAMS["long_gap_ms"]),
                         "auto": float(EOU_VOICE_PARAMS["long_gap_ms"]), "low": 1400.0}


class TurnDetectionError(ValueError):
    """A ``turn_detection`` object we cannot honour; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class TurnDetection:
    """The session's ``audio.input.turn_detection`` (``kind`` none = ``null``, manual commit)."""

    kind: str = "server_vad"  # server_vad | semantic_vad | none
    threshold: float = 0.5
    silence_duration_ms: int = 500
    prefix_padding_ms: int = 300
    eagerness: str = "auto"
    create_response: bool = True
    interrupt_response: bool = True
    type: str = "turn_detection"

    def to_wire(self) -> dict[str, Any] | None:
        if self.kind == "none":
            return None
        if self.kind == "semantic_vad":
            return {"type": "semantic_vad", "eagerness": self.eagerness, "create_response": self.create_response,
                    "interrupt_response": self.interrupt_response}
        return {"type": "server_vad", "threshold": self.threshold, "silence_duration_ms": self.silence_duration_ms,
                "prefix_padding_ms": self.prefix_padding_ms, "idle_timeout_ms": None,
                "create_response": self.create_response, "interrupt_response": self.interrupt_response}

    def policy_params(self, armed: bool = False) -> dict[str, Any]:
        """Parameters of the ``realtime`` policy that implements this turn detection."""
        auto = {"server_vad": "silence", "semantic_vad": "eou"}.get(self.kind, "none")
        return {"auto": auto if self.create_response else "none", "armed": armed,
                "interrupt": self.interrupt_response and self.kind != "none",
                # the VAD's hangover already is part of the silence before SpeechStopped
                "gap_ms": float(max(0, self.silence_duration_ms - VAD_MIN_SILENCE_MS)),
                "long_gap_ms": EAGERNESS_LONG_GAP_MS[self.eagerness]}


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, lo: float | None = None,
         hi: float | None = None) -> Any:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) \
            or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise TurnDetectionError(f"turn_detection.{key} has an invalid value {value!r}", f"turn_detection.{key}")
    return value


def parse_turn_detection(raw: Any, current: TurnDetection) -> TurnDetection:
    """``audio.input.turn_detection`` -> :class:`TurnDetection` (unset fields take the defaults of
    the chosen type, as the Realtime API does)."""
    if raw is None:
        return TurnDetection(kind="none", create_response=False, interrupt_response=False)
    if not isinstance(raw, dict):
        raise TurnDetectionError("turn_detection must be an object or null", "turn_detection")
    kind = raw.get("type", current.kind if current.kind != "none" else "server_vad")
    if kind == "server_vad":
        allowed = {"type", "threshold", "silence_duration_ms", "prefix_padding_ms", "create_response",
                   "interrupt_response", "idle_timeout_ms"}
    elif kind == "semantic_vad":
        allowed = {"type", "eagerness", "create_response", "interrupt_response"}
    else:
        raise TurnDetectionError(f"turn_detection.type {kind!r} is not supported (server_vad, semantic_vad or null)",
                                 "turn_detection.type")
    extra = sorted(set(raw) - allowed)
    if extra:
        raise TurnDetectionError(f"turn_detection.{extra[0]} is not supported for {kind}", f"turn_detection.{extra[0]}")
    if raw.get("idle_timeout_ms") is not None:
        raise TurnDetectionError("turn_detection.idle_timeout_ms is not supported", "turn_detection.idle_timeout_ms")
    eagerness = raw.get("eagerness", "auto")
    if eagerness not in EAGERNESS_LONG_GAP_MS:
        raise TurnDetectionError("turn_detection.eagerness must be low, medium, high or auto",
                                 "turn_detection.eagerness")
    return TurnDetection(
        kind=kind, threshold=float(_get(raw, "threshold", (int, float), 0.5, 0.0, 1.0)),
        silence_duration_ms=int(_get(raw, "silence_duration_ms", int, 500, 0, 10_000)),
        prefix_padding_ms=int(_get(raw, "prefix_padding_ms", int, 300, 0, 2_000)), eagerness=eagerness,
        create_response=bool(_get(raw, "create_response", bool, True)),
        interrupt_response=bool(_get(raw, "interrupt_response", bool, True)))


@register_policy("realtime")
@dataclass(slots=True)
class RealtimeTurnPolicy:
    """Answer on ``armed`` (a pending ``response.create``) or, with ``auto`` silence|eou, when that
    policy would; barge in only with ``interrupt`` (the Realtime API's ``interrupt_response``)."""

    auto: str = "silence"  # silence | eou | none
    armed: bool = False
    interrupt: bool = True
    gap_ms: float = 200.0
    long_gap_ms: float = float(EOU_VOICE_PARAMS["long_gap_ms"])
    speak_chunk_tokens: int = 1
    barge_in: BargeInRules = field(default_factory=BargeInRules)
    name: str = "realtime"

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def decide(self, obs: Observation) -> Action:
        if obs.agent_speaking:
            if self.interrupt and (b := self.barge_in.decide(obs)) is not None:
                return b
            if not self.interrupt and (obs.user_speaking or obs.overlap_s > 0):
                return Continue("interrupt_response_off")
            return Speak(self.speak_chunk_tokens)
        has_turn = obs.user_turn_words > 0 or bool(obs.partial_text.strip())
        if self.armed and has_turn:
            return Speak(self.speak_chunk_tokens)
        if self.auto == "silence" and not obs.user_turn_final:
            return SilencePolicy(gap_ms=self.gap_ms, speak_chunk_tokens=self.speak_chunk_tokens).decide(obs)
        if self.auto == "eou" and not obs.user_turn_final:
            params = {**EOU_VOICE_PARAMS, "long_gap_ms": self.long_gap_ms}
            return EouPolicy(**params, speak_chunk_tokens=self.speak_chunk_tokens).decide(obs)
        return Listen()


class ThresholdVad:
    """The server's frame VAD with the Realtime ``threshold`` on top: frames quieter than the
    level the threshold asks for are unvoiced. 0.5 (the API default) leaves the VAD as it is;
    1.0 needs -25 dBFS. ``settings`` is read per frame, so a ``session.update`` applies at once."""

    def __init__(self, inner: Any, settings: Any) -> None:
        self.inner = inner
        self.settings = settings  # anything with a ``threshold`` attribute (the connection's state)
        self.frame_samples = inner.frame_samples

    def is_speech(self, frame: np.ndarray) -> bool:
        threshold = float(self.settings.threshold)
        if threshold > 0.5:
            rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64))))
            if 20 * np.log10(rms + 1e-10) < -55.0 + (threshold - 0.5) * 60.0:
                return False
        return bool(self.inner.is_speech(frame))

    def reset(self) -> None:
        self.inner.reset()
