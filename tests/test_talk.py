"""``duplex talk``: a clear error and exit code 2 without audio devices; the echo gate and the
per-turn playback accounting, headless."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from duplex.audio.devices import AudioDeviceError, find_device
from duplex.voice.talk import EXIT_NO_DEVICE, MicGate, PlaybackTracker, run_talk


def _has_devices() -> bool:
    try:
        find_device("input")
        find_device("output")
    except AudioDeviceError:
        return False
    return True


def _args(**kw: object) -> argparse.Namespace:
    base = dict(model="tiny", device="cpu", dtype="float32", policy="eou", headphones=False, tts=None, verbose=0)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.skipif(_has_devices(), reason="this machine has audio devices")
async def test_no_audio_device_exits_2_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_talk(_args()) == EXIT_NO_DEVICE == 2
    err = capsys.readouterr().err
    assert "duplex talk:" in err and "audio" in err and "device" in err
    assert "loading models" not in err  # failed before loading anything


@pytest.mark.skipif(_has_devices(), reason="this machine has audio devices")
def test_cli_talk_exit_code_without_devices(capsys: pytest.CaptureFixture[str]) -> None:
    from duplex.cli.main import main

    assert main(["talk", "--model", "tiny"]) == 2
    assert "audio" in capsys.readouterr().err


def test_mic_gate_mutes_while_playing_and_for_the_tail() -> None:
    gate = MicGate(tail_s=0.3)
    block = np.full(320, 0.5, np.float32)
    assert gate.process(block, 0.0, speaker_busy=False) is block
    assert not gate.process(block, 1.0, speaker_busy=True).any()
    assert not gate.process(block, 1.2, speaker_busy=False).any()  # echo tail
    assert gate.process(block, 1.31, speaker_busy=False) is block


def test_mic_gate_is_open_with_headphones() -> None:
    gate = MicGate(headphones=True)
    block = np.full(320, 0.5, np.float32)
    assert gate.process(block, 1.0, speaker_busy=True) is block


def test_playback_tracker_counts_samples_per_turn() -> None:
    t = PlaybackTracker()
    t.queued(turn=1, offset_samples=0, n_samples=1000)
    t.queued(turn=1, offset_samples=1000, n_samples=500)
    t.queued(turn=2, offset_samples=0, n_samples=800)  # queued behind turn 1
    assert t.played_in_turn(1, 1200) == 1200 and t.played_in_turn(2, 1200) == 0
    assert t.played_in_turn(2, 1600) == 100
    t.prune(1600)
    assert list(t.turn_base) == [2]
    t.dropped(700)  # barge-in: the speaker dropped the rest of turn 2
    t.queued(turn=3, offset_samples=0, n_samples=100)
    assert t.turn_base[3] == 1600 and t.played_in_turn(3, 1650) == 50
