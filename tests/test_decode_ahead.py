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
