"""Test helpers shared by session-level tests: event waiting with hang guards (not timing checks)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["collect_until", "settle"]


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
