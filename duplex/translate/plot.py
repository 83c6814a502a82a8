"""Quality against latency from ``duplex translate eval`` JSON files: BLEU and chrF (y) against
LAAL (x), one point per policy, one series per file (e.g. text source vs speech source).

``latency="LAAL"`` plots the non-computational LAAL in source words; ``"LAAL_CA_ms"`` the
computation-aware one (shown in seconds), which is what the speech goal is stated in. Each file
may name its own latency (text in words, speech in computation-aware seconds): files that share
a latency share a column of panels, so no axis mixes units.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CurvePoint", "curve_points", "plot_quality_latency"]

_LATENCY_LABELS = {
    "LAAL": "LAAL (source words)",
    "AL": "AL (source words)",
    "LAAL_CA_ms": "computation-aware LAAL (s)",
    "AL_CA_ms": "computation-aware AL (s)",
    "StreamLAAL_ms": "StreamLAAL (s of source audio)",
    "StreamLAAL_CA_ms": "computation-aware StreamLAAL (s)",
}
LATENCIES = tuple(_LATENCY_LABELS)


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """One policy of one eval run on the quality/latency plane."""

    series: str
    policy: str
    latency: float
    bleu: float
    chrf: float
    latency_key: str = "LAAL"  # which latency ``latency`` is (ms keys are given in s)
    type: str = "curve_point"


def _wait_k_order(policy: str) -> tuple[int, int, str]:
    """wait-k points in k order (they form the curve), then the other policies by name."""
    name, _, params = policy.partition(":")
    if name in ("wait-k", "waitk"):
        k = params.partition("k=")[2]
        return (0, int(k) if k.isdigit() else 0, policy)
    return (1, 0, policy)


def curve_points(result: dict[str, Any], latency: str = "LAAL", series: str = "") -> list[CurvePoint]:
    """The points of one eval JSON (policies without the latency key are skipped)."""
    points = []
    for policy, scores in result.get("policies", {}).items():
        if latency not in scores or "BLEU" not in scores or "chrF" not in scores:
            continue
        x = float(scores[latency])
        if latency.endswith("_ms"):
            x /= 1000.0
        points.append(CurvePoint(series, policy, x, float(scores["BLEU"]), float(scores["chrF"]), latency))
    return sorted(points, key=lambda p: _wait_k_order(p.policy))


def plot_quality_latency(files: Sequence[str | Path], out: str | Path, *, latency: str | Sequence[str] = "LAAL",
                         labels: Sequence[str] | None = None, title: str | None = None) -> list[CurvePoint]:
    """Draw BLEU (top) and chrF (bottom) against latency to ``out`` (PNG); return the points.
    ``latency``: one key for every file, or one per file; each distinct key gets its own column.
    wait-k points of a series are joined by a line in k order; other policies are single markers."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files")
    latencies = [latency] * len(files) if isinstance(latency, str) else list(latency)
    if len(latencies) == 1 and len(files) > 1:
        latencies *= len(files)
    if len(latencies) != len(files):
        raise ValueError(f"{len(latencies)} latency keys for {len(files)} files")
    columns = list(dict.fromkeys(latencies))
    all_points: list[CurvePoint] = []
    fig, axes = plt.subplots(2, len(columns), figsize=(6 * len(columns), 8), squeeze=False, constrained_layout=True)
    markers = {"local-agreement": "s", "retranslate": "^", "offline": "*"}
    for i, path in enumerate(files):
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        series = labels[i] if labels else Path(path).stem
        points = curve_points(result, latencies[i], series)
        if not points:
            raise ValueError(f"{path}: no policy has {latencies[i]}, BLEU and chrF")
        all_points += points
        color = f"C{i}"
        column = columns.index(latencies[i])
        for row, metric in enumerate(("bleu", "chrf")):
            ax = axes[row][column]
            waitk = [p for p in points if _wait_k_order(p.policy)[0] == 0]
            if waitk:
                ax.plot([p.latency for p in waitk], [getattr(p, metric) for p in waitk], "o-", color=color,
                        label=f"{series}: wait-k")
                for p in waitk:
                    ax.annotate(p.policy.partition(":")[2] or p.policy, (p.latency, getattr(p, metric)),
                                textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
            for p in points:
                if _wait_k_order(p.policy)[0] == 0:
                    continue
                name = p.policy.partition(":")[0]
                ax.plot([p.latency], [getattr(p, metric)], markers.get(name, "D"), color=color, markersize=8,
                        label=f"{series}: {p.policy}")
    for column, key in enumerate(columns):
        for row, name in enumerate(("BLEU", "chrF")):
            ax = axes[row][column]
            ax.set_xlabel(_LATENCY_LABELS.get(key, key))
            ax.set_ylabel(name)
            ax.grid(True, alpha=0.3)
        axes[1][column].legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "quality against latency")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return all_points
