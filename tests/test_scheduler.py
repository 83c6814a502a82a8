"""Engine scheduler: batched decode equals decoding alone; fairness and priority by counting rows
per tick (the scheduler's trace), never by timing."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from duplex.engine import scheduler as scheduler_module
from duplex.engine.models import LoadedModel
from duplex.engine.openmp import runtime
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import SharedSequence, Speaker
from duplex.engine.worker import Engine

PROMPTS = ["You are a pirate.", "Answer in one word, please, and be brief.", "Count to ten slowly " * 3]
LONG = "The quick brown fox jumps over the lazy dog near the river bank. " * 70  # ~ 1000 tokens


def _greedy() -> Sampler:
    return Sampler(SamplingConfig(temperature=0.0, max_tokens=64))


def _alone(lm: LoadedModel, engine: Engine, prompt: str, n: int) -> list[int]:
    """Reference: the sequence on its own, no scheduler (the pre-scheduler code path)."""
    seq = SharedSequence(lm, engine.template)
    seq.add_message(Speaker.SYSTEM, prompt)
    seq.hand_over(Speaker.AGENT)
    sampler = _greedy()
    return [seq.step(sampler) for _ in range(n)]


async def _talk_during_long_prefill(engine: Engine, steps: int, tick_between: bool = False,
                                    monkeypatch: pytest.MonkeyPatch | None = None):
    """A talker decodes ``steps`` tokens while another sequence prefills LONG as its system
    message; returns (the ticks traced meanwhile, the talker, the listener). ``tick_between``:
    after each step the talker waits for a tick to run without it (as when a session is still
    emitting its token), instead of leaving that to how the threads happen to be scheduled.
    With ``monkeypatch``, the talker counts as speaking until its last step however long the
    machine stalls its loop between steps (the scheduler drops a speaker silent for 0.25 s)."""
    speaker_s = scheduler_module._SPEAKER_SECONDS
    if monkeypatch is not None:
        monkeypatch.setattr(scheduler_module, "_SPEAKER_SECONDS", 3600.0)
    talker = await engine.start_sequence(PROMPTS[0])
    await engine.run(talker.hand_over, Speaker.AGENT)
    listener = engine.new_sequence()
    engine.scheduler.trace.clear()
    sampler = _greedy()

    async def talk() -> None:
        for _ in range(steps):
            await engine.decode(talker, sampler)
            ticks = engine.scheduler.stats.ticks
            for _ in range(30_000 if tick_between else 0):  # 30 s: a hang guard only
                if engine.scheduler.stats.ticks > ticks or prefill.done():
                    break
                await asyncio.sleep(0.001)
        scheduler_module._SPEAKER_SECONDS = speaker_s  # done talking: it may stop counting as a speaker

    talking = asyncio.ensure_future(talk())  # (it starts first, the prefill right behind it)
    prefill = asyncio.ensure_future(engine.run(listener.add_message, Speaker.SYSTEM, LONG))
    await asyncio.gather(talking, prefill)
    return list(engine.scheduler.trace), talker, listener


async def _decode(engine: Engine, prompt: str, n: int, ready: list[int], gate: asyncio.Event) -> list[int]:
    seq = await engine.start_sequence(prompt)
    await engine.run(seq.hand_over, Speaker.AGENT)
    ready.append(1)
    await gate.wait()  # all sessions start decoding together
    sampler = _greedy()
    return [await engine.decode(seq, sampler) for _ in range(n)]


@pytest.mark.parametrize("mode", ["batched", "chunked", "fifo"])
async def test_concurrent_greedy_decoding_equals_decoding_alone(tiny_lm: LoadedModel, mode: str) -> None:
    engine = Engine(tiny_lm, scheduler=mode)
    try:
        gate, ready = asyncio.Event(), []
        tasks = [asyncio.ensure_future(_decode(engine, p, 24, ready, gate)) for p in PROMPTS]
        while len(ready) < len(PROMPTS):
            await asyncio.sleep(0.01)
        gate.set()
        together = await asyncio.gather(*tasks)
        assert together == [_alone(tiny_lm, engine, p, 24) for p in PROMPTS]
        if mode == "batched":
            # decode steps of different sessions shared forwards
            assert engine.stats.max_rows >= 2
            assert any(sum(r.decode for r in t.rows) >= 2 and t.forwards == 1 for t in engine.scheduler.trace)
        if mode == "chunked":
            assert all(t.forwards == len(t.rows) for t in engine.scheduler.trace)
    finally:
        engine.close()


async def test_a_long_prefill_is_chunked_between_another_sessions_decode_steps(tiny_lm: LoadedModel) -> None:
    engine = Engine(tiny_lm, scheduler="batched", chunk_tokens=32)
    try:
        ticks, talker, listener = await _talk_during_long_prefill(engine, 30)
        pieces = [r for t in ticks for r in t.rows if r.owner == id(listener)]
        decodes = [(t.tick, r) for t in ticks for r in t.rows if r.owner == id(talker)]
        assert len(decodes) == 30 and all(r.decode for _, r in decodes)
        # bounded chunks, in order, covering the whole prompt exactly once
        assert all(t.prefill_tokens <= 32 for t in ticks)
        assert [r.start_pos for r in pieces] == [sum(p.tokens for p in pieces[:i]) for i in range(len(pieces))]
        assert sum(p.tokens for p in pieces) == len(listener) > 900
        # a decode step waits at most for the tick already running when it arrived
        assert max(r.waited_ticks for _, r in decodes) <= 1
        # ... and the talker kept decoding while the prefill ran (not before or after it)
        first, last = (min(t.tick for t in ticks if any(r.owner == id(listener) for r in t.rows)),
                       max(t.tick for t in ticks if any(r.owner == id(listener) for r in t.rows)))
        assert sum(first < tick < last for tick, _ in decodes) >= 10
        assert any(len(t.rows) >= 2 and t.forwards == 1 for t in ticks)  # decode + chunk in one forward
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["batched", "chunked"])
async def test_decode_steps_go_first_and_prefills_take_turns(tiny_lm: LoadedModel, mode: str) -> None:
    engine = Engine(tiny_lm, scheduler=mode, chunk_tokens=64)
    try:
        talker = await engine.start_sequence(PROMPTS[1])
        await engine.run(talker.hand_over, Speaker.AGENT)
        a, b = engine.new_sequence(), engine.new_sequence()
        engine.scheduler.trace.clear()
        # both long prefills are queued before the decode step: it still runs in the first tick or the next
        jobs = [engine.run(a.add_message, Speaker.SYSTEM, LONG), engine.run(b.add_message, Speaker.SYSTEM, LONG)]
        futures = [asyncio.ensure_future(j) for j in jobs]
        await asyncio.sleep(0)
        token = await engine.decode(talker, _greedy())
        await asyncio.gather(*futures)
        ticks = list(engine.scheduler.trace)
        step = next(t for t in ticks if any(r.owner == id(talker) for r in t.rows))
        assert step.tick <= ticks[0].tick + 1
        assert step.rows[0].owner == id(talker)  # decode rows lead the tick (run first when unbatched)
        assert isinstance(token, int)
        # round robin: b's prefill starts before a's finishes and vice versa
        ticks_of = {s: [t.tick for t in ticks if any(r.owner == id(s) for r in t.rows)] for s in (a, b)}
        assert ticks_of[b][0] < ticks_of[a][-1] and ticks_of[a][0] < ticks_of[b][-1]
        assert all(t.prefill_tokens <= 64 for t in ticks)
        assert len(a) == len(b)
    finally:
        engine.close()


async def test_calls_on_one_sequence_keep_their_order(tiny_lm: LoadedModel) -> None:
    """Jobs of one lane never overlap: a rollback queued behind a step runs after it."""
    engine = Engine(tiny_lm)
    try:
        seq = await engine.start_sequence(PROMPTS[0])
        await engine.run(seq.hand_over, Speaker.AGENT)
        sampler = _greedy()
        n0 = len(seq)
        step = asyncio.ensure_future(engine.decode(seq, sampler))
        rollback = asyncio.ensure_future(engine.run_for(seq, seq.rollback, 1))
        await asyncio.gather(step, rollback)
        assert len(seq) == n0 and seq.cache_length == n0
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["batched", "chunked"])
async def test_every_forward_runs_on_the_schedulers_thread_and_jobs_sample_on_one_thread(
        tiny_lm: LoadedModel, mode: str, monkeypatch) -> None:
    """Only one thread opens the engine's parallel regions (duplex.engine.openmp): a lone session's
    job that parks its forward last waits for the scheduler's thread to run it instead of running
    the tick itself, job threads run their own torch ops (sampling) on themselves alone, and the
    tick thread gives its pool back after its ticks."""
    ran_on: list[str] = []
    execute = scheduler_module.Scheduler._execute

    def spy(self, plan):
        ran_on.append(threading.current_thread().name)
        return execute(self, plan)

    monkeypatch.setattr(scheduler_module.Scheduler, "_execute", spy)
    released: list[str] = []
    monkeypatch.setattr(scheduler_module, "release_pool", lambda: released.append(threading.current_thread().name))
    engine = Engine(tiny_lm, scheduler=mode)
    try:
        seq = await engine.start_sequence(PROMPTS[1])  # prefill jobs, one lane: each parks last
        await engine.run(seq.hand_over, Speaker.AGENT)
        sampler = _greedy()
        for _ in range(4):
            await engine.run_for(seq, seq.step, sampler)  # a job's forward per token
            await engine.decode(seq, sampler)  # tick steps
        others = [await engine.start_sequence(p) for p in PROMPTS]
        await asyncio.gather(*(engine.run(o.add_message, Speaker.USER, "And then?") for o in others))
        job_threads = await engine.run(torch.get_num_threads)
        for _ in range(1000):  # its tick thread gives its pool back after each tick (10 s guard)
            if released:
                break
            await asyncio.sleep(0.01)
    finally:
        engine.close()
    assert ran_on and set(ran_on) == {f"{engine.scheduler._name}-scheduler"}
    assert released and set(released) == {f"{engine.scheduler._name}-scheduler"}
    if runtime() is not None:
        assert job_threads == 1


async def test_close_refuses_new_work(tiny_lm: LoadedModel) -> None:
    engine = Engine(tiny_lm)
    seq = await engine.start_sequence(PROMPTS[0])
    engine.close()
    with pytest.raises(RuntimeError):
        await engine.run(seq.hand_over, Speaker.AGENT)


async def test_an_error_while_planning_a_tick_reaches_its_caller_and_the_engine_goes_on(
        tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in planning must not end the tick thread with every caller left waiting: the callers
    of that tick get the error, and later work runs."""
    engine = Engine(tiny_lm, scheduler="batched")
    try:
        seq = await engine.start_sequence(PROMPTS[0])
        sched = engine.scheduler
        real = sched._plan
        failed: list[bool] = []

        def plan_once_broken():  # noqa: ANN202
            if not failed:
                failed.append(True)
                raise RuntimeError("planning failed")
            return real()

        monkeypatch.setattr(sched, "_plan", plan_once_broken)
        with pytest.raises(RuntimeError, match="planning failed"):
            await engine.run(seq.hand_over, Speaker.AGENT)
        again = await engine.start_sequence(PROMPTS[1])
        assert len(again) > 0 and failed == [True]
    finally:
        engine.close()


async def test_a_model_the_ragged_pass_cannot_run_falls_back_to_one_forward_per_session(
        tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from duplex.engine import scheduler

    def broken(model: object, rows: object) -> None:
        raise TypeError("this architecture does not take a ragged cache")

    class BrokenLean:
        max_query = 24
        dense = False
        forward = staticmethod(lambda rows: broken(None, rows))

    monkeypatch.setattr(scheduler, "ragged_forward", broken)
    monkeypatch.setattr(scheduler, "fast_decoder", lambda model: BrokenLean())
    engine = Engine(tiny_lm, scheduler="batched")
    try:
        gate, ready = asyncio.Event(), []
        tasks = [asyncio.ensure_future(_decode(engine, p, 8, ready, gate)) for p in PROMPTS[:2]]
        while len(ready) < 2:
            await asyncio.sleep(0.01)
        gate.set()
        assert await asyncio.gather(*tasks) == [_alone(tiny_lm, engine, p, 8) for p in PROMPTS[:2]]
        assert all(t.forwards == len(t.rows) for t in engine.scheduler.trace)
    finally:
        engine.close()


async def test_a_plain_forward_after_a_ragged_pass_still_works(tiny_lm: LoadedModel) -> None:
    """The ragged pass leaves its attention implementation set on the shared model; a direct
    caller (a test, a bench, another tool) must still get ordinary causal attention."""
    import torch

    ids = tiny_lm.tokenizer.encode("The weather today is", return_tensors="pt")
    with torch.inference_mode():
        before = tiny_lm.model(ids).logits[0, -1]
    engine = Engine(tiny_lm, scheduler="batched")
    try:
        seqs = [await engine.start_sequence(p) for p in PROMPTS[:2]]
        for seq in seqs:
            await engine.run(seq.hand_over, Speaker.AGENT)
        await asyncio.gather(*(engine.decode(seq, _greedy()) for seq in seqs))  # one ragged pass
        with torch.inference_mode():
            after = tiny_lm.model(ids).logits[0, -1]
        assert torch.allclose(before, after, atol=1e-4)
    finally:
        engine.close()


def test_the_pacer_fits_a_fixed_part_a_per_token_part_and_an_attention_part() -> None:
    """Tick time = a + b * tokens + c * attention pairs, fitted over recent ticks; a prefill may
    add (PACE - 1) times what the decode rows alone cost, and a piece is sized by its own cost."""
    from duplex.engine.pacer import TickPacer

    pacer = TickPacer(None)
    assert pacer.fit() is None and pacer.budget(4, 800.0) is None
    a, b, c = 0.02, 0.003, 2e-6
    for tokens, attn in ((1, 200), (4, 900), (6, 30_000), (2, 8_000), (8, 1_700), (3, 12_000), (5, 1_000),
                         (1, 4_000), (7, 25_000)):
        pacer.observe(a + b * tokens + c * attn, tokens, attn)
    fit = pacer.fit()
    assert fit == pytest.approx((a, b, c))
    assert pacer.budget(4, 800.0) == pytest.approx((TickPacer.PACE - 1) * (a + 4 * b + 800 * c))
    assert pacer.cost(2, 3000) == pytest.approx(2 * b + c * TickPacer.attn(2, 3000))
    assert TickPacer.attn(1, 10) == 11  # a token attends to the 10 cached positions and itself


async def test_a_speaker_between_its_steps_still_paces_a_long_prefill(tiny_lm: LoadedModel, monkeypatch) -> None:
    """A tick that starts while the speaker's loop is still emitting its last token (no decode
    request queued) must not give the whole chunk to a long prefill: the speaker would queue its
    next step a moment later and wait behind it."""
    engine = Engine(tiny_lm, scheduler="batched", chunk_tokens=32)
    try:
        pacer = engine.scheduler._pacer  # one prefill token's worth of allowance a tick
        monkeypatch.setattr(pacer, "budget", lambda tokens, attn: 1.0)
        monkeypatch.setattr(pacer, "cost", lambda n, start: float(n))
        ticks, talker, listener = await _talk_during_long_prefill(engine, 20, tick_between=True,
                                                                  monkeypatch=monkeypatch)
        talking = [t.tick for t in ticks if any(r.owner == id(talker) for r in t.rows)]
        during = [t for t in ticks if talking[0] <= t.tick <= talking[-1]]
        assert any(not any(r.owner == id(talker) for r in t.rows) and t.prefill_tokens for t in during)
        # (the message header is a short request of its own: short ones are never paced)
        assert all(r.tokens <= 1 for t in during for r in t.rows if r.owner == id(listener) and r.start_pos > 0)
        assert max(t.prefill_tokens for t in ticks) == 32  # after the talk, full chunks again
        assert sum(r.tokens for t in ticks for r in t.rows if r.owner == id(listener)) == len(listener)
    finally:
        engine.close()


async def test_a_prefill_token_dearer_than_a_ticks_allowance_waits_until_it_is_saved_up(
        tiny_lm: LoadedModel, monkeypatch) -> None:
    """Deep into a long prompt one token can cost more than a speaker's tick may add: the
    allowance is banked and the token goes in every few ticks, not in every tick at 3x cost."""
    engine = Engine(tiny_lm, scheduler="batched", chunk_tokens=32)
    try:
        pacer = engine.scheduler._pacer
        monkeypatch.setattr(pacer, "budget", lambda tokens, attn: 1.0)
        monkeypatch.setattr(pacer, "cost", lambda n, start: 3.0 * n)  # a token costs 3 ticks' allowance
        ticks, talker, listener = await _talk_during_long_prefill(engine, 24, monkeypatch=monkeypatch)
        talking = [t.tick for t in ticks if any(r.owner == id(talker) for r in t.rows)]
        during = [t for t in ticks if talking[0] < t.tick < talking[-1]]
        pieces = [r.tokens for t in during for r in t.rows if r.owner == id(listener) and r.start_pos > 0]
        assert pieces and all(n == 1 for n in pieces)
        assert len(pieces) <= len(during) // 3 + 2  # one tick in three carries a token
        assert sum(r.tokens for t in ticks for r in t.rows if r.owner == id(listener)) == len(listener)
    finally:
        engine.close()


async def test_a_tick_waits_for_the_last_ticks_speakers_to_queue_their_next_step(tiny_lm: LoadedModel,
                                                                                 monkeypatch) -> None:
    # each session's event loop resubmits its step at its own moment (here: after i+1 loop turns);
    # a tick that started on the first arrival would leave the others to another pass over the
    # weights. The window is widened so that the test counts rows, not milliseconds.
    from duplex.engine import scheduler as sched

    monkeypatch.setattr(sched, "_GATHER_S", 30.0)
    monkeypatch.setattr(sched, "_GATHER_TICK_FRACTION", 1e9)
    engine = Engine(tiny_lm, scheduler="batched")
    try:
        seqs = [await engine.start_sequence(p) for p in PROMPTS]
        for seq in seqs:
            await engine.run(seq.hand_over, Speaker.AGENT)
        engine.scheduler.trace.clear()

        async def speak(i: int, seq: SharedSequence) -> None:
            sampler = _greedy()
            for _ in range(6):
                await engine.decode(seq, sampler)
                for _ in range(i + 1):
                    await asyncio.sleep(0)  # emitting the token takes a while, longer for some

        await asyncio.gather(*(speak(i, s) for i, s in enumerate(seqs)))
        rows = [sum(r.decode for r in t.rows) for t in engine.scheduler.trace]
        assert sum(rows) == 18
        # The first tick starts before the others have queued (nothing decoded before it), so one
        # session may lag a tick behind: then the last tick carries only it. Every tick between
        # carries all three; without the wait they split ([1, 3, 3, 3, 3, 1, ...]).
        assert len(rows) <= 7
        assert all(n == 3 for n in rows[1:-1]), rows
    finally:
        engine.close()


async def test_turns_that_start_together_share_one_tick_beyond_one_chunk(tiny_lm: LoadedModel, monkeypatch) -> None:
    """Short prefills (a user's words with the hand-over: what a reply's first token waits for)
    queued together run whole in one tick, up to burst_tokens, not one chunk_tokens per tick; a
    tick of prefills alone waits for arrivals a moment apart (the window is widened here so
    that the test counts rows, not milliseconds)."""
    from duplex.engine import scheduler as sched

    engine = Engine(tiny_lm, scheduler="batched", chunk_tokens=8)
    try:
        seqs = [await engine.start_sequence(p) for p in PROMPTS]
        for seq in seqs:
            await engine.run(seq.begin_turn, Speaker.USER)
        monkeypatch.setattr(sched, "_ARRIVAL_GAP_S", 1.0)  # only now: each setup tick would wait it out
        monkeypatch.setattr(sched, "_ARRIVAL_MAX_S", 1.0)
        engine.scheduler.trace.clear()
        words = [tiny_lm.tokenizer.encode(w, add_special_tokens=False)[:6] for w in ("hello there my friend",
                                                                                    "what time is it now",
                                                                                    "tell me a short story")]

        async def say(i: int, seq: SharedSequence) -> None:
            for _ in range(i):
                await asyncio.sleep(0)  # each message is read at its own loop turn
            await engine.prefill(seq, words[i])

        await asyncio.gather(*(say(i, s) for i, s in enumerate(seqs)))
        ticks = list(engine.scheduler.trace)
        assert len(ticks) == 1
        assert {r.owner for r in ticks[0].rows} == {id(s) for s in seqs}
        assert ticks[0].prefill_tokens == sum(len(w) for w in words) > 8
        assert engine.scheduler.burst_tokens == 32  # 4 chunks by default
    finally:
        engine.close()


def test_only_a_prefill_tick_with_nobody_speaking_waits_for_arrivals(tiny_lm: LoadedModel) -> None:
    from duplex.engine.scheduler import _ARRIVAL_GAP_S, Scheduler
    from duplex.engine.scheduler_work import Request as _Request

    sched = Scheduler(tiny_lm.model, mode="batched")
    try:
        now = __import__("time").perf_counter()

        def request(n: int) -> _Request:
            return _Request(object(), [1] * n, 0, 1, None, lambda *a: None, job=False, arrived=now)

        with sched._lock:
            sched._pending = [request(5)]
            assert 0 < sched._gather_wait() <= _ARRIVAL_GAP_S
            sched._pending = [request(5), request(1)]  # a decode step: it never waits for arrivals
            assert sched._gather_wait() <= 0
            sched._pending = [request(5)]
            sched._speakers[1] = (0, now, 10)  # someone is speaking: no arrival window either
            assert sched._gather_wait() <= 0
            sched._speakers.clear()
            sched._pending = []
    finally:
        sched.close()


@pytest.mark.parametrize("dense,attn_limit,kernel_rows,lean", [
    (True, 10**9, 16, True), (True, 1, 16, False),  # dense weights: by the tick's attention
    (False, 10**9, 10**9, True), (False, 10**9, 4, False),  # none: by the rows the C attention takes
])
async def test_a_big_tick_takes_the_lean_forward_where_it_pays(
        tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch, dense: bool, attn_limit: int, kernel_rows: int,
        lean: bool) -> None:
    """Eight questions starting together make a tick past _FAST_MAX_TOKENS over short caches. With
    dense weights its linears are matrix products either way, and the lean forward's attention is
    cheap there, so it runs it; long rows over long caches go to the ragged (SDPA) forward. Without
    them both forwards run the same int8 mat-vecs, and the lean one takes the tick wherever the C
    attention takes its rows' lengths (any on the AVX2 code). Counted by which forward ran."""
    from duplex.engine import scheduler as sched
    from duplex.engine.fast_decode import fast_decoder

    real = fast_decoder(tiny_lm.model)
    if real is None:
        pytest.skip("no lean forward for the tiny model")
    calls: list[tuple[str, int]] = []

    class Lean:
        def __init__(self) -> None:
            self.dense = dense
            self.max_query = 4  # the program pass's limit (AMX_MAX_QUERY where the AMX tiles run)

        def forward(self, rows):  # noqa: ANN001, ANN202
            calls.append(("lean", sum(len(r.ids) for r in rows)))
            return real.forward(rows)

    ragged = sched.ragged_forward

    def counted_ragged(model, rows):  # noqa: ANN001, ANN202
        calls.append(("ragged", sum(len(r.ids) for r in rows)))
        return ragged(model, rows)

    monkeypatch.setattr(sched, "_FAST_MAX_TOKENS", 4)
    monkeypatch.setattr(sched, "_FAST_MAX_ATTN", {"amx-bf16": attn_limit, "avx512-bf16": attn_limit,
                                                         "avx2": attn_limit})
    monkeypatch.setattr(sched, "fast_decoder", lambda model: Lean())
    monkeypatch.setattr(sched, "max_query_rows", lambda: kernel_rows)
    monkeypatch.setattr(sched, "ragged_forward", counted_ragged)
    engine = Engine(tiny_lm, scheduler="batched", chunk_tokens=8)
    try:
        seqs = [await engine.start_sequence(p) for p in PROMPTS]
        for seq in seqs:
            await engine.run(seq.begin_turn, Speaker.USER)
        monkeypatch.setattr(sched, "_ARRIVAL_GAP_S", 1.0)  # the three questions share one tick
        monkeypatch.setattr(sched, "_ARRIVAL_MAX_S", 1.0)
        words = tiny_lm.tokenizer.encode("what time is it now", add_special_tokens=False)[:5]
        calls.clear()
        await asyncio.gather(*(engine.prefill(seq, words) for seq in seqs))
        assert calls == [("lean" if lean else "ragged", 3 * len(words))]
    finally:
        engine.close()


def test_urgent_requests_run_in_an_express_tick_and_the_next_tick_takes_everyone(tiny_lm: LoadedModel) -> None:
    """A reply's first steps (urgent) run without the other sessions' decode rows and prefill
    pieces when those are pending; the tick after takes everyone, so a streaming session waits
    at most that one express tick. Checked on the plan, by rows."""
    from duplex.engine.scheduler import Scheduler
    from duplex.engine.scheduler_work import Request as _Request

    sched = Scheduler(tiny_lm.model, mode="batched", chunk_tokens=64)
    try:
        now = __import__("time").perf_counter()

        def request(n: int, urgent: bool = False) -> _Request:
            return _Request(object(), [1] * n, 0, 1, None, lambda *a: None, job=True, urgent=urgent, arrived=now)

        streaming = [request(1), request(1)]
        long_prefill = request(100)
        hand_over, first_step = request(6, urgent=True), request(1, urgent=True)
        with sched._lock:
            sched._pending = [*streaming, long_prefill, hand_over, first_step]
            assert sched._gather_wait() <= 0  # no waiting for the last tick's speakers either
            express = sched._plan()
            assert {id(r) for r, _, _ in express} == {id(hand_over), id(first_step)}
            assert sched._left_out
            everyone = sched._plan()  # the same requests still pending: the next tick takes all
            assert {id(r) for r, _, _ in everyone} >= {id(r) for r in [*streaming, hand_over, first_step]}
            assert any(r is long_prefill for r, _, _ in everyone)
            assert not sched._left_out
            sched._pending = [hand_over, first_step]  # urgent work alone is an ordinary tick
            assert {id(r) for r, _, _ in sched._plan()} == {id(hand_over), id(first_step)}
            assert not sched._left_out
    finally:
        with sched._lock:
            sched._pending = []  # made-up requests: nothing for the scheduler thread to run
        sched.close()


def test_a_reply_waiting_for_its_first_words_rides_with_pieces_of_prefill_not_whole_turns(tiny_lm: LoadedModel) -> None:
    """While an urgent decode row is pending (a reply one step from its first words), the short
    prefills of that tick take at most ``first_words_tokens`` in all, split into pieces whose last
    keeps the logits; without such a row they run whole, as many as ``burst_tokens`` allows.
    Checked on the plan, by rows and tokens."""
    from duplex.engine.scheduler import Scheduler
    from duplex.engine.scheduler_work import Request as _Request

    sched = Scheduler(tiny_lm.model, mode="batched", chunk_tokens=64, first_words_tokens=16)
    try:
        now = __import__("time").perf_counter()

        def request(n: int, urgent: bool = True) -> _Request:
            return _Request(object(), [1] * n, 0, 1, None, lambda *a: None, job=True, urgent=urgent, arrived=now)

        def run(plan: list) -> None:  # what _execute and _finish_tick do to the requests
            for r, n, offset in plan:
                assert offset == r.done
                r.done += n
                if r.done == len(r.ids):
                    sched._pending.remove(r)
                elif not r.decode:
                    sched._served[id(r.owner)] = sched.stats.ticks
            sched.stats.ticks += 1

        first_step, question, other = request(1), request(40), request(20)
        with sched._lock:
            sched._pending = [first_step, question, other]
            plan = sched._plan()
            assert [(r is first_step, n) for r, n, _ in plan] == [(True, 1), (False, 16)]
            assert plan[1][0] is question
            run(plan)
            assert first_step not in sched._pending and question.done == 16
            # the next step of that reply is pending again: the split turn keeps its place (arrival order)
            step2 = request(1)
            sched._pending.append(step2)
            plan = sched._plan()
            assert [(r, n) for r, n, _ in plan] == [(step2, 1), (question, 16)]
            run(plan)
            # first words out: no urgent decode row, so the rest of both run whole in one tick
            plan = sched._plan()
            assert [(r, n) for r, n, _ in plan] == [(question, 8), (other, 20)]
            run(plan)
            assert sched._pending == []
            # a turn whose last piece would be its logits position alone still ends on that position
            step3, short = request(1), request(17)
            sched._pending = [step3, short]
            plan = sched._plan()
            assert [(r, n) for r, n, _ in plan] == [(step3, 1), (short, 16)]
            run(plan)
            assert short.done == 16 and len(short.ids) - short.done == short.keep
            run(sched._plan())
            # without the limit (first_words_tokens None, the behaviour before it) turns run whole
            sched.first_words_tokens = None
            step4, whole = request(1), request(40)
            sched._pending = [step4, whole]
            assert [(r, n) for r, n, _ in sched._plan()] == [(step4, 1), (whole, 40)]
    finally:
        with sched._lock:
            sched._pending = []  # made-up requests: nothing for the scheduler thread to run
        sched.close()


async def test_a_reply_started_urgently_while_others_stream_decodes_as_it_would_alone(tiny_lm: LoadedModel) -> None:
    """Two sessions stream while a third hands over and takes its first steps as urgent jobs:
    its tokens are those it gets alone, express ticks hold urgent rows only, and a streaming
    session's step waits at most for the tick running when it arrived and one express tick."""
    engine = Engine(tiny_lm, scheduler="batched")
    try:
        talkers = [await engine.start_sequence(p) for p in PROMPTS[:2]]
        for seq in talkers:
            await engine.run(seq.hand_over, Speaker.AGENT)
        asker = await engine.start_sequence(PROMPTS[2])
        engine.scheduler.trace.clear()
        done = asyncio.Event()

        async def stream(seq: SharedSequence) -> None:
            sampler = _greedy()
            while not done.is_set():
                await engine.decode(seq, sampler)

        async def ask() -> list[int]:
            while engine.scheduler.stats.ticks < 3:
                await asyncio.sleep(0.001)
            sampler = _greedy()
            await engine.run_urgent(asker, asker.hand_over, Speaker.AGENT)
            tokens = [await engine.run_urgent(asker, asker.step, sampler) for _ in range(4)]
            done.set()
            return tokens

        streams = [asyncio.ensure_future(stream(s)) for s in talkers]
        tokens = await ask()
        await asyncio.gather(*streams)
        assert tokens == _alone(tiny_lm, engine, PROMPTS[2], 4)
        ticks = list(engine.scheduler.trace)
        assert any(r.urgent for t in ticks for r in t.rows)
        for t in ticks:
            if t.express:
                assert all(r.urgent for r in t.rows), t
        assert all(r.waited_ticks <= 2 for t in ticks for r in t.rows if r.decode and not r.urgent)
        assert engine.stats.express_ticks == sum(t.express for t in ticks)
    finally:
        engine.close()


def test_the_first_words_limit_comes_from_the_environment(monkeypatch) -> None:
    from duplex.engine.worker import _first_words_tokens

    monkeypatch.delenv("DUPLEX_FIRST_WORDS_TOKENS", raising=False)
    assert _first_words_tokens() == 16
    monkeypatch.setenv("DUPLEX_FIRST_WORDS_TOKENS", "8")
    assert _first_words_tokens() == 8
    monkeypatch.setenv("DUPLEX_FIRST_WORDS_TOKENS", "off")
    assert _first_words_tokens() is None
    monkeypatch.setenv("DUPLEX_FIRST_WORDS_TOKENS", "many")
    with pytest.raises(ValueError, match="DUPLEX_FIRST_WORDS_TOKENS"):
        _first_words_tokens()

