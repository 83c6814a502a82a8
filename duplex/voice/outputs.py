"""What the voice pipeline hands its transport, besides the session's own events.

Agent audio carries the turn it belongs to and its offset on that turn's audio timeline, so a
transport only has to play it in order and report how far it got.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from duplex.audio.events import SpeechStarted, SpeechStopped, TtsChunk
from duplex.session.events import SessionEvent

__all__ = ["AudioCleared", "BackchannelAudio", "AudioDone", "AudioOut", "AudioPaused", "AudioResumed", "SpeechFinalized", "VoiceOutput"]


@dataclass(frozen=True, slots=True)
class SpeechFinalized:
    """The final ASR pass of the utterance that ended at ``t_s`` (stream seconds) is done."""

    t_s: float
    type: str = "speech_finalized"


@dataclass(frozen=True, slots=True, eq=False)
class AudioOut:
    """Agent audio: play it after everything before it. ``offset_samples``: where the chunk
    starts within the audio of agent turn ``turn`` (what ``report_played`` counts)."""

    turn: int
    chunk: TtsChunk
    offset_samples: int
    t: float
    type: str = "audio_out"


@dataclass(frozen=True, slots=True)
class AudioCleared:
    """Barge-in or cancel: drop every queued sample of ``turn`` now, then report how much of it
    was played (``report_played``/``truncate``) once."""

    turn: int
    t: float
    type: str = "audio_cleared"


@dataclass(frozen=True, slots=True)
class AudioPaused:
    """User sound over the agent: stop playing ``turn`` now but keep its queued audio. Nothing
    more of the turn arrives until :class:`AudioResumed` (play on from the same sample) or
    :class:`AudioCleared` (a barge-in). ``sent_samples``: the end of the audio handed out so far."""

    turn: int
    sent_samples: int
    sample_rate_hz: int
    t: float
    reason: str = "overlap"
    type: str = "audio_paused"


@dataclass(frozen=True, slots=True)
class AudioResumed:
    """The overlap was a backchannel: play ``turn`` on from where it paused."""

    turn: int
    t: float
    reason: str = "backchannel"
    type: str = "audio_resumed"


@dataclass(frozen=True, slots=True, eq=False)
class BackchannelAudio:
    """The agent's own acknowledgement ("mm-hm") while the user talks: play it at once, over
    nothing (the agent is silent); it belongs to no turn and is never truncated."""

    text: str
    pcm: np.ndarray
    sample_rate_hz: int
    t: float
    type: str = "backchannel_audio"


@dataclass(frozen=True, slots=True)
class AudioDone:
    """All audio of agent turn ``turn`` has been produced: ``total_samples`` long."""

    turn: int
    total_samples: int
    sample_rate_hz: int
    t: float
    type: str = "audio_done"


VoiceOutput = (SessionEvent | SpeechStarted | SpeechStopped | SpeechFinalized | AudioOut | AudioCleared | AudioDone
               | AudioPaused | AudioResumed | BackchannelAudio)
