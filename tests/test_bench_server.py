"""``duplex bench server`` end to end with the tiny model, against a ``duplex serve`` subprocess.
Structure and counts only; no timing is asserted."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import duplex
from duplex.bench.server import ServerBenchConfig, bench_server


async def test_the_server_sweep_counts_every_reply_and_the_prefill_case():
    cfg = ServerBenchConfig(model="tiny", device="cpu", dtype="float32", quantize=None, sessions=(1, 2),
                            max_tokens=6, rounds=2, schedulers=("batched",), serve_configs=("text",), prefill_kb=1.0, prefill_talkers=1,
                            prefill_idle_s=1.0)
    result = await bench_server(cfg)
    (mode,) = result["modes"]
    assert (mode["serve"], mode["scheduler"]) == ("text", "batched")
    assert mode["serve_flags"][:4] == ["--asr-model", "none", "--tts", "none"]
    assert mode["decode_baseline"]["tokens"] == cfg.max_tokens
    assert [lv["sessions"] for lv in mode["levels"]] == [1, 2]
    for level in mode["levels"]:
        assert level["replies"] == level["sessions"] * cfg.rounds  # every question got its response.done
        assert 0 < level["reply_tokens_mean"] <= cfg.max_tokens
        assert not math.isnan(level["ttft_ms_p50"]) and level["aggregate_tokens_per_s"] > 0
        assert level["decode_rows_per_tick"] is not None  # read from the server's /healthz counters
        assert level["server_rss_mib"] > 0
        # the server ran this checkout's code (its /healthz says which), not another on the path
        assert level["server_code"] == {"version": duplex.__version__, "git_commit": result["git_commit"]}
    floors = result["ttft_floor"]["levels"]
    assert [f["sessions"] for f in floors] == [1, 2] and all(f["ms_max"] >= f["ms_p50"] > 0 for f in floors)
    prefill = mode["prefill"]
    assert prefill["instructions_chars"] == 1024 and prefill["talkers"] == 1 and prefill["prefill_s"] >= 0
    # the idle baseline talks as the talkers do during the prefill; the lockstep one is kept beside it
    assert prefill["idle_tokens"] > 0 and prefill["lockstep_idle_inter_token_ms_p95"] > 0


async def test_the_ttft_floor_takes_every_question_in_one_tick(tiny_engine):
    """The floor is what one batched tick of all N hand-overs (and one of their first steps)
    costs: the scheduler's trace shows the N questions' forwards together, every round."""
    from duplex.bench.server import _burst_floor

    tiny_engine.scheduler.trace.clear()
    floor = await _burst_floor(tiny_engine, 4, rounds=2)
    assert floor["sessions"] == 4 and floor["rounds"] == 2 and floor["ms_max"] > 0
    ticks = list(tiny_engine.scheduler.trace)
    prefills = [sum(1 for r in t.rows if not r.decode) for t in ticks]
    # the system messages, the three rounds' hand-overs and the turn ends: always all four together
    assert set(prefills) - {0} == {4} and prefills.count(4) >= 7
    assert sum(1 for t in ticks if sum(1 for r in t.rows if r.decode) == 4) >= 3  # the first steps


def test_a_served_subprocess_imports_the_benchs_own_package_first(monkeypatch, tmp_path):
    """An A/B run of a clone (``PYTHONPATH=clone``) started from another checkout served that
    checkout's code: ``python -m`` put the working directory first on the path."""
    from duplex.bench.servers import ServeOptions, serve_env

    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    env = serve_env()
    root = str(Path(duplex.__file__).resolve().parent.parent)
    assert env["PYTHONPATH"].split(os.pathsep) == [root, str(tmp_path)]
    argv = ServeOptions().argv(8000)
    assert argv[:4] == [sys.executable, "-P", "-m", "duplex.cli.main"] if sys.version_info >= (3, 11) else argv[:3] == [
        sys.executable, "-m", "duplex.cli.main"]
