"""``duplex bench translate``: N simultaneous-translation sessions against ``duplex serve`` (its own
process), measured from outside over ``/ws``.

Each client switches its session to translate mode and types the test set's sentences word by word
at a speaker's pace (``input_text {final: false}``, 2.5 words/s by default: 150 words a minute), as a
live source arrives. What a listener meets:

- **finish lag**: from the moment a sentence's last word was sent to its ``response.done`` (the
  translation's end), the wait after the speaker stops;
- **first target word**: from a sentence's first word to its first target delta. The policy itself
  waits for ``k`` source words (wait-k), which at the pace takes ``(k - 1) / pace`` seconds: the
  bound with free compute, printed beside it;
- **target words/s** over all sessions, and whether the server keeps up with the pace: the finish
  lag of each client's last third of sentences against its first third (a server that falls behind
  lags more with every sentence).

``DUPLEX_FAST_DECODE=0`` in the environment reaches the server too (the generic transformers
forward): the A/B of the lean forward runs this same command twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duplex.bench.servers import ServeOptions, serve_process, server_health
from duplex.bench.soak_report import percentile
from duplex.serving.client import DuplexClient
from duplex.serving.client_translate import translate_settings

__all__ = ["TranslateBenchConfig", "add_translate_bench_args", "bench_translate", "bench_translate_cli"]

_DATA = Path(__file__).resolve().parents[2] / "eval" / "data" / "translate_en.txt"
_NOTICES = ("rate_limited",)  # error events that report, not refuse


@dataclass(frozen=True, slots=True)
class TranslateBenchConfig:
    sessions: tuple[int, ...] = (1, 2, 4)
    sentences: int = 10  # per session: the first sentences of the test set, each client from its own offset
    words_per_s: float = 2.5
    policy: str = "wait-k"
    k: int = 3
    source: Path = _DATA
    serve_args: tuple[str, ...] = ()
    timeout_s: float = 300.0  # hang guard for any one event (the first translate update loads the model)
    type: str = "translate_bench_config"


@dataclass(slots=True)
class _Sentence:
    words: list[str]
    first_sent: float = 0.0
    last_sent: float = 0.0
    first_target: float | None = None
    done: float | None = None
    target_words: int = 0


@dataclass(slots=True)
class _Run:
    sentences: list[_Sentence] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


def _progress(msg: str) -> None:
    print(f"[bench translate] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value, 1)


async def _translate_client(url: str, texts: list[str], cfg: TranslateBenchConfig) -> _Run:
    """One live source: the words of ``texts`` at the pace; returns when every sentence is done."""
    run = _Run([_Sentence(t.split()) for t in texts])
    async with DuplexClient(url) as client:
        await client.update_session(**translate_settings(policy=cfg.policy, k=cfg.k))
        while True:
            event = await client.next_event(cfg.timeout_s)
            if event.get("type") == "session.updated":
                break
            if event.get("type") == "error" and event.get("code") not in _NOTICES:
                raise RuntimeError(f"translate mode refused: {event}")

        async def feed() -> None:
            start = time.perf_counter()
            i = 0
            for sentence in run.sentences:
                for j, word in enumerate(sentence.words):
                    await asyncio.sleep(max(0.0, start + i / cfg.words_per_s - time.perf_counter()))
                    now = time.perf_counter()
                    if j == 0:
                        sentence.first_sent = now
                    sentence.last_sent = now
                    await client.send_text(word + " ", final=False)
                    i += 1
            await client.send_text("", final=True)

        feeder = asyncio.create_task(feed())
        turns: dict[int, _Sentence] = {}
        finished = 0
        try:
            while finished < len(run.sentences):
                event = await client.next_event(cfg.timeout_s)
                kind = event.get("type")
                now = time.perf_counter()
                if kind == "response.created":
                    # translations start in source order: the n-th response is the n-th sentence
                    turns[event.get("turn", -1)] = run.sentences[len(turns)]
                elif kind == "response.output_text.delta":
                    sentence = turns.get(event.get("turn", -1))
                    if sentence is not None:
                        sentence.first_target = sentence.first_target or now
                        sentence.target_words += len(str(event.get("delta", "")).split())
                elif kind == "response.done":
                    sentence = turns.get(event.get("turn", -1))
                    if sentence is not None and sentence.done is None:
                        sentence.done = now
                        finished += 1
                elif kind == "error":
                    code = str(event.get("code"))
                    run.errors[code] = run.errors.get(code, 0) + 1
                    if code not in _NOTICES:
                        raise RuntimeError(f"translation failed: {event}")
                elif kind == "connection.closed":
                    raise RuntimeError("the connection closed during the benchmark")
            await feeder
        finally:
            if not feeder.done():
                feeder.cancel()
    return run


async def _level(url: str, n: int, cfg: TranslateBenchConfig, texts: list[str]) -> dict[str, Any]:
    per = cfg.sentences
    sources = [[texts[(i * per + j) % len(texts)] for j in range(per)] for i in range(n)]
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(_translate_client(url, s, cfg) for s in sources))
    wall = time.perf_counter() - t0
    sentences = [s for run in runs for s in run.sentences]
    finish = [1000 * (s.done - s.last_sent) for s in sentences if s.done is not None]
    first = [1000 * (s.first_target - s.first_sent) for s in sentences
             if s.first_target is not None and len(s.words) >= cfg.k]
    third = max(1, per // 3)
    early = [1000 * (s.done - s.last_sent) for run in runs for s in run.sentences[:third] if s.done is not None]
    late = [1000 * (s.done - s.last_sent) for run in runs for s in run.sentences[-third:] if s.done is not None]
    source_words = sum(len(s.words) for s in sentences)
    errors: dict[str, int] = {}
    for run in runs:
        for code, count in run.errors.items():
            errors[code] = errors.get(code, 0) + count
    policy_wait = 1000 * (cfg.k - 1) / cfg.words_per_s if cfg.policy == "wait-k" else None
    first_p50 = _pct(first, 0.5)
    return {
        "sessions": n, "sentences": len(sentences), "source_words": source_words,
        "target_words": sum(s.target_words for s in sentences), "wall_s": round(wall, 1),
        "target_words_per_s": round(sum(s.target_words for s in sentences) / wall, 2),
        "source_words_per_s_offered": round(n * cfg.words_per_s, 2),
        "finish_lag_ms_p50": _pct(finish, 0.5), "finish_lag_ms_p95": _pct(finish, 0.95),
        "finish_lag_ms_max": round(max(finish), 1) if finish else None,
        "first_target_ms_p50": first_p50, "first_target_ms_p95": _pct(first, 0.95),
        "policy_wait_ms": policy_wait,  # the first target word's bound with free compute (wait-k)
        "first_target_over_policy_wait_ms_p50": (round(first_p50 - policy_wait, 1)
                                                 if first_p50 is not None and policy_wait is not None else None),
        "finish_lag_ms_p50_first_third": _pct(early, 0.5), "finish_lag_ms_p50_last_third": _pct(late, 0.5),
        "errors": errors,
    }


async def bench_translate(cfg: TranslateBenchConfig | None = None) -> dict[str, Any]:
    from duplex.eval.runner import git_commit

    cfg = cfg or TranslateBenchConfig()
    texts = [line.strip() for line in cfg.source.read_text(encoding="utf-8").splitlines() if line.strip()]
    load = os.getloadavg()
    out: dict[str, Any] = {
        "benchmark": "translate", "git_commit": git_commit(Path(__file__).parent),
        "measured": "from outside: duplex serve subprocess, typed source words at a speaker's pace over /ws",
        "config": {"sessions": list(cfg.sessions), "sentences_per_session": cfg.sentences,
                   "words_per_s": cfg.words_per_s, "policy": cfg.policy, "k": cfg.k, "source": str(cfg.source),
                   "serve_args": list(cfg.serve_args),
                   "fast_decode": os.environ.get("DUPLEX_FAST_DECODE", "1") != "0"},
        "cpu_count": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load], "levels": [],
    }
    options = ServeOptions(extra_args=cfg.serve_args)
    _progress(f"starting duplex serve {' '.join(cfg.serve_args)}")
    async with serve_process(options) as served:
        _progress("warm-up: one sentence (loads the translation model)")
        await _translate_client(served.url, texts[-1:], cfg)
        for n in cfg.sessions:
            level = await _level(served.url, n, cfg, texts)
            out["levels"].append(level)
            _progress(f"N={n}: finish lag p50/p95 {level['finish_lag_ms_p50']}/{level['finish_lag_ms_p95']} ms, "
                      f"first target p50 {level['first_target_ms_p50']} ms (policy wait {level['policy_wait_ms']}), "
                      f"{level['target_words_per_s']} target words/s")
        health = await asyncio.to_thread(server_health, served.url) or {}
        out["server_code"] = health.get("code") or {}
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def add_translate_bench_args(parser: argparse.ArgumentParser) -> None:
    """``duplex bench translate`` flags (--json, --out and --serve-arg are shared)."""
    g = parser.add_argument_group("translate", "duplex bench translate: N translation sessions typing the test set "
                                               "word by word at a speaker's pace over the socket")
    g.add_argument("--translate-sessions", default="1,2,4", help="concurrency levels, comma-separated")
    g.add_argument("--sentences", type=int, default=10, help="sentences per session")
    g.add_argument("--words-per-s", type=float, default=2.5, help="the source's pace (2.5: 150 words a minute)")
    g.add_argument("--translate-policy", default="wait-k", help="wait-k | local-agreement | retranslate | offline")
    g.add_argument("--k", type=int, default=3, help="wait-k: source words read before the first target word")


def bench_translate_cli(args: argparse.Namespace) -> dict[str, Any]:
    cfg = TranslateBenchConfig(
        sessions=tuple(int(n) for n in str(args.translate_sessions).split(",") if n.strip()),
        sentences=args.sentences, words_per_s=args.words_per_s, policy=args.translate_policy, k=args.k,
        serve_args=tuple(a for item in args.serve_arg or () for a in item.split()))
    result = asyncio.run(bench_translate(cfg))
    for path in {args.out, args.json if isinstance(args.json, str) else None} - {None}:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
