"""The episode timeline: JSON-ready records in time order that :mod:`.metrics` scores. Both clocks
write it the same way: what a listener heard is what a :class:`~duplex.bench.speaker.VirtualSpeaker`
played, turned into ``agent_audio`` records here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .scenario import Cue, RenderedUser, voiced_bounds_s

__all__ = ["EpisodeResult", "agent_audio_records", "played_audio_records", "scenario_records", "sort_records",
           "voiced_bounds"]

_WORD = re.compile(r"\S*\w\S*")


@dataclass(frozen=True, slots=True)
class EpisodeResult:
    """The episode's timeline (JSON-ready records in time order) and its statistics."""

    scenario_id: str
    category: str
    policy: str
    records: tuple[dict[str, Any], ...]
    stats: dict[str, float]
    type: str = "episode_result"


def voiced_bounds(pcm: Any, sample_rate_hz: int) -> tuple[float, float]:
    """Voiced onset and offset (seconds) of float agent audio at any rate."""
    if sample_rate_hz == 16_000:
        return voiced_bounds_s(pcm)
    from duplex.audio import to_mono_16k

    return voiced_bounds_s(to_mono_16k(pcm, sample_rate_hz))


def agent_audio_records(turn: int, text: str, token_start: int, token_end: int, onset_s: float, offset_s: float,
                        pieces: list[tuple[float, float, float]], until: float | None = None) -> list[dict[str, Any]]:
    """``agent_audio`` records of one audio chunk (what :mod:`.metrics` reads). ``pieces``: the
    played parts as (wall start, chunk start s, chunk end s), several when playback was paused
    inside the chunk; ``onset_s``/``offset_s``: the chunk's voiced span. Word onsets are estimated
    from character positions within the voiced span; nothing after ``until`` counts."""
    words = [m.start() for m in _WORD.finditer(text)]
    span = max(offset_s - onset_s, 0.0)
    n = max(len(text), 1)
    rel = [onset_s + span * (p / n) for p in words]
    out = []
    for start, a, b in pieces:
        if until is not None:
            if start >= until:
                continue
            b = min(b, a + until - start)
        end = start + (b - a)
        shift = start - a
        out.append({"type": "agent_audio", "t": start, "end": end, "turn": turn, "text": text,
                    "token_start": token_start, "token_end": token_end,
                    "voiced_start": min(max(onset_s, a), b) + shift, "voiced_end": min(max(offset_s, a), b) + shift,
                    "word_times": [x + shift for x in rel if a <= x < b]})
    return out


def played_audio_records(speaker: Any, until: float) -> list[dict[str, Any]]:
    """``agent_audio`` records of everything a ``VirtualSpeaker`` played before ``until`` (paused
    or dropped audio was never played, so it never counts as heard)."""
    speaker.finish(until)
    out: list[dict[str, Any]] = []
    for f in speaker.frames:
        if not f.pieces:
            continue
        on, off = voiced_bounds(f.pcm.astype(np.float32) / 32768.0, f.sample_rate_hz)
        pieces = [(t, a / f.sample_rate_hz, (a + n) / f.sample_rate_hz) for t, a, n in f.pieces]
        out += agent_audio_records(f.turn, f.text, f.token_start, f.token_end, on, off, pieces, until=until)
    return out


def scenario_records(user: RenderedUser, cues: tuple[Cue, ...]) -> list[dict[str, Any]]:
    """The scenario's own facts: its cues and the user's utterances."""
    out: list[dict[str, Any]] = [{"type": "cue", "t": c.t, "kind": c.kind, "end": c.end, "start": c.start}
                                 for c in cues]
    out += [{"type": "user_speech", "t": on, "end": off, "item": i, "text": text} for i, on, off, text in user.spans]
    return out


def sort_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stable sort by time (records without a time count as 0)."""
    order = {id(r): i for i, r in enumerate(records)}
    return sorted(records, key=lambda r: (r["t"] if r["t"] is not None else 0.0, order[id(r)]))
