"""``duplex bench server``: N concurrent text sessions against ``duplex serve``, measured from outside.

The server is the product itself, ``duplex serve`` started as a subprocess (its own process, event
loop and GIL; the clients here never share them), once per serve configuration and scheduler mode:

- ``voice``: ``duplex serve``'s defaults, ASR and TTS loaded (what a user runs), answering text
  sessions: its LLM has half the cores while a speech stage runs and borrows the rest otherwise
  (``duplex.cpu``); its decode baseline runs at that half;
- ``text``: ``--asr-model none --tts none``, the LLM on every core.

Per N (default 1, 2, 4, 8, 16) every client sends a question at the same moment and reads its
streamed reply: TTFT = send -> first ``response.output_text.delta``; inter-token = the gap between
deltas spread over the tokens they carry (deltas are word-buffered); aggregate tokens/s = all
reply tokens / the round's wall time; RSS of the server process; decode rows per tick from its
``/healthz`` counters. Then the prefill case: ``prefill_talkers`` sessions keep talking while one
more session sends ``prefill_kb`` of instructions; their inter-token p95 during that prefill is
compared with the same talkers idle. Each scheduler mode (``batched``, ``chunked``, ``fifo`` = the
old single worker) runs in the same run, so the modes compare on equal footing. A single-sequence
decode in this process, without sockets, at each configuration's LLM threads, is the baseline for
what serving costs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duplex.bench.servers import (
    ServeOptions,
    read_rss_kib,
    serve_process,
    server_health,
)
from duplex.cpu import llm_threads
from duplex.engine.models import load_model
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import Speaker
from duplex.engine.worker import Engine
from duplex.serving.client import DuplexClient

__all__ = ["SERVE_CONFIGS", "ServerBenchConfig", "add_server_bench_args", "bench_server", "bench_server_cli",
           "plot_server"]

# serve configuration -> (extra ``duplex serve`` flags, text-only: its LLM's threads are every core)
SERVE_CONFIGS: dict[str, tuple[tuple[str, ...], bool]] = {
    "voice": ((), False),  # the defaults: what `duplex serve` runs
    "text": (("--asr-model", "none", "--tts", "none"), True),
}

QUESTIONS = [
    "Tell me a story about a dragon who learns to cook.", "Explain how a bicycle works, step by step.",
    "Describe your ideal weekend in detail.", "Why is the sky blue? Explain it to a child.",
    "Write a short poem about the sea and the wind.", "What should I pack for a week of hiking?",
    "Explain what a computer does when it starts.", "Describe a busy market in the morning.",
]
_FILLER = ("The committee reviewed the quarterly report, noted the rising costs of shipping, and asked the "
           "team to prepare a plan that keeps the schedule while reducing waste in every department. ")


@dataclass(frozen=True, slots=True)
class ServerBenchConfig:
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = "auto"
    sessions: tuple[int, ...] = (1, 2, 4, 8, 16)
    max_tokens: int = 64
    rounds: int = 1
    schedulers: tuple[str, ...] = ("batched", "fifo")
    serve_configs: tuple[str, ...] = ("voice", "text")
    prefill_kb: float = 100.0  # 0: skip the prefill case
    prefill_talkers: int = 4
    prefill_idle_s: float = 8.0  # the talkers' idle baseline: this long, talking as during the prefill
    type: str = "server_bench_config"

    def __post_init__(self) -> None:
        unknown = [c for c in self.serve_configs if c not in SERVE_CONFIGS]
        if unknown:
            raise ValueError(f"unknown serve configuration {unknown[0]!r}; choose from {', '.join(SERVE_CONFIGS)}")


def _progress(msg: str) -> None:
    print(f"[bench server] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def _client(url: str, max_tokens: int) -> DuplexClient:
    """A connected client whose replies are greedy and at most ``max_tokens`` long."""
    client = DuplexClient(url)
    await client.connect()
    await client.update_session(temperature=0.0, max_output_tokens=max_tokens)
    await client.wait_for("session.updated", timeout=60)
    return client


def _decode_baseline(engine: Engine, tokens: int) -> dict[str, float]:
    """One sequence, greedy, no sockets and no session: ms/token of bare decode (on the scheduler)."""
    seq = engine.new_sequence()
    seq.add_message(Speaker.SYSTEM, "You are a helpful assistant. Keep your answers short.")
    seq.add_message(Speaker.USER, QUESTIONS[0])
    seq.hand_over(Speaker.AGENT)
    sampler = Sampler(SamplingConfig(temperature=0.0, max_tokens=tokens))
    seq.step(sampler)  # warm-up
    t0 = time.perf_counter()
    for _ in range(tokens):
        seq.step(sampler)
    ms = (time.perf_counter() - t0) * 1000 / tokens
    return {"ms_per_token": round(ms, 2), "tokens_per_s": round(1000 / ms, 2), "tokens": tokens}


def _typed_turn(seq: Any, ids: list[int], sampler: Sampler) -> float:
    """A typed question's path to its first word, as a session runs it: the words, the user
    footer and the agent header in one forward, the first token, and the step after it (a word is
    complete once the next token starts another). Returns when it finished (perf_counter)."""
    seq.append_and_hand_over(ids, Speaker.AGENT, open_as=Speaker.USER)
    seq.append_and_sample(seq.sample(sampler), sampler)
    return time.perf_counter()


async def _burst_floor(engine: Engine, n: int, rounds: int) -> dict[str, Any]:
    """``n`` questions at once in this process, without sockets, event loops or sessions: each
    sequence's hand-over and first step is one job, all submitted together, so one tick takes every
    question. The slowest job's time is what the engine alone needs before the last of ``n``
    lockstep clients can see its first word: the floor of TTFT at N."""
    from duplex.session.config import DEFAULT_INSTRUCTIONS

    sampler = Sampler(SamplingConfig(temperature=0.0, max_tokens=1 << 20))
    seqs = [engine.new_sequence() for _ in range(n)]
    await asyncio.gather(*(engine.run_for(s, s.add_message, Speaker.SYSTEM, DEFAULT_INSTRUCTIONS) for s in seqs))
    floors: list[float] = []
    for r in range(rounds + 1):  # round 0 warms up
        ids = [engine.tokenizer.encode(QUESTIONS[(i + r) % len(QUESTIONS)], add_special_tokens=False)
               for i in range(n)]
        t0 = time.perf_counter()
        done = await asyncio.gather(*(engine.run_for(s, _typed_turn, s, q, sampler) for s, q in zip(seqs, ids)))
        if r:
            floors.append(1000 * (max(done) - t0))
        await asyncio.gather(*(engine.run_for(s, s.end_turn, Speaker.AGENT) for s in seqs))
    return {"sessions": n, "ms_p50": round(_pct(floors, 0.5), 1), "ms_max": round(max(floors), 1),
            "rounds": rounds}


@dataclass(slots=True)
class _Reply:
    t_send: float
    t_first: float | None = None
    t_done: float | None = None
    tokens: int = 0
    gaps: list[tuple[float, float, float]] = field(default_factory=list)  # (t_prev, t, per-token interval s)


async def _ask(client: DuplexClient, question: str) -> _Reply:
    reply = _Reply(time.perf_counter())
    await client.send_text(question)
    t_last: float | None = None
    async for ev in client.events():
        if ev["type"] == "response.output_text.delta":
            now = time.perf_counter()
            end = int(ev["token_end"])
            if reply.t_first is None:
                reply.t_first = now
            elif end > reply.tokens and t_last is not None:
                per = (now - t_last) / (end - reply.tokens)
                reply.gaps += [(t_last, now, per)] * (end - reply.tokens)
            t_last = now
            reply.tokens = max(reply.tokens, end)
        elif ev["type"] == "response.done":
            reply.t_done = time.perf_counter()
            return reply
        elif ev["type"] in ("connection.closed", "error"):
            raise RuntimeError(f"benchmark session failed: {ev}")
    raise RuntimeError("connection ended during the benchmark")


async def _level(url: str, n: int, rounds: int, max_tokens: int, pid: int) -> dict[str, Any]:
    clients = list(await asyncio.gather(*(_client(url, max_tokens) for _ in range(n))))
    before = await asyncio.to_thread(server_health, url) or {}
    try:
        replies: list[_Reply] = []
        t0 = time.perf_counter()
        for r in range(rounds):
            replies += await asyncio.gather(*(_ask(c, QUESTIONS[(i + r) % len(QUESTIONS)])
                                              for i, c in enumerate(clients)))
        wall = time.perf_counter() - t0
        rss = (read_rss_kib(pid) or 0) / 1024
        after = await asyncio.to_thread(server_health, url) or {}
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    ttft = [1000 * (r.t_first - r.t_send) for r in replies if r.t_first is not None]
    gaps = [1000 * g for r in replies for _, _, g in r.gaps]
    tokens = sum(r.tokens for r in replies)
    return {
        "sessions": n, "replies": len(replies), "reply_tokens_mean": round(tokens / len(replies), 1),
        "aggregate_tokens_per_s": round(tokens / wall, 2),
        "ttft_ms_p50": round(_pct(ttft, 0.5), 1), "ttft_ms_p95": round(_pct(ttft, 0.95), 1),
        "inter_token_ms_p50": round(_pct(gaps, 0.5), 1), "inter_token_ms_p95": round(_pct(gaps, 0.95), 1),
        "server_rss_mib": round(rss, 1), "decode_rows_per_tick": _rows_per_tick(before, after),
        "server_kernels": after.get("kernels") or {},  # what ran the forwards (Engine.describe)
        "server_code": after.get("code") or {},  # which code served (its package and commit)
    }


def _rows_per_tick(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Decode rows per engine tick between two ``/healthz`` readings (None: no ticks, or fifo)."""
    b, a = before.get("engine") or {}, after.get("engine") or {}
    ticks = a.get("ticks", 0) - b.get("ticks", 0)
    return round((a.get("decode_rows", 0) - b.get("decode_rows", 0)) / ticks, 2) if ticks > 0 else None


async def _talk_until(client: DuplexClient, stop: asyncio.Event, replies: list[_Reply], offset: int) -> None:
    i = offset
    while not stop.is_set():
        replies.append(await _ask(client, QUESTIONS[i % len(QUESTIONS)]))
        i += 1


async def _prefill_case(url: str, talkers: int, kb: float, max_tokens: int, idle_replies: int = 2,
                        idle_s: float = 8.0) -> dict[str, Any]:
    """Talkers' inter-token p95 with nothing else going on, then while one more session's
    ``kb`` KB instructions update is prefilled.

    The idle baseline is the talkers talking exactly as they do during the prefill (each asks
    again as soon as its reply ends, for ``idle_s``): their turns then start at different
    moments, and a tick that carries one talker's question is in the others' inter-token gaps,
    with or without the prefill. The lockstep figure (all ask together, ``idle_replies`` times:
    no question ever lands mid-reply) is kept as ``lockstep_idle_*`` for comparison."""
    clients = list(await asyncio.gather(*(_client(url, max_tokens) for _ in range(talkers))))
    big = await _client(url, max_tokens)
    try:
        lockstep: list[_Reply] = []
        for r in range(idle_replies):
            lockstep += await asyncio.gather(*(_ask(c, QUESTIONS[(i + r) % len(QUESTIONS)])
                                               for i, c in enumerate(clients)))
        stop = asyncio.Event()
        idle: list[_Reply] = []
        talking = [asyncio.ensure_future(_talk_until(c, stop, idle, i)) for i, c in enumerate(clients)]
        await asyncio.sleep(idle_s)
        stop.set()
        await asyncio.gather(*talking)
        text = (_FILLER * (int(kb * 1024) // len(_FILLER) + 1))[:int(kb * 1024)]
        stop = asyncio.Event()
        busy: list[_Reply] = []
        talking = [asyncio.ensure_future(_talk_until(c, stop, busy, i)) for i, c in enumerate(clients)]
        await asyncio.sleep(0.5)  # the talkers are decoding when the update arrives
        t_update = time.perf_counter()
        await big.update_session(instructions=text)
        ev = await big.wait_for("session.instructions_updated", "error", timeout=1800)
        while ev["type"] == "session.instructions_updated" and ev.get("status") == "pending":
            ev = await big.wait_for("session.instructions_updated", "error", timeout=1800)
        t_applied = time.perf_counter()
        stop.set()
        await asyncio.gather(*talking)
        if ev["type"] == "error":
            raise RuntimeError(f"instructions update failed: {ev}")
    finally:
        await asyncio.gather(*(c.close() for c in [*clients, big]), return_exceptions=True)
    idle_gaps = [1000 * g for r in idle for _, _, g in r.gaps]
    lockstep_gaps = [1000 * g for r in lockstep for _, _, g in r.gaps]
    # gaps that overlap the prefill (one that spans all of it, as the old single worker makes, counts)
    during = [1000 * g for r in busy for t0, t1, g in r.gaps if t1 >= t_update and t0 <= t_applied]
    p95_idle, p95_busy = _pct(idle_gaps, 0.95), _pct(during, 0.95)
    return {
        "talkers": talkers, "instructions_kb": kb, "instructions_chars": len(text),
        "prefill_s": round(t_applied - t_update, 2),
        "idle_inter_token_ms_p50": round(_pct(idle_gaps, 0.5), 1), "idle_inter_token_ms_p95": round(p95_idle, 1),
        "idle_tokens": len(idle_gaps),
        "lockstep_idle_inter_token_ms_p50": round(_pct(lockstep_gaps, 0.5), 1),
        "lockstep_idle_inter_token_ms_p95": round(_pct(lockstep_gaps, 0.95), 1),
        "during_inter_token_ms_p50": round(_pct(during, 0.5), 1) if during else None,
        "during_inter_token_ms_p95": round(p95_busy, 1) if during else None,
        "during_inter_token_ms_max": round(max(during), 1) if during else None,
        "during_tokens": len(during), "p95_ratio": round(p95_busy / p95_idle, 2) if during else None,
    }


def _serve_options(cfg: ServerBenchConfig, serve: str, mode: str) -> ServeOptions:
    """``duplex serve`` in configuration ``serve`` with scheduler ``mode``, room for every client,
    and (for the prefill case) for ``prefill_kb`` of instructions."""
    flags, _ = SERVE_CONFIGS[serve]
    chars = max(8_000, int(cfg.prefill_kb * 1024) + 1)
    # the instructions' tokens must fit a quarter of the context window (instructions_token_limit)
    window = max(4096, 4 * (chars // 3 + 64))
    sessions = max((*cfg.sessions, 1)) + cfg.prefill_talkers + 8
    return ServeOptions(model=cfg.model, device=cfg.device, dtype=cfg.dtype,
                        quantize="none" if cfg.quantize is None else cfg.quantize,
                        extra_args=(*flags, "--scheduler", mode, "--max-sessions", str(sessions),
                                    "--max-instructions-chars", str(chars), "--context-tokens", str(window)))


async def _one_mode(cfg: ServerBenchConfig, serve: str, mode: str) -> dict[str, Any]:
    options = _serve_options(cfg, serve, mode)
    out: dict[str, Any] = {"serve": serve, "scheduler": mode, "serve_flags": list(options.extra_args), "levels": []}
    tag = f"{serve}/{mode}"
    _progress(f"[{tag}] starting duplex serve {' '.join(options.extra_args)}")
    async with serve_process(options) as served:
        url = served.url
        await _level(url, 1, 1, cfg.max_tokens, served.pid)  # warm-up: first-call overheads out of the numbers
        for n in cfg.sessions:
            level = await _level(url, n, cfg.rounds, cfg.max_tokens, served.pid)
            out["levels"].append(level)
            _progress(f"[{tag}] N={n}: {level['aggregate_tokens_per_s']} tok/s, TTFT p95 {level['ttft_ms_p95']} ms, "
                      f"inter-token p50/p95 {level['inter_token_ms_p50']}/{level['inter_token_ms_p95']} ms")
        if cfg.prefill_kb > 0:
            out["prefill"] = await _prefill_case(url, cfg.prefill_talkers, cfg.prefill_kb, cfg.max_tokens,
                                                idle_s=cfg.prefill_idle_s)
            _progress(f"[{tag}] prefill {cfg.prefill_kb} KB: {out['prefill']}")
    return out


def _targets(mode: dict[str, Any], floors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    by_n = {lv["sessions"]: lv for lv in mode["levels"]}
    floor = {f["sessions"]: f for f in floors or ()}
    out: dict[str, Any] = {}
    if 1 in by_n and 8 in by_n:
        tps = by_n[8]["aggregate_tokens_per_s"] / by_n[1]["aggregate_tokens_per_s"]
        ttft = by_n[8]["ttft_ms_p95"] / by_n[1]["ttft_ms_p95"]
        out.update(tokens_per_s_n8_over_n1=round(tps, 2), tokens_per_s_target_met=tps >= 3.0,
                   ttft_p95_n8_over_n1=round(ttft, 2), ttft_target_met=ttft <= 2.0)
        if 8 in floor:
            # the engine alone needs floor[8] (its median over the rounds: a floor is not a slow
            # spell of the host) for eight lockstep questions: above 2x N=1's TTFT, no scheduling
            # meets the TTFT target here; the served N=8 p95 against it is what sockets, event
            # loop and sessions add
            out.update(ttft_floor_n8_ms=floor[8]["ms_p50"],
                       ttft_floor_n8_over_n1_p95=round(floor[8]["ms_p50"] / by_n[1]["ttft_ms_p95"], 2),
                       ttft_p95_n8_over_floor=round(by_n[8]["ttft_ms_p95"] / floor[8]["ms_p50"], 2))
    if mode.get("prefill") and mode["prefill"]["p95_ratio"] is not None:
        out.update(prefill_p95_ratio=mode["prefill"]["p95_ratio"], prefill_target_met=mode["prefill"]["p95_ratio"] <= 2.0)
    return out


async def bench_server(cfg: ServerBenchConfig | None = None) -> dict[str, Any]:
    """The decode baselines in this process, then every (serve configuration, scheduler mode)
    against its own ``duplex serve``; returns JSON."""
    cfg = cfg or ServerBenchConfig()
    _progress(f"loading model {cfg.model or 'default'} for the decode baseline")
    loop = asyncio.get_running_loop()
    lm = await loop.run_in_executor(None, lambda: load_model(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                                                quantize=cfg.quantize))
    from duplex.eval.runner import git_commit

    load = os.getloadavg()
    results: dict[str, Any] = {
        "benchmark": "server", "git_commit": git_commit(Path(__file__).parent), "model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
        "quantization": lm.quantization, "cpu_count": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load],
        "max_reply_tokens": cfg.max_tokens, "rounds": cfg.rounds, "measured": "from outside: duplex serve subprocess",
        "modes": [],
    }
    baselines: dict[str, dict[str, Any]] = {}
    for serve in cfg.serve_configs:
        threads = llm_threads(text_only=SERVE_CONFIGS[serve][1])
        engine = Engine(lm, threads=threads, borrow_cores=False)  # exactly `threads`: the share it names
        try:
            baselines[serve] = {**await engine.run(_decode_baseline, engine, cfg.max_tokens), "threads": threads}
        finally:
            engine.close()
        _progress(f"[{serve}] decode baseline {baselines[serve]['ms_per_token']} ms/token at {threads} thread(s)")
    # the floor of TTFT under lockstep load: the engine alone, at every core (as either serve
    # configuration's LLM runs while no speech stage does)
    floor_threads = os.cpu_count() or 1
    engine = Engine(lm, threads=floor_threads, borrow_cores=False)
    try:
        floors = [await _burst_floor(engine, n, max(cfg.rounds, 5)) for n in cfg.sessions]
    finally:
        engine.close()
    results["ttft_floor"] = {
        "what": "N typed questions at once in the bench process (no sockets, event loops or sessions): the "
                "time until the last one's first word (hand-over forward + one decode step), all in one "
                "batched tick each; TTFT at N in lockstep cannot be lower",
        "threads": floor_threads, "levels": floors}
    _progress("TTFT floor (engine alone, median of rounds): " + ", ".join(f"N={f['sessions']} {f['ms_p50']} ms" for f in floors))
    del lm, engine
    gc.collect()  # the servers load their own copy
    for serve in cfg.serve_configs:
        for mode in cfg.schedulers:
            result = await _one_mode(cfg, serve, mode)
            result["decode_baseline"] = baselines[serve]
            result["targets"] = _targets(result, results["ttft_floor"]["levels"])
            results["modes"].append(result)
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def plot_server(results: dict[str, Any], path: Path) -> Path:
    """Aggregate tokens/s, TTFT p95 and inter-token p95 against N, one line per scheduler mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=110)
    for mode in results["modes"]:
        ns = [lv["sessions"] for lv in mode["levels"]]
        for ax, key in zip(axes, ("aggregate_tokens_per_s", "ttft_ms_p95", "inter_token_ms_p95")):
            ax.plot(ns, [lv[key] for lv in mode["levels"]], marker="o", label=f"{mode['serve']}/{mode['scheduler']}")
    for ax, title in zip(axes, ("aggregate tokens/s", "TTFT p95 (ms)", "inter-token p95 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"duplex bench server: {results['model']} {results['dtype']} on {results['device']}, "
                 f"{results['cpu_count']} CPUs, load {results['loadavg_before'][0]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def add_server_bench_args(parser: argparse.ArgumentParser) -> None:
    """``duplex bench server`` flags (the model flags and --tokens, --json, --out are shared)."""
    g = parser.add_argument_group("server", "duplex bench server: N concurrent text sessions over the socket; "
                                            "--json FILE / --out FILE also write the JSON there and a PNG plot next to it")
    g.add_argument("--sessions", default="1,2,4,8,16", help="concurrency levels, comma-separated")
    g.add_argument("--scheduler", default="batched,fifo",
                   help="engine scheduler modes to compare in the same run: batched, chunked, fifo (the old worker)")
    g.add_argument("--serve-config", default="voice,text",
                   help="duplex serve configurations, comma-separated: voice (the defaults: ASR and TTS loaded, "
                        "the LLM on half the cores while a speech stage runs), text (--asr-model none --tts none)")
    g.add_argument("--prefill-kb", type=float, default=100.0,
                   help="instructions size for the prefill-while-others-decode case (0: skip it)")
    g.add_argument("--prefill-talkers", type=int, default=4)
    g.add_argument("--rounds", type=int, default=1, help="questions per session per level")


def bench_server_cli(args: argparse.Namespace) -> dict[str, Any]:
    cfg = ServerBenchConfig(
        model=args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
        sessions=tuple(int(n) for n in str(args.sessions).split(",") if n.strip()), max_tokens=args.tokens,
        rounds=args.rounds, schedulers=tuple(m.strip() for m in str(args.scheduler).split(",") if m.strip()),
        serve_configs=tuple(c.strip() for c in str(args.serve_config).split(",") if c.strip()),
        prefill_kb=args.prefill_kb, prefill_talkers=args.prefill_talkers,
    )
    result = asyncio.run(bench_server(cfg))
    for out in {args.out, args.json if isinstance(args.json, str) else None} - {None}:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        plot_server(result, path.with_suffix(".png"))
    return result
