"""The engine and the session on a CUDA device (skipped where there is none, as in CI).

Run on a GPU machine with ``pytest tests/test_cuda.py``: the same code paths as on CPU (shared
sequence, batched scheduler ticks, barge-in rollback), on ``cuda`` tensors.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from duplex.engine.models import load_model
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import SharedSequence, Speaker
from duplex.engine.template import TurnTemplate
from duplex.engine.worker import Engine
from duplex.session.clock import ManualClock
from duplex.session.core import Session, SessionConfig
from duplex.session.events import Cancel, PlaybackMark, TextInput
from tests.fakes import collect_until

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPTS = ["Tell me about the moon.", "What is a good name for a cat?", "Count to five."]


def _greedy(lm, prompt: str, n: int) -> tuple[list[int], torch.Tensor]:
    seq = SharedSequence(lm, TurnTemplate.from_tokenizer(lm.tokenizer))
    seq.add_message(Speaker.USER, prompt)
    seq.begin_turn(Speaker.AGENT)
    sampler = Sampler(SamplingConfig(), device=lm.device)
    return [seq.step(sampler) for _ in range(n)], seq.logits.float().cpu()


def test_the_tiny_model_decodes_on_cuda_as_on_cpu():
    cpu = load_model("tiny", device="cpu", dtype="float32")
    gpu = load_model("tiny", device="cuda", dtype="float32")
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    cpu_ids, cpu_logits = _greedy(cpu, PROMPTS[0], 12)
    gpu_ids, gpu_logits = _greedy(gpu, PROMPTS[0], 12)
    assert gpu_ids == cpu_ids
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-3, atol=1e-3)


def test_rollback_on_cuda_restores_the_cache_exactly():
    lm = load_model("tiny", device="cuda", dtype="bfloat16")
    seq = SharedSequence(lm, TurnTemplate.from_tokenizer(lm.tokenizer))
    seq.add_message(Speaker.USER, PROMPTS[1])
    seq.begin_turn(Speaker.AGENT)
    sampler = Sampler(SamplingConfig(), device=lm.device)
    first = [seq.step(sampler) for _ in range(4)]
    logits_after_4 = seq.logits.clone()
    [seq.step(sampler) for _ in range(6)]
    seq.rollback(6)
    assert len(seq) == seq.cache_length
    assert seq.ids[-4:] == first
    torch.testing.assert_close(seq.logits, logits_after_4)


async def test_batched_scheduler_ticks_on_cuda_equal_each_session_alone():
    lm = load_model("tiny", device="cuda", dtype="float32")
    alone = [_greedy(lm, p, 8)[0] for p in PROMPTS]
    engine = Engine(lm, scheduler="batched")
    try:
        async def run(prompt: str) -> list[int]:
            seq = await engine.start_sequence()
            await engine.run_for(seq, seq.add_message, Speaker.USER, prompt)
            await engine.run_for(seq, seq.begin_turn, Speaker.AGENT)
            sampler = Sampler(SamplingConfig(), device=lm.device)
            return [await engine.decode(seq, sampler) for _ in range(8)]

        together = await asyncio.gather(*(run(p) for p in PROMPTS))
        assert together == alone
        assert engine.stats.max_rows >= 2  # the sessions really shared forwards
    finally:
        engine.close()


async def test_a_session_replies_and_rolls_back_a_barge_in_on_cuda():
    lm = load_model("tiny", device="cuda", dtype="bfloat16")
    engine = Engine(lm)
    session = Session(engine, SessionConfig(instructions="You are terse.", sampling=SamplingConfig(max_tokens=40),
                                            audio_output=True), clock=ManualClock())
    await session.start()
    try:
        session.submit(TextInput("hello there"))
        events = await collect_until(session, lambda e: e.type == "agent_text_delta" and e.token_end >= 6)
        turn = events[-1].turn
        session.submit(PlaybackMark(turn, 3))  # the listener heard 3 tokens, then stopped it
        session.submit(Cancel())
        session.submit(PlaybackMark(turn, 3, final=True))
        ended = await collect_until(session, lambda e: e.type == "turn_ended" and e.speaker == "agent")
        assert ended[-1].reason == "interrupted"
        assert session.seq is not None and len(session.seq) == session.seq.cache_length
    finally:
        await session.close()
        engine.close()


def test_the_lean_decode_forward_on_cuda_matches_transformers():
    from duplex.engine.fast_decode import DecodeRow, fast_decoder
    from duplex.engine.kv import new_kv_cache

    lm = load_model("tiny", device="cuda", dtype="float32")
    fast = fast_decoder(lm.model)
    assert fast is not None
    prompt = lm.tokenizer.encode("The lighthouse keeper looked at the sea")
    ref_cache, fast_cache = new_kv_cache(lm.model.config), new_kv_cache(lm.model.config)
    pos = 0
    ids = prompt
    for _ in range(6):
        with torch.inference_mode():
            ref = lm.model(input_ids=torch.tensor([ids], device="cuda"),
                           position_ids=torch.arange(pos, pos + len(ids), device="cuda").unsqueeze(0),
                           past_key_values=ref_cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        got = fast.forward([DecodeRow(fast_cache, ids, pos)])[0]
        assert got is not None and got.is_cuda
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
        pos += len(ids)
        ids = [int(ref.argmax())]
