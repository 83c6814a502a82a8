"""``duplex bench server``: N concurrent text sessions against an in-process server (TTS off).

Per N in (1, 2, 4, 8): every client sends a question at the same moment and reads its streamed
reply. TTFT = send -> first ``response.output_text.delta``; tokens/s per session = agent tokens /
(first delta -> ``response.done``). The baseline in the same run is the engine decoding one
sequence directly (no sockets, no session), so the ratio shows what serving costs.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
from typing import Any

from duplex.serving.client import DuplexClient
from duplex.engine.worker import Engine
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import Speaker
from duplex.serving.server import DuplexServer
from duplex.session.core import SessionConfig

__all__ = ["bench_server"]

log = logging.getLogger(__name__)

QUESTIONS = [
    "What is the capital of France?", "Name three colors of the rainbow.", "How many legs does a spider have?",
    "What do bees make?", "Why is the sky blue?", "What is two plus two?", "Who wrote Hamlet?",
    "What is the largest ocean?",
]
CONCURRENCY = (1, 2, 4, 8)


def _progress(msg: str) -> None:
    print(f"[bench server] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _decode_baseline(engine: Engine, tokens: int) -> dict[str, float]:
    """One sequence, greedy, on the engine worker's thread settings: ms/token of bare decode."""
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


async def _one(url: str, question: str, start: asyncio.Event, ready: list[int]) -> dict[str, float]:
    async with DuplexClient(url) as client:
        ready.append(1)
        await start.wait()
        t_send = time.perf_counter()
        await client.send_text(question)
        t_first: float | None = None
        n_tokens = 0
        async for ev in client.events():
            if ev["type"] == "response.output_text.delta":
                if t_first is None:
                    t_first = time.perf_counter()
                n_tokens = max(n_tokens, int(ev["token_end"]))
            elif ev["type"] == "response.done":
                t_done = time.perf_counter()
                break
            elif ev["type"] == "connection.closed":
                raise RuntimeError("connection closed during the benchmark")
        assert t_first is not None
        decode_s = max(1e-9, t_done - t_first)
        return {"ttft_ms": (t_first - t_send) * 1000, "tokens": n_tokens,
                "tokens_per_s": (n_tokens - 1) / decode_s if n_tokens > 1 else 0.0}


async def bench_server(model: str | None = None, max_tokens: int = 48, rounds: int = 1,
                       concurrency: tuple[int, ...] = CONCURRENCY) -> dict[str, Any]:
    """Start a server on the default (or given) model, run the concurrency sweep, return JSON."""
    _progress(f"loading model {model or 'default'}")
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, Engine.load, model)
    config = SessionConfig(policy="silence", sampling=SamplingConfig(temperature=0.0, max_tokens=max_tokens))
    server = DuplexServer(engine, config=config)
    await server.start("127.0.0.1", 0)
    results: dict[str, Any] = {
        "benchmark": "server", "model": model or "default", "device": str(engine.lm.device),
        "max_reply_tokens": max_tokens, "rounds": rounds, "levels": [],
    }
    try:
        _progress("single-sequence decode baseline")
        results["decode_baseline"] = await engine.run(_decode_baseline, engine, max_tokens)
        _progress(f"baseline {results['decode_baseline']['ms_per_token']} ms/token")
        # warm-up: one full round trip (first-call overheads out of the numbers)
        await _one(server.ws_url(), QUESTIONS[0], _set(asyncio.Event()), [])
        for n in concurrency:
            samples: list[dict[str, float]] = []
            t0 = time.perf_counter()
            for _ in range(rounds):
                start = asyncio.Event()
                ready: list[int] = []
                tasks = [asyncio.ensure_future(_one(server.ws_url(), QUESTIONS[i % len(QUESTIONS)], start, ready))
                         for i in range(n)]
                while len(ready) < n:  # everyone connected before the starting gun
                    await asyncio.sleep(0.01)
                start.set()
                samples += await asyncio.gather(*tasks)
            ttft = [s["ttft_ms"] for s in samples]
            tps = [s["tokens_per_s"] for s in samples]
            level = {
                "sessions": n, "ttft_ms_p50": round(_pct(ttft, 0.5), 1), "ttft_ms_p95": round(_pct(ttft, 0.95), 1),
                "tokens_per_s_per_session_mean": round(statistics.fmean(tps), 2),
                "tokens_per_s_per_session_min": round(min(tps), 2),
                "aggregate_tokens_per_s": round(sum(s["tokens"] for s in samples) / (time.perf_counter() - t0), 2),
                "reply_tokens_mean": round(statistics.fmean(s["tokens"] for s in samples), 1),
            }
            level["per_session_vs_baseline"] = round(
                level["tokens_per_s_per_session_mean"] / results["decode_baseline"]["tokens_per_s"], 3)
            results["levels"].append(level)
            _progress(f"N={n}: TTFT p50 {level['ttft_ms_p50']} ms p95 {level['ttft_ms_p95']} ms, "
                      f"{level['tokens_per_s_per_session_mean']} tok/s/session")
    finally:
        await server.close()
        engine.close()
    return results


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event
