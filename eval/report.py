"""``report.html``: one self-contained page (PNG plots embedded as base64) from a run directory:
the summary table, metric bars per policy, latency CDFs and a timeline per scenario with one row
per policy (user speech, agent speech, cues, barge-ins)."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

from .metrics import agent_outputs
from .runner import timeline_path

__all__ = ["TABLE_COLUMNS", "write_report"]

log = logging.getLogger(__name__)

TABLE_COLUMNS = [
    ("tor_pause", "TOR pause ↓"), ("tor_backchannel", "TOR backchannel ↓"), ("tor_turn_taking", "TOR turn-taking ↑"),
    ("tor_interruption", "TOR interruption ↑"), ("turn_taking_latency_s", "turn-taking latency s"),
    ("stop_latency_s", "stop latency s"), ("response_latency_s", "response latency s"),
    ("yield_rate", "yield rate (interr.)"), ("false_interruption_rate", "false interruption rate"),
    ("backchannel_per_s", "agent backchannels /s"), ("overlap_s", "overlap s/episode"),
]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _bars(rows: list[dict[str, Any]], keys: list[tuple[str, str]], title: str, ylabel: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), dpi=90)
    ax = fig.add_subplot()
    n = max(1, len(rows))
    width = 0.8 / n
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [row.get(k) or 0.0 for k, _ in keys], width, label=row["policy"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [label for _, label in keys], fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _png(fig)


def _cdfs(episodes: list[dict[str, Any]], policies: list[str]) -> str:
    from matplotlib.figure import Figure

    keys = [("latency_s", "turn-taking latency"), ("stop_latency_s", "interruption stop latency"),
            ("response_latency_s", "interruption response latency")]
    fig = Figure(figsize=(11, 3.2), dpi=90)
    for i, (key, title) in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for p in policies:
            vals = sorted(e[key] for e in episodes if e["policy"] == p and e.get(key) is not None)
            if vals:
                ax.step(vals, [(j + 1) / len(vals) for j in range(len(vals))], where="post", label=f"{p} (n={len(vals)})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def _timeline(scenario: str, per_policy: list[tuple[str, list[dict[str, Any]]]]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 0.5 + 0.55 * len(per_policy)), dpi=60)
    ax = fig.add_subplot()
    end = 0.0
    for row, (policy, recs) in enumerate(per_policy):
        y = len(per_policy) - 1 - row
        user = [(r["t"], r["end"] - r["t"]) for r in recs if r["type"] == "user_speech"]
        agent = [(r["voiced_start"], r["voiced_end"] - r["voiced_start"]) for r in recs
                 if r["type"] == "agent_audio" and r["voiced_end"] > r["voiced_start"]]
        ax.broken_barh(user, (y + 0.5, 0.35), color="tab:blue")
        ax.broken_barh(agent, (y + 0.1, 0.35), color="tab:orange")
        for o in agent_outputs(recs):
            if o.first_word_t is not None:
                ax.plot([o.first_word_t], [y + 0.28], marker="|", color="black", markersize=9)
        for r in recs:
            if r["type"] == "interrupted":
                ax.plot([r["t"]], [y + 0.28], marker="x", color="red", markersize=8)
            elif (r["type"] == "input" and r["event"].get("type") == "speech_stopped") or (
                    r["type"] == "server_event" and r["event"].get("type") == "input_audio_buffer.speech_stopped"):
                ax.plot([r["t"]], [y + 0.68], marker="v", color="navy", markersize=5)
            elif r["type"] == "cue" and row == 0:
                ax.axvline(r["t"], color="green", alpha=0.6, lw=1)
                if r.get("end") is not None:
                    ax.axvspan(r["t"], r["end"], color="green", alpha=0.08)
            elif r["type"] == "episode_end":
                end = max(end, r["t"])
    ax.set_yticks([len(per_policy) - 1 - i + 0.5 for i in range(len(per_policy))], [p for p, _ in per_policy],
                  fontsize=8)
    ax.set_xlim(0, end or None)
    ax.set_title(f"{scenario}: user (blue), agent (orange), first word |, barge-in ×, VAD stop ▼, cue (green)",
                 fontsize=9)
    ax.set_xlabel("seconds")
    return _png(fig)


def write_report(run_dir: str | Path, max_timelines: int | None = None) -> Path:
    """Write ``run_dir/report.html`` from summary.json, episodes.jsonl and the timelines."""
    import matplotlib

    matplotlib.use("Agg")
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    episodes = [json.loads(x) for x in (run / "episodes.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = summary["rows"]
    policies = [r["policy"] for r in rows]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>duplex eval report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}</style></head><body>",
             "<h1>duplex offline policy evaluation</h1>"]
    meta = summary["meta"]
    parts.append("<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in meta.items()
                                     if not isinstance(v, dict)) + "</table>")
    parts.append("<h2>Summary</h2><table><tr><th>policy</th>" + "".join(f"<th>{html.escape(lbl)}</th>" for _, lbl in TABLE_COLUMNS)
                 + "<th>episodes</th></tr>")
    for r in rows:
        parts.append(f"<tr><td>{html.escape(r['policy'])}</td>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k, _ in TABLE_COLUMNS)
                     + f"<td>{r.get('episodes')}</td></tr>")
    parts.append("</table><p>Valid cues per category (agent speaking at the cue for backchannel/interruption): "
                 + "; ".join(f"{html.escape(r['policy'])}: " + ", ".join(f"{c} {r.get(f'n_{c}')}/{r.get(f'n_{c}_total')}"
                             for c in ("pause", "backchannel", "turn_taking", "interruption")) for r in rows) + "</p>")
    parts.append("<h3>Policy parameters</h3><pre>" + html.escape(json.dumps(summary["policies"], indent=1)) + "</pre>")
    parts.append("<h2>Metrics per policy</h2>")
    parts.append(f"<img src='{_bars(rows, TABLE_COLUMNS[:4], 'Turn-over rate per category', 'TOR')}'>")
    parts.append(f"<img src='{_bars(rows, TABLE_COLUMNS[4:7], 'Latencies (mean)', 'seconds')}'>")
    parts.append(f"<img src='{_bars(rows, TABLE_COLUMNS[7:], 'Rates and overlap', 'value')}'>")
    parts.append("<h2>Latency CDFs</h2>")
    parts.append(f"<img src='{_cdfs(episodes, policies)}'>")
    parts.append("<h2>Timelines</h2>")
    scenarios = sorted({e["scenario"] for e in episodes})
    for sid in scenarios[: max_timelines if max_timelines is not None else len(scenarios)]:
        per_policy = []
        for p in policies:
            path = timeline_path(str(run), p, sid)
            if path.exists():
                per_policy.append((p, [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]))
        if per_policy:
            parts.append(f"<img src='{_timeline(sid, per_policy)}'>")
    parts.append("</body></html>")
    out = run / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    log.info("wrote %s", out)
    return out
