"""The growable KV cache gives exactly the logits of transformers' DynamicCache, crops included."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from duplex.engine.kv import GrowableLayer, new_kv_cache


def _steps(model, cache, prompt, n=20):
    out = []
    with torch.inference_mode():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        for i in range(n):  # past the initial capacity: the buffer grows mid-stream
            o = model(input_ids=torch.tensor([[11 + i]]), past_key_values=cache, use_cache=True)
            out.append(o.logits[0, -1].float())
        cache.crop(-7)  # a barge-in rollback
        o = model(input_ids=torch.tensor([[5, 6]]), past_key_values=cache, use_cache=True)
        out.append(o.logits[0, -1].float())
    return torch.stack(out), cache.get_seq_length()


def test_growable_cache_equals_dynamic_cache(tiny_lm, monkeypatch):
    monkeypatch.setattr(GrowableLayer, "initial_capacity", 8)
    model = tiny_lm.model
    prompt = torch.randint(10, 200, (1, 13))
    cache = new_kv_cache(model.config)
    assert all(isinstance(layer, GrowableLayer) for layer in cache.layers) or \
        cache.layer_class_to_replicate is GrowableLayer
    ours, n_ours = _steps(model, cache, prompt)
    ref, n_ref = _steps(model, DynamicCache(config=model.config), prompt)
    assert n_ours == n_ref == 13 + 20 - 7 + 2
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_growable_layer_crops_as_transformers_does():
    """A negative count drops trailing positions; a positive one is the length to keep (what
    ``DynamicCache.crop`` passes on transformers 4); longer than the cache: nothing to do."""
    from duplex.engine.kv import GrowableLayer

    layer = GrowableLayer()
    k = torch.arange(2 * 10 * 4, dtype=torch.float32).view(1, 2, 10, 4)
    layer.update(k, k + 1)
    layer.crop(-3)
    assert layer.get_seq_length() == 7 and torch.equal(layer.keys, k[..., :7, :])
    layer.crop(5)
    assert layer.get_seq_length() == 5 and torch.equal(layer.values, (k + 1)[..., :5, :])
    layer.crop(9)
    assert layer.get_seq_length() == 5
