"""What the engine scheduler queues and records: jobs in lanes, forward requests, tick records.

Kept apart from :mod:`duplex.engine.scheduler` (which decides what each tick runs) so that the
records tests and ``/healthz`` read, and the :class:`TickStep` protocol a decode step implements,
can be read without the scheduling itself.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
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
    waited_s: float = 0.0  # from its request's arrival to the start of this tick (diagnostics)
    type: str = "row"


@dataclass(frozen=True, slots=True)
class TickRecord:
    tick: int
    rows: tuple[RowRecord, ...]
    forwards: int  # model calls in this tick: 1 when batched
    seconds: float = 0.0  # wall time of its forwards (diagnostics; tests count rows, not time)
    express: bool = False  # urgent rows only, others left for the next tick
    ended: float = 0.0  # time.perf_counter() when its forwards ended (diagnostics)
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


class TickLog:
    """Every tick as one JSON line (``$DUPLEX_TICK_LOG``, read by :mod:`duplex.bench.ticks`): where a
    reply's first words waited under load, and behind what, without a debugger. Written by the
    tick's thread (buffered, flushed about once a second); a failed write turns it off with a
    warning rather than failing the tick."""

    _open_paths: set[str] = set()  # paths a TickLog of this process writes (under _paths_lock)
    _paths_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        # a second engine in the process (translation beside chat) gets a file of its own, FILE.2 ...:
        # two buffered writers on one file would cut each other's lines
        with TickLog._paths_lock:
            n, chosen = 1, path
            while os.path.abspath(chosen) in TickLog._open_paths:
                n += 1
                chosen = f"{path}.{n}"
            TickLog._open_paths.add(os.path.abspath(chosen))
        if chosen != path:
            logging.getLogger(__name__).info("tick log: another engine writes %s; this one writes %s", path, chosen)
        self.path = chosen
        self._file: Any = open(chosen, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115 - kept open
        self._flushed = time.monotonic()

    def add(self, tick: TickRecord) -> None:
        if self._file is None:
            return
        rows = [[r.owner, r.tokens, r.start_pos, int(r.decode), int(r.urgent), round(r.waited_s, 5)] for r in tick.rows]
        line = json.dumps({"tick": tick.tick, "ended": round(tick.ended, 5), "seconds": round(tick.seconds, 5),
                           "express": int(tick.express), "rows": rows}, separators=(",", ":"))
        try:
            self._file.write(line + "\n")
            now = time.monotonic()
            if now - self._flushed > 1.0:
                self._file.flush()
                self._flushed = now
        except OSError as exc:
            logging.getLogger(__name__).warning("tick log %s: %s; not logging ticks any more", self.path, exc)
            self.close()

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with TickLog._paths_lock:
                TickLog._open_paths.discard(os.path.abspath(self.path))
            try:
                file.close()
            except OSError:
                pass

