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
