"""Virtual time for the simulated clocks: a clock that only the driver moves, the pipeline's
worker stages as executors on that clock, and an engine adapter that runs model calls on one.

``ideal`` charges nothing: a model call finishes at the moment it was asked for, which isolates
the policy from the hardware and makes runs repeatable. ``replay-measured`` charges each call its
measured wall time: the stage is busy that long, and calls queue behind each other as on the real
single worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from duplex.engine.models import LoadedModel
from duplex.engine.sequence import SequenceConfig, SharedSequence, Speaker, Status
from duplex.engine.template import TurnTemplate
from duplex.session.clock import ManualClock

__all__ = ["CLOCK_MODES", "StageExecutor", "VirtualClock", "VirtualEngine"]

T = TypeVar("T")
CLOCK_MODES = ("ideal", "replay-measured")  # simulated clocks; ``duplex eval run`` adds "measured" (served)


class VirtualClock(ManualClock):
    """The evaluation's timeline: the shared manual clock plus timers (:meth:`call_at`) for work
    that finishes in virtual time."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__(start)
        self._timers: list[tuple[float, Callable[[], None]]] = []

    def call_at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the clock reaches ``t`` (at once if it has)."""
        if t <= self.now():
            fn()
        else:
            self._timers.append((t, fn))

    @property
    def pending(self) -> int:
        return super().pending + len(self._timers)

    def next_deadline(self) -> float | None:
        deadlines = [d for d, _ in self._timers]
        own = super().next_deadline()
        if own is not None:
            deadlines.append(own)
        return min(deadlines) if deadlines else None

    def advance_to(self, t: float) -> None:
        due = sorted((x for x in self._timers if x[0] <= t), key=lambda x: x[0])
        self._timers = [x for x in self._timers if x[0] > t]
        super().advance_to(t)
        for _, fn in due:
            fn()


class StageExecutor(Executor):
    """One worker stage (engine, whisper, turn features, TTS) on the virtual timeline.

    A job runs inline when it is submitted, on the event loop's thread, so the whole pipeline is
    single-threaded and repeatable; its future completes when the stage would have finished it:
    at once (ideal), or after its measured compute, queued behind the stage's earlier jobs."""

    def __init__(self, clock: VirtualClock, measured: bool = False) -> None:
        self.clock = clock
        self.measured = measured
        self.busy_until = 0.0
        self.compute_s = 0.0
        self.calls = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()
        fut.set_running_or_notify_cancel()
        t0 = time.perf_counter()
        try:
            result, error = fn(*args, **kwargs), None
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter, as a thread pool would
            result, error = None, exc
        dt = time.perf_counter() - t0
        self.compute_s += dt
        self.calls += 1
        self.busy_until = max(self.clock.now(), self.busy_until) + (dt if self.measured else 0.0)

        def finish() -> None:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)  # type: ignore[arg-type]

        self.clock.call_at(self.busy_until, finish)
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to release: there is no thread."""


class VirtualEngine:
    """Duck-types :class:`duplex.engine.worker.Engine` for the session (``run``, ``run_for``,
    ``run_urgent``, ``decode``, ``prefill``): the same sequence calls, run by a :class:`StageExecutor` instead of
    the engine's scheduler thread."""

    def __init__(self, lm: LoadedModel, stage: StageExecutor, template: TurnTemplate | None = None) -> None:
        self.lm = lm
        self.template = template or TurnTemplate.from_tokenizer(lm.tokenizer)
        self.stage = stage

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    def new_sequence(self, config: SequenceConfig | None = None) -> SharedSequence:
        return SharedSequence(self.lm, self.template, config)

    async def start_sequence(self, system_prompt: str | None = None,
                             config: SequenceConfig | None = None) -> SharedSequence:
        seq = SharedSequence(self.lm, self.template, config)
        if system_prompt:
            await self.run(seq.add_message, Speaker.SYSTEM, system_prompt)
        return seq

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.stage.submit(fn, *args, **kwargs))

    async def run_for(self, seq: SharedSequence | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One stage runs everything in submission order, so every sequence's calls stay in order."""
        return await self.run(fn, *args, **kwargs)

    async def run_urgent(self, seq: SharedSequence | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One stage has no other sessions to go ahead of: as :meth:`run_for`."""
        return await self.run(fn, *args, **kwargs)

    async def decode(self, seq: SharedSequence, sampler: Any, status: Status = Status.UNSPOKEN) -> int:
        return await self.run(seq.step, sampler, status)

    async def prefill(self, seq: SharedSequence, ids: Sequence[int], status: Status = Status.COMMITTED) -> None:
        await self.run(seq.append, list(ids), status)

    def close(self) -> None:
        """Nothing to release: there is no worker thread."""
