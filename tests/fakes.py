"""Test helpers shared by several test modules: event waiting with hang guards (not timing
checks) and a synthetic speech-like WAV."""

from __future__ import annotations

import asyncio
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["collect_until", "settle", "tone_wav"]


async def collect_until(session: Any, pred: Callable[[Any], bool], timeout: float = 30.0) -> list[Any]:
    """Read session events until ``pred(event)``; returns all events read (the last one matched).
    The timeout only guards against hangs."""
    seen: list[Any] = []

    async def run() -> None:
        async for ev in session.events():
            seen.append(ev)
            if pred(ev):
                return
        raise AssertionError(f"event stream ended; saw {[e.type for e in seen]}")

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError as exc:
        raise AssertionError(f"no matching event; saw {[e.type for e in seen][-20:]}") from exc
    return seen


async def settle(session: Any, rounds: int = 20) -> list[Any]:
    """Let the session loop run briefly, and return whatever it emitted."""
    out = []
    for _ in range(rounds):
        await asyncio.sleep(0.01)
        while (ev := session.get_nowait()) is not None:
            out.append(ev)
    return out


def tone_wav(path: Path, seconds: float, sample_rate_hz: int = 16_000) -> None:
    """A 220 Hz tone as a PCM16 WAV: loud enough for the energy VAD, one fake word per 0.25 s."""
    n = int(seconds * sample_rate_hz)
    pcm = (np.sin(np.arange(n) * 2 * np.pi * 220 / sample_rate_hz) * 0.3 * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate_hz)
        w.writeframes(pcm.tobytes())
