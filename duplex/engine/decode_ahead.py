"""Decode ahead: a speaking session's next step is queued by the engine, not by its event loop.

A reply is one engine job per token (append the token just taken, sample the next). When the
event loop queued each job only after it had emitted the previous token, a batched tick had to
wait for every speaking session's loop to come round: with 8 sessions, 8 ms of each 35 ms cycle
went to that hand-off while the engine stood idle. Here the job that samples token k+1 also
queues the job that appends it, in the same lane, provided the session has *claimed* its own step
(taken token k): so the engine runs at most one token ahead of what the session has taken, and the
next tick starts while the loops are still sending words.

Each step is a tick step of the scheduler (:class:`_Step`): the tick that runs its row also takes
the token, samples the next and queues the follower, so no worker thread wakes per token.

A token appended ahead and never taken (the turn ended on a stop sequence, a barge-in cut it, user
words are about to be interleaved) must leave the cache before the loop changes the turn: the
session revokes the step in flight (:meth:`DecodeLink.revoke`, so that it queues nothing more) and
settles the one queued ahead (:func:`settle`: cancelled if it has not started, rolled back if it
ran).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from duplex.engine.sampling import Sampler
from duplex.engine.sequence import SharedSequence, Status

__all__ = ["ENABLED", "DecodeLink", "StepResult", "settle", "submit_step"]

# $DUPLEX_DECODE_AHEAD=0: every step is queued by the session's loop, as before (A/B runs)
ENABLED = os.environ.get("DUPLEX_DECODE_AHEAD", "1").strip() != "0"
# $DUPLEX_TICK_STEPS=0: every step is a plain job on a worker thread, as before (A/B runs)
TICK_STEPS = os.environ.get("DUPLEX_TICK_STEPS", "1").strip() != "0"

# (the next token, the sequence's logits_version it was sampled at, the step queued to append it
# or None)
StepResult = tuple[int, int, "DecodeLink | None"]


class DecodeLink:
    """One decode step of a reply: append ``token`` (already sampled), sample the one after it.

    ``claimed``: the session has taken ``token`` and waits for this step; only a claimed step
    queues the next one, so at most one step runs ahead of the session."""

    __slots__ = ("_chain", "_claimed", "_lock", "_revoked", "future", "token")

    def __init__(self, token: int, claimed: bool, chain: bool) -> None:
        self.token = token
        self.future: Future[StepResult] | None = None
        self._lock = threading.Lock()
        self._claimed = claimed
        self._chain = chain
        self._revoked = False

    def claim(self, chain: bool) -> asyncio.Future[StepResult]:
        """The session took ``token``: this step is its own now. ``chain``: may it queue the next
        one (False for the reply's last token)? Returns the step's result as an asyncio future."""
        with self._lock:
            self._claimed = True
            self._chain = chain and not self._revoked
        assert self.future is not None
        return asyncio.wrap_future(self.future)

    def revoke(self) -> None:
        """Queue nothing after this step (the loop is about to change the turn). Synchronous: once
        it returns, the step either queued its follower already or never will."""
        with self._lock:
            self._revoked = True
            self._chain = False


def submit_step(scheduler: Any, seq: SharedSequence, token: int, sampler: Sampler, *, chain: bool,
                urgent: Callable[[], bool], status: Status = Status.UNSPOKEN) -> DecodeLink:
    """Queue the claimed step that appends ``token``; its result comes in ``link.claim``'s future
    (or ``link.future``). ``urgent()`` is asked for each step as it is queued (express ticks until
    the reply's first words are out)."""
    link = DecodeLink(token, claimed=True, chain=chain)
    _queue(scheduler, seq, link, sampler, status, urgent)
    return link


def _queue(scheduler: Any, seq: SharedSequence, link: DecodeLink, sampler: Sampler, status: Status,
           urgent: Callable[[], bool]) -> None:
    submit = getattr(scheduler, "submit_step", None) if TICK_STEPS else None
    if submit is None:  # a plain job
        link.future = scheduler.submit(seq, _step, scheduler, seq, link, sampler, status, urgent, urgent=urgent())
    else:
        link.future = submit(seq, _Step(scheduler, seq, link, sampler, status, urgent), urgent=urgent())


class _Step:
    """One decode step as the scheduler's :class:`~duplex.engine.scheduler_work.TickStep`: its forward
    row is the token appended to the open turn, and the tick that runs it takes the token into the
    ledger, samples the next and queues the follower, with no worker thread woken between two ticks
    (on 2 cores eight sessions' job threads waking in turn cost ~5 ms of each ~30 ms cycle). Where
    the sequence says it cannot (:meth:`SharedSequence.decode_row`: an eviction due, no open turn)
    the same step runs as a plain job (:func:`_step`)."""

    __slots__ = ("link", "sampler", "scheduler", "seq", "status", "urgent")

    def __init__(self, scheduler: Any, seq: SharedSequence, link: DecodeLink, sampler: Sampler, status: Status,
                 urgent: Callable[[], bool]) -> None:
        self.scheduler, self.seq, self.link, self.sampler, self.status, self.urgent = (
            scheduler, seq, link, sampler, status, urgent)

    def begin(self) -> tuple[object, list[int], int, int, Any, Any] | None:
        return self.seq.decode_row(self.link.token, self.scheduler)

    def finish(self, out: Any) -> StepResult:
        nxt, version = self.seq.take_decode_row(self.link.token, out, self.sampler, self.status)
        return nxt, version, _follow(self.scheduler, self.seq, self.link, self.sampler, self.status, self.urgent, nxt)

    def call(self) -> StepResult:
        return _step(self.scheduler, self.seq, self.link, self.sampler, self.status, self.urgent)


def _step(scheduler: Any, seq: SharedSequence, link: DecodeLink, sampler: Sampler, status: Status,
          urgent: Callable[[], bool]) -> StepResult:
    """Worker thread: the step as a plain job, then (claimed, and not the end of the turn) its
    follower, queued before this job returns so that it is first in the sequence's lane."""
    nxt, version = seq.append_and_sample(link.token, sampler, status)
    return nxt, version, _follow(scheduler, seq, link, sampler, status, urgent, nxt)


def _follow(scheduler: Any, seq: SharedSequence, link: DecodeLink, sampler: Sampler, status: Status,
            urgent: Callable[[], bool], nxt: int) -> DecodeLink | None:
    """The step that appends ``nxt``, queued if ``link``'s step was claimed, may chain and did not end
    the turn; else None. The link's lock is held while queueing: revoke() then means "nothing more
    will be queued"."""
    with link._lock:
        if not (link._claimed and link._chain and not link._revoked and nxt not in seq.template.end_of_agent_turn_ids):
            return None
        follower = DecodeLink(nxt, claimed=False, chain=False)
        try:
            _queue(scheduler, seq, follower, sampler, status, urgent)
        except RuntimeError:  # the engine is closing: the session hears of it on its next call
            return None
        return follower


async def settle(rollback_one: Callable[[], Any], link: DecodeLink) -> bool:
    """Undo a step queued ahead and never claimed: cancelled if it has not started, else awaited
    and its token rolled back (``rollback_one()``: an awaitable that removes the sequence's last
    token in its lane). Returns True if a token was rolled back."""
    assert link.future is not None
    if link.future.cancel():
        return False
    try:
        await asyncio.wrap_future(link.future)
    except Exception:  # noqa: BLE001 - the step failed: nothing was appended
        return False
    await rollback_one()
    return True
