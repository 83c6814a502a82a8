"""``duplex bench bargein``: input that starts a barge-in -> the session's ``interrupted`` event.

Measured on the real default model while it is generating, next to the decode step time from the
same run (the target is p95 <= one decode step + 20 ms: a barge-in waits at most for the step in
flight, never behind queued data).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, TextIO

from duplex.engine.worker import Engine
from duplex.session.events import AsrWord, SpeechStarted, TextInput
from duplex.engine.sampling import SamplingConfig
from duplex.session.core import Session, SessionConfig

__all__ = ["bench_bargein"]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _one_trial(engine: Engine, kind: str, warm_tokens: int = 6) -> tuple[float, list[float]]:
    session = Session(engine, SessionConfig(sampling=SamplingConfig(max_tokens=400)))
    await session.start()
    session.submit(TextInput("Tell me a long story about a lighthouse keeper and a storm."))
    step_times: list[float] = []
    last = None
    t0 = None
    try:
        async for ev in session.events():
            now = time.perf_counter()
            if ev.type == "agent_text_delta":
                if last is not None:
                    step_times.append((now - last) / max(1, ev.token_end - ev.token_start))
                last = now
                if t0 is None and ev.token_end >= warm_tokens:
                    t0 = time.perf_counter()
                    if kind == "text":
                        session.submit(TextInput("Stop, what time is it?"))
                    else:
                        session.submit(SpeechStarted(0.0))
                        session.submit(AsrWord("stop", 0.0, 0.3, True))
            elif ev.type == "interrupted" and t0 is not None:
                return (time.perf_counter() - t0) * 1000, step_times
            elif ev.type == "turn_ended" and ev.speaker == "agent" and t0 is None:  # type: ignore[union-attr]
                break
    finally:
        await session.close()
    raise RuntimeError("the reply ended before the barge-in point; no measurement")


async def bench_bargein(model: str | None = None, device: str = "auto", dtype: str = "auto", trials: int = 20,
                        progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    engine = Engine.load(model, device=device, dtype=dtype)
    try:
        result: dict[str, Any] = {"benchmark": "bargein", "model": engine.lm.name, "device": str(engine.lm.device),
                                  "dtype": str(engine.lm.dtype).replace("torch.", ""), "trials": trials}
        all_steps: list[float] = []
        for kind in ("text", "voice_stop_word"):
            lat = []
            for i in range(trials):
                ms, steps = await _one_trial(engine, "text" if kind == "text" else "voice")
                lat.append(ms)
                all_steps.extend(steps)
                if progress:
                    print(f"[bench] {kind} trial {i + 1}/{trials}: {ms:.1f} ms", file=progress, flush=True)
            result[kind] = {"p50_ms": round(_pct(lat, 0.5), 1), "p95_ms": round(_pct(lat, 0.95), 1),
                            "max_ms": round(max(lat), 1)}
        step = statistics.median(all_steps) * 1000
        result["decode_step_ms"] = round(step, 1)
        result["target_p95_ms"] = round(step + 20, 1)
        result["meets_target"] = all(result[k]["p95_ms"] <= step + 20 for k in ("text", "voice_stop_word"))
        return result
    finally:
        engine.close()
