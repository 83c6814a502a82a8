"""``duplex eval``: make-scenarios, run, report."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

__all__ = ["add_eval_parser"]

log = logging.getLogger(__name__)


def _cmd_make(args: argparse.Namespace) -> int:
    from .make import LayoutConfig, make_scenarios
    from .scenario import CATEGORIES

    voices = args.voices.split(",") if args.voices else None
    categories = tuple(args.categories.split(",")) if args.categories else CATEGORIES
    layout = LayoutConfig(short_turn_share=args.short_turns, long_pause_share=args.long_pauses)
    paths = make_scenarios(args.out, args.n, seed=args.seed, voices=voices, categories=categories, layout=layout,
                           progress=not args.quiet, id_offset=args.id_offset)
    print(f"wrote {len(paths)} scenarios to {args.out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .runner import CLOCKS, RunSpec, parse_policy, run_eval

    if args.clock not in CLOCKS:
        raise SystemExit(f"--clock must be one of {', '.join(CLOCKS)}")
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("duplex eval run: --ray needs the 'ray' package (pip install 'ray>=2.9'); "
                  "or drop --ray to use the local process pool (--workers N)")
            return 2
    policies = tuple(parse_policy(p) for p in (args.policy or ["silence", "eou", "half-duplex"]))
    spec = RunSpec(out_dir=args.out, policies=policies, clock=args.clock, seed=args.seed, model=args.model,
                   device=args.device, dtype=args.dtype, asr=args.asr_model, vad=args.vad, tts=args.tts,
                   max_reply_tokens=args.max_reply_tokens, temperature=args.temperature,
                   instructions=args.instructions, threads=args.threads, server_url=args.url)
    summary = run_eval(spec, args.scenarios, workers=args.workers, ray_address=args.ray, progress=not args.quiet,
                       report=not args.no_report)
    _print_table(summary)
    print(f"wall time {summary['meta']['wall_s']:.1f} s; results in {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .report import write_report
    from .runner import rebuild_summary

    if args.rebuild or not (Path(args.run_dir) / "summary.json").exists():
        _print_table(rebuild_summary(args.run_dir))
    path = write_report(args.run_dir, max_timelines=args.max_timelines)
    print(f"wrote {path}")
    return 0


def _print_table(summary: dict[str, Any]) -> None:
    from .report import TABLE_COLUMNS

    keys = [k for k, _ in TABLE_COLUMNS]
    print("policy".ljust(16) + " ".join(k[:12].rjust(12) for k in keys))
    for row in summary["rows"]:
        vals = [row.get(k) for k in keys]
        print(row["policy"][:16].ljust(16) + " ".join(("-" if v is None else f"{v:.3f}").rjust(12) for v in vals))
    print(json.dumps({r["policy"]: {c: f"{r[f'n_{c}']}/{r[f'n_{c}_total']}" for c in
                                    ("pause", "backchannel", "turn_taking", "interruption")} for r in summary["rows"]}))


def add_eval_parser(subparsers: Any) -> None:
    """Add ``eval`` with ``make-scenarios``, ``run`` and ``report`` to the ``duplex`` CLI."""
    p = subparsers.add_parser("eval", help="offline policy evaluation (scenarios, replay, metrics, report)")
    sub = p.add_subparsers(dest="eval_command", required=True)

    m = sub.add_parser("make-scenarios", help="synthesise Full-Duplex-Bench style scenarios")
    m.add_argument("--out", required=True)
    m.add_argument("--n", type=int, default=10, help="scenarios per category")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--voices", default=None, help="comma list, e.g. piper:joe,flite:slt (default: all available)")
    m.add_argument("--categories", default=None, help="comma list (default: all four)")
    m.add_argument("--short-turns", type=float, default=0.0, metavar="SHARE",
                   help="share of turn-taking scenarios whose turn is one to seven words, most of two to "
                        "five (default 0)")
    m.add_argument("--long-pauses", type=float, default=0.0, metavar="SHARE",
                   help="share of pause scenarios whose unfinished first half is seven words or more (default 0)")
    m.add_argument("--id-offset", type=int, default=0, metavar="N",
                   help="number the files from N (pause-1000, ...): add a second set to a directory that has one")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=_cmd_make)

    r = sub.add_parser("run", help="play scenarios to the served agent in real time (or to the same pipeline "
                                   "on a virtual clock)")
    r.add_argument("--scenarios", required=True)
    r.add_argument("--policy", action="append", help="NAME or NAME:key=value,... (repeatable; default: "
                                                      "silence, eou, half-duplex)")
    r.add_argument("--out", required=True)
    r.add_argument("--workers", type=int, default=1, help="local processes (1 = in this process; virtual clocks only)")
    r.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="run episodes as Ray tasks (virtual clocks only)")
    r.add_argument("--clock", default="measured", choices=["measured", "ideal", "replay-measured"],
                   help="measured (default): a browser-like client speaks to the real server in real time, one "
                        "episode at a time; ideal: the same voice pipeline on a virtual clock, compute counts as 0; "
                        "replay-measured: the same on a virtual clock charged with each model call's measured compute")
    r.add_argument("--url", default=None, help="measured clock: use this running server (ws://HOST:PORT/ws) "
                                               "instead of starting duplex serve")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--model", default=None, help="HF id/path (default: packaged SmolLM2-135M-Instruct)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--asr-model", default="tiny.en", help="tiny.en | base | path | fake")
    r.add_argument("--vad", default="webrtc", help="webrtc | energy")
    r.add_argument("--tts", default="piper", help="piper | flite | espeak-ng | fake")
    r.add_argument("--max-reply-tokens", type=int, default=48)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--instructions", default=None)
    r.add_argument("--threads", type=int, default=1, help="torch/whisper threads per worker")
    r.add_argument("--no-report", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="rebuild report.html from a run directory")
    rep.add_argument("run_dir")
    rep.add_argument("--max-timelines", type=int, default=None)
    rep.add_argument("--rebuild", action="store_true", help="recompute metrics from the episode timelines "
                                                             "(also works on a run that was cut short)")
    rep.set_defaults(func=_cmd_report)
