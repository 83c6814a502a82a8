"""Evaluation scenarios: a hand-editable JSON timeline of user input plus annotated cues.

A scenario is what the user does (speak a WAV file, speak text in a named voice, type text in
chunks) and when; its cues say where the interesting moments are (a mid-utterance pause, a
backchannel, the end of the user's turn, an interruption). See ``eval/README.md`` for the format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CATEGORIES", "CUE_KINDS", "AudioItem", "Cue", "RenderedUser", "Scenario", "ScenarioError", "SpeechItem",
    "Synthesize", "TypedChunk", "TypedItem", "UserItem", "item_audio", "load_scenario", "load_scenarios",
    "render_user_audio", "resolve_cues", "save_scenario", "scenario_from_dict", "scenario_to_dict",
    "voiced_bounds_s",
]

log = logging.getLogger(__name__)

CATEGORIES = ("pause", "backchannel", "turn_taking", "interruption")
CUE_KINDS = ("pause", "backchannel", "end_of_turn", "interruption")
_SR = 16_000


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class AudioItem:
    """A WAV file (any rate/channels) that starts arriving at ``t`` seconds."""

    t: float
    path: str
    text: str = ""  # what is said (for reports; never given to the agent)
    type: str = "audio"


@dataclass(frozen=True, slots=True)
class SpeechItem:
    """Text spoken by ``voice`` ("piper:joe", "flite:slt", ...) starting at ``t``. ``audio``: the
    rendered WAV (relative to the scenario file); synthesised at load time when absent."""

    t: float
    text: str
    voice: str = "piper:joe"
    audio: str | None = None
    type: str = "speech"


@dataclass(frozen=True, slots=True)
class TypedChunk:
    t: float
    text: str
    final: bool = False
    type: str = "typed_chunk"


@dataclass(frozen=True, slots=True)
class TypedItem:
    """Typed text arriving in chunks; the chunk with ``final`` is the Enter key."""

    chunks: tuple[TypedChunk, ...]
    type: str = "typed"

    @property
    def t(self) -> float:
        return self.chunks[0].t if self.chunks else 0.0


UserItem = AudioItem | SpeechItem | TypedItem


@dataclass(frozen=True, slots=True)
class Cue:
    """An annotated moment. ``t``: where it happens (pause start, end of turn, onset of a
    backchannel or interruption); ``end``: where it ends (pause end = the user resumes; offset of
    the backchannel or interruption). ``item``: the user item it was derived from, if any."""

    kind: str
    t: float | None = None
    end: float | None = None
    start: float | None = None  # end_of_turn: onset of the utterance that ends at t
    item: int | None = None
    type: str = "cue"


@dataclass(frozen=True, slots=True)
class Scenario:
    id: str
    category: str
    items: tuple[UserItem, ...]
    cues: tuple[Cue, ...]
    duration_s: float
    instructions: str | None = None
    seed: int | None = None
    base_dir: str = ""  # where relative audio paths resolve (not serialised)
    meta: dict[str, Any] = field(default_factory=dict)
    type: str = "scenario"

    def primary_cue(self) -> Cue | None:
        """The cue the category is scored on."""
        kind = {"pause": "pause", "backchannel": "backchannel", "turn_taking": "end_of_turn",
                "interruption": "interruption"}[self.category]
        return next((c for c in self.cues if c.kind == kind), None)


# ---- JSON --------------------------------------------------------------------------------------
def _item_from_dict(d: dict[str, Any], where: str) -> UserItem:
    kind = d.get("type")
    try:
        if kind == "audio":
            return AudioItem(float(d["t"]), str(d["path"]), str(d.get("text", "")))
        if kind == "speech":
            return SpeechItem(float(d["t"]), str(d["text"]), str(d.get("voice", "piper:joe")), d.get("audio"))
        if kind == "typed":
            chunks = tuple(TypedChunk(float(c["t"]), str(c["text"]), bool(c.get("final", False))) for c in d["chunks"])
            if not chunks:
                raise ScenarioError(f"{where}: typed item has no chunks")
            return TypedItem(chunks)
    except (KeyError, TypeError, ValueError) as exc:
        raise ScenarioError(f"{where}: bad {kind} item ({exc!r})") from exc
    raise ScenarioError(f"{where}: unknown item type {kind!r} (audio | speech | typed)")


def _item_to_dict(item: UserItem) -> dict[str, Any]:
    if isinstance(item, TypedItem):
        return {"type": "typed", "chunks": [{"t": c.t, "text": c.text, **({"final": True} if c.final else {})}
                                            for c in item.chunks]}
    if isinstance(item, AudioItem):
        return {"type": "audio", "t": item.t, "path": item.path, **({"text": item.text} if item.text else {})}
    out: dict[str, Any] = {"type": "speech", "t": item.t, "text": item.text, "voice": item.voice}
    if item.audio:
        out["audio"] = item.audio
    return out


def scenario_from_dict(d: dict[str, Any], base_dir: str = "", where: str = "scenario") -> Scenario:
    category = d.get("category")
    if category not in CATEGORIES:
        raise ScenarioError(f"{where}: category must be one of {', '.join(CATEGORIES)}, got {category!r}")
    items = tuple(_item_from_dict(x, f"{where} item {i}") for i, x in enumerate(d.get("items", [])))
    cues = []
    for i, c in enumerate(d.get("cues", [])):
        if c.get("kind") not in CUE_KINDS:
            raise ScenarioError(f"{where} cue {i}: kind must be one of {', '.join(CUE_KINDS)}")
        cues.append(Cue(c["kind"], _opt(c.get("t")), _opt(c.get("end")), _opt(c.get("start")),
                        None if c.get("item") is None else int(c["item"])))
    last = max([_item_end_guess(x) for x in items] or [0.0])
    return Scenario(id=str(d.get("id", Path(where).stem)), category=category, items=items, cues=tuple(cues),
                    duration_s=float(d.get("duration_s", last + 8.0)), instructions=d.get("instructions"),
                    seed=d.get("seed"), base_dir=base_dir, meta=dict(d.get("meta", {})))


def _opt(v: Any) -> float | None:
    return None if v is None else float(v)


def _item_end_guess(item: UserItem) -> float:
    if isinstance(item, TypedItem):
        return item.chunks[-1].t
    return item.t + 5.0


def scenario_to_dict(s: Scenario) -> dict[str, Any]:
    out: dict[str, Any] = {"id": s.id, "category": s.category, "duration_s": s.duration_s}
    if s.instructions:
        out["instructions"] = s.instructions
    if s.seed is not None:
        out["seed"] = s.seed
    out["items"] = [_item_to_dict(x) for x in s.items]
    out["cues"] = [{k: v for k, v in (("kind", c.kind), ("t", c.t), ("end", c.end), ("start", c.start),
                                      ("item", c.item)) if v is not None} for c in s.cues]
    if s.meta:
        out["meta"] = s.meta
    return out


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ScenarioError(f"{path}: {exc}") from exc
    return scenario_from_dict(data, base_dir=str(path.parent), where=str(path))


def load_scenarios(directory: str | Path) -> list[Scenario]:
    """Every ``*.json`` scenario in ``directory`` (not recursive), sorted by id."""
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*.json") if p.name not in ("manifest.json", "summary.json"))
    if not files:
        raise ScenarioError(f"no scenario *.json files in {directory}")
    return sorted((load_scenario(p) for p in files), key=lambda s: s.id)


def save_scenario(s: Scenario, path: str | Path) -> None:
    Path(path).write_text(json.dumps(scenario_to_dict(s), indent=2) + "\n", encoding="utf-8")


# ---- audio -------------------------------------------------------------------------------------
Synthesize = Callable[[str, str], np.ndarray]  # (text, voice) -> float32 16 kHz


def voiced_bounds_s(audio: np.ndarray, threshold_db: float = -40.0) -> tuple[float, float]:
    """First and last 10 ms frame louder than ``threshold_db`` relative to the loudest frame."""
    frame = _SR // 100
    n = len(audio) // frame
    if n == 0:
        return 0.0, 0.0
    rms = np.sqrt(np.mean(np.square(audio[: n * frame].reshape(n, frame), dtype=np.float64), axis=1))
    peak = float(rms.max())
    if peak <= 1e-6:
        return 0.0, 0.0
    loud = np.nonzero(rms > peak * 10 ** (threshold_db / 20))[0]
    return float(loud[0] * frame / _SR), float((loud[-1] + 1) * frame / _SR)


def item_audio(s: Scenario, item: UserItem, synthesize: Synthesize | None) -> np.ndarray | None:
    """float32 16 kHz audio of one item (None for typed items)."""
    from duplex.audio import read_wav

    if isinstance(item, TypedItem):
        return None
    if isinstance(item, AudioItem):
        return read_wav(Path(s.base_dir) / item.path)
    if item.audio and (Path(s.base_dir) / item.audio).exists():
        return read_wav(Path(s.base_dir) / item.audio)
    if synthesize is None:
        raise ScenarioError(f"{s.id}: speech item {item.text!r} has no rendered audio and no synthesiser was given")
    return synthesize(item.text, item.voice)


@dataclass(frozen=True, slots=True)
class RenderedUser:
    """The user's side of a scenario as one 16 kHz signal, with each item's voiced span."""

    audio: np.ndarray
    spans: tuple[tuple[int, float, float, str], ...]  # (item index, onset_s, offset_s, text)
    typed: tuple[tuple[float, str, bool], ...]  # (t, text, final)
    type: str = "rendered_user"


def render_user_audio(s: Scenario, synthesize: Synthesize | None = None) -> RenderedUser:
    """Mix every audio/speech item into one signal at its start time (overlaps add)."""
    n_total = int(round(s.duration_s * _SR))
    out = np.zeros(n_total, dtype=np.float32)
    spans: list[tuple[int, float, float, str]] = []
    typed: list[tuple[float, str, bool]] = []
    for i, item in enumerate(s.items):
        if isinstance(item, TypedItem):
            typed.extend((c.t, c.text, c.final) for c in item.chunks)
            continue
        audio = item_audio(s, item, synthesize)
        assert audio is not None
        start = int(round(item.t * _SR))
        if start >= n_total:
            continue
        seg = audio[: n_total - start]
        out[start:start + len(seg)] += seg
        on, off = voiced_bounds_s(seg)
        if off > on:
            spans.append((i, item.t + on, item.t + off, item.text))
    return RenderedUser(np.clip(out, -1.0, 1.0), tuple(spans), tuple(sorted(typed, key=lambda x: x[0])))


def resolve_cues(s: Scenario, user: RenderedUser) -> tuple[Cue, ...]:
    """Fill cue times from their ``item`` where the file gives no explicit time."""
    by_item = {i: (on, off) for i, on, off, _ in user.spans}
    typed_end = {i: item.chunks[-1].t for i, item in enumerate(s.items) if isinstance(item, TypedItem)}
    out = []
    for c in s.cues:
        t, end, start = c.t, c.end, c.start
        if c.item is not None:
            on, off = by_item.get(c.item, (typed_end.get(c.item), typed_end.get(c.item)))
            if c.kind == "pause":
                nxt = by_item.get(c.item + 1, (None, None))[0]
                t = off if t is None else t
                end = nxt if end is None else end
            elif c.kind == "end_of_turn":
                t = off if t is None else t
                start = on if start is None else start
            else:
                t = on if t is None else t
                end = off if end is None else end
        if t is None:
            raise ScenarioError(f"{s.id}: cue {c.kind} has no time and no item to take it from")
        out.append(Cue(c.kind, t, end, start, c.item))
    return tuple(out)
