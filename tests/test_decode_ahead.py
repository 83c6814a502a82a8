"""Decode ahead (duplex.engine.decode_ahead): a claimed step queues the next one, an unclaimed or
revoked one never does, and a step queued ahead and never taken leaves the cache exactly as it was.
Counts and token ids only; no timing."""

from __future__ import annotations

import asyncio

from duplex.engine import decode_ahead
from duplex.engine.decode_ahead import DecodeLink, settle
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import Speaker, Status
from duplex.session.clock import ManualClock
from duplex.session.config import SessionConfig
from duplex.session.core import Session
from duplex.session.events import TextInput
from tests.fakes import collect_until


class _RecordingScheduler:
    def __init__(self) -> None:
        self.submitted: list[tuple] = []

    def submit(self, lane, fn, *args, urgent=False):
        self.submitted.append((lane, fn, args, urgent))
        return object()


def _count_plain_job_steps(monkeypatch) -> list[int]:
    """A list that grows by one for every decode step run as a plain job (not inside a tick)."""
    jobs: list[int] = []
    step = decode_ahead._step

    def counting_step(*args, **kwargs):
        jobs.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(decode_ahead, "_step", counting_step)
    return jobs


def _greedy() -> Sampler:
    return Sampler(SamplingConfig(temperature=0.0, max_tokens=64))


def _agent_turn(engine):
    seq = engine.new_sequence()
    seq.add_message(Speaker.USER, "hello there")
    seq.hand_over(Speaker.AGENT)
    return seq


async def test_only_a_claimed_unrevoked_step_queues_the_next_one(tiny_engine):
    seq = _agent_turn(tiny_engine)
    first = seq.sample(_greedy())
    cases = {"claimed": DecodeLink(first, claimed=True, chain=True),
             "unclaimed": DecodeLink(first, claimed=False, chain=True),
             "no chain": DecodeLink(first, claimed=True, chain=False),
             "revoked": DecodeLink(first, claimed=True, chain=True)}
    cases["revoked"].revoke()
    for name, link in cases.items():
        sched = _RecordingScheduler()
        start = len(seq)
        nxt, version, follower = await asyncio.to_thread(decode_ahead._step, sched, seq, link, _greedy(),
                                                         Status.UNSPOKEN, lambda: True)
        assert len(seq) == start + 1 and seq.ids[-1] == first and version == seq.logits_version
        if name == "claimed":
            assert follower is not None and follower.token == nxt
            ((lane, fn, args, urgent),) = sched.submitted
            assert lane is seq and fn is decode_ahead._step and args[2] is follower and urgent is True
        else:
            assert follower is None and not sched.submitted, name
        seq.rollback(1)


async def test_the_end_of_the_turn_is_never_appended_ahead(tiny_engine):
    seq = _agent_turn(tiny_engine)
    eot = next(iter(seq.template.end_of_agent_turn_ids))

    class SaysEnd(Sampler):
        def __call__(self, logits, recent_ids=None):
            return eot

    sched = _RecordingScheduler()
    link = DecodeLink(seq.sample(_greedy()), claimed=True, chain=True)
    nxt, _, follower = await asyncio.to_thread(decode_ahead._step, sched, seq, link,
                                               SaysEnd(SamplingConfig(temperature=0.0)), Status.UNSPOKEN, lambda: False)
    assert nxt == eot and follower is None and not sched.submitted


async def test_a_step_queued_ahead_and_settled_leaves_the_cache_as_it_was(tiny_engine):
    seq = _agent_turn(tiny_engine)
    sampler = _greedy()
    token = seq.sample(sampler)
    start = len(seq)
    link = tiny_engine.decode_step(seq, token, sampler, chain=True, urgent=lambda: False)
    nxt, _, follower = await asyncio.wrap_future(link.future)
    assert follower is not None and follower.token == nxt  # queued by the step, not by this test

    async def rollback_one():
        return await tiny_engine.run_for(seq, seq.rollback, 1)

    await asyncio.wrap_future(follower.future)  # it ran: its token is in the cache...
    assert len(seq) == start + 2 and seq.ids[-1] == nxt
    assert await settle(rollback_one, follower)  # ...and leaves it
    assert len(seq) == start + 1 and seq.ids[-1] == token
    # the claimed step still decodes on as if nothing had run ahead
    again, _, _ = await asyncio.wrap_future(tiny_engine.decode_step(seq, nxt, sampler, chain=False,
                                                                   urgent=lambda: False).future)
    assert seq.ids[-1] == nxt and isinstance(again, int)


async def test_a_stop_sequence_leaves_exactly_the_taken_tokens_in_the_turn(tiny_engine):
    async def reply(**sampling):
        config = SessionConfig(instructions="You are terse.", sampling=SamplingConfig(temperature=0.0, **sampling))
        s = Session(tiny_engine, config, clock=ManualClock())
        await s.start()
        s.submit(TextInput("tell me something"))
        events = await collect_until(s, lambda e: e.type == "turn_ended" and e.speaker == "agent")
        return s, events

    s, events = await reply(max_tokens=12)
    full = [e for e in events if e.type == "agent_text_delta"]
    turn = full[-1].turn
    content = [s.seq.ids[p] for p in s.seq.positions(turn)]
    await s.close()
    header, footer = s.seq.template.agent.header, s.seq.template.agent.footer
    tokens = content[len(header):len(content) - len(footer)]
    text = tiny_engine.tokenizer.decode(tokens[:3], skip_special_tokens=True)
    assert text  # (the random model repeats one token: three of it are the stop sequence)
    s, events = await reply(max_tokens=12, stop=[text])
    (ended,) = [e for e in events if e.type == "turn_ended" and e.speaker == "agent"]
    assert ended.reason == "stop_sequence"
    kept = [s.seq.ids[p] for p in s.seq.positions(ended.turn)]
    n = len(kept) - len(header) - len(footer)
    # the turn holds the tokens taken up to the stop, then its footer: no token appended ahead
    assert kept[:len(header)] == list(header) and kept[len(kept) - len(footer):] == list(footer)
    stop_at = next(k for k in range(1, 4) if text in tiny_engine.tokenizer.decode(tokens[:k], skip_special_tokens=True))
    assert kept[len(header):len(header) + n] == tokens[:n] and n == stop_at
    assert tiny_engine.tokenizer.decode(kept[len(header):len(header) + n], skip_special_tokens=True).startswith(text)
    await s.close()


async def test_a_reply_decodes_inside_the_ticks_with_no_job_per_step(tiny_engine, monkeypatch):
    """Every step of a reply is a tick step: the tick that runs its row takes the token, samples the
    next and queues the follower itself, so no plain job (no worker thread) runs for any step."""
    jobs = _count_plain_job_steps(monkeypatch)
    before = tiny_engine.stats.tick_steps
    config = SessionConfig(instructions="You are terse.", sampling=SamplingConfig(temperature=0.0, max_tokens=12))
    s = Session(tiny_engine, config, clock=ManualClock())
    await s.start()
    s.submit(TextInput("tell me something"))
    events = await collect_until(s, lambda e: e.type == "turn_ended" and e.speaker == "agent")
    deltas = [e for e in events if e.type == "agent_text_delta"]
    # the opening job took the first token and the step after it; every later one ran in a tick
    assert not jobs and tiny_engine.stats.tick_steps - before == deltas[-1].token_end - 1 > 0
    await s.close()


async def test_a_step_queued_behind_a_lane_job_runs_after_it_and_a_cancelled_one_never(tiny_engine):
    """A tick step keeps its place in the sequence's lane: queued behind a job, it has not started
    (cancel() still works) and, once that job is done, appends after what the job appended."""
    import threading

    seq = _agent_turn(tiny_engine)
    sampler = _greedy()
    token = seq.sample(sampler)
    word = tiny_engine.tokenizer.encode(" ok", add_special_tokens=False)[0]
    gate = threading.Event()

    def held_append():
        assert gate.wait(30)
        seq.append([word], Status.COMMITTED)

    job = asyncio.wrap_future(tiny_engine.scheduler.submit(seq, held_append))
    dropped = tiny_engine.decode_step(seq, token, sampler, chain=True, urgent=lambda: False)
    kept = tiny_engine.decode_step(seq, token, sampler, chain=False, urgent=lambda: False)
    assert not dropped.future.running() and not kept.future.running()
    assert dropped.future.cancel()
    gate.set()
    await job
    nxt, version, follower = await asyncio.wrap_future(kept.future)
    assert seq.ids[-2:] == [word, token] and follower is None and version == seq.logits_version
    assert isinstance(nxt, int)


async def test_a_step_the_sequence_cannot_take_in_a_tick_runs_as_a_job(tiny_engine, monkeypatch):
    """``decode_row`` declines (an eviction due, no open turn, another runner): the same step runs
    as a plain job, with the same result."""
    seq = _agent_turn(tiny_engine)
    sampler = _greedy()
    token = seq.sample(sampler)
    assert seq.decode_row(token, tiny_engine.scheduler)[2] == len(seq)  # the row starts at the end
    assert seq.decode_row(token, object()) is None  # not this sequence's runner
    jobs = _count_plain_job_steps(monkeypatch)
    monkeypatch.setattr(seq, "decode_row", lambda token, runner: None)
    start = len(seq)
    _, _, follower = await asyncio.wrap_future(
        tiny_engine.decode_step(seq, token, sampler, chain=False, urgent=lambda: False).future)
    assert jobs == [1] and follower is None and len(seq) == start + 1 and seq.ids[-1] == token


async def test_a_tick_step_whose_row_fails_gets_the_error_and_its_lane_goes_on(tiny_engine):
    class FailingStep:
        def begin(self):
            def direct(ids, start_pos, keep):
                raise RuntimeError("row failed")
            return self, [1], 0, 1, object(), direct  # a cache no batched pass takes: direct runs it

        def finish(self, out):
            raise AssertionError("finish must not run for a failed row")

        def call(self):
            raise AssertionError("the row was given: no plain job")

    sched = tiny_engine.scheduler
    failed = asyncio.wrap_future(sched.submit_step("lane", FailingStep()))
    after = asyncio.wrap_future(sched.submit("lane", lambda: 42))
    try:
        await failed
    except RuntimeError as exc:
        assert "row failed" in str(exc)
    else:
        raise AssertionError("the row's error did not reach the step's future")
    assert await after == 42
