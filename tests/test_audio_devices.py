"""Local devices: a clear AudioDeviceError when there is none; playback counting headless."""

from __future__ import annotations

import asyncio
import builtins

import numpy as np
import pytest

from duplex.audio import devices
from duplex.audio.devices import AudioDeviceError, MicrophoneStream, SpeakerStream, find_device


def _has_devices() -> bool:
    try:
        find_device("input")
        find_device("output")
    except AudioDeviceError:
        return False
    return True


@pytest.mark.skipif(_has_devices(), reason="this machine has audio devices")
async def test_no_device_raises_clear_error() -> None:
    with pytest.raises(AudioDeviceError, match="input"):
        await MicrophoneStream().start()
    with pytest.raises(AudioDeviceError, match="output"):
        await SpeakerStream().start()


def test_missing_portaudio_is_an_audio_device_error(monkeypatch) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(AudioDeviceError, match="libportaudio2"):
        find_device("input")


def test_unknown_device_names_the_problem() -> None:
    try:
        find_device("output", device="no-such-speaker-xyz")
    except AudioDeviceError as exc:
        assert "no-such-speaker-xyz" in str(exc) or "PortAudio" in str(exc)
    else:  # pragma: no cover - only if a device with that name exists
        pytest.fail("expected AudioDeviceError")
    with pytest.raises(ValueError):
        find_device("sideways")


async def test_speaker_render_counts_and_stop_drops() -> None:
    speaker = SpeakerStream(sample_rate_hz=16000)
    speaker.play(np.full(300, 7, np.int16))
    speaker.play(np.full(500, 9, np.int16))
    out = np.ones(256, np.int16)
    assert speaker.render(out) == 256 and speaker.played_samples == 256
    assert (out == 7).all()
    out = np.ones(256, np.int16)
    speaker.render(out)
    assert (out[:44] == 7).all() and (out[44:] == 9).all()
    assert speaker.stop() == 800 - 512
    out = np.ones(256, np.int16)
    assert speaker.render(out) == 0 and not out.any()  # silence after stop, counter unchanged
    assert speaker.played_samples == 512 and speaker.queued_samples == 0
    await asyncio.sleep(0)
    assert devices.SpeakerStream is SpeakerStream


def test_speaker_pause_holds_the_queue_and_resume_plays_on_from_the_same_sample() -> None:
    speaker = SpeakerStream(sample_rate_hz=16000)
    speaker.play(np.arange(400, dtype=np.int16))
    out = np.zeros(100, np.int16)
    speaker.render(out)
    speaker.pause()
    held = np.ones(100, np.int16)
    assert speaker.render(held) == 0 and not held.any()  # silence while paused, nothing consumed
    assert speaker.queued_samples == 300 and speaker.played_samples == 100
    speaker.resume()
    speaker.render(out)
    assert (out == np.arange(100, 200)).all()  # nothing lost or repeated
    speaker.pause()
    assert speaker.stop() == 200 and not speaker.paused  # a barge-in clears the pause too
