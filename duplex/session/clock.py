"""Injected clocks: real time for live sessions, a manual clock for tests and offline replay."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "MonotonicClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds, monotonic."""
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """Time moves only when :meth:`advance` / :meth:`advance_to` is called; sleepers wake when their
    deadline passes. Used by tests and by the offline evaluation's virtual timeline."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._t

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._t + max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._t:
            await asyncio.sleep(0)  # still a scheduling point, as a zero-length worker call would be
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((deadline, fut))
        try:
            await fut
        finally:
            self._sleepers = [(d, f) for d, f in self._sleepers if f is not fut]

    @property
    def pending(self) -> int:
        return sum(1 for _, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        deadlines = [d for d, f in self._sleepers if not f.done()]
        return min(deadlines) if deadlines else None

    def advance(self, seconds: float) -> None:
        self.advance_to(self._t + seconds)

    def advance_to(self, t: float) -> None:
        self._t = max(self._t, t)
        for deadline, fut in list(self._sleepers):
            if deadline <= self._t and not fut.done():
                fut.set_result(None)
