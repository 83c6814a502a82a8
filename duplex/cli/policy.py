"""``duplex policy``: train the learned turn policy from logged episodes."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_policy_parser"]


def _baselines() -> dict[str, Any]:
    """The heuristics the held-out report compares with, each with the parameters it is served with."""
    from duplex.policies import make_policy
    from duplex.voice.config import voice_policy_params

    eou_params = voice_policy_params("eou") or {"short_gap_ms": 0.0, "long_gap_ms": 700.0, "confident": 0.2,
                                                "unlikely": 0.02}
    return {"eou": make_policy("eou", **eou_params), "silence": make_policy("silence"),
            "smart-turn": make_policy("smart-turn")}


def _cmd_train(args: argparse.Namespace) -> int:
    from duplex.policies.learned.model import DEFAULT_WEIGHTS
    from duplex.policies.learned.train import TrainConfig, train_policy

    config = TrainConfig(hidden=args.hidden, epochs=args.epochs, seed=args.seed, max_gap_ms=args.max_gap_ms,
                         weight_decay=args.weight_decay, drop_audio=args.drop_audio, test_voices=_test_voices(args))
    out = args.out or str(DEFAULT_WEIGHTS)
    report = train_policy(args.runs, out, config, baselines=_baselines())
    _print_report(report)
    print(f"wrote {out}")
    _write_json(args.report, report)
    return 0


def _test_voices(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(v for v in args.test_voices.split(",") if v)


def _write_json(path: str | None, obj: Any) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# The candidates ``policy cv`` compares (leave-one-voice-out on the training split).
CV_CONFIGS = {
    "logreg": {},
    "logreg-wd1e-2": {"weight_decay": 1e-2},
    "logreg-no-audio-drop": {"drop_audio": 0.0},
    "mlp8": {"hidden": 8},
    "mlp8-no-audio-drop": {"hidden": 8, "drop_audio": 0.0},
}


def _cmd_cv(args: argparse.Namespace) -> int:
    import sys

    from duplex.policies.learned.train import TrainConfig, cross_validate

    voices = _test_voices(args)
    configs = {name: TrainConfig(test_voices=voices, **kw) for name, kw in CV_CONFIGS.items()}
    result = cross_validate(args.runs, configs, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"leave-one-voice-out on the training split (test voices {', '.join(voices)} unseen):")
    print(f"  {'config':<22}{'score':>7}{'early':>9}{'latency mean s':>16}{'p50 s':>8}")
    for name, r in result["configs"].items():
        print(f"  {name:<22}{r['score']:>7.3f}{r['early']:>5}/{r['n']:<3}"
              f"{_seconds(r['latency_mean_s']):>16}{_seconds(r['latency_p50_s']):>8}")
    print(f"best: {result['best']} ({CV_CONFIGS[result['best']] or 'the defaults'})")
    _write_json(args.json, result)
    return 0


def _print_report(report: dict[str, Any]) -> None:
    s = report["split"]
    print(f"split by voice and sentence: train {s['train_episodes']} episodes ({', '.join(s['train_voices'])}), "
          f"{s['train_ticks']} ticks; test {s['test_episodes']} episodes ({', '.join(s['test_voices'])}); "
          f"{s['dropped_shared_sentence']} dropped (a sentence shared with the test split)")
    print(f"threshold {report['threshold']:.2f} (chosen on the training split), max gap {report['max_gap_ms']:.0f} ms")
    test = report["test"]
    if not test:
        print("no test episodes: nothing held out to report")
        return
    t = test["ticks"]
    auc = "-" if t["auc"] is None else f"{t['auc']:.3f}"
    acc = "-" if t["accuracy"] is None else f"{t['accuracy']:.3f}"
    print(f"HELD-OUT (test split only): {t['n']} listening ticks ({t['positive']} after the end of the turn), "
          f"AUC {auc}, accuracy {acc}")
    print(f"simulated on the held-out logged ticks ({test['episodes']} episodes; latency = end of the user's voice -> "
          f"decision on the logs' clock, the VAD hangover and the final ASR pass included):")
    print(f"  {'policy':<12}{'early':>8}{'undecided':>11}{'latency mean s':>16}{'p50 s':>8}")

    def row(name: str, r: dict[str, Any], indent: str = "  ") -> None:
        print(f"{indent}{name:<12}{r['early']:>5}/{r['n']:<2}{r['undecided']:>11}"
              f"{_seconds(r['latency_mean_s']):>16}{_seconds(r['latency_p50_s']):>8}")

    for name, r in test["policies"].items():
        row(name, r)
    for cat, rows in test["by_category"].items():
        print(f"  {cat}:")
        for name, r in rows.items():
            row(name, r, "    ")


def add_policy_parser(subparsers: Any) -> None:
    """Add ``policy train`` to the ``duplex`` CLI."""
    p = subparsers.add_parser("policy", help="interaction policies: train the learned one")
    sub = p.add_subparsers(dest="policy_command", required=True)
    t = sub.add_parser("train", help="train policies/learned from logged episodes (duplex eval run --clock ideal)")
    t.add_argument("--runs", action="append", required=True, metavar="RUN_DIR",
                   help="an eval run directory with episode timelines (repeatable)")
    t.add_argument("--out", default=None, help="weights JSON (default: the committed policies/learned/weights.json)")
    t.add_argument("--report", default=None, help="also write the held-out report as JSON here")
    t.add_argument("--test-voices", default="flite:slt,flite:awb",
                   help="episodes in these voices are the test split (and their sentences leave the training split)")
    t.add_argument("--hidden", type=int, default=0, help="0: logistic regression; N: a tanh layer of N units")
    t.add_argument("--epochs", type=int, default=400)
    t.add_argument("--max-gap-ms", type=float, default=2000.0, help="speak after this silence whatever the model says")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weight-decay", type=float, default=1e-3)
    t.add_argument("--drop-audio", type=float, default=0.15,
                   help="share of ticks repeated without their audio features (they may arrive late)")
    t.set_defaults(func=_cmd_train)
    c = sub.add_parser("cv", help="choose the model: leave-one-voice-out on the training split, the test split unseen")
    c.add_argument("--runs", action="append", required=True, metavar="RUN_DIR")
    c.add_argument("--test-voices", default="flite:slt,flite:awb")
    c.add_argument("--json", default=None, help="write the comparison here")
    c.set_defaults(func=_cmd_cv)
