"""What the engine scheduler queues and records: jobs in lanes, forward requests, tick records.

Kept apart from :mod:`duplex.engine.scheduler` (which decides what each tick runs) so that the
records tests and ``/healthz`` read, and the :class:`TickStep` protocol a decode step implements,
can be read without the scheduling itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = ["Direct", "Job", "Request", "RowRecord", "SchedulerStats", "TickRecord", "TickStep"]

Direct = Callable[[list[int], int, int], torch.Tensor]


@dataclass(frozen=True, slots=True)
class RowRecord:
    """One row of a tick. ``waited_ticks``: ticks begun between its request and this row (a
    decode row waits at most for the one tick already running when it arrived, and one express
    tick: 0 to 2). ``urgent``: on the path to a reply's first words."""

    owner: int  # id() of the sequence
    tokens: int
    start_pos: int
    decode: bool
    waited_ticks: int
    urgent: bool = False
    type: str = "row"


@dataclass(frozen=True, slots=True)
class TickRecord:
    tick: int
    rows: tuple[RowRecord, ...]
    forwards: int  # model calls in this tick: 1 when batched
    seconds: float = 0.0  # wall time of its forwards (diagnostics; tests count rows, not time)
    express: bool = False  # urgent rows only, others left for the next tick
    type: str = "tick"

    @property
    def prefill_tokens(self) -> int:
        return sum(r.tokens for r in self.rows if not r.decode)


@dataclass(slots=True)
class SchedulerStats:
    ticks: int = 0
    forwards: int = 0
    rows: int = 0
    decode_rows: int = 0
    prefill_tokens: int = 0
    max_rows: int = 0
    express_ticks: int = 0
    tick_steps: int = 0  # steps run by the tick itself (TickStep), no job thread
    type: str = "scheduler_stats"


@dataclass(slots=True, eq=False)
class Request:
    owner: object
    ids: list[int]
    start_pos: int
    keep: int
    cache: Any
    direct: Direct
    job: bool  # made by a job thread (which gave the baton back while it waits)
    urgent: bool = False  # made by an urgent job: see the module docstring
    step: Job | None = None  # a TickStep's job: the tick finishes it (TickStep.finish), no thread waits
    order: int = 0
    arrived: float = 0.0  # perf_counter() at submission
    submitted_tick: int = 0
    done: int = 0
    result: torch.Tensor | None = None
    error: BaseException | None = None
    event: threading.Event = field(default_factory=threading.Event)

    @property
    def decode(self) -> bool:
        return len(self.ids) == 1


@dataclass(slots=True, eq=False)
class Job:
    lane: Hashable
    future: Future[Any]
    call: Callable[[], Any]
    urgent: bool = False
    tick: TickStep | None = None  # run by the tick itself where TickStep.begin gives a row


class TickStep(Protocol):
    """A lane's job whose whole work is one forward row plus a little bookkeeping: the scheduler
    runs it inside its ticks, with no worker thread to wake (:meth:`Scheduler.submit_step`)."""

    def begin(self) -> tuple[object, list[int], int, int, Any, Direct] | None:
        """Called under the scheduler's lock when the job reaches the front of its lane: the row
        (owner, ids, start_pos, keep, cache, direct), or None to run :meth:`call` instead."""

    def finish(self, out: torch.Tensor | None) -> Any:
        """On the tick's thread (baton held, lock not) once the row ran: the job's result."""

    def call(self) -> Any:
        """The same job as a plain one on a worker thread (its forward a request like any other)."""
