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
