"""The pure half of ``duplex bench soak``: sequence-number accounting for lost events, RSS
statistics after warm-up, the targets table, and the RSS plot. No sockets, no clock reads."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "RssStats", "SeqLedger", "percentile", "plot_rss", "rss_stats", "targets"]

# issue 14: 30 minutes, 8 clients on 2 cores
TARGETS = {"minutes": 30.0, "clients": 8, "rss_growth_pct": 5.0, "p95_vs_idle": 2.0}


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..1); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass(slots=True)
class SeqLedger:
    """Every ``seq`` one session's client received, over all its connections. Text-only sessions
    send JSON events only, and JSON is never dropped, so any gap in 1..max is a lost event."""

    seen: set[int] = field(default_factory=set)
    duplicates: int = 0
    type: str = "seq_ledger"

    def see(self, seq: Any) -> None:
        if not isinstance(seq, int) or isinstance(seq, bool) or seq <= 0:
            return  # session.resumed, a refusal: seq 0, outside the session's stream
        if seq in self.seen:
            self.duplicates += 1
        self.seen.add(seq)

    @property
    def highest(self) -> int:
        return max(self.seen, default=0)

    def missing(self) -> list[int]:
        """Sequence numbers up to the highest seen that never arrived."""
        return sorted(set(range(1, self.highest + 1)) - self.seen)


@dataclass(frozen=True, slots=True)
class RssStats:
    """RSS (MiB) at the end of warm-up vs at the end of the run, from ``(t_s, rss_kib)`` samples."""

    warmup_s: float
    baseline_mib: float | None  # median over the first samples after warm-up
    final_mib: float | None  # median over the last tenth of the run
    max_mib: float | None
    growth_pct: float | None
    slope_mib_per_min: float | None  # least squares over the samples after warm-up
    samples_after_warmup: int
    type: str = "rss_stats"


def rss_stats(samples: list[tuple[float, int]], warmup_s: float) -> RssStats:
    after = [(t, kib / 1024) for t, kib in samples if t >= warmup_s]
    if len(after) < 2:
        return RssStats(warmup_s, None, None, None, None, None, len(after))
    n = max(1, len(after) // 10)
    base = statistics.median(v for _, v in after[:n])
    final = statistics.median(v for _, v in after[-n:])
    ts = [t / 60 for t, _ in after]
    vs = [v for _, v in after]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    den = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (v - mv) for t, v in zip(ts, vs)) / den if den > 0 else 0.0
    return RssStats(warmup_s, round(base, 1), round(final, 1), round(max(vs), 1),
                    round(100 * (final - base) / base, 2), round(slope, 3), len(after))


def _check(target: Any, measured: Any, met: bool | None) -> dict[str, Any]:
    return {"target": target, "measured": measured, "met": met}


def targets(minutes: float, clients: int, rss: RssStats, internal_errors: int, lost: int,
            p95_ratio: float | None) -> dict[str, dict[str, Any]]:
    """The issue's targets next to what this run measured (``met`` None: not measured)."""
    growth = rss.growth_pct
    return {
        "duration_min": _check(f">= {TARGETS['minutes']:g}", round(minutes, 2), minutes >= TARGETS["minutes"]),
        "clients": _check(f">= {TARGETS['clients']}", clients, clients >= TARGETS["clients"]),
        "rss_growth_after_warmup_pct": _check(f"< {TARGETS['rss_growth_pct']:g}", growth,
                                              None if growth is None else growth < TARGETS["rss_growth_pct"]),
        "internal_error": _check(0, internal_errors, internal_errors == 0),
        "lost_events": _check(0, lost, lost == 0),
        "well_behaved_p95_first_text_vs_idle": _check(f"<= {TARGETS['p95_vs_idle']:g}", p95_ratio,
                                                      None if p95_ratio is None else p95_ratio <= TARGETS["p95_vs_idle"]),
    }


def plot_rss(samples: list[tuple[float, int]], sessions: list[tuple[float, int]], stats: RssStats, path: Path,
             title: str) -> Path:
    """RSS over time (warm-up shaded, the baseline and final medians marked), sessions held on a
    second axis; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    ax.plot([t / 60 for t, _ in samples], [k / 1024 for _, k in samples], color="tab:blue", lw=1.4,
            label="server RSS (VmRSS)")
    ax.axvspan(0, stats.warmup_s / 60, color="0.9", label="warm-up")
    for value, style, name in ((stats.baseline_mib, "--", "after warm-up"), (stats.final_mib, ":", "end")):
        if value is not None:
            ax.axhline(value, color="tab:blue", ls=style, lw=0.8, label=f"{name}: {value:.0f} MiB")
    ax.set_xlabel("minutes since the first sample (the idle baseline runs first)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(0, 1.25 * max((k / 1024 for _, k in samples), default=1.0))
    if sessions:
        ax2 = ax.twinx()
        ax2.step([t / 60 for t, _ in sessions], [n for _, n in sessions], where="post", color="tab:orange",
                 lw=0.9, alpha=0.8, label="sessions held")
        ax2.set_ylabel("sessions held (/healthz)")
        ax2.set_ylim(bottom=0, top=max(n for _, n in sessions) + 2)
        ax2.legend(loc="lower right", fontsize=8)
    growth = "n/a" if stats.growth_pct is None else f"{stats.growth_pct:+.2f} %"
    ax.set_title(f"{title}\nRSS growth after warm-up: {growth}", fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
