"""Session-level limits and state bugs (issue 14): eviction during an agent turn, instructions
updates that wait for a turn boundary and survive eviction, bounded input queues, and the
validation of sampling settings. Tiny model; nothing asserts on time."""

from __future__ import annotations

import asyncio

from duplex.engine.sampling import SamplingConfig
from duplex.engine.sequence import SequenceConfig
from duplex.session.clock import ManualClock
from duplex.session.core import Session, SessionConfig
from duplex.session.events import Cancel, TextInput, UpdateSession
from duplex.session.validation import instructions_token_limit
from tests.fakes import collect_until, settle


def _is(type_: str, **attrs):
    return lambda ev: ev.type == type_ and all(getattr(ev, k) == v for k, v in attrs.items())


async def _session(engine, max_tokens: int = 24, **cfg) -> Session:
    cfg.setdefault("instructions", "You are terse.")
    s = Session(engine, SessionConfig(sampling=SamplingConfig(max_tokens=max_tokens), **cfg), clock=ManualClock())
    await s.start()
    return s


def _errors(events) -> list[str]:
    return [e.code for e in events if e.type == "error"]


async def test_eviction_during_an_agent_turn_keeps_the_rollback_exact(tiny_engine):
    seq_cfg = SequenceConfig(max_tokens=160, keep_recent_tokens=80, prefill_chunk_tokens=64)
    s = await _session(tiny_engine, sequence=seq_cfg)
    assert s.seq is not None
    tpl = s.seq.template
    fixed = len(s.seq) + len(tpl.user.header) + len(tpl.user.footer) + len(tpl.agent.header)
    tok = tiny_engine.tokenizer
    words = ["apple"]
    while fixed + len(tok.encode(" ".join(words + ["apple"]), add_special_tokens=False)) <= 160 - 6:
        words.append("apple")
    s.submit(TextInput(" ".join(words)))  # the agent turn opens ~6 tokens below the eviction threshold
    seen = await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 12)
    assert s.seq.evicted_tokens > 0  # evicted while the agent was speaking
    s.submit(Cancel())
    seen += await collect_until(s, _is("turn_ended", speaker="agent"))
    ended = seen[-1]
    assert ended.reason == "interrupted" and "internal_error" not in _errors(seen)
    shown = "".join(e.text for e in seen if e.type == "agent_text_delta")
    assert shown.startswith(ended.text)  # kept exactly what was shown
    assert s.seq.cache_length == len(s.seq) and s.state == "listening"
    s.submit(TextInput("are you still there"))  # not wedged: the next turn is answered
    after = await collect_until(s, _is("turn_ended", speaker="agent"))
    assert after[-1].reason in ("max_tokens", "completed") and "internal_error" not in _errors(after)
    await s.close()


async def test_instructions_while_the_agent_speaks_wait_for_the_turn_boundary(tiny_engine):
    s = await _session(tiny_engine)
    s.submit(TextInput("hello there"))
    await collect_until(s, _is("turn_started", speaker="agent"))
    s.submit(UpdateSession(instructions="Answer in French."))
    seen = await collect_until(s, _is("instructions_updated"))
    assert seen[-1].status == "pending"
    assert "Answer in French." not in s.transcript  # not in the middle of the agent's turn
    seen = await collect_until(s, _is("instructions_updated"))
    assert seen[-1].status == "applied"
    assert [e for e in seen if e.type == "turn_ended" and e.speaker == "agent"]  # after the turn closed
    text = s.transcript
    assert text.index("Answer in French.") > text.index("hello there")
    assert s.config.instructions == "Answer in French."
    s.submit(TextInput("and now"))
    await collect_until(s, _is("turn_ended", speaker="agent"))
    await s.close()


async def test_instructions_when_idle_apply_at_once_and_survive_eviction(tiny_engine):
    seq_cfg = SequenceConfig(max_tokens=200, keep_recent_tokens=100, prefill_chunk_tokens=64)
    s = await _session(tiny_engine, max_tokens=8, sequence=seq_cfg)
    s.submit(UpdateSession(instructions="Always rhyme."))
    seen = await collect_until(s, _is("instructions_updated"))
    assert seen[-1].status == "applied" and "Always rhyme." in s.transcript
    assert s.seq is not None
    for i in range(12):
        s.submit(TextInput(f"turn {i} tell me something about the weather in the mountains today"))
        await collect_until(s, _is("turn_ended", speaker="agent"))
    assert s.seq.evicted_tokens > 0
    assert "Always rhyme." in s.transcript and "You are terse." in s.transcript  # both kept
    assert len(s.seq) <= 200 and s.seq.cache_length == len(s.seq)
    await s.close()


async def test_instructions_over_the_limits_get_an_error_naming_the_limit(tiny_engine):
    s = await _session(tiny_engine)
    s.submit(UpdateSession(instructions="x" * 900_000))
    err = (await collect_until(s, _is("error")))[-1]
    assert err.code == "instructions_too_long" and "8000" in err.message and "characters" in err.message
    limit = instructions_token_limit(s.config)
    s.submit(UpdateSession(instructions=" ".join(["word"] * (limit + 10))[:7_999]))
    err = (await collect_until(s, _is("error")))[-1]
    assert err.code == "instructions_too_long" and f"{limit} tokens" in err.message
    s.submit(TextInput("hi"))
    await collect_until(s, _is("turn_ended", speaker="agent"))  # still usable
    await s.close()


async def test_bad_sampling_settings_are_refused(tiny_engine):
    s = await _session(tiny_engine)
    for update, field in ((UpdateSession(temperature=-1.0), "temperature"),
                          (UpdateSession(temperature=float("nan")), "temperature"),
                          (UpdateSession(max_reply_tokens=10**9), "max_reply_tokens"),
                          (UpdateSession(policy_params={"no_such_param": 1}), "policy_params")):
        assert not s.submit(update)
        err = (await collect_until(s, _is("error")))[-1]
        assert field in err.message and err.code in ("invalid_value", "invalid_policy"), err
    assert not s.submit(TextInput("bad \ud800 text"))
    assert (await collect_until(s, _is("error")))[-1].code == "invalid_value"
    await s.close()


async def test_input_queue_is_bounded_and_waiting_for_room_is_backpressure(tiny_engine):
    s = await _session(tiny_engine, max_queued_inputs=3)
    assert all(s.submit(TextInput(f"w{i} ", final=False)) for i in range(3))
    assert not s.has_room
    assert not s.submit(TextInput("w3 ", final=False))
    err = (await collect_until(s, _is("error")))[-1]
    assert err.code == "input_queue_full" and "max_queued_inputs" in err.message and "3" in err.message
    await asyncio.wait_for(s.wait_for_room(), 30)  # the loop drains the queue
    assert s.submit(TextInput("w4"))
    await collect_until(s, _is("turn_ended", speaker="agent"))
    assert all(f"w{i}" in s.transcript for i in (0, 1, 2, 4))
    await settle(s)
    await s.close()


async def test_typed_text_without_word_breaks_is_bounded(tiny_engine):
    s = await _session(tiny_engine, max_text_chars=100)
    assert s.submit(TextInput("a" * 60, final=False))
    await settle(s, rounds=3)
    assert not s.submit(TextInput("b" * 60, final=False))
    err = (await collect_until(s, _is("error")))[-1]
    assert err.code == "text_too_long" and "100" in err.message
    await s.close()
