"""The session loop on the tiny model with a manual clock: turn-taking, backchannels, barge-in
rollback, cancellation and bad input."""

from __future__ import annotations

import asyncio

import pytest

from duplex.engine.sampling import SamplingConfig
from duplex.engine.sequence import Speaker, Status
from duplex.session.clock import ManualClock
from duplex.session.core import TRUNCATION_MARKER, Session, SessionConfig
from duplex.session.events import (
    AsrWord,
    Cancel,
    PlaybackMark,
    SpeechStarted,
    SpeechStopped,
    TextInput,
    UpdateSession,
)
from tests.fakes import collect_until, settle


def _is(type_: str, **attrs):
    return lambda ev: ev.type == type_ and all(getattr(ev, k) == v for k, v in attrs.items())


async def _session(engine, clock=None, max_tokens=24, **cfg) -> Session:
    config = SessionConfig(instructions="You are terse.", sampling=SamplingConfig(max_tokens=max_tokens), **cfg)
    s = Session(engine, config, clock=clock or ManualClock())
    await s.start()
    return s


async def _speaking_with_audio(engine, clock, tokens: int = 4) -> tuple[Session, int]:
    """An audio-output session whose agent has emitted ``tokens`` tokens of a long reply."""
    s = await _session(engine, clock, max_tokens=4000, audio_output=True, truncate_wait_ms=400)
    s.submit(TextInput("talk to me"))
    turn = (await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= tokens))[-1].turn
    return s, turn


async def test_text_turn_streams_a_reply_with_contiguous_token_spans(tiny_engine):
    s = await _session(tiny_engine)
    s.submit(TextInput("hello there"))
    events = await collect_until(s, _is("turn_ended", speaker="agent"))
    types = [e.type for e in events]
    assert types.index("turn_ended") < types.index("turn_started")  # user turn closes, agent opens
    deltas = [e for e in events if e.type == "agent_text_delta"]
    assert deltas and deltas[0].token_start == 0
    for a, b in zip(deltas, deltas[1:]):
        assert a.token_end == b.token_start
    assert "".join(d.text for d in deltas) == events[-1].text
    assert events[-1].reason == "max_tokens" and deltas[-1].token_end == 24
    await s.close()


async def test_pause_waits_for_the_silence_gap(tiny_engine):
    clock = ManualClock()
    s = await _session(tiny_engine, clock)
    s.submit(SpeechStarted(0.0))
    s.submit(AsrWord("what", 0.0, 0.3, True))
    s.submit(AsrWord("time", 0.3, 0.6, True))
    s.submit(SpeechStopped(0.6))
    await collect_until(s, lambda e: e.type == "user_transcript" and e.text == "what time")
    clock.advance(0.3)  # a pause shorter than the 500 ms gap
    assert not [e for e in await settle(s) if e.type == "turn_started"]
    obs = s.observe()
    assert obs.silence_s == pytest.approx(0.3) and 0.0 <= obs.eou_prob <= 1.0
    assert 0.0 <= obs.sentence_break_prob <= 1.0 - obs.eou_prob  # from the same prediction
    clock.advance(0.3)  # now past the gap: a smooth end of turn
    await collect_until(s, _is("turn_started", speaker="agent"))
    await s.close()


async def test_a_committed_word_replaces_its_retimed_tentative_copy(tiny_engine):
    """An earlier pass showed "call" tentatively; the final pass commits it with boundaries a few
    tens of ms earlier. The live transcript shows it once (it used to read "remind me call call")."""
    s = await _session(tiny_engine, ManualClock())
    s.submit(SpeechStarted(0.0))
    s.submit(AsrWord("remind", 0.0, 0.3, True))
    s.submit(AsrWord("me", 0.34, 0.5, False))
    s.submit(AsrWord("call", 0.56, 0.9, False))
    await collect_until(s, _is("user_transcript", text="remind me call"))
    s.submit(AsrWord("me", 0.32, 0.48, True))
    s.submit(AsrWord("call", 0.52, 0.86, True))
    await collect_until(s, _is("user_transcript", text="remind me call", committed=True))
    assert s.observe().partial_text == "remind me call"
    s.submit(AsrWord("later", 1.0, 1.3, False))  # a word after the committed ones stays tentative
    await collect_until(s, _is("user_transcript", text="remind me call later"))
    await s.close()


async def test_user_resuming_after_a_pause_keeps_one_turn(tiny_engine):
    clock = ManualClock()
    s = await _session(tiny_engine, clock)
    for ev in (SpeechStarted(0), AsrWord("book", 0, 0.2, True), SpeechStopped(0.3)):
        s.submit(ev)
    await collect_until(s, _is("user_transcript", text="book"))
    clock.advance(0.3)
    s.submit(SpeechStarted(0.6))
    s.submit(AsrWord("a table", 0.6, 0.9, True))
    s.submit(SpeechStopped(1.0))
    await collect_until(s, _is("user_transcript", text="book a table"))
    clock.advance(0.6)
    events = await collect_until(s, _is("turn_ended", speaker="user"))
    assert events[-1].text == "book a table"
    await s.close()


async def test_backchannel_does_not_interrupt(tiny_engine):
    clock = ManualClock()
    s = await _session(tiny_engine, clock, max_tokens=4000)
    s.submit(TextInput("tell me everything"))
    await collect_until(s, _is("agent_text_delta"))
    s.submit(SpeechStarted(1.0))
    s.submit(AsrWord("yeah", 1.0, 1.3, True))
    await settle(s)
    clock.advance(0.3)
    s.submit(SpeechStopped(1.3))
    events = await settle(s, rounds=30)
    assert not [e for e in events if e.type in ("interrupted", "turn_started")]
    assert s.state == "speaking"
    assert s.observe().user_turn_words == 0  # the backchannel is not queued as a new turn
    s.submit(Cancel())
    ev = (await collect_until(s, _is("interrupted")))[-1]
    assert ev.reason == "cancelled"
    await s.close()


async def test_text_barge_in_keeps_exactly_what_was_shown(tiny_engine):
    s = await _session(tiny_engine, max_tokens=4000)
    s.submit(TextInput("tell me a long story"))
    seen = await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 5)
    turn = seen[-1].turn
    s.submit(TextInput("stop, another question"))
    events = seen + await collect_until(s, _is("turn_ended", speaker="agent"))
    cut = next(i for i, e in enumerate(events) if e.type == "interrupted")
    shown = [e for e in events[:cut] if e.type == "agent_text_delta"]
    inter = events[cut]
    assert inter.kept_tokens == shown[-1].token_end
    assert inter.kept_text == "".join(d.text for d in shown)
    assert events[-1].reason == "interrupted"
    seq = s.seq
    assert len(seq.positions(turn, Status.SPOKEN)) == inter.kept_tokens
    assert not seq.positions(turn, Status.UNSPOKEN)
    expected_tail = inter.kept_text + TRUNCATION_MARKER
    turn_text = seq.text(seq.turn_start(turn), seq.positions(turn)[-1] + 1)
    assert expected_tail in turn_text
    # the barge-in text is then answered in a new agent turn
    events = await collect_until(s, _is("turn_started", speaker="agent"))
    user_turn = [e for e in events if e.type == "turn_ended" and e.speaker == "user"][-1]
    assert user_turn.text == "stop, another question"
    await s.close()


async def test_audio_barge_in_rolls_back_to_the_final_playback_mark(tiny_engine):
    clock = ManualClock()
    s = await _session(tiny_engine, clock, max_tokens=4000, audio_output=True, truncate_wait_ms=400)
    s.submit(TextInput("talk to me"))
    seen = await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 6)
    turn = seen[-1].turn
    s.submit(PlaybackMark(turn, 4))
    s.submit(SpeechStarted(2.0))
    paused = (await collect_until(s, _is("agent_paused")))[-1]  # pause first, at the onset
    assert paused.turn == turn
    clock.advance(1.6)  # sustained sound with no words, beyond the 1.5 s a backchannel may last
    inter = (await collect_until(s, _is("interrupted")))[-1]
    assert inter.kept_tokens == 4
    s.submit(PlaybackMark(turn, 3, final=True))  # the client stopped playback: it had really played 3
    ended = (await collect_until(s, _is("turn_ended", speaker="agent")))[-1]
    assert ended.reason == "interrupted"
    seq = s.seq
    spoken = seq.positions(turn, Status.SPOKEN)
    assert len(spoken) == 3
    assert not seq.positions(turn, Status.UNSPOKEN)
    header = len(seq.template.agent.header)
    marker = tiny_engine.tokenizer.encode(TRUNCATION_MARKER, add_special_tokens=False)
    footer = list(seq.template.agent.footer)
    assert len(seq.positions(turn)) == header + 3 + len(marker) + len(footer)
    # between the engine's jobs: the session may be prefilling its next turn meanwhile
    cached, ledger = await tiny_engine.run_for(seq, lambda: (seq.cache_length, len(seq)))
    assert cached == ledger
    await s.close()


async def test_audio_barge_in_without_final_mark_uses_last_mark_after_timeout(tiny_engine):
    clock = ManualClock()
    s = await _session(tiny_engine, clock, max_tokens=4000, audio_output=True, truncate_wait_ms=400)
    s.submit(TextInput("talk to me"))
    seen = await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 4)
    turn = seen[-1].turn
    s.submit(PlaybackMark(turn, 2))
    s.submit(Cancel())
    await collect_until(s, _is("interrupted"))
    assert not [e for e in await settle(s) if e.type == "turn_ended"]  # still waiting for the client
    clock.advance(0.5)
    await collect_until(s, _is("turn_ended", speaker="agent"))
    assert len(s.seq.positions(turn, Status.SPOKEN)) == 2
    await s.close()


async def test_close_leaves_no_orphan_tasks(tiny_engine):
    before = asyncio.all_tasks()
    s = await _session(tiny_engine, max_tokens=4000)
    s.submit(TextInput("go on"))
    await collect_until(s, _is("agent_text_delta"))
    await s.close()
    await asyncio.sleep(0)
    leftover = {t for t in asyncio.all_tasks() - before if not t.done()}
    assert not leftover


async def test_bad_inputs_get_errors_and_the_session_carries_on(tiny_engine):
    s = await _session(tiny_engine)
    assert not s.submit(object())
    assert not s.submit(TextInput(""))
    assert not s.submit(TextInput("x" * 1_000_000))
    assert not s.submit(UpdateSession(policy="no-such-policy"))
    assert not s.submit(UpdateSession(policy_params={"gap_ms": 100, "bogus_knob": 1}))  # params only
    errors = [e for e in await settle(s) if e.type == "error"]
    # one error per bad update (not one per tick), each naming what was wrong
    assert [e.code for e in errors] == ["unknown_event", "empty_text", "text_too_long", "invalid_policy",
                                        "invalid_policy"]
    assert "1000000" in errors[2].message and "bogus_knob" in errors[4].message
    assert s.policy.params()["gap_ms"] != 100  # a rejected update changes nothing
    assert s.submit(TextInput("still there?"))
    await collect_until(s, _is("turn_started", speaker="agent"))
    await s.close()


async def test_policy_can_be_switched_live(tiny_engine):
    s = await _session(tiny_engine)
    s.submit(UpdateSession(policy="eou", policy_params={"short_gap_ms": 100}))
    await settle(s)
    assert s.policy.name == "eou" and s.config.policy == "eou"
    # another policy without params starts from its own defaults (eou's params would not fit it)
    assert s.submit(UpdateSession(policy="half-duplex"))
    errors = [e for e in await settle(s) if e.type == "error"]
    assert not errors and s.policy.name == "half-duplex" and s.config.policy_params == {}
    assert s.submit(TextInput("still answering?"))
    await collect_until(s, _is("turn_started", speaker="agent"))
    await s.close()


async def test_user_speech_while_agent_generates_waits_outside_the_cache(tiny_engine):
    s = await _session(tiny_engine, max_tokens=4000, policy="half-duplex")
    s.submit(TextInput("first"))
    await collect_until(s, _is("agent_text_delta"))
    s.submit(TextInput("second message"))
    await settle(s)
    assert s.seq.open_turn[0] is Speaker.AGENT  # no user tokens interleaved into the open agent turn
    assert s.state == "speaking"  # half-duplex does not yield
    s.submit(Cancel())
    await collect_until(s, _is("turn_started", speaker="agent"))  # then "second message" is answered
    await s.close()


async def test_speculative_handover_is_undone_exactly_when_the_user_goes_on(tiny_engine):
    async def run(speculative: bool) -> list[int]:
        clock = ManualClock()
        s = await _session(tiny_engine, clock, speculative_handover=speculative)
        for ev in (SpeechStarted(0), AsrWord("book", 0, 0.2, True), SpeechStopped(0.3)):
            s.submit(ev)
        await collect_until(s, _is("user_transcript", text="book"))
        await settle(s)
        if speculative:
            assert s.seq.open_turn[0] is Speaker.AGENT  # footer + agent header already prefilled
        s.submit(SpeechStarted(0.6))
        s.submit(AsrWord("a table", 0.6, 0.9, True))
        await collect_until(s, _is("user_transcript", text="book a table"))
        ids = s.seq.ids
        await s.close()
        return ids

    assert await run(True) == await run(False)


async def test_agent_backchannel_is_said_but_opens_no_turn(tiny_engine):
    clock = ManualClock()
    s = await _session(tiny_engine, clock, policy="eou", policy_params={"backchannel_every_s": 1.0})
    s.submit(SpeechStarted(0.0))
    await settle(s)
    clock.advance(1.2)  # the user is still talking
    events = await collect_until(s, _is("agent_backchannel"))
    assert events[-1].text == "mm-hm"
    assert not [e for e in events if e.type == "turn_started"]
    clock.advance(0.3)
    assert not [e for e in await settle(s) if e.type in ("agent_backchannel", "turn_started")]  # not again yet
    assert s._agent is None and s.state == "listening"
    assert "mm-hm" not in s.transcript  # kept out of the conversation: the user holds the floor
    await s.close()


async def test_user_backchannel_resumes_and_is_noted_in_the_next_user_turn(tiny_engine):
    from duplex.session.core import BACKCHANNEL_MARKER

    clock = ManualClock()
    s, turn = await _speaking_with_audio(tiny_engine, clock)
    s.submit(SpeechStarted(2.0))
    await collect_until(s, _is("agent_paused"))
    s.submit(AsrWord("mm-hm", 2.0, 2.4, committed=True))
    s.submit(SpeechStopped(2.5))
    resumed = (await collect_until(s, _is("agent_resumed")))[-1]
    assert resumed.turn == turn and s._agent is not None  # the agent plays on: no interruption
    assert not s._user_committed  # and the backchannel opened no user turn
    s.submit(Cancel())  # end the long reply, then the user really speaks
    await collect_until(s, _is("interrupted"))
    s.submit(PlaybackMark(turn, 4, final=True))
    await collect_until(s, _is("turn_ended", speaker="agent"))
    s.submit(TextInput("what about tomorrow"))
    await collect_until(s, _is("turn_started", speaker="agent"))
    user_spans = [sp for sp in s.seq.spans() if sp.speaker == Speaker.USER]
    last_user = s.seq.text(user_spans[-1].start, user_spans[-1].end)
    assert BACKCHANNEL_MARKER.format("mm-hm") in last_user and "what about tomorrow" in last_user
    await s.close()


async def test_decoding_waits_while_the_agent_is_paused_and_goes_on_after_the_resume(tiny_engine):
    """Pause first, decide after: during the pause no decode step competes with the whisper pass
    that decides the overlap; a resume picks the reply up where it was."""
    clock = ManualClock()
    s = await _session(tiny_engine, clock, max_tokens=4000, audio_output=True, truncate_wait_ms=400)
    s.submit(TextInput("talk to me"))
    seen = await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 4)
    s.submit(SpeechStarted(2.0))
    seen += await collect_until(s, _is("agent_paused"))
    seen += await settle(s)
    await tiny_engine.run_for(s.seq, lambda: None)  # (behind the step that was under way, if any)
    generated = len(s.seq)
    for _ in range(5):  # ticks pass while the overlap is judged: nothing more is generated
        clock.advance(0.05)
        seen += await settle(s)
    assert len(s.seq) == generated
    s.submit(AsrWord("mm-hm", 2.0, 2.3, committed=True))
    s.submit(SpeechStopped(2.3))
    await collect_until(s, _is("agent_resumed"))
    for _ in range(50):  # the reply goes on (the first deltas may be words decoded before the pause)
        if len(s.seq) > generated:
            break
        await collect_until(s, lambda e: e.type == "agent_text_delta")
    assert len(s.seq) > generated
    await s.close()


async def test_short_sound_resumes_at_once_and_its_late_misheard_words_open_no_turn(tiny_engine):
    """ "uh-huh" (0.3 s) over the agent, whose final words come a second later as "Sir Sir":
    the agent resumes at the sound's end and the late words only become the backchannel note."""
    from duplex.session.core import BACKCHANNEL_MARKER
    from duplex.session.events import TranscriptStatus

    clock = ManualClock()
    s, turn = await _speaking_with_audio(tiny_engine, clock)
    s.submit(SpeechStarted(2.0))
    await collect_until(s, _is("agent_paused"))
    clock.advance(0.4)
    s.submit(TranscriptStatus(True, 2.4))
    s.submit(SpeechStopped(2.4))
    await collect_until(s, _is("agent_resumed"))  # no words yet: resumed on the sound's length
    clock.advance(1.0)
    s.submit(AsrWord("Sir", 2.0, 2.2, committed=True))
    s.submit(AsrWord("Sir", 2.2, 2.4, committed=True))
    s.submit(TranscriptStatus(False, 3.4))
    events = await collect_until(s, lambda e: e.type == "user_transcript" and e.turn == -1 and e.text == "Sir Sir")
    events += await settle(s)
    assert not [e for e in events if e.type in ("interrupted", "agent_paused")]
    assert s._agent is not None and s._agent.turn == turn and not s._user_committed
    s.submit(Cancel())
    await collect_until(s, _is("interrupted"))
    s.submit(PlaybackMark(turn, 4, final=True))
    await collect_until(s, _is("turn_ended", speaker="agent"))
    s.submit(TextInput("go on"))
    await collect_until(s, _is("turn_started", speaker="agent"))
    user_spans = [sp for sp in s.seq.spans() if sp.speaker == Speaker.USER]
    assert BACKCHANNEL_MARKER.format("Sir Sir") in s.seq.text(user_spans[-1].start, user_spans[-1].end)
    await s.close()


async def test_late_stop_word_after_a_resume_still_stops_the_agent(tiny_engine):
    from duplex.session.events import TranscriptStatus

    clock = ManualClock()
    s = await _session(tiny_engine, clock, max_tokens=4000, audio_output=True, truncate_wait_ms=400)
    s.submit(TextInput("talk to me"))
    await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end >= 4)
    s.submit(SpeechStarted(2.0))
    await collect_until(s, _is("agent_paused"))
    clock.advance(0.3)
    s.submit(TranscriptStatus(True, 2.3))
    s.submit(SpeechStopped(2.3))
    await collect_until(s, _is("agent_resumed"))
    s.submit(AsrWord("wait", 2.0, 2.3, committed=True))  # "wait" is short too, but it means stop
    await collect_until(s, _is("interrupted"))
    await s.close()


async def test_held_decoding_waits_for_release_and_a_cancel_still_gets_through(tiny_engine):
    s = await _session(tiny_engine, max_tokens=4000)
    s.submit(TextInput("talk to me"))
    await collect_until(s, _is("agent_text_delta"))
    s.hold_decoding()
    await settle(s)  # a step already under way may finish
    frozen = len(s._agent.tokens)
    await settle(s)
    assert len(s._agent.tokens) == frozen  # no decode step while held
    s.release_decoding()
    await collect_until(s, lambda e: e.type == "agent_text_delta" and e.token_end > frozen + 1)
    s.hold_decoding()
    s.submit(Cancel())  # a barge-in or cancel is never kept waiting by the hold
    await collect_until(s, _is("interrupted"))
    await s.close()


async def test_reply_first_token_is_sampled_in_the_job_that_opens_the_turn(tiny_engine, monkeypatch):
    # under load each engine job waits for the tick in flight: the first token must not need a job
    # of its own between the hand-over and the first decode step; and a typed turn's job takes the
    # first decode step too (a word is complete only once the next token starts another)
    s = await _session(tiny_engine, max_tokens=6)
    calls: list[str] = []
    run, run_for, run_urgent = tiny_engine.run, tiny_engine.run_for, tiny_engine.run_urgent

    async def counting_run(fn, *args, **kwargs):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await run(fn, *args, **kwargs)

    async def counting_run_for(seq, fn, *args, **kwargs):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await run_for(seq, fn, *args, **kwargs)

    async def counting_run_urgent(seq, fn, *args, **kwargs):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await run_urgent(seq, fn, *args, **kwargs)

    steps = 0
    take = type(s.seq).take_decode_row
    append_and_sample = type(s.seq).append_and_sample

    def counting_take(*args, **kwargs):  # every decode step run in a tick (queued by the session or ahead)
        nonlocal steps
        steps += 1
        return take(*args, **kwargs)

    def counting_append_and_sample(*args, **kwargs):  # ... or as a plain job
        nonlocal steps
        steps += 1
        return append_and_sample(*args, **kwargs)

    monkeypatch.setattr(tiny_engine, "run", counting_run)
    monkeypatch.setattr(tiny_engine, "run_for", counting_run_for)
    monkeypatch.setattr(tiny_engine, "run_urgent", counting_run_urgent)
    monkeypatch.setattr(type(s.seq), "take_decode_row", counting_take)
    monkeypatch.setattr(type(s.seq), "append_and_sample", counting_append_and_sample)
    s.submit(TextInput("hello there"))
    events = await collect_until(s, _is("turn_ended", speaker="agent"))
    deltas = [e for e in events if e.type == "agent_text_delta"]
    assert deltas
    assert "sample" not in calls  # only append-and-sample steps, each carrying the next token
    assert calls[0] == "_append_and_prepare_sync"  # words, hand-over, first token and the step after it
    # then one step per reply token, none wasted past the last (max_tokens: that step queues none)
    assert steps == deltas[-1].token_end - 1
    await s.close()


async def test_a_typed_turn_taking_its_first_step_in_the_opening_job_says_what_it_would_say_without(tiny_engine):
    """The folded first step (``_append_and_prepare_sync(first_step=True)``) gives the same greedy
    reply, the same token spans and the same cache as the hand-over and first step as two jobs
    (``speculative_handover`` off takes that path)."""
    replies = []
    for speculative in (True, False):
        config = SessionConfig(instructions="You are terse.", speculative_handover=speculative,
                               sampling=SamplingConfig(max_tokens=8, temperature=0.0))
        s = Session(tiny_engine, config, clock=ManualClock())
        await s.start()
        s.submit(TextInput("hello there"))
        events = await collect_until(s, _is("turn_ended", speaker="agent"))
        deltas = [e for e in events if e.type == "agent_text_delta"]
        replies.append(([(d.text, d.token_start, d.token_end) for d in deltas], list(s.seq.ids)))
        await s.close()
    assert replies[0] == replies[1]
    assert replies[0][0][-1][2] == 8


async def test_policy_sees_that_the_user_interrupted_until_the_reply_starts(tiny_engine):
    clock = ManualClock()
    s, turn = await _speaking_with_audio(tiny_engine, clock)
    assert not s.observe().after_interruption
    s.submit(PlaybackMark(turn, 3))
    s.submit(SpeechStarted(2.0))
    await collect_until(s, _is("agent_paused"))
    clock.advance(1.6)  # sustained sound over the agent: it yields
    await collect_until(s, _is("interrupted"))
    s.submit(PlaybackMark(turn, 3, final=True))
    await collect_until(s, _is("turn_ended", speaker="agent"))
    s.submit(AsrWord("no", 2.0, 2.3, True))
    s.submit(SpeechStopped(2.4))
    await collect_until(s, _is("user_transcript", text="no"))
    assert s.observe().after_interruption  # the policy may answer sooner than an ordinary turn
    clock.advance(2.0)
    await collect_until(s, _is("turn_started", speaker="agent"))
    assert not s.observe().after_interruption
    # a cancel is not an interruption by the user's voice
    s.submit(Cancel())
    await collect_until(s, _is("interrupted"))
    assert not s.observe().after_interruption
    await s.close()


async def test_the_observation_carries_whispers_confidence_in_the_heard_words(tiny_engine):
    s = await _session(tiny_engine)
    assert s.observe().word_confidence is None
    s.submit(SpeechStarted(0))
    s.submit(AsrWord("you are", 0.0, 0.3, False, 0.2))
    await collect_until(s, lambda e: e.type == "user_transcript")
    assert s.observe().word_confidence == pytest.approx(0.2)
    s.submit(AsrWord("you", 0.0, 0.2, True, 0.8))  # replaces the tentative words that start with it
    await collect_until(s, lambda e: e.type == "user_transcript" and e.committed)
    assert s.observe().word_confidence == pytest.approx(0.8)
    await s.close()


async def test_a_reply_that_shows_no_text_stops_being_urgent_after_a_few_steps(tiny_engine, monkeypatch):
    """Steps are urgent (express ticks) until the reply's first words are out, and at most
    ``URGENT_STEPS_MAX``: a reply whose tokens show nothing (here the word buffer never releases)
    must not keep priority over every other session for its whole length."""
    from duplex.session import speaking

    s = await _session(tiny_engine, max_tokens=20)
    submitted: list[bool] = []
    submit_step = tiny_engine.scheduler.submit_step

    def recording_submit_step(lane, step, *, urgent=False):  # every decode step is queued here
        submitted.append(urgent)
        return submit_step(lane, step, urgent=urgent)

    monkeypatch.setattr(tiny_engine.scheduler, "submit_step", recording_submit_step)
    monkeypatch.setattr(speaking.WordBuffer, "push", lambda self, text: "")  # no word is ever complete
    s.submit(TextInput("hello there"))
    await collect_until(s, _is("turn_ended", speaker="agent"))
    assert len(submitted) >= speaking.URGENT_STEPS_MAX + 4  # the reply ran on past the cap
    assert any(submitted) and not any(submitted[speaking.URGENT_STEPS_MAX:])
    await s.close()
