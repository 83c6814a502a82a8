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
