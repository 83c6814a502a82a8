"""Typed events of the speech I/O layer: past-tense facts with a ``type`` tag for JSON."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "AsrWord",
    "AudioFormatError",
    "Clause",
    "SpeechStarted",
    "SpeechStopped",
    "TtsChunk",
]


class AudioFormatError(ValueError):
    """Raised when incoming audio cannot be interpreted; the message names the problem."""


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The VAD confirmed speech; ``t_s`` is the onset in stream seconds (before padding)."""

    t_s: float
    type: str = "speech_started"


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """The VAD confirmed the end of a speech turn; ``t_s`` is where the speech ended."""

    t_s: float
    type: str = "speech_stopped"


@dataclass(frozen=True, slots=True)
class AsrWord:
    """One recognised word; tentative words (``committed=False``) may still be revised."""

    text: str
    start_s: float
    end_s: float
    committed: bool
    # whisper's probability for the word (1.0 where the recogniser gives none): its guesses at
    # sub-second sounds over the agent ("yeah yeah" heard as "You are you") come back low
    probability: float = 1.0
    type: str = "asr_word"


@dataclass(frozen=True, slots=True)
class Clause:
    """A span of agent text ready for synthesis, with where each token starts in ``text``."""

    text: str
    token_start: int
    token_end: int
    token_char_offsets: tuple[int, ...]
    type: str = "clause"


@dataclass(frozen=True, slots=True, eq=False)
class TtsChunk:
    """Audio voicing agent tokens [token_start, token_end).

    ``token_offsets_samples[i]`` is the sample where token ``token_start + i`` begins, so
    playback marks can be mapped back to the tokens the listener actually heard (barge-in).
    """

    pcm: np.ndarray = field(repr=False)
    sample_rate_hz: int
    text: str
    token_start: int
    token_end: int
    token_offsets_samples: tuple[int, ...]
    type: str = "tts_chunk"

    def __post_init__(self) -> None:
        n_tokens = self.token_end - self.token_start
        if n_tokens < 0:
            raise ValueError(f"token_end {self.token_end} < token_start {self.token_start}")
        if len(self.token_offsets_samples) != n_tokens:
            raise ValueError(
                f"{len(self.token_offsets_samples)} token offsets for {n_tokens} tokens"
            )
        if any(b < a for a, b in zip(self.token_offsets_samples, self.token_offsets_samples[1:])):
            raise ValueError("token_offsets_samples must be non-decreasing")

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate_hz

    def token_at(self, played_samples: int) -> int:
        """Absolute index of the first token not yet fully heard after ``played_samples``.

        Token i is fully heard once playback reaches the start of token i+1 (the last token:
        the end of the chunk), so the heard tokens are ``[token_start, token_at(...))``.
        """
        if played_samples >= len(self.pcm):
            return self.token_end
        # ends[i] = start of token i+1; count tokens whose end has been played.
        ends = self.token_offsets_samples[1:]
        return self.token_start + bisect.bisect_right(ends, played_samples)
