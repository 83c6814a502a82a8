"""``duplex eval run --clock measured`` end to end through the CLI: the browser-like client plays a
short scenario to an in-process server (the fakes only exist in-process) and the same metrics score
the client's timeline. Facts only; nothing asserts on time."""

from __future__ import annotations

import json
from pathlib import Path

from duplex.cli.main import main
from duplex.eval.runner import read_timeline
from tests.test_bench_realtime import write_short_scenarios


def test_eval_run_measured_clock_is_the_default_and_scores_the_served_episode(tmp_path: Path, capsys) -> None:
    paths = write_short_scenarios(tmp_path / "scn")
    paths["interruption"].unlink()
    out = tmp_path / "run"
    rc = main(["eval", "run", "--scenarios", str(tmp_path / "scn"), "--policy", "silence", "--out", str(out),
               "--model", "tiny", "--asr-model", "fake", "--tts", "fake", "--vad", "energy", "--max-reply-tokens", "8",
               "--temperature", "1.0", "--workers", "2", "--no-report", "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["clock"] == "measured" and summary["meta"]["workers"] == 1  # forced sequential
    (row,) = summary["rows"]
    assert row["policy"] == "silence" and row["n_turn_taking_total"] == 1 and row["tor_turn_taking"] is not None
    timeline = read_timeline(out / "episodes" / "silence" / "turn_taking-0.jsonl")
    head = timeline[0]
    assert head["type"] == "episode" and head["clock"] == "measured" and head["policy_name"] == "silence"
    sent = [r["event"] for r in timeline if r["type"] == "client_event"]
    update = next(e for e in sent if e["type"] == "session.update")["session"]
    assert update["policy"] == "silence" and update["max_output_tokens"] == 8
    assert any(r["type"] == "turn_started" for r in timeline) and timeline[-1]["type"] == "episode_end"
    (episode,) = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    assert episode["scenario"] == "turn_taking-0" and episode["client_mic_frames"] > 0


def test_policies_take_turns_going_first_so_no_policy_always_meets_cold_caches() -> None:
    from duplex.eval.measured import policy_order

    policies = ["learned", "eou", "silence"]
    orders = [policy_order(policies, i) for i in range(6)]
    assert all(sorted(o) == sorted(policies) for o in orders)  # every scenario runs every policy once
    assert [o[0] for o in orders] == ["learned", "eou", "silence"] * 2
    assert orders[1] == ["eou", "silence", "learned"]
    assert policy_order([], 3) == []


def test_run_measured_plays_each_scenario_in_the_rotated_order(tmp_path: Path, monkeypatch) -> None:
    """The served run itself uses the rotation (the episode client is replaced by a recorder)."""
    import asyncio
    from types import SimpleNamespace

    from duplex.bench import loopback
    from duplex.eval.measured import run_measured
    from duplex.eval.runner import PolicySpec, RunSpec

    played: list[tuple[str, str]] = []

    async def fake_episode(url, scenario, user, cues, config, label):
        played.append((scenario.id, label))
        return SimpleNamespace(records=[{"type": "episode", "scenario": scenario.id, "category": scenario.category,
                                         "policy": label}], stats={})

    monkeypatch.setattr(loopback, "run_episode", fake_episode)
    paths = write_short_scenarios(tmp_path / "scn")
    spec = RunSpec(out_dir=str(tmp_path / "run"), policies=(PolicySpec("eou", "eou", {}), PolicySpec("silence", "silence", {})),
                   server_url="ws://unused.invalid/ws")
    rows = asyncio.run(run_measured(spec, sorted(str(p) for p in paths.values()), warmup=False))
    ids = sorted(p.stem for p in paths.values())
    assert played == [(ids[0], "eou"), (ids[0], "silence"), (ids[1], "silence"), (ids[1], "eou")]
    assert len(rows) == 4
