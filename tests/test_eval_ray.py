"""The Ray executor of ``duplex eval run`` against a local Ray instance (one small task)."""

from __future__ import annotations

from pathlib import Path

import pytest

from duplex.eval.runner import RunSpec, parse_policy, run_eval
from tests.test_eval_simulated import write_tone_scenarios

ray = pytest.importorskip("ray")


def test_ray_runs_episodes_as_tasks_on_a_local_instance(tmp_path: Path):
    scenarios = tmp_path / "scenarios"
    write_tone_scenarios(scenarios)
    for p in scenarios.glob("*.json"):
        if not p.name.startswith("turn_taking"):
            p.unlink()
    spec = RunSpec(out_dir=str(tmp_path / "run"), policies=(parse_policy("silence"),), clock="ideal", model="tiny", asr="fake",
                   vad="energy", tts="fake", max_reply_tokens=8, temperature=1.0)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # the local instance "auto" finds
    try:
        summary = run_eval(spec, scenarios, ray_address="auto", report=False)
    finally:
        ray.shutdown()
    assert summary["meta"]["ray"] == "auto"
    (row,) = summary["rows"]
    assert row["policy"] == "silence" and row["tor_turn_taking"] == 1.0
    assert (tmp_path / "run" / "episodes" / "silence" / "turn_taking-0.jsonl").exists()
