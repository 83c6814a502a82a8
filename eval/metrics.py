"""Full-Duplex-Bench metrics over episode timelines, with the definitions of design §4.

- **TOR**: 1 if the agent takes the turn in the window after the cue: an agent turn whose first
  word falls in the window and whose output is longer than 1 s or has more than 3 words.
- **Turn-taking latency**: first word of the agent's reply − end of the user's turn, clamped at 0,
  averaged where TOR = 1.
- **Interruption**: stop latency = user onset → agent output halted (or its natural end when it
  never yields); response latency = end of the interrupting utterance → first word of the new
  reply (clamped at 0, where TOR = 1).

Windows per category (the cue's ``t``/``end``/``start`` come from the scenario):

- pause: first word in [pause start, end of the user's turn) — the agent spoke before the user was
  done (lower is better);
- turn_taking: first word in [onset of the user's utterance, end of turn + ``window_s``] (higher is
  better; an agent that starts before the user finished gets latency 0);
- backchannel / interruption: valid only when agent audio is playing at the cue onset; a *new*
  agent turn with first word in [onset, offset + ``window_s``] counts (the turn that was playing is
  not a turn-over). A backchannel cue where the playing turn halts is a false interruption.

Agent output is what was actually played: TTS audio segments trimmed at a halt; "words" are the
words of the played audio. Agent backchannels are completed agent turns with at least one word that
are neither longer than 1 s nor more than 3 words; their frequency is per second of user speech.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["AgentOutput", "EpisodeMetrics", "MetricsConfig", "agent_outputs", "episode_metrics",
           "summarize"]


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    min_turn_s: float = 1.0  # output longer than this takes the turn
    max_backchannel_words: int = 3  # more words than this takes the turn
    window_s: float = 10.0
    type: str = "metrics_config"


@dataclass(frozen=True, slots=True)
class AgentOutput:
    """What the listener heard of one agent turn."""

    turn: int
    first_word_t: float | None
    start_t: float | None  # first voiced sample
    end_t: float | None  # last voiced sample played
    duration_s: float  # voiced audio played
    n_words: int
    halted_t: float | None
    type: str = "agent_output"

    def takes_turn(self, cfg: MetricsConfig) -> bool:
        return self.duration_s > cfg.min_turn_s or self.n_words > cfg.max_backchannel_words

    def playing_at(self, t: float) -> bool:
        return self.start_t is not None and self.end_t is not None and self.start_t <= t < self.end_t


@dataclass(frozen=True, slots=True)
class EpisodeMetrics:
    scenario: str
    category: str
    policy: str
    tor: float | None = None  # None: the cue was not applicable (no agent speech at the cue)
    latency_s: float | None = None  # turn_taking only, where TOR = 1
    stop_latency_s: float | None = None
    response_latency_s: float | None = None
    yielded: float | None = None  # interruption: the agent halted (1) or talked on (0)
    false_interruption: float | None = None  # backchannel: the agent halted
    agent_backchannels: int = 0
    user_speech_s: float = 0.0
    overlap_s: float = 0.0
    agent_turns: int = 0
    type: str = "episode_metrics"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def agent_outputs(records: Iterable[dict[str, Any]]) -> list[AgentOutput]:
    """Per agent turn, from ``agent_audio`` and ``agent_audio_halted`` records (in turn order)."""
    segs: dict[int, list[dict[str, Any]]] = {}
    halted: dict[int, float] = {}
    turns: list[int] = []
    for r in records:
        kind = r.get("type")
        if kind == "turn_started" and r.get("speaker") == "agent":
            turns.append(r["turn"])
        elif kind == "agent_audio":
            segs.setdefault(r["turn"], []).append(r)
        elif kind == "agent_audio_halted":
            halted.setdefault(r["turn"], r["t"])
    out = []
    for turn in sorted(set(turns) | set(segs)):
        words = sorted(w for s in segs.get(turn, []) for w in s.get("word_times", []))
        voiced = [(s["voiced_start"], s["voiced_end"]) for s in segs.get(turn, []) if s["voiced_end"] > s["voiced_start"]]
        out.append(AgentOutput(
            turn=turn, first_word_t=words[0] if words else None,
            start_t=min(a for a, _ in voiced) if voiced else None, end_t=max(b for _, b in voiced) if voiced else None,
            duration_s=sum(b - a for a, b in voiced), n_words=len(words), halted_t=halted.get(turn)))
    return out


def _intervals_overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total = 0.0
    for a0, a1 in _union(a):
        for b0, b1 in _union(b):
            total += max(0.0, min(a1, b1) - max(a0, b0))
    return total


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif e > s:
            out.append((s, e))
    return out


def _cue(records: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((r for r in records if r.get("type") == "cue" and r.get("kind") == kind), None)


def episode_metrics(records: list[dict[str, Any]], cfg: MetricsConfig | None = None) -> EpisodeMetrics:
    """All metrics of one episode timeline (the records of one JSONL file)."""
    cfg = cfg or MetricsConfig()
    head = next(r for r in records if r.get("type") == "episode")
    category = head["category"]
    outputs = agent_outputs(records)
    user_iv = [(r["t"], r["end"]) for r in records if r.get("type") == "user_speech"]
    agent_iv = [(a, b) for r in records if r.get("type") == "agent_audio"
                for a, b in [(r["voiced_start"], r["voiced_end"])] if b > a]
    spoken = [o for o in outputs if o.first_word_t is not None]
    base: dict[str, Any] = dict(
        scenario=head["scenario"], category=category, policy=head["policy"],
        agent_backchannels=sum(1 for o in spoken if o.halted_t is None and not o.takes_turn(cfg)),
        user_speech_s=sum(b - a for a, b in _union(user_iv)), overlap_s=_intervals_overlap(user_iv, agent_iv),
        agent_turns=len(outputs))

    def first_taker(lo: float, hi: float, exclude: int | None = None) -> AgentOutput | None:
        for o in sorted(spoken, key=lambda o: o.first_word_t or 0.0):
            assert o.first_word_t is not None
            if o.turn != exclude and lo <= o.first_word_t <= hi and o.takes_turn(cfg):
                return o
        return None

    eot = _cue(records, "end_of_turn")
    if category == "pause":
        cue = _cue(records, "pause")
        if cue is None:
            return EpisodeMetrics(**base)
        hi = eot["t"] if eot is not None else (cue.get("end") or cue["t"]) + 2.0
        taker = first_taker(cue["t"], hi - 1e-9)
        return EpisodeMetrics(**base, tor=float(taker is not None))
    if category == "turn_taking":
        if eot is None:
            return EpisodeMetrics(**base)
        lo = eot.get("start") if eot.get("start") is not None else eot["t"]
        taker = first_taker(lo, eot["t"] + cfg.window_s)
        latency = None if taker is None or taker.first_word_t is None else max(0.0, taker.first_word_t - eot["t"])
        return EpisodeMetrics(**base, tor=float(taker is not None), latency_s=latency)
    cue = _cue(records, category)
    if cue is None:
        return EpisodeMetrics(**base)
    t0 = cue["t"]
    t1 = cue.get("end") if cue.get("end") is not None else t0
    playing = next((o for o in outputs if o.playing_at(t0)), None)
    if playing is None:
        return EpisodeMetrics(**base)  # the agent was not speaking at the cue: not applicable
    taker = first_taker(t0, t1 + cfg.window_s, exclude=playing.turn)
    halted = playing.halted_t is not None and t0 <= playing.halted_t <= t1 + cfg.window_s
    if category == "backchannel":
        return EpisodeMetrics(**base, tor=float(taker is not None), false_interruption=float(halted))
    stop_at = playing.halted_t if halted else playing.end_t
    assert stop_at is not None
    response = None
    if taker is not None and taker.first_word_t is not None:
        response = max(0.0, taker.first_word_t - t1)
    return EpisodeMetrics(**base, tor=float(taker is not None), stop_latency_s=max(0.0, stop_at - t0),
                          response_latency_s=response, yielded=float(halted))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _vals(eps: list[EpisodeMetrics], attr: str, category: str | None = None) -> list[float]:
    out = []
    for e in eps:
        v = getattr(e, attr)
        if v is not None and (category is None or e.category == category) and not math.isnan(v):
            out.append(float(v))
    return out


def summarize(episodes: list[EpisodeMetrics]) -> dict[str, dict[str, Any]]:
    """One row per policy: means of every metric, and how many episodes each mean is over."""
    rows: dict[str, dict[str, Any]] = {}
    for policy in sorted({e.policy for e in episodes}):
        eps = [e for e in episodes if e.policy == policy]
        row: dict[str, Any] = {}
        for cat in ("pause", "backchannel", "turn_taking", "interruption"):
            vals = _vals(eps, "tor", cat)
            row[f"tor_{cat}"] = _mean(vals)
            row[f"n_{cat}"] = len(vals)
            row[f"n_{cat}_total"] = sum(1 for e in eps if e.category == cat)
        row["turn_taking_latency_s"] = _mean(_vals(eps, "latency_s", "turn_taking"))
        row["stop_latency_s"] = _mean(_vals(eps, "stop_latency_s", "interruption"))
        row["response_latency_s"] = _mean(_vals(eps, "response_latency_s", "interruption"))
        row["yield_rate"] = _mean(_vals(eps, "yielded", "interruption"))
        row["false_interruption_rate"] = _mean(_vals(eps, "false_interruption", "backchannel"))
        speech = sum(e.user_speech_s for e in eps)
        row["backchannel_per_s"] = sum(e.agent_backchannels for e in eps) / speech if speech > 0 else None
        row["overlap_s"] = _mean([e.overlap_s for e in eps])
        row["episodes"] = len(eps)
        rows[policy] = row
    return rows
