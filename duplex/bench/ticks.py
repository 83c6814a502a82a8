"""Reads a scheduler tick log (``DUPLEX_TICK_LOG=FILE duplex serve ...``, one JSON line per tick,
see :class:`duplex.engine.scheduler_work.TickLog`): how long ticks took, and where the replies'
first words spent their time.

A *first-words chain* is what a user waits for, as the engine sees it: a session's urgent rows
from its turn's hand-over prefill (its typed words, the hand-over) through the reply's urgent
decode steps, which stay urgent until the first words are out (at most 6 steps). For the slowest
tenth of the chains it reports the time waiting for a tick, the time in ticks, and how much of
that was ticks carrying other sessions' prefill: the rows a reply one step from its first words
rode along with. ``bench soak`` adds this summary to its JSON when the server it starts logs
ticks (``DUPLEX_TICK_LOG`` set in its environment); ``python -m duplex.bench.ticks FILE`` prints it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duplex.bench.soak_report import percentile

__all__ = ["summarize_tick_log"]

_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class _Chain:
    arrived: float
    ticks: list[tuple[float, float, int, int]] = field(default_factory=list)  # (waited, seconds, own, others' prefill)
    ended: float = 0.0
    decoded: bool = False


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


def _read(path: str | Path) -> list[dict[str, Any]]:
    ticks = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    ticks.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a killed server
    return ticks


def summarize_tick_log(path: str | Path, since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """Tick times (percentiles, mean by tokens, busy fraction) and the first-words chains, over the
    ticks that ended between ``since`` and ``until`` (``time.perf_counter()`` values: the
    system's monotonic clock on Linux, so another process's window applies)."""
    ticks = [t for t in _read(path) if (since is None or t["ended"] >= since) and (until is None or t["ended"] <= until)]
    if not ticks:
        return {"ticks": 0}
    seconds = [t["seconds"] for t in ticks]
    span = ticks[-1]["ended"] - (ticks[0]["ended"] - ticks[0]["seconds"])
    by_tokens: dict[str, list[float]] = {}
    for t in ticks:
        n = sum(r[1] for r in t["rows"])
        bucket = max(b for b in _TOKEN_BUCKETS if b <= max(1, n))
        by_tokens.setdefault(f"{bucket}+", []).append(t["seconds"])
    chains = _chains(ticks)
    spans = [c.ended - c.arrived for c in chains]
    slow_cut = percentile(spans, 0.9)
    slow = [c for c in chains if slow_cut is not None and c.ended - c.arrived >= slow_cut]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    run = [sum(s for _, s, _, _ in c.ticks) for c in slow]
    riding = [sum(s for _, s, _, others in c.ticks if others) for c in slow]
    return {
        "ticks": len(ticks),
        "span_s": round(span, 1),
        "busy_fraction": round(sum(seconds) / span, 3) if span > 0 else None,
        "tick_ms": {"p50": _ms(percentile(seconds, 0.5)), "p95": _ms(percentile(seconds, 0.95)),
                    "p99": _ms(percentile(seconds, 0.99)), "max": _ms(max(seconds))},
        "tick_ms_mean_by_tokens": {k: {"ticks": len(v), "mean_ms": _ms(mean(v))}
                                   for k, v in sorted(by_tokens.items(), key=lambda kv: int(kv[0][:-1]))},
        "decode_ticks": _decode_ticks(ticks),
        "first_words_chains": {
            "definition": "a session's urgent rows from its turn's prefill through the reply's urgent decode "
                          "steps; span = the first row's arrival to the end of the last one's tick",
            "n": len(chains),
            "span_ms": {"p50": _ms(percentile(spans, 0.5)), "p95": _ms(percentile(spans, 0.95))},
            "slowest_tenth": {
                "n": len(slow),
                "mean_span_ms": _ms(mean([c.ended - c.arrived for c in slow])),
                "mean_waiting_ms": _ms(mean([sum(w for w, _, _, _ in c.ticks) for c in slow])),
                "mean_in_ticks_ms": _ms(mean(run)),
                "mean_in_ticks_with_others_prefill_ms": _ms(mean(riding)),
                "mean_ticks": round(mean([len(c.ticks) for c in slow]) or 0, 2),
                "mean_others_prefill_tokens_per_tick": round(
                    mean([others for c in slow for _, _, _, others in c.ticks]) or 0, 1),
            },
        },
    }


def _decode_ticks(ticks: list[dict[str, Any]]) -> dict[str, Any]:
    """Ticks of speaking sessions only (every row one decode token), by row count: the median tick,
    and the median gap before it (the engine idle since the tick before ended), split by the rows'
    arrival stamps into the time until the first row arrived (the last tick's finishing work),
    while the rows arrived, and after the last one (handing results over, planning). With N
    sessions speaking, N-row ticks and their gaps are the whole cycle of a token."""
    by_rows: dict[int, list[tuple[float, float | None, list[float]]]] = {}
    for before, tick in zip([None, *ticks], ticks):
        rows = tick["rows"]
        if not rows or not all(r[3] and r[1] == 1 for r in rows):
            continue
        gap = None if before is None else tick["ended"] - tick["seconds"] - before["ended"]
        by_rows.setdefault(len(rows), []).append((tick["seconds"], gap, sorted(r[5] for r in rows)))
    out: dict[str, Any] = {}
    for n, entries in sorted(by_rows.items()):
        if len(entries) < 5:
            continue  # a few stray ticks of this size say nothing
        gaps = [(g, w) for _, g, w in entries if g is not None and g >= 0]
        out[str(n)] = {
            "ticks": len(entries),
            "tick_ms_p50": _ms(percentile([s for s, _, _ in entries], 0.5)),
            "gap_before_ms_p50": _ms(percentile([g for g, _ in gaps], 0.5)),
            "gap_until_first_row_ms_p50": _ms(percentile([max(0.0, g - w[-1]) for g, w in gaps], 0.5)),
            "gap_rows_arriving_ms_p50": _ms(percentile([w[-1] - w[0] for _, w in gaps], 0.5)),
            "gap_after_last_row_ms_p50": _ms(percentile([w[0] for _, w in gaps], 0.5)),
        }
    return out


def _chains(ticks: list[dict[str, Any]]) -> list[_Chain]:
    """First-words chains, in order of their start (see the module docstring)."""
    open_chains: dict[int, _Chain] = {}
    chains: list[_Chain] = []
    for t in ticks:
        ended, secs = t["ended"], t["seconds"]
        prefill_by_owner: dict[int, int] = {}
        for owner, tokens, _, decode, _, _ in t["rows"]:
            if not decode:
                prefill_by_owner[owner] = prefill_by_owner.get(owner, 0) + tokens
        total_prefill = sum(prefill_by_owner.values())
        for owner, tokens, _, decode, urgent, waited in t["rows"]:
            chain = open_chains.get(owner)
            if not urgent:
                open_chains.pop(owner, None)  # its first words are out (or it never was a reply)
                continue
            if not decode and (chain is None or chain.decoded):
                chain = _Chain(arrived=ended - secs - waited)  # a new turn's prefill
                open_chains[owner] = chain
                chains.append(chain)
            if chain is None:
                continue  # an urgent step whose prefill came before the log started
            chain.decoded |= bool(decode)
            others = total_prefill - prefill_by_owner.get(owner, 0)
            chain.ticks.append((waited, secs, tokens, others))
            chain.ended = ended
    return [c for c in chains if c.ticks]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m duplex.bench.ticks TICK_LOG.jsonl", file=sys.stderr)
        return 2
    print(json.dumps(summarize_tick_log(args[0]), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
