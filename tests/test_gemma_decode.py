"""Gemma 3's lean forward computes what transformers' Gemma3ForCausalLM computes: alone, batched,
across its sliding window, in int8 + bf16, and through the engine's scheduler."""

from __future__ import annotations

import asyncio

import pytest
import torch

from duplex.engine.fast_decode import DecodeRow, fast_decoder
from duplex.engine.gemma_decode import GemmaDecoder
from duplex.engine.kv import new_kv_cache
from duplex.engine.models import LoadedModel
from duplex.engine.quant import quantize_int8

_WINDOW = 8


def _tiny_gemma3(dtype: torch.dtype = torch.float32, head_dim: int = 16, seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                              sliding_window=_WINDOW, max_position_embeddings=512,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config).eval()
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's norms start at zero (scale 1): give them something to do
                p.data.normal_(0.0, 0.3)
    return model.to(dtype)


def _reference(model, cache, ids: list[int], start: int, keep: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(start, start + len(ids)).unsqueeze(0),
                    past_key_values=cache, use_cache=True, logits_to_keep=keep)
    return out.logits[0]


def test_the_engine_picks_the_gemma_lean_forward_and_the_switch_turns_it_off(monkeypatch):
    assert isinstance(fast_decoder(_tiny_gemma3()), GemmaDecoder)
    monkeypatch.setenv("DUPLEX_FAST_DECODE", "0")
    assert fast_decoder(_tiny_gemma3(seed=1)) is None


@pytest.mark.parametrize("chunks", [[30], [20, 10], [5] * 6, [1] * 30, [3, 17, 10]],
                         ids=["one-pass", "past-window", "fives", "steps", "mixed"])
def test_logits_match_transformers_across_the_sliding_window(chunks):
    """Passes longer than the window, and steps after it filled: a sliding layer's queries see only
    their last 8 positions, as transformers' mask has it."""
    model = _tiny_gemma3()
    dec = fast_decoder(model)
    assert isinstance(dec, GemmaDecoder)
    ids = list(range(100, 100 + sum(chunks)))
    ref_cache, cache = new_kv_cache(model.config), new_kv_cache(model.config)
    pos = 0
    for n in chunks:
        ref = _reference(model, ref_cache, ids[pos:pos + n], pos, n)
        got = dec.forward([DecodeRow(cache, ids[pos:pos + n], pos, keep=n)])[0]
        got = got if got.dim() == 2 else got[None]
        torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-5)
        pos += n
    assert cache.get_seq_length() == ref_cache.get_seq_length() == pos


def test_rows_of_several_sequences_in_one_pass_equal_separate_passes():
    model = _tiny_gemma3()
    dec = fast_decoder(model)
    assert dec is not None
    histories = [list(range(10, 22)), list(range(40, 43)), list(range(60, 75))]  # past the window and not
    new = [[7, 8], [9], [11, 12, 13]]
    alone, together = [], []
    for hist in histories:
        for caches in (alone, together):
            cache = new_kv_cache(model.config)
            _reference(model, cache, hist, 0, 1)
            caches.append(cache)
    separate = [dec.forward([DecodeRow(c, ids, len(h), keep=len(ids))])[0] for c, ids, h in zip(alone, new, histories)]
    batched = dec.forward([DecodeRow(c, ids, len(h), keep=len(ids)) for c, ids, h in zip(together, new, histories)])
    for a, b in zip(separate, batched):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_int8_bf16_pass_stays_within_bf16_noise_of_transformers():
    """The packaged model's format: int8 weights (q/k/v and gate/up fused), bf16 activations, the C
    mat-vecs and rope where this CPU has them. Summation orders differ, so: bf16 noise, same tokens."""
    model = quantize_int8(_tiny_gemma3(torch.bfloat16, head_dim=64))
    dec = fast_decoder(model)
    assert dec is not None
    ref_cache, cache = new_kv_cache(model.config), new_kv_cache(model.config)
    prompt = list(range(120, 132))
    ref = _reference(model, ref_cache, prompt, 0, 1)[-1]
    got = dec.forward([DecodeRow(cache, prompt, 0)])[0]
    pos, ref_tokens, got_tokens = len(prompt), [], []
    for _ in range(12):
        torch.testing.assert_close(got.float(), ref.float(), rtol=0.05, atol=0.05)
        ref_tokens.append(int(ref.argmax()))
        got_tokens.append(int(got.argmax()))
        ref = _reference(model, ref_cache, [ref_tokens[-1]], pos, 1)[-1]
        got = dec.forward([DecodeRow(cache, [ref_tokens[-1]], pos)])[0]
        pos += 1
    assert got_tokens == ref_tokens


def test_rope_tables_hold_the_bits_the_rotary_module_gives():
    model = _tiny_gemma3(torch.bfloat16)
    dec = fast_decoder(model)
    assert isinstance(dec, GemmaDecoder)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    positions = [0, 1, 255, 256, 300, 511, 7, 600]
    for kind in ("sliding_attention", "full_attention"):
        cos, sin = dec._rope(x, kind, positions)
        ref_cos, ref_sin = model.model.rotary_emb(x[None], torch.tensor([positions]), kind)
        assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])


def test_a_failed_pass_leaves_every_cache_as_it_was():
    model = _tiny_gemma3()
    dec = fast_decoder(model)
    assert dec is not None
    cache = new_kv_cache(model.config)
    _reference(model, cache, [1, 2, 3, 4], 0, 1)
    with pytest.raises(IndexError):
        dec.forward([DecodeRow(cache, [5], 4), DecodeRow(new_kv_cache(model.config), [10 ** 9], 0)])
    assert cache.get_seq_length() == 4


def test_the_scheduler_batches_gemma_sessions_into_one_forward_per_tick(tiny_lm):
    """Two translation-model sequences decoding at once share ticks (one forward each, two rows);
    before, sliding-window caches ran one forward per row. Their tokens are what each alone gives."""
    from duplex.engine.sampling import Sampler, SamplingConfig
    from duplex.engine.sequence import Speaker
    from duplex.engine.template import RoleMarkers, TurnTemplate
    from duplex.engine.worker import Engine

    model = _tiny_gemma3()
    lm = LoadedModel(model=model, tokenizer=tiny_lm.tokenizer, name="tiny-gemma3", device=torch.device("cpu"),
                     dtype=torch.float32)
    engine = Engine(lm, threads=1)
    empty = RoleMarkers((), ())
    engine.template = TurnTemplate(system=empty, user=empty, agent=empty, eos_ids=(0,))
    sampler = Sampler(SamplingConfig(temperature=0.0, max_tokens=1 << 20))

    async def run(n: int) -> list[list[int]]:
        seqs = [engine.new_sequence() for _ in range(n)]
        for i, seq in enumerate(seqs):
            await engine.run_for(seq, seq.begin_turn, Speaker.USER)
            await engine.run_for(seq, seq.append, list(range(30 + 7 * i, 41 + 7 * i)))  # past the window

        async def decode(seq) -> list[int]:
            return [await engine.decode(seq, sampler) for _ in range(6)]

        return list(await asyncio.gather(*(decode(s) for s in seqs)))

    try:
        alone = [asyncio.run(run(1))[0]]
        engine.scheduler.trace.clear()
        both = asyncio.run(run(2))
        shared = [t for t in engine.scheduler.trace if sum(r.decode for r in t.rows) == 2]
    finally:
        engine.close()
    assert both[0] == alone[0]
    assert shared and all(t.forwards == 1 for t in shared)


def test_the_c_norm_is_gemmas_norm_but_for_rare_last_bit_differences():
    """``FusedOps.gemma_norm`` (one C call for the module's eight torch ops) against
    ``Gemma3RMSNorm`` itself: the mean's summation order differs, so a bf16 result may differ in its
    last bit, rarely; with a residual, the decoder layer's bf16 add."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from duplex.engine.int8_kernel import fused_ops

    ops = fused_ops()
    if ops is None:
        pytest.skip("no C helpers here (no compiler or no AVX2)")
    gen = torch.Generator().manual_seed(0)
    differing = total = 0
    for trial in range(60):
        d, rows = (640, 256, 24, 37)[trial % 4], 1 + trial % 5
        module = Gemma3RMSNorm(d, eps=1e-6)
        module.weight.data = torch.randn(d, generator=gen) * 0.3
        module = module.to(torch.bfloat16)
        x = (torch.randn(rows, d, generator=gen) * (0.1 + trial % 9)).to(torch.bfloat16)
        residual = torch.randn(rows, d, generator=gen).to(torch.bfloat16)
        scale = 1.0 + module.weight.float()
        for got, ref in ((ops.gemma_norm(x, scale, 1e-6), module(x)),
                         (ops.gemma_norm(x, scale, 1e-6, residual=residual), residual + module(x))):
            torch.testing.assert_close(got, ref, rtol=2 ** -7, atol=1e-6)  # at most a last bit apart
            differing += int((got != ref).sum())
            total += ref.numel()
    assert differing <= total // 1000
