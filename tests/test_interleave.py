"""The two overlap layouts on the tiny model: user words heard while the agent generates either
wait outside the cache (``hold``) or go in at once inside the agent's turn (``interleave``), and
rollback still leaves exactly what was heard and said."""

from __future__ import annotations

import asyncio

import pytest

from duplex.engine.sampling import SamplingConfig
from duplex.engine.sequence import Speaker, Status
from duplex.session.clock import ManualClock
from duplex.session.core import Session, SessionConfig
from duplex.session.events import AsrWord, Cancel, PlaybackMark, SpeechStarted, TextInput
from duplex.session.interleave import Interjection, agent_position, agent_spans, kept_interjections
from tests.fakes import collect_until


async def _until(cond, timeout_s: float = 20.0) -> None:
    """Poll (a hang guard, not a timing assertion)."""
    for _ in range(int(timeout_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


def _is(type_: str, **attrs):
    return lambda ev: ev.type == type_ and all(getattr(ev, k) == v for k, v in attrs.items())


async def _session(engine, layout: str, clock=None, **cfg) -> Session:
    config = SessionConfig(instructions="You are terse.", sampling=SamplingConfig(max_tokens=4000),
                           overlap_layout=layout, **cfg)
    s = Session(engine, config, clock=clock or ManualClock())
    await s.start()
    return s


def test_agent_positions_skip_interjections():
    js = [Interjection(at=2, length=5, ids=(1,), agent_turn=7), Interjection(at=4, length=3, ids=(2,), agent_turn=9)]
    assert [agent_position(10, js, k) for k in range(6)] == [10, 11, 12, 18, 19, 23]
    assert agent_spans(10, js, 0, 6) == [(10, 12), (17, 19), (22, 24)]
    assert agent_spans(10, js, 3, 4) == [(18, 19)]
    assert kept_interjections(js, 4) == ([js[0]], [js[1]])
    with pytest.raises(ValueError, match="overlap_layout"):
        SessionConfig(overlap_layout="sideways")


async def test_interleaved_words_enter_the_cache_inside_the_agent_turn_and_generation_goes_on(tiny_engine):
    s = await _session(tiny_engine, "interleave", policy="half-duplex")  # never yields: the agent talks on
    s.submit(TextInput("talk to me"))
    turn = (await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 4))[-1].turn
    s.submit(TextInput("oh really "))  # typed over the agent: committed whole words, not submitted
    await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 12)
    agent = s._agent
    assert agent is not None and agent.turn == turn and len(agent.interjections) == 1
    seq = s.seq
    users = [sp for sp in seq.spans() if sp.speaker == Speaker.USER]
    assert "oh really" in seq.text(users[-1].start, users[-1].end)  # in the cache, as a user turn ...
    agents_after = [sp for sp in seq.spans() if sp.speaker == Speaker.AGENT and sp.start > users[-1].end]
    assert agents_after  # ... followed by the agent's reopened turn, where generation went on
    assert not s._held_ids
    # text output: every token shown is marked spoken, in both agent spans, and nothing else is
    shown = agent.delivered_tokens
    statuses = [seq._status[p] for a, b in agent_spans(s._content_start(agent), agent.interjections, 0, shown)
                for p in range(a, b)]
    assert len(statuses) == shown and set(statuses) == {Status.SPOKEN}
    n = len(agent.tokens) - 1  # (the newest token may still be on its way into the cache)
    assert [seq._ids[p] for a, b in agent_spans(s._content_start(agent), agent.interjections, 0, n)
            for p in range(a, b)] == agent.tokens[:n]
    await s.close()


@pytest.mark.parametrize("layout", ["hold", "interleave"])
async def test_barge_in_leaves_what_was_heard_then_the_users_words_in_either_layout(tiny_engine, layout):
    clock = ManualClock()
    s = await _session(tiny_engine, layout, clock, audio_output=True, truncate_wait_ms=400)
    s.submit(TextInput("talk to me"))
    turn = (await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 8))[-1].turn
    s.submit(PlaybackMark(turn, 3))
    s.submit(SpeechStarted(2.0))
    await collect_until(s, _is("agent_paused"))
    for i, w in enumerate(("what", "about", "tomorrow")):
        s.submit(AsrWord(w, 2.0 + 0.2 * i, 2.2 + 0.2 * i, committed=True))
    await collect_until(s, _is("interrupted"))
    s.submit(PlaybackMark(turn, 3, final=True))
    await collect_until(s, _is("turn_ended", speaker="agent"))
    await _until(lambda: "what about tomorrow" in s.seq.text())  # re-appended on the engine worker
    seq = s.seq
    agent_span = [sp for sp in seq.spans() if sp.turn == turn and sp.status == Status.SPOKEN]
    assert sum(len(sp) for sp in agent_span) == 3  # exactly what was heard ...
    users = [sp for sp in seq.spans() if sp.speaker == Speaker.USER]
    assert users[-1].start > agent_span[-1].end  # ... then the user's words, after it
    assert "what about tomorrow" in seq.text(users[-1].start)
    assert seq.text().count("what about tomorrow") == 1  # re-appended once, never twice
    # between the engine's jobs: the session may be prefilling its next turn meanwhile
    cached, ledger = await tiny_engine.run_for(seq, lambda: (seq.cache_length, len(seq)))
    assert cached == ledger
    await s.close()


async def test_cancel_keeps_an_interjection_that_came_before_the_cut_in_place(tiny_engine):
    s = await _session(tiny_engine, "interleave", policy="half-duplex")
    s.submit(TextInput("talk to me"))
    await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 4)
    s.submit(TextInput("mm okay "))
    await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 10)
    s.submit(Cancel())  # text output: everything shown was "heard", the interjection included
    ended = (await collect_until(s, _is("turn_ended", speaker="agent")))[-1]
    assert ended.reason == "interrupted"
    seq = s.seq
    kinds: list[Speaker] = []
    for sp in seq.spans():
        if sp.turn >= ended.turn and (not kinds or kinds[-1] != sp.speaker):
            kinds.append(sp.speaker)
    assert kinds[:3] == [Speaker.AGENT, Speaker.USER, Speaker.AGENT]  # said where it was said
    assert seq.text().count("mm okay") == 1 and not s._held_ids
    # between the engine's jobs: the session may be prefilling its next turn meanwhile
    cached, ledger = await tiny_engine.run_for(seq, lambda: (seq.cache_length, len(seq)))
    assert cached == ledger
    await s.close()
