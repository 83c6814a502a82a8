"""``duplex talk``: a clear error and exit code 2 without audio devices; the echo gate, the
per-turn playback accounting, and the sounddevice transport around the voice pipeline, headless."""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import pytest

from duplex.audio.asr import StreamingAsr
from duplex.audio.devices import AudioDeviceError, SpeakerStream, find_device
from duplex.audio.fakes import EnergyVad, FakeTts, FakeWhisper
from duplex.audio.speech_input import SpeechInput
from duplex.audio.vad import VadSegmenter
from duplex.engine.sampling import SamplingConfig
from duplex.engine.sequence import Speaker, Status
from duplex.session.config import SessionConfig
from duplex.voice.config import VoiceConfig
from duplex.voice.pipeline import VoicePipeline
from duplex.voice.talk import EXIT_NO_DEVICE, MicGate, PlaybackTracker, converse, run_talk

HANG_GUARD_S = 60.0  # only catches a hang; nothing here asserts on timing


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


class _FakeMic:
    """A microphone that plays a recording in 20 ms blocks at real time, then silence."""

    def __init__(self, recording: np.ndarray) -> None:
        self._blocks = [recording[i:i + 320] for i in range(0, len(recording), 320)]

    async def read(self) -> np.ndarray:
        await asyncio.sleep(0.02)
        return self._blocks.pop(0) if self._blocks else np.zeros(320, np.float32)


class _FakeSpeaker(SpeakerStream):
    """The real speaker's queue and counters, with a task standing in for the device callback."""

    async def run_device(self) -> None:
        block = np.zeros(self.sample_rate_hz * self.block_ms // 1000, np.int16)
        while True:
            await asyncio.sleep(self.block_ms / 1000)
            self.render(block)


async def test_talk_transport_plays_the_reply_and_reports_it_heard(tiny_engine) -> None:
    """The sounddevice adapter around the one VoicePipeline, with fake devices and fake ASR/TTS:
    speech in, an agent reply played on the speaker, every token of it counted as spoken."""
    speech = SpeechInput(VadSegmenter(EnergyVad(), prefix_padding_ms=100, min_silence_ms=200, min_speech_ms=60),
                         StreamingAsr(FakeWhisper()), asr_interval_ms=400)
    session = SessionConfig(policy="silence", policy_params={"gap_ms": 0.0},
                            sampling=SamplingConfig(temperature=1.0, seed=0, max_tokens=8))
    voice = VoicePipeline(tiny_engine, VoiceConfig(session=session), speech_factory=lambda: speech,
                          tts=FakeTts(sample_rate_hz=16000, chars_per_s=200.0))
    tone = (0.3 * np.sin(np.arange(16000) * 0.2)).astype(np.float32)
    mic = _FakeMic(np.concatenate([np.zeros(3200, np.float32), tone]))
    speaker = _FakeSpeaker(sample_rate_hz=16000)
    device = asyncio.create_task(speaker.run_device())
    talk = asyncio.create_task(converse(voice, mic, speaker, headphones=True))  # type: ignore[arg-type]
    try:
        async def agent_turn_played() -> int:
            while True:
                seq = voice.session.seq
                agent = [s.turn for s in seq.spans() if s.speaker == Speaker.AGENT] if seq else []
                if agent and voice.agent_turn is None and voice.session.state == "listening" \
                        and speaker.played_samples > 0:
                    return agent[0]
                await asyncio.sleep(0.05)

        turn = await asyncio.wait_for(agent_turn_played(), HANG_GUARD_S)
        seq = voice.session.seq
        assert seq is not None
        assert seq.positions(turn, Status.SPOKEN) and not seq.positions(turn, Status.UNSPOKEN)
    finally:
        talk.cancel()
        device.cancel()
        await asyncio.gather(talk, device, return_exceptions=True)
        await voice.close()
