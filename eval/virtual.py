"""Virtual time for offline replay: a clock that only the replay driver moves, and an engine
adapter that runs model calls inline and charges their compute to that clock.

``measured`` mode charges each call its measured wall time (the worker is busy that long, and
calls queue behind each other as on the real single device worker); ``ideal`` charges nothing,
which isolates the policy from the hardware and makes replays bit-identical.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from duplex.models import LoadedModel
from duplex.sequence import SequenceConfig, SharedSequence, Speaker
from duplex.template import TurnTemplate

__all__ = ["CLOCK_MODES", "StageTimer", "VirtualClock", "VirtualEngine"]

T = TypeVar("T")
CLOCK_MODES = ("ideal", "measured")


class VirtualClock:
    """The ``Clock`` protocol on virtual seconds; sleepers wake in :meth:`advance_to`."""

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

    def advance_to(self, t: float) -> None:
        self._t = max(self._t, t)
        for deadline, fut in list(self._sleepers):
            if deadline <= self._t and not fut.done():
                fut.set_result(None)


class StageTimer:
    """One pipeline stage as a single worker on the virtual timeline: a job submitted at ``t``
    starts when the worker is free and finishes its (measured or zero) compute time later."""

    def __init__(self, measured: bool) -> None:
        self.measured = measured
        self.busy_until = 0.0
        self.compute_s = 0.0
        self.calls = 0

    def run(self, t: float, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        """Run ``fn`` now (wall time); return its result and the virtual time it is ready."""
        t0 = time.perf_counter()
        result = fn(*args)
        dt = time.perf_counter() - t0
        self.compute_s += dt
        self.calls += 1
        start = max(t, self.busy_until)
        self.busy_until = start + (dt if self.measured else 0.0)
        return result, self.busy_until


class VirtualEngine:
    """Duck-types :class:`duplex.engine.Engine` for a :class:`~duplex.session.Session`: the same
    sequence calls, run inline on the caller's thread, finishing on the virtual clock."""

    def __init__(self, lm: LoadedModel, clock: VirtualClock, measured: bool,
                 template: TurnTemplate | None = None) -> None:
        self.lm = lm
        self.template = template or TurnTemplate.from_tokenizer(lm.tokenizer)
        self.clock = clock
        self.stage = StageTimer(measured)

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def calls(self) -> int:
        return self.stage.calls

    def new_sequence(self, config: SequenceConfig | None = None) -> SharedSequence:
        return SharedSequence(self.lm, self.template, config)

    async def start_sequence(self, system_prompt: str | None = None,
                             config: SequenceConfig | None = None) -> SharedSequence:
        seq = SharedSequence(self.lm, self.template, config)
        if system_prompt:
            await self.run(seq.add_message, Speaker.SYSTEM, system_prompt)
        return seq

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result, ready = self.stage.run(self.clock.now(), lambda: fn(*args, **kwargs))
        await self.clock.sleep_until(ready)
        return result

    def close(self) -> None:
        """Nothing to release: there is no worker thread."""
