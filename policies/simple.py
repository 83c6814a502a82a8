"""Built-in policies: silence endpointing, model end-of-turn probability, and half-duplex."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .base import Action, BargeInRules, Continue, Listen, Observation, Speak, agent_backchannel, register_policy

__all__ = ["EouPolicy", "HalfDuplexPolicy", "SilencePolicy", "ends_sentence"]


_SENTENCE_END = re.compile(r"[.?!][\"')\]]*$")


def ends_sentence(text: str) -> bool:
    """The words end a sentence: ".", "?" or "!" (quotes after it are fine), but not an ellipsis,
    which is how whisper writes a voice that trails off ("So my plan is to...")."""
    text = text.rstrip()
    return bool(_SENTENCE_END.search(text)) and not text.rstrip("\"')]").endswith(("..", "…"))


def _user_has_turn(obs: Observation) -> bool:
    return obs.user_turn_words > 0 or bool(obs.partial_text.strip())


def _take_turn_after(obs: Observation, gap_ms: float, speak_chunk_tokens: int) -> Action:
    """The agent is silent: reply once the user has said something and then been silent for
    ``gap_ms`` (or submitted typed text)."""
    if not _user_has_turn(obs) or obs.user_speaking:
        return Listen()
    if obs.user_turn_final or (obs.silence_s is not None and obs.silence_s * 1000 >= gap_ms):
        return Speak(speak_chunk_tokens)
    return Listen()


@register_policy("silence")
@dataclass(slots=True)
class SilencePolicy:
    """Reply after a fixed silence gap (OpenAI server-VAD style, default 500 ms)."""

    gap_ms: float = 500.0
    speak_chunk_tokens: int = 1
    backchannel_every_s: float | None = None  # the agent's own "mm-hm" while the user talks; off
    barge_in: BargeInRules = field(default_factory=BargeInRules)
    name: str = "silence"

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def decide(self, obs: Observation) -> Action:
        if (b := self.barge_in.decide(obs)) is not None:
            return b
        if obs.agent_speaking:
            return Speak(self.speak_chunk_tokens)
        if (bc := agent_backchannel(obs, self.backchannel_every_s)) is not None:
            return bc
        return _take_turn_after(obs, self.gap_ms, self.speak_chunk_tokens)


@register_policy("eou")
@dataclass(slots=True)
class EouPolicy:
    """Silence gap scaled by the model's end-of-turn probability: short when the user's words
    look finished, long for prefixes like "I'd like to book a table for..."."""

    short_gap_ms: float = 200.0
    long_gap_ms: float = 1500.0
    confident: float = 0.5
    unlikely: float = 0.05
    # count the model's sentence-break mass as end of turn when the words end a sentence (".",
    # "?", "!"; not a trailing "..."): read prose ("...to do for them.") otherwise looks unfinished
    sentence_breaks: bool = False
    # the most it waits after an interruption's words ("No, I asked about Oslo."): the model's
    # end-of-turn probability is low after its own cut-off turn, and the user is waiting for it
    interruption_gap_ms: float = 600.0
    speak_chunk_tokens: int = 1
    backchannel_every_s: float | None = None  # the agent's own "mm-hm" while the user talks; off
    barge_in: BargeInRules = field(default_factory=BargeInRules)
    name: str = "eou"

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def belief(self, obs: Observation) -> float | None:
        """The end-of-turn belief the gap is scaled by."""
        if (self.sentence_breaks and obs.eou_prob is not None and obs.sentence_break_prob is not None
                and ends_sentence(obs.partial_text)):
            return min(1.0, obs.eou_prob + obs.sentence_break_prob)
        return obs.eou_prob

    def gap_ms(self, eou_prob: float | None) -> float:
        if eou_prob is None:
            return (self.short_gap_ms + self.long_gap_ms) / 2
        if eou_prob >= self.confident:
            return self.short_gap_ms
        if eou_prob <= self.unlikely:
            return self.long_gap_ms
        frac = (eou_prob - self.unlikely) / (self.confident - self.unlikely)
        return self.long_gap_ms + frac * (self.short_gap_ms - self.long_gap_ms)

    def decide(self, obs: Observation) -> Action:
        if (b := self.barge_in.decide(obs)) is not None:
            return b
        if obs.agent_speaking:
            return Speak(self.speak_chunk_tokens)
        if (bc := agent_backchannel(obs, self.backchannel_every_s)) is not None:
            return bc
        gap = self.gap_ms(self.belief(obs))
        if obs.after_interruption:
            gap = min(gap, self.interruption_gap_ms)
        return _take_turn_after(obs, gap, self.speak_chunk_tokens)


@register_policy("half-duplex")
@dataclass(slots=True)
class HalfDuplexPolicy:
    """Baseline that never overlaps: it ignores the user while it speaks (no barge-in)."""

    gap_ms: float = 500.0
    speak_chunk_tokens: int = 1
    name: str = "half-duplex"

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def decide(self, obs: Observation) -> Action:
        if obs.agent_speaking:
            return Continue("half_duplex") if obs.user_speaking or obs.overlap_s > 0 else Speak(self.speak_chunk_tokens)
        return _take_turn_after(obs, self.gap_ms, self.speak_chunk_tokens)
