"""Model loading: clear errors offline, the tiny model, and the real packaged model."""

from __future__ import annotations

import pytest

from duplex.engine.models import ModelNotFoundError, load_model
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import SharedSequence, Speaker
from duplex.engine.template import TurnTemplate


def test_unknown_path_names_it_and_explains_offline_use(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as err:
        load_model(str(missing))
    assert str(missing) in str(err.value)
    assert "offline" in str(err.value)


def test_unknown_hub_id_names_it(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read once at import: without this the lookup retried the network for ~47 s before failing
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="nobody/definitely-not-a-model"):
        load_model("nobody/definitely-not-a-model")


def test_tiny_model_uses_real_tokenizer(tiny_lm):
    assert tiny_lm.tokenizer.chat_template
    assert tiny_lm.model.config.num_hidden_layers == 2


@pytest.mark.integration
def test_real_model_knows_the_capital_of_france(real_lm):
    seq = SharedSequence(real_lm, TurnTemplate.from_tokenizer(real_lm.tokenizer))
    seq.add_message(Speaker.SYSTEM, "You are a helpful AI assistant.")
    seq.add_message(Speaker.USER, "What is the capital of France?")
    seq.begin_turn(Speaker.AGENT)
    sampler = Sampler(SamplingConfig())
    ids = []
    for _ in range(20):
        tok = seq.step(sampler)
        if tok in seq.template.end_of_agent_turn_ids:
            break
        ids.append(tok)
    assert "Paris" in real_lm.tokenizer.decode(ids)


def test_the_decode_format_probe_times_the_int8_mat_vec_decode_runs_at_one_thread(monkeypatch):
    """The int8 candidate is the C mat-vec decode steps run (PyTorch's int8pack_mm, timed before,
    is no faster than bf16 on an AVX2 CPU, which made the pick a coin toss), every round times every
    format, and the probe runs at one thread (a busy neighbour stalled two-thread mat-vecs at their
    barriers and handed the pick to fp32), restoring the thread count afterwards."""
    import torch

    from duplex.engine import int8_kernel, models

    calls: list[int] = []

    def fake_gemv():
        def gemv(x, w, scales):
            calls.append(torch.get_num_threads())
            return torch.zeros(x.shape[0], w.shape[0], dtype=torch.bfloat16)
        return gemv

    real_timing = models.time_interleaved

    def timing(passes, rounds):  # the real rounds; the pick from made-up times, not this machine's
        times = real_timing(passes, rounds)
        return {fmt: (1.0 if fmt == (torch.bfloat16, True) else 2.0) for fmt in times}

    monkeypatch.setattr(int8_kernel, "int8_gemv", fake_gemv)
    monkeypatch.setattr(models, "time_interleaved", timing)
    before = torch.get_num_threads()
    models.fastest_cpu_decode_format.cache_clear()
    try:
        assert models.fastest_cpu_decode_format() == (torch.bfloat16, True)
    finally:
        models.fastest_cpu_decode_format.cache_clear()
    assert calls and set(calls) == {1}
    assert len(calls) == 8 * 24  # 8 rounds (one warm-up) over the 24 matrices
    assert torch.get_num_threads() == before
