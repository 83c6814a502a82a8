"""``bench ttft`` on the tiny model: its rows, and that every round visits every history."""

from __future__ import annotations

import io

from duplex.bench import engine as bench_engine
from duplex.engine.sequence import SharedSequence


def test_bench_ttft_interleaves_histories(monkeypatch):
    visits: list[int] = []
    real_hand_over = SharedSequence.hand_over

    def hand_over(self, speaker):
        visits.append(id(self))
        return real_hand_over(self, speaker)

    monkeypatch.setattr(SharedSequence, "hand_over", hand_over)
    monkeypatch.setattr(bench_engine, "bandwidth_gbps", lambda device, mbytes=512: 10.0)
    progress = io.StringIO()
    result = bench_engine.bench_ttft("tiny", device="cpu", dtype="float32", histories=(30, 90), reps=2,
                                     turn_ends_per_rep=2, progress=progress)
    rows = result["rows"]
    assert [r["history_tokens"] >= h for r, h in zip(rows, (30, 90))] == [True, True]
    assert rows[0]["history_tokens"] < rows[1]["history_tokens"]
    assert result["shared_growth_ratio"] == round(rows[1]["shared_cache_ms"] / rows[0]["shared_cache_ms"], 2)
    assert all(r["shared_cache_ms"] > 0 and r["reprefill_ms"] > 0 for r in rows)
    # each round: all of the short history's turn ends (timed on every attention code, then the
    # prepared one), then all of the long one's
    runs = [seq for i, seq in enumerate(visits) if i == 0 or visits[i - 1] != seq]
    small, large = runs[:2]
    assert runs == [small, large, small, large]
    assert visits.count(small) == visits.count(large) >= 2 * 3
    assert "round 2/2" in progress.getvalue()


def test_bench_ttft_reports_the_fp32_compute_floor_on_the_avx2_code(monkeypatch):
    """Where attention is fp32 multiply-adds, the hand-over's rows against the extra history are a
    floor of their own: its MACs at the run's measured fp32 rate, added to the short history's TTFT."""
    monkeypatch.setattr(bench_engine, "attention_isa", lambda: "avx2")
    monkeypatch.setattr(bench_engine, "set_attention_isa", lambda isa: isa)
    monkeypatch.setattr(bench_engine, "bandwidth_gbps", lambda device, mbytes=512: 10.0)
    monkeypatch.setattr(bench_engine, "fp32_gmacs", lambda device: 2.0)
    result = bench_engine.bench_ttft("tiny", device="cpu", dtype="float32", histories=(30, 90), reps=1,
                                     turn_ends_per_rep=1, progress=io.StringIO())
    first, last = result["rows"]
    from duplex.engine.models import load_model

    lm = load_model("tiny", device="cpu", dtype="float32")
    cfg = lm.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    seq = bench_engine._history_sequence(lm, 30)[0]
    hand_over = len(seq.template.user.footer) + len(seq.template.agent.header)
    macs = hand_over * cfg.num_attention_heads * head_dim * 2 * cfg.num_hidden_layers * (
        last["history_tokens"] - first["history_tokens"])
    assert result["attention_extra_gmac"] == round(macs / 1e9, 3)
    expected = (first["shared_cache_ms"] + macs / 2.0e6) / first["shared_cache_ms"]
    assert result["compute_bound_growth_ratio"] == round(expected, 2)
    assert result["fp32_gmacs"] == 2.0


def test_fp32_gmacs_is_the_products_multiply_adds_over_the_best_time(monkeypatch):
    import torch

    times = iter([5.0, 2.0, 4.0])
    monkeypatch.setattr(bench_engine, "_timed", lambda fn, device: next(times))
    assert bench_engine.fp32_gmacs(torch.device("cpu"), n=64, k=128, reps=3) == 64 * 128 * 64 / 2e-3 / 1e9
