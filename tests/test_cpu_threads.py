"""Per-stage thread counts (duplex.cpu): half the cores by default, the environment overrides."""

from __future__ import annotations

import os

import pytest
import torch

from duplex.cpu import stage_threads, time_interleaved


def test_half_the_cores_at_least_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DUPLEX_TORCH_THREADS", raising=False)
    for cores, want in ((1, 1), (2, 1), (3, 1), (4, 2), (16, 8)):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert stage_threads("DUPLEX_TORCH_THREADS") == want


def test_the_environment_overrides_and_bad_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEX_TORCH_THREADS", "3")
    assert stage_threads("DUPLEX_TORCH_THREADS") == 3
    monkeypatch.setenv("DUPLEX_TORCH_THREADS", "0")
    assert stage_threads("DUPLEX_TORCH_THREADS") == 1
    monkeypatch.setenv("DUPLEX_TORCH_THREADS", "two")
    with pytest.raises(ValueError, match="DUPLEX_TORCH_THREADS"):
        stage_threads("DUPLEX_TORCH_THREADS")


def test_a_text_only_server_gives_the_llm_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from duplex.cli.serve import _llm_threads

    monkeypatch.delenv("DUPLEX_TORCH_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert _llm_threads(argparse.Namespace(asr_model="none", tts="none")) == 2
    assert _llm_threads(argparse.Namespace(asr_model="tiny.en", tts="none")) == 1  # whisper needs a core
    assert _llm_threads(argparse.Namespace(asr_model="none", tts="piper")) == 1
    monkeypatch.setenv("DUPLEX_TORCH_THREADS", "1")
    assert _llm_threads(argparse.Namespace(asr_model="none", tts="none")) == 1  # the environment decides


def test_speech_stages_count_what_runs_inside_them() -> None:
    from duplex.cpu import SpeechStages, speech_stage

    stages = SpeechStages()
    assert stages.idle
    with stages.running():
        assert not stages.idle
        with stages.running():
            assert not stages.idle
        assert not stages.idle
    assert stages.idle
    seen = []
    from duplex import cpu

    wrapped = speech_stage(lambda x: seen.append(cpu.SPEECH_STAGES.idle) or x * 2)
    assert wrapped(21) == 42 and seen == [False] and cpu.SPEECH_STAGES.idle
    with pytest.raises(ZeroDivisionError):
        speech_stage(lambda: 1 / 0)()
    assert cpu.SPEECH_STAGES.idle  # an exception leaves the count as it was


def test_a_voice_engine_borrows_every_core_while_no_speech_stage_runs(tiny_lm, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from duplex.cpu import SPEECH_STAGES
    from duplex.engine.sequence import Speaker
    from duplex.engine.worker import Engine

    monkeypatch.delenv("DUPLEX_TORCH_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    engine = Engine(tiny_lm, threads=2)  # a voice server's share of 4 cores
    try:
        assert engine.tick_threads() == 4
        with SPEECH_STAGES.running():
            assert engine.tick_threads() == 2
        seen: list[int] = []
        orig = engine._tick_threads

        def record() -> None:
            orig()
            seen.append(torch.get_num_threads())

        engine.scheduler._before_tick = record  # the hook runs on the tick's thread, before its forward
        seq = engine.new_sequence()
        asyncio.run(engine.run_for(seq, seq.add_message, Speaker.USER, "hello there"))
        assert seen and set(seen) == {4}
    finally:
        engine.close()
    monkeypatch.setenv("DUPLEX_TORCH_THREADS", "2")  # a fixed count is kept as it is
    fixed = Engine(tiny_lm, threads=2)
    try:
        assert fixed.tick_threads() == 2
    finally:
        fixed.close()


def test_interleaved_timing_takes_each_candidates_best_round_after_the_warm_up_at_one_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every round times every candidate (a slow spell then costs all of them alike), the first round
    is not counted, the candidates run at one thread, and the thread count comes back. A fake clock:
    each candidate advances it by its cost in that round."""
    import time

    clock = [0.0]
    costs = {"a": [100.0, 5.0, 3.0, 4.0], "b": [1.0, 9.0, 8.0, 7.0]}
    order: list[tuple[str, int]] = []

    def candidate(key: str):
        def run() -> None:
            order.append((key, torch.get_num_threads()))
            clock[0] += costs[key][sum(k == key for k, _ in order) - 1]
        return run

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        best = time_interleaved({"a": candidate("a"), "b": candidate("b")}, rounds=4)
        assert best == {"a": 3.0, "b": 7.0}
        assert [k for k, _ in order] == ["a", "b"] * 4
        assert {t for _, t in order} == {1}
        assert torch.get_num_threads() == 2

        def broken() -> None:
            raise RuntimeError("kernel failed")

        with pytest.raises(RuntimeError):
            time_interleaved({"x": broken})
        assert torch.get_num_threads() == 2  # restored on an error too
        with pytest.raises(ValueError):
            time_interleaved({"a": candidate("a")}, rounds=1)
    finally:
        torch.set_num_threads(before)

