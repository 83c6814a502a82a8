"""``learned``: a small trained model decides when the user's turn is over.

Every tick (each ``tick_ms`` while a decision is pending) the policy looks at the observation:
while the agent speaks, user sound over it is judged by the shared :class:`BargeInRules` (pause
first, then resume or yield); while the agent listens, :class:`TurnModel` turns the features of
:mod:`.features` (silence, the LLM's and Smart Turn's end-of-turn probabilities, prosody, VAD
history, words, punctuation) into P(the user is done), and the agent speaks once it reaches the
trained threshold, or after ``max_gap_ms`` of silence whatever the model says.
Trained by ``duplex policy train`` (:mod:`.train`) from logged episodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..base import Action, BargeInRules, Listen, Observation, Speak, register_policy
from .features import FEATURE_NAMES, turn_features
from .model import DEFAULT_WEIGHTS, TurnModel, load_turn_model

__all__ = ["DEFAULT_WEIGHTS", "FEATURE_NAMES", "LearnedPolicy", "TurnModel", "load_turn_model", "turn_features"]


@register_policy("learned")
@dataclass(slots=True)
class LearnedPolicy:
    """``threshold`` / ``max_gap_ms``: None takes the values stored with the weights; ``weights``:
    a weights JSON path (None: the committed ``policies/learned/weights.json``)."""

    threshold: float | None = None
    max_gap_ms: float | None = None
    # the most it waits after the words that made the agent yield: as in ``eou``, the user is
    # waiting for the reply, and the training ticks (before the agent's first turn) never show it
    interruption_gap_ms: float = 600.0
    weights: str | None = None
    speak_chunk_tokens: int = 1
    barge_in: BargeInRules = field(default_factory=BargeInRules)
    name: str = "learned"
    needs_audio_features: ClassVar[bool] = True  # the voice pipeline runs Smart Turn + prosody for it
    model: TurnModel | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = load_turn_model(self.weights)

    def params(self) -> dict[str, Any]:
        assert self.model is not None
        return {"threshold": self.threshold if self.threshold is not None else self.model.threshold,
                "max_gap_ms": self.max_gap_ms if self.max_gap_ms is not None else self.model.max_gap_ms,
                "interruption_gap_ms": self.interruption_gap_ms,
                "weights": self.weights, "speak_chunk_tokens": self.speak_chunk_tokens,
                "barge_in": asdict(self.barge_in), "name": self.name}

    def probability(self, obs: Observation) -> float:
        """P(the user's turn is over) at ``obs``."""
        assert self.model is not None
        return self.model.probability(turn_features(obs))

    def decide(self, obs: Observation) -> Action:
        if (b := self.barge_in.decide(obs)) is not None:
            return b
        if obs.agent_speaking:
            return Speak(self.speak_chunk_tokens)
        if obs.user_speaking or not (obs.user_turn_words > 0 or obs.partial_text.strip()):
            return Listen()
        if obs.user_turn_final:
            return Speak(self.speak_chunk_tokens)
        if obs.silence_s is None:
            return Listen()
        assert self.model is not None
        max_gap = self.max_gap_ms if self.max_gap_ms is not None else self.model.max_gap_ms
        if obs.after_interruption:
            max_gap = min(max_gap, self.interruption_gap_ms)
        threshold = self.threshold if self.threshold is not None else self.model.threshold
        if obs.silence_s * 1000 >= max_gap or self.probability(obs) >= threshold:
            return Speak(self.speak_chunk_tokens)
        return Listen()
