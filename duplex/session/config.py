"""Session settings and the per-turn book-keeping the session loop keeps for the agent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from duplex.engine.sampling import SamplingConfig
from duplex.engine.sequence import SequenceConfig
from duplex.session.interleave import OVERLAP_LAYOUTS, Interjection

__all__ = ["DEFAULT_INSTRUCTIONS", "SessionConfig", "TRUNCATION_MARKER", "AgentTurnState"]

DEFAULT_INSTRUCTIONS = "You are a helpful assistant. Keep your answers short."
# What ends an agent turn cut by a barge-in, after the words the user heard. An ellipsis, not a
# bracketed note: with "… [interrupted]" the model copied the note into later replies, which the
# TTS then spoke ("I'm sorry… [interrupted]": 3 of ~40 replies in every synthetic bench realtime run).
TRUNCATION_MARKER = "…"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Per-session settings. ``audio_output``: agent tokens count as heard only via playback marks."""

    instructions: str = DEFAULT_INSTRUCTIONS
    policy: str = "silence"
    policy_params: dict[str, Any] = field(default_factory=dict)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0, max_tokens=160))
    audio_output: bool = False
    truncate_wait_ms: float = 400.0
    tick_ms: float = 20.0
    max_text_chars: int = 16_000
    max_instructions_chars: int = 8_000
    max_instructions_tokens: int = 1_000  # also at most instructions_token_limit() of the sequence budget
    max_queued_inputs: int = 1_024  # inputs waiting for the session loop; past it submit() refuses
    log_decisions: bool = False
    speculative_handover: bool = True  # prefill the turn hand-over while the user is silent
    overlap_layout: str = "hold"  # user words heard while the agent generates: see duplex.session.interleave
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    type: str = "session_config"

    def __post_init__(self) -> None:
        if self.overlap_layout not in OVERLAP_LAYOUTS:
            raise ValueError(f"overlap_layout must be one of {', '.join(OVERLAP_LAYOUTS)}, not {self.overlap_layout!r}")


@dataclass(slots=True)
class AgentTurnState:
    """Book-keeping for the agent turn being generated or played."""

    turn: int
    content_start: int  # logical position of the first content token: sequence position + evicted tokens
    tokens: list[int] = field(default_factory=list)
    char_ends: list[int] = field(default_factory=list)  # cumulative text length after each token
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    delivered_tokens: int = 0
    generating: bool = True
    playback_done: bool = False
    interjections: list[Interjection] = field(default_factory=list)  # user words inside this turn (interleave)
    # the next token, sampled by the last decode step and not yet appended, and the sequence's
    # logits_version it was sampled at (valid only while that is unchanged)
    next_token: int | None = None
    next_version: int = -1
    # decode ahead (duplex.engine.decode_ahead): the claimed step in flight, and the step the last
    # one queued to append next_token (unclaimed: the engine's one token ahead of the session)
    stepping: Any = None
    ahead: Any = None
