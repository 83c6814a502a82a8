"""Smart Turn baseline: pipecat's audio end-of-turn model decides when the user is done.

The model itself runs beside the VAD (``duplex.audio.turn_features``) at the start of each pause;
its probability arrives here as ``Observation.audio_eot_prob``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .base import Action, BargeInRules, Observation, Speak, register_policy
from .simple import _take_turn_after

__all__ = ["SmartTurnPolicy"]


@register_policy("smart-turn")
@dataclass(slots=True)
class SmartTurnPolicy:
    """Reply once the end of speech is in and Smart Turn v3.2 calls the turn complete
    (P >= ``threshold``, pipecat's 0.5); otherwise wait ``incomplete_gap_ms`` of silence (pipecat
    waits up to ``stop_secs``). Without audio features (typed text) a plain ``no_audio_gap_ms``."""

    threshold: float = 0.5
    complete_gap_ms: float = 0.0
    incomplete_gap_ms: float = 1500.0
    no_audio_gap_ms: float = 500.0
    speak_chunk_tokens: int = 1
    barge_in: BargeInRules = field(default_factory=BargeInRules)
    name: str = "smart-turn"
    needs_audio_features: ClassVar[bool] = True  # the voice pipeline runs Smart Turn + prosody for it

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def gap_ms(self, audio_eot_prob: float | None) -> float:
        if audio_eot_prob is None:
            return self.no_audio_gap_ms
        return self.complete_gap_ms if audio_eot_prob >= self.threshold else self.incomplete_gap_ms

    def decide(self, obs: Observation) -> Action:
        if (b := self.barge_in.decide(obs)) is not None:
            return b
        if obs.agent_speaking:
            return Speak(self.speak_chunk_tokens)
        return _take_turn_after(obs, self.gap_ms(obs.audio_eot_prob), self.speak_chunk_tokens)
