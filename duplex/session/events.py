"""Typed session inputs and outputs. Every class serializes straight to JSON via :func:`to_dict`.

Inputs are what a transport tells a session (text, words, speech onsets, playback marks, cancel);
outputs are past-tense facts the session reports. Speech events and ASR words come from
:mod:`duplex.audio.events` unchanged, so the audio stack needs no knowledge of sessions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from duplex.audio.events import AsrWord, SpeechStarted, SpeechStopped

__all__ = [
    "AgentBackchannel", "TranscriptStatus", "AgentPaused", "AgentResumed", "AgentTextDelta", "AsrWord", "Cancel", "ErrorEvent", "InstructionsUpdated", "Interrupted", "PlaybackMark",
    "PolicyDecided",
    "SessionEvent", "SessionInput", "SpeechStarted", "SpeechStopped", "StateChanged", "TextInput",
    "TurnEnded", "TurnStarted", "UpdateSession", "UserTranscript", "to_dict",
]


# ---- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TextInput:
    """Typed text. ``final`` ends the user's turn (Enter); partial chunks stream while typing."""

    text: str
    final: bool = True
    type: str = "text_input"


@dataclass(frozen=True, slots=True)
class PlaybackMark:
    """The user has received the first ``heard_tokens`` content tokens of agent turn ``turn``.

    ``final`` marks the client's answer to an interruption (playback stopped here; like the Realtime
    API's ``conversation.item.truncate``): the session rolls back to it at once instead of waiting.
    """

    turn: int
    heard_tokens: int
    done: bool = False  # playback of this turn finished
    final: bool = False
    type: str = "playback_mark"


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop the agent's reply now (like the Realtime API's ``response.cancel``)."""

    type: str = "cancel"


@dataclass(frozen=True, slots=True)
class UpdateSession:
    """Change instructions, policy or sampling; unspecified fields keep their value."""

    instructions: str | None = None
    policy: str | None = None
    policy_params: dict[str, Any] | None = None
    temperature: float | None = None
    max_reply_tokens: int | None = None
    audio_output: bool | None = None  # agent tokens count as heard only via playback marks
    type: str = "update_session"


@dataclass(frozen=True, slots=True)
class TranscriptStatus:
    """Whether the words of the sound that ended at ``t_s`` (stream seconds) are still being
    recognised. Sent around an overlap's ``SpeechStopped``: the sound's end bounds the overlap at
    once, while the decision (resume or yield) waits for its final words."""

    pending: bool
    t_s: float
    type: str = "transcript_status"


SessionInput = (TextInput | AsrWord | SpeechStarted | SpeechStopped | TranscriptStatus | PlaybackMark | Cancel
                | UpdateSession)


# ---- outputs -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StateChanged:
    state: str  # listening | thinking | speaking | interrupted
    t: float
    type: str = "state_changed"


@dataclass(frozen=True, slots=True)
class TurnStarted:
    speaker: str
    turn: int
    t: float
    type: str = "turn_started"


@dataclass(frozen=True, slots=True)
class TurnEnded:
    speaker: str
    turn: int
    text: str
    reason: str  # completed | interrupted | cancelled | max_tokens | stop_sequence
    t: float
    type: str = "turn_ended"


@dataclass(frozen=True, slots=True)
class AgentTextDelta:
    """Agent text covering content tokens [token_start, token_end) of ``turn``."""

    turn: int
    text: str
    token_start: int
    token_end: int
    t: float
    type: str = "agent_text_delta"


@dataclass(frozen=True, slots=True)
class UserTranscript:
    turn: int
    text: str
    committed: bool
    t: float
    type: str = "user_transcript"


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The agent stopped; ``kept_text`` is what stays in the conversation (what the user got)."""

    turn: int
    kept_text: str
    kept_tokens: int
    dropped_tokens: int
    t: float
    reason: str = "barge_in"
    type: str = "interrupted"


@dataclass(frozen=True, slots=True)
class AgentBackchannel:
    """The agent acknowledges ("mm-hm") while the user keeps talking: spoken, not a turn, and
    kept out of the conversation (the user holds the floor)."""

    text: str
    t: float
    type: str = "agent_backchannel"


@dataclass(frozen=True, slots=True)
class AgentPaused:
    """User sound over the agent: its output stops where it is, and nothing new is delivered
    until :class:`AgentResumed` (a backchannel) or :class:`Interrupted` (a barge-in)."""

    turn: int
    t: float
    reason: str = "overlap"
    type: str = "agent_paused"


@dataclass(frozen=True, slots=True)
class AgentResumed:
    """The overlap was not a turn: output goes on exactly where it paused."""

    turn: int
    t: float
    reason: str = "backchannel"
    type: str = "agent_resumed"


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    code: str
    message: str
    t: float
    type: str = "error"


@dataclass(frozen=True, slots=True)
class InstructionsUpdated:
    """New instructions were written into the conversation (``applied``), or wait for the next
    turn boundary because a turn is open (``pending``); a pending update is applied, never lost."""

    status: str  # "applied" | "pending"
    t: float
    type: str = "instructions_updated"


@dataclass(frozen=True, slots=True)
class PolicyDecided:
    """Every decision that changed something, with its observation: training data for policies."""

    observation: dict[str, Any]
    action: dict[str, Any]
    t: float
    type: str = "policy_decided"


SessionEvent = (StateChanged | TurnStarted | TurnEnded | AgentTextDelta | UserTranscript | Interrupted
                | AgentBackchannel | AgentPaused | AgentResumed | ErrorEvent | InstructionsUpdated | PolicyDecided)


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> JSON-ready dict (enums become their values, numpy arrays are not expected)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Enum):
            v = v.value
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = to_dict(v)
        out[f.name] = v
    return out


