"""``duplex bench soak``: the seq ledger and RSS arithmetic, and a few seconds of the real soak
(every client behaviour, a real socket) against an in-process server on the tiny model.
Facts only (no loss, no internal_error, every flood message answered); nothing asserts on time."""

from __future__ import annotations

import json
import os

from duplex.bench.servers import in_process_server
from duplex.bench.soak import SoakConfig, bench_soak, read_rss_kib
from duplex.bench.soak_report import SeqLedger, rss_stats, targets
from duplex.engine.sampling import SamplingConfig
from duplex.serving.server import ServerLimits
from duplex.session.config import SessionConfig


def test_seq_ledger_counts_gaps_and_duplicates() -> None:
    ledger = SeqLedger()
    for seq in (1, 2, 3, 5, 5, 0, None, True, 7):
        ledger.see(seq)
    assert ledger.missing() == [4, 6] and ledger.duplicates == 1 and ledger.highest == 7


def test_rss_stats_after_warmup() -> None:
    samples = [(float(t), 100 * 1024 if t < 10 else (200 + (t - 10) // 10) * 1024) for t in range(110)]
    stats = rss_stats(samples, warmup_s=10)
    assert stats.baseline_mib is not None and stats.final_mib is not None
    assert stats.baseline_mib == 200 and stats.final_mib == stats.max_mib == 209
    assert 0 < stats.growth_pct < 5  # the warm-up jump from 100 to 200 MiB does not count
    assert rss_stats(samples[:5], warmup_s=10).growth_pct is None
    checks = targets(2.0, 4, stats, 0, 0, 1.5)
    assert checks["duration_min"]["met"] is False and checks["rss_growth_after_warmup_pct"]["met"] is True
    assert read_rss_kib(os.getpid()) and read_rss_kib(-1) is None


async def test_a_short_soak_loses_nothing(tiny_engine, tmp_path) -> None:
    config = SessionConfig(policy="silence", sampling=SamplingConfig(temperature=1.0, max_tokens=16))
    # A flood must outrun the limit on any machine: unpaced, a flood message costs the server ~0.3 ms
    # here and ~3 ms on a loaded 2-core box, so the default 200 messages/s (400 saved up) was not
    # always exceeded there. At 20/s after a burst of 10, 60 messages outrun it unless they take > 2.5 s.
    limits = ServerLimits(max_sessions=16, messages_per_s=20.0, messages_burst=10.0)
    flood = 60
    async with in_process_server(tiny_engine, config=config, limits=limits) as url:
        cfg = SoakConfig(clients=3, minutes=0.04, url=url, server_pid=os.getpid(), warmup_s=1.0, sample_s=0.5,
                         idle_trials=1, flood_messages=flood, slow_read_s=0.05, max_reply_tokens=16, out=str(tmp_path / "soak.json"))
        result = await bench_soak(cfg)
    json.dumps(result)  # serializable as written by the CLI
    assert result["run_kind"].startswith("SMOKE RUN ONLY")
    assert result["internal_errors"] == 0 and "internal_error" not in result["errors_by_code"]
    assert result["lost_events"] == 0 and result["duplicate_events"] == 0
    counts = result["counts"]
    assert counts["resumes"] >= 1 and not counts["resumes_failed"]  # the chaos clients start with a drop + resume and a flood
    assert counts["flood_messages_sent"] == flood * counts["actions"]["flood"] >= flood
    assert counts["flood_messages_answered"] == counts["flood_messages_sent"]  # paced, never dropped
    assert result["errors_by_code"].get("rate_limited", 0) >= 1
    assert result["sessions_held"]["after_all_clients_closed"] == 0
    assert result["first_text_ms"]["idle"]["n"] == 1 and result["first_text_ms"]["idle_after_soak"]["n"] == 1
    assert set(result["targets"]) >= {"rss_growth_after_warmup_pct", "internal_error", "lost_events"}
    assert (tmp_path / "soak.png").stat().st_size > 0 and result["plot"] == "soak.png"


def test_a_server_the_bench_started_dies_with_the_bench():
    """A bench killed by a signal runs no ``finally``: the ``duplex serve`` it started must not
    outlive it (``die_with_parent``: SIGTERM to the child when its parent goes). Here the parent is
    a Python process that starts a long ``sleep`` the same way, then is SIGKILLed."""
    import signal
    import subprocess
    import sys
    import time

    import pytest

    from duplex.bench.servers import die_with_parent

    if die_with_parent() is None:
        pytest.skip("no prctl here")
    parent = subprocess.Popen(
        [sys.executable, "-c",
         ("import subprocess, sys, time\n"
          "from duplex.bench.servers import die_with_parent\n"
          "child = subprocess.Popen(['sleep', '120'], preexec_fn=die_with_parent())\n"
          "print(child.pid, flush=True)\n"
          "time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    os.kill(child_pid, 0)  # alive while its parent is
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30  # a liveness bound, not a measurement
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        try:  # reaped by init once it exits; a zombie still counts as gone
            with open(f"/proc/{child_pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(child_pid, signal.SIGKILL)
    raise AssertionError("the child outlived its killed parent")
