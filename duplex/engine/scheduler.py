"""The engine scheduler: every session's model work, one batched forward per tick, fairly.

Sessions hand the engine small synchronous jobs (append these words, sample a token, hand over
the turn). Before, one worker ran those jobs FIFO, each to completion: a 100 KB instructions
prefill held every other session's next token for its whole duration, and eight decoding
sessions paid eight passes over the weights per round. Here:

- **jobs** run on worker threads, one at a time (a baton), FIFO per *lane* (one lane per
  sequence, plus one for calls that name none), so a session's calls stay in order while
  different sessions interleave;
- a job's model call (:meth:`Scheduler.forward`, reached from ``SharedSequence._forward``)
  does not run on the job's thread: it parks the job and becomes a *request*;
- when every started job is parked or done, a **tick** runs (on the thread of the job that parked
  last, or on the scheduler thread for callers that are not jobs): every pending
  1-token request (decode steps: priority, all of them), every short prefill (at most
  ``chunk_tokens``: a user's words, a turn hand-over; up to ``burst_tokens`` in all, so that
  turns that start together share one tick), plus pieces of long prefills, round robin across
  sequences, at most ``chunk_tokens`` tokens in all and, while anyone speaks (decoded in the
  last ticks, queued now or not), at most 0.3x the decode rows' own cost more
  (:class:`~duplex.engine.pacer.TickPacer`). In
  ``batched`` mode the tick is ONE ragged forward (:mod:`duplex.engine.ragged`); in ``chunked``
  mode the same rows run one by one; ``fifo`` is the old single-worker behaviour (for A/B).

A job that is one forward row and a little bookkeeping (a reply's decode step,
:meth:`Scheduler.submit_step` with a :class:`TickStep`) does not take a worker thread at all: when
it reaches the front of its lane its row joins the pending requests, and the tick that runs it calls
its ``finish`` (take the token, sample the next, queue the follower) on the tick's own thread. Eight
speaking sessions then cost no thread wake-ups between two ticks.

A tick that is ready to run waits briefly (at most 8 ms, and half the last tick's time) for the
sessions that decoded in the last tick to queue their next step: their event loops resubmit one
after another, and starting on the first arrival splits one batched pass into several.

**Urgent** work (:meth:`Scheduler.submit` with ``urgent=True``: a reply's hand-over and its steps
until its first words are out, what a user waits for) runs in an *express* tick of its own when
other work is pending: without the other sessions' decode rows and prefill pieces, and without
the gather wait. The tick after an express tick that left requests out takes everyone, so a
streaming session's next token waits at most one express tick more; it is already ahead of its
listener, while the first words of a reply are what the user is waiting for.

While a reply is a decode step from its first words (an urgent decode row is pending), a tick's
prefill rows take at most ``first_words_tokens`` (16) in all, short turns split into pieces in
arrival order: on a CPU where prefill costs milliseconds a token, the slowest tenth of a soak's
first-words chains spent 363 of their 465 ms in ticks carrying other turns' whole prefill, 244 of
373 with the limit (``bench/results/ab-first-words/``, from ``DUPLEX_TICK_LOG``).

So a long prefill delays another session's next token by at most one tick, whose long-prefill
part is bounded by ``chunk_tokens`` (turns that start together may add up to ``burst_tokens`` of
short ones: what their first tokens wait for), plus one express tick; and decoders share the
weight reads. Ticks are recorded
(:attr:`Scheduler.trace`) so tests can check fairness by counting rows, not by timing.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

import torch

from duplex.engine.attention import attention_isa, max_query_rows
from duplex.engine.fast_decode import DecodeRow, FastDecoder, fast_decoder
from duplex.engine.openmp import release_pool, serial_thread
from duplex.engine.pacer import TickPacer
from duplex.engine.ragged import Row, ragged_forward, register, supports
from duplex.engine.scheduler_work import (
    Direct,
    Job,
    Request,
    RowRecord,
    SchedulerStats,
    TickLog,
    TickRecord,
    TickStep,
)

__all__ = ["MODES", "RowRecord", "Scheduler", "SchedulerStats", "TickRecord", "TickStep"]

log = logging.getLogger(__name__)

MODES = ("batched", "chunked", "fifo")
_MIN_PIECE = 8  # a later prefill row in a tick takes no intermediate piece smaller than this
# a session that decoded within this many ticks, or this many seconds, still counts as speaking
_SPEAKER_TICKS = 2
_SPEAKER_SECONDS = 0.25
# a tick waits at most this long (and at most half the last tick's time) for the sessions that
# decoded in the last tick to queue their next step: their event loops resubmit one after another,
# and a tick that starts on the first arrival leaves the others to one more pass over the weights
_GATHER_S = 0.008
_GATHER_TICK_FRACTION = 0.5
# a tick of prefills alone, with nobody speaking, waits while requests keep arriving (each within
# _ARRIVAL_GAP_S of the last, _ARRIVAL_MAX_S in all): turns that start together (a burst of
# messages, read one after another by the event loop) then share one pass instead of the first
# taking a tick alone and the rest queueing behind it. A lone arrival pays at most the gap.
_ARRIVAL_GAP_S = 0.003
_ARRIVAL_MAX_S = 0.015
# a tick of at most this many tokens (decode steps, short prefill pieces) takes the lean forward of
# duplex.engine.fast_decode; a bigger one the ragged transformers forward (SDPA for long rows)...
_FAST_MAX_TOKENS = 96
# ...unless its attention is small: (query, cached position) pairs at most this many, where the
# lean forward has dense weights. Eight questions starting together (8 rows x 19 tokens at 100
# cached) took 164 ms there against 241 ms in the ragged forward with the AVX2 attention code,
# which then read the cache once per 16 queries (8 x 19 at 1000 cached: 319 against 301 ms; 128
# tokens at 2000: 600 against 249 ms). The AVX-512 code reads it once per row: 8 x 19 at 100
# cached 98 against 214 ms, at 1000 250 against 318, 8 decode rows + 2 x 64 at 1000 217 against
# 235; SDPA stays ahead for long rows over long caches (128 at 2000: 251 against 184 ms). The AMX
# code (tiles for blocks of 6+ query rows) keeps the AVX-512 limit until a probe sets its own. The
# AVX2 code now reads the cache once per row too (2026-11-27); its limit is the one measured before.
# Without dense weights (no matrix engine) the lean forward takes big ticks wherever its attention
# takes their rows (see _lean_forward)
_FAST_MAX_ATTN = {"amx-bf16": 160_000, "avx512-bf16": 160_000, "avx2": 60_000}

class Scheduler:
    """Owns the model's compute: jobs in per-sequence lanes, forwards batched per tick."""

    def __init__(self, model: Any, mode: str = "batched", chunk_tokens: int = 64,
                 init_thread: Callable[[], None] | None = None, name: str = "duplex", trace_len: int = 4096,
                 burst_tokens: int | None = None, before_tick: Callable[[], None] | None = None,
                 first_words_tokens: int | None = 16, tick_log: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"scheduler mode must be one of {', '.join(MODES)}, not {mode!r}")
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        self.model = model
        self.mode = mode
        self.chunk_tokens = chunk_tokens
        # short prefills (each at most chunk_tokens) one tick takes in all; default 4 chunks
        self.burst_tokens = max(chunk_tokens, burst_tokens if burst_tokens is not None else 4 * chunk_tokens)
        # prefill tokens a tick takes in all while a reply's first words wait for a decode step
        # (None: no such limit, the behaviour before it; for A/B runs)
        self.first_words_tokens = None if first_words_tokens is None else max(1, first_words_tokens)
        self.stats = SchedulerStats()
        self.trace: deque[TickRecord] = deque(maxlen=trace_len)
        self._init_thread = init_thread or (lambda: None)
        self._before_tick = before_tick or (lambda: None)  # on the tick's thread, before its forward
        self._name = name
        self._lock = threading.Lock()  # queues and counters; never held across a model call
        self._baton = threading.Lock()  # held by the running job, or by the scheduler during a tick
        self._tick_cv = threading.Condition(self._lock)
        self._work_cv = threading.Condition(self._lock)
        self._local = threading.local()
        self._lanes: dict[Hashable, deque[Job]] = {}  # a lane is present while it has a job started
        self._ready: deque[Job] = deque()
        self._urgent_ready = 0  # urgent jobs at the front of _ready, in their arrival order
        self._idle = 0
        self._workers: list[threading.Thread] = []
        self._runnable = 0  # started jobs not parked in forward()
        self._pending: list[Request] = []
        self._steps_done: list[Request] = []  # TickStep rows of the tick just finished
        self._served: dict[int, int] = {}  # owner id -> tick of its last prefill piece (round robin)
        self._arrivals = 0
        self._pacer = TickPacer(getattr(model, "config", None))
        # owner id -> (tick and time of its last decode row, its position): a speaker between
        # two steps (its loop is emitting the last token) still paces the prefill of the tick
        # that starts meanwhile
        self._speakers: dict[int, tuple[int, float, int]] = {}
        self._last_decoders: frozenset[int] = frozenset()  # owners with a decode row in the last tick
        self._left_out = False  # the last tick was an express tick that left requests waiting
        self._last_tick_end = 0.0
        self._last_tick_s = 0.0
        self._batching = mode == "batched"
        self._closing = False
        # every tick as a JSON line, for duplex.bench.ticks (where first words wait, and behind what)
        path = tick_log if tick_log is not None else os.environ.get("DUPLEX_TICK_LOG", "").strip() or None
        self._tick_log = TickLog(path) if path else None
        if self._batching:
            register()
        self._thread = threading.Thread(target=self._loop, name=f"{name}-scheduler", daemon=True)
        self._thread.start()

    # ---- jobs ----------------------------------------------------------------------------------
    def submit(self, lane: Hashable, fn: Callable[..., Any], *args: Any, urgent: bool = False,
               **kwargs: Any) -> Future[Any]:
        """Queue ``fn(*args, **kwargs)`` behind earlier jobs of ``lane``; its result comes in the
        future. ``urgent``: a user is waiting for it (a reply's first words): it starts before
        queued jobs of other lanes, and its forwards run in express ticks."""
        return self._enqueue(Job(None if self.mode == "fifo" else lane, Future(),
                                  functools.partial(fn, *args, **kwargs), urgent))

    def submit_step(self, lane: Hashable, step: TickStep, *, urgent: bool = False) -> Future[Any]:
        """:meth:`submit` for a job that is one forward row (a reply's chained decode step): when it
        reaches the front of its lane, ``step.begin()`` gives the row and the tick that runs it
        calls ``step.finish`` itself, so no worker thread wakes between two ticks for it; where
        ``begin`` gives None (or in ``fifo`` mode) ``step.call`` runs as a plain job. Its future is
        running from the moment its row is queued: ``cancel()`` works only before that."""
        fifo = self.mode == "fifo"
        return self._enqueue(Job(None if fifo else lane, Future(), step.call, urgent, None if fifo else step))

    def _enqueue(self, job: Job) -> Future[Any]:
        """``job`` behind the earlier jobs of its lane (started now if the lane is idle)."""
        with self._lock:
            if self._closing:
                raise RuntimeError("engine is closed")
            queued = self._lanes.get(job.lane)
            if queued is None:
                self._lanes[job.lane] = deque()
                self._start(job)
            else:
                queued.append(job)
        return job.future

    def _start(self, job: Job) -> None:  # under _lock
        if job.tick is not None:
            row = None if self._closing else job.tick.begin()
            if row is not None:
                if not job.future.set_running_or_notify_cancel():
                    self._next_in_lane(job.lane)  # cancelled while queued: the lane goes on
                    return
                owner, ids, start_pos, keep, cache, direct = row
                self._add_request(Request(owner, list(ids), start_pos, keep, cache, direct, False, job.urgent, job))
                self._tick_cv.notify()
                return
        self._runnable += 1
        if job.urgent:
            self._ready.insert(self._urgent_ready, job)  # ahead of the others, behind earlier urgent ones
            self._urgent_ready += 1
        else:
            self._ready.append(job)
        if len(self._ready) > self._idle:
            worker = threading.Thread(target=self._work, name=f"{self._name}-job{len(self._workers)}", daemon=True)
            self._workers.append(worker)
            worker.start()
        else:
            self._work_cv.notify()

    def _work(self) -> None:
        self._init_thread()
        if self.mode != "fifo":
            # only the scheduler's thread runs forwards: a job thread's own OpenMP pool (from
            # sampling) would make every barrier of the engine's sleep (duplex.engine.openmp)
            serial_thread()
        self._local.job = True
        while True:
            with self._lock:
                while not self._ready and not self._closing:
                    self._idle += 1
                    self._work_cv.wait()
                    self._idle -= 1
                if not self._ready:
                    return
                job = self._ready.popleft()
                self._urgent_ready -= job.urgent
            with self._baton:
                self._local.urgent = job.urgent
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.call())
                    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                        job.future.set_exception(exc)
            with self._lock:
                self._runnable -= 1
                self._next_in_lane(job.lane)
                self._tick_cv.notify()

    def _next_in_lane(self, lane: Hashable) -> None:  # under _lock
        """The lane's job in front finished: start the next one, or the lane is idle."""
        queued = self._lanes[lane]
        if queued:
            self._start(queued.popleft())
        else:
            del self._lanes[lane]

    # ---- model calls ---------------------------------------------------------------------------
    def forward(self, owner: object, ids: list[int], start_pos: int, keep: int, cache: Any,
                direct: Direct) -> torch.Tensor | None:
        """Logits of the last ``keep`` positions (None for 0) after running ``ids`` at ``start_pos`` on
        ``cache`` (written in place). Blocks the calling thread until a tick has run them all."""
        if self.mode == "fifo":
            return direct(ids, start_pos, keep)
        job = bool(getattr(self._local, "job", False))
        req = Request(owner, list(ids), start_pos, keep, cache, direct, job,
                       job and bool(getattr(self._local, "urgent", False)))
        with self._lock:
            if self._closing and not job:
                raise RuntimeError("engine is closed")
            self._add_request(req)
            if job:
                self._runnable -= 1
            self._tick_cv.notify()
        # the scheduler's thread runs the tick, also for a job that parks last: a job thread that
        # ran ticks itself (saving a hand-over) gave the process one more OpenMP pool, and with more
        # pooled threads than cores every barrier of every forward sleeps (duplex.engine.openmp)
        if job:
            self._baton.release()
        try:
            req.event.wait()
        finally:
            if job:
                self._baton.acquire()
        return self._result(req)

    def _add_request(self, req: Request) -> None:  # under _lock
        """``req`` joins the pending requests, stamped with its arrival (order, tick, time)."""
        req.order, self._arrivals = self._arrivals, self._arrivals + 1
        req.submitted_tick = self.stats.ticks
        req.arrived = time.perf_counter()
        self._pending.append(req)

    @staticmethod
    def _result(req: Request) -> torch.Tensor | None:
        if req.error is not None:
            raise req.error
        assert req.result is not None or req.keep == 0
        return req.result

    def _loop(self) -> None:
        self._init_thread()
        while True:
            with self._lock:
                while not (self._closing and not self._lanes and not self._pending):
                    if self._pending and self._runnable == 0:
                        wait = self._gather_wait()
                        if wait <= 0:
                            break
                        self._tick_cv.wait(wait)
                    else:
                        self._tick_cv.wait()
                if not self._pending:
                    return  # closing, nothing left
            with self._baton:
                with self._lock:
                    # a job may have started (and be running) while this thread waited for the
                    # baton: decide again, or this tick would leave out what it is about to queue
                    if self._runnable > 0 or (self._pending and self._gather_wait() > 0):
                        continue
                self._tick()
            with self._lock:
                idle = not self._pending
            if idle:
                # the pool ends once nothing is queued (a new one starts with the next tick, in tens
                # of microseconds): an idle pool's thread spins for milliseconds on a core the event
                # loop wants, and one more engine in the process (translation) would double the
                # pools. Not after every tick: the call waits for the worker to end its spin (2.0-2.5
                # ms on the 2-core EPYC, right after an 8-row forward), and with the next tick's rows
                # already queued (a batched tick's steps queue their followers before it returns)
                # that wait sat between every two ticks
                release_pool()

    def _gather_wait(self) -> float:  # under _lock
        """Seconds a tick should still wait: for last tick's decoders to queue their next step, or,
        for a tick of prefills alone while nobody speaks, for more arrivals (``_ARRIVAL_*``)."""
        if not self._batching or any(r.urgent for r in self._pending):
            return 0.0  # an urgent request runs now (in an express tick, see _plan)
        if not self._last_decoders:
            if not self._pending or self._speakers or any(r.decode for r in self._pending):
                return 0.0
            now = time.perf_counter()
            first = min(r.arrived for r in self._pending)
            last = max(r.arrived for r in self._pending)
            return min(last + _ARRIVAL_GAP_S, first + _ARRIVAL_MAX_S) - now
        if self._last_decoders <= {id(r.owner) for r in self._pending}:
            return 0.0
        window = min(_GATHER_S, _GATHER_TICK_FRACTION * self._last_tick_s)
        return self._last_tick_end + window - time.perf_counter()

    def _tick(self) -> None:
        """Plan, run and finish one tick (baton held). An unexpected error in planning fails the
        requests waiting on this tick (each caller gets it) instead of leaving them waiting forever:
        the forward's own errors are handled in :meth:`_execute`."""
        with self._lock:
            if not self._pending:
                return  # nothing left to run
            try:
                plan = self._plan()
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                log.exception("scheduler: planning a tick failed; failing its %d requests", len(self._pending))
                self._fail_pending(exc)
                steps, self._steps_done = self._steps_done, []
            else:
                steps = None
                tick = self.stats.ticks
        if steps is not None:
            self._finish_steps(steps)
            return
        try:
            self._before_tick()
        except Exception:  # noqa: BLE001 - a failed thread setting must not stop the tick
            log.warning("scheduler: before_tick failed", exc_info=True)
        t0 = time.perf_counter()
        forwards = self._execute(plan)
        seconds = time.perf_counter() - t0
        if forwards == 1:
            self._pacer.observe(seconds, sum(n for _, n, _ in plan),
                                sum(self._pacer.attn(n, r.start_pos + off) for r, n, off in plan))
        with self._lock:
            self._finish_tick(tick, plan, forwards, seconds)
            steps, self._steps_done = self._steps_done, []
        self._finish_steps(steps)

    def _finish_steps(self, steps: list[Request]) -> None:
        """The tick's TickStep rows ran (or failed): each one's ``finish`` on this thread (its token
        taken, the next sampled, its follower queued in its lane), then every lane goes on (the
        followers' rows are queued for the next tick), and only then the results go to their
        futures. Handing each result over as it came woke the sessions' event loop, which then took
        the GIL back and forth with the rest of the finishing: with 8 sessions, 2.9-3.2 ms between
        two decode ticks (tick log), 1.1-1.3 of them between the first follower's arrival and the
        last's."""
        if not steps:
            return
        outcomes: list[tuple[Job, Any, BaseException | None]] = []
        for req in steps:
            job = req.step
            assert job is not None and job.tick is not None
            try:
                if req.error is not None:
                    raise req.error
                outcomes.append((job, job.tick.finish(req.result), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                outcomes.append((job, None, exc))
        try:
            with self._lock:
                for job, _, _ in outcomes:
                    self.stats.tick_steps += 1
                    self._next_in_lane(job.lane)
                self._tick_cv.notify()
        finally:  # every caller hears of its step, even if a lane could not go on
            for job, result, exc in outcomes:
                if exc is not None:
                    job.future.set_exception(exc)
                else:
                    job.future.set_result(result)

    def _plan(self) -> list[tuple[Request, int, int]]:
        """(request, tokens, offset) rows: every decode request, every short prefill (whole, up
        to ``burst_tokens`` in all), then pieces of long prefills round robin, with the short ones
        at most ``chunk_tokens`` in all; while anyone speaks, long prefills add at most
        ``TickPacer.PACE - 1`` times the decode rows' own cost; while a reply waits for its first
        words, all prefill rows together at most ``first_words_tokens``."""
        pool = self._pending
        urgent = [r for r in pool if r.urgent]
        if urgent and len(urgent) < len(pool) and not self._left_out:
            pool = urgent  # an express tick; the next one takes everyone
        self._left_out = pool is not self._pending
        plan = [(r, 1, 0) for r in pool if r.decode]
        # short prefills in arrival order (one split into pieces keeps its place: turns of about
        # equal size finish soonest on average one after another, not sharing ticks); long ones
        # round robin, least recently served first, so one huge prompt cannot hold back another
        prefills = sorted((r for r in pool if not r.decode),
                          key=lambda r: (0, r.order) if len(r.ids) <= self.chunk_tokens
                          else (1, self._served.get(id(r.owner), -1), r.order))
        budget = self.chunk_tokens
        tick = self.stats.ticks
        now = time.perf_counter()
        for owner, (last, at, _) in list(self._speakers.items()):
            if last < tick - _SPEAKER_TICKS and now - at > _SPEAKER_SECONDS:
                del self._speakers[owner]  # stopped decoding: its turn ended or it was interrupted
        allowance: float | None = None  # seconds this tick's long prefills may add
        paced = bool(prefills and self._speakers)
        if paced:
            planned = {id(r.owner) for r, _, _ in plan}
            # a speaker whose next step is not queued yet counts as if it were: it will queue it
            # while this tick runs, and must not then wait behind an unpaced piece
            waiting = [pos for owner, (_, _, pos) in self._speakers.items() if owner not in planned]
            allowance = self._pacer.budget(
                len(plan) + len(waiting),
                sum(self._pacer.attn(1, r.start_pos) for r, _, _ in plan) + sum(self._pacer.attn(1, p) for p in waiting))
            if allowance is not None:
                allowance += self._pacer.bank
        first = True
        short_of_allowance = False
        # short prefills first (a user's words, a turn hand-over: at most chunk_tokens each), whole:
        # what someone's first reply token waits for. Many arriving at once share this tick up to
        # burst_tokens (a tick per chunk_tokens would add a tick to most of their replies); long
        # prefills' pieces then take what is left of chunk_tokens.
        # But while some reply's first words are a decode step away (an urgent decode row), that
        # row must not wait for whole turns of others' prefill: the prefill rows then take at most
        # first_words_tokens in all, in pieces (a turn split this way costs its own user a tick
        # or two of decode rows; the rows waiting for first words save all but that piece)
        limit = self.first_words_tokens if any(r.urgent and r.decode for r in pool) else None
        first_words = limit is not None
        burst = self.burst_tokens
        if limit is not None:
            burst = budget = min(burst, budget, limit)
        longs = []
        for r in prefills:
            if len(r.ids) > self.chunk_tokens:
                longs.append(r)
                continue
            remaining = len(r.ids) - r.done
            if remaining <= burst or (first and not first_words):
                n = remaining
            else:
                n = min(burst, remaining - r.keep)  # the positions that need logits stay in the last piece
                if not first_words or n < 1 or (not first and n < _MIN_PIECE):
                    continue
            plan.append((r, n, r.done))
            burst -= n
            budget -= n
            first = False
        for r in longs:
            if budget <= 0:
                break
            start = r.start_pos + r.done
            remaining = len(r.ids) - r.done
            cap = budget
            if paced:
                # long prefills are paced to their last piece (a sequence sends a long prompt as
                # several requests); the short ones above are not: someone's first token waits
                if allowance is None:
                    cap = 1 if first else 0  # no cost fit yet: one token a tick, the safe side
                else:
                    cap = min(cap, self._affordable(allowance, start, min(cap, remaining)))
                if cap < 1:
                    short_of_allowance = True  # saved up (below) until one token is covered
                    continue
            if remaining <= cap:
                n = remaining
            else:
                n = min(cap, remaining - r.keep)  # the positions that need logits stay in the last piece
                if n <= 0:
                    n = remaining
                elif not first and n < _MIN_PIECE:
                    continue
            plan.append((r, n, r.done))
            budget -= n
            if allowance is not None and paced:
                allowance -= self._pacer.cost(n, start) or 0.0
            first = False
        # the allowance a too-dear token could not use is saved for it; otherwise none is kept
        self._pacer.bank = max(allowance, 0.0) if short_of_allowance and allowance is not None else 0.0
        return plan

    def _affordable(self, seconds: float, start: int, most: int) -> int:
        """How many tokens (at most ``most``) of a prefill at ``start`` fit in ``seconds``."""
        lo, hi = 0, most
        while lo < hi:  # the cost grows with n (quadratically, through attention): bisect
            mid = (lo + hi + 1) // 2
            if (self._pacer.cost(mid, start) or 0.0) <= seconds:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _lean_forward(self, rows: list[Row]) -> FastDecoder | None:
        """The lean forward for these rows, or None for the ragged one: see ``_FAST_MAX_TOKENS``."""
        fast = fast_decoder(self.model)
        if fast is not None and not all(supports(self.model, row.cache) for row in rows):
            return fast  # rows the ragged forward cannot take (sliding-window caches): the lean one only
        if fast is None or sum(len(row.ids) for row in rows) <= max(_FAST_MAX_TOKENS, fast.max_query):
            return fast  # (its program pass takes up to max_query tokens: more where the AMX tiles run)
        if not fast.dense:
            # no dense weights (no matrix engine): both passes run the same int8 mat-vecs, the lean
            # one with fewer ops around them, where its attention takes the rows' lengths (8 x 19
            # tokens on an AVX2 EPYC, 2 threads: 553-564 ms against 695-702 in the ragged forward)
            return fast if max_query_rows() >= max(len(row.ids) for row in rows) else None
        attn = sum(self._pacer.attn(len(row.ids), row.start_pos) for row in rows)
        return fast if attn <= _FAST_MAX_ATTN.get(attention_isa() or "avx2", 0) else None

    def _batchable(self, cache: Any) -> bool:
        """Can this cache's row share the tick's one forward: the ragged forward takes it, or the
        lean forward does (Gemma 3's sliding-window layers: the lean forward only)."""
        if not self._batching:
            return False
        if supports(self.model, cache):
            return True
        fast = fast_decoder(self.model)
        return fast is not None and fast.accepts(cache)

    def _execute(self, plan: list[tuple[Request, int, int]]) -> int:
        """Run the planned rows (baton held, _lock not): one batched forward, or one by one."""
        shared = [self._batchable(r.cache) for r, _, _ in plan]
        batch = [(r, n) for (r, n, _), s in zip(plan, shared) if s]
        single = [(r, n) for (r, n, _), s in zip(plan, shared) if not s]
        forwards = 0
        if batch:
            rows = [Row(r.cache, tuple(r.ids[r.done:r.done + n]), r.start_pos + r.done,
                        r.keep if r.done + n == len(r.ids) else 0) for r, n in batch]
            try:  # choosing the pass is inside: an error there must not stop the tick thread either
                fast = self._lean_forward(rows)
                outs = (fast.forward([DecodeRow(row.cache, row.ids, row.start_pos, row.keep) for row in rows])
                        if fast is not None else ragged_forward(self.model, rows))
            except Exception:
                log.warning("batched forward failed for %s; running sessions one by one from now on",
                            type(self.model).__name__, exc_info=True)
                self._batching = False
                single = batch + single
            else:
                forwards += 1
                for (r, n), out in zip(batch, outs):
                    r.done += n
                    if r.done == len(r.ids):
                        r.result = out
        for r, n in single:
            final = r.done + n == len(r.ids)
            try:
                out = r.direct(r.ids[r.done:r.done + n], r.start_pos + r.done, r.keep if final else 0)
            except Exception as exc:  # noqa: BLE001 - raised in the requesting job
                r.error = exc
                continue
            forwards += 1
            r.done += n
            if final:
                r.result = out
        return forwards

    def _finish_tick(self, tick: int, plan: list[tuple[Request, int, int]], forwards: int,
                     seconds: float) -> None:  # under _lock
        now = time.perf_counter()
        started = now - seconds
        records = tuple(RowRecord(id(r.owner), n, r.start_pos + offset, r.decode, tick - r.submitted_tick, r.urgent,
                                  max(0.0, started - r.arrived))
                        for r, n, offset in plan)
        record = TickRecord(tick, records, forwards, seconds, self._left_out, now)
        self.trace.append(record)
        if self._tick_log is not None:
            self._tick_log.add(record)
        s = self.stats
        s.ticks += 1
        s.express_ticks += self._left_out
        s.forwards += forwards
        s.rows += len(plan)
        s.decode_rows += sum(1 for r, _, _ in plan if r.decode)
        s.prefill_tokens += sum(n for r, n, _ in plan if not r.decode)
        s.max_rows = max(s.max_rows, len(plan))
        self._last_decoders = frozenset(id(r.owner) for r, _, _ in plan if r.decode)
        self._last_tick_end, self._last_tick_s = now, seconds
        for r, _, _ in plan:
            if r.decode:
                self._speakers[id(r.owner)] = (tick, now, r.start_pos)
            else:
                self._served[id(r.owner)] = tick
            if r.done < len(r.ids) and r.error is None:
                continue  # more prefill pieces to go
            self._complete(r)

    def _complete(self, r: Request) -> None:  # under _lock
        """``r`` leaves the queue (its result or error set) and its caller wakes."""
        self._pending.remove(r)
        if not any(p.owner is r.owner for p in self._pending):
            self._served.pop(id(r.owner), None)
        if r.job:
            self._runnable += 1
        if r.step is not None:
            self._steps_done.append(r)  # finished by the tick's thread once the lock is released
        r.event.set()

    def _fail_pending(self, exc: BaseException) -> None:  # under _lock
        """Hand ``exc`` to every pending request and wake its caller."""
        for r in list(self._pending):
            r.error = exc
            self._complete(r)

    # ---- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Refuse new work, cancel queued jobs, let started ones finish, stop the threads."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            for lane in self._lanes.values():
                for job in lane:
                    job.future.cancel()
                lane.clear()
            self._tick_cv.notify_all()
            self._work_cv.notify_all()
        me = threading.current_thread()
        for thread in [self._thread, *self._workers]:
            if thread is not me:
                thread.join()
        if self._tick_log is not None:
            self._tick_log.close()
