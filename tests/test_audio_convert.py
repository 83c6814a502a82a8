"""Format conversion: every odd input becomes float32 mono 16 kHz or a clear AudioFormatError."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from duplex.audio.convert import read_wav, to_mono_16k
from duplex.audio.events import AudioFormatError


def _tone(rate_hz: int, seconds: float = 1.0, freq_hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    return (0.5 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


@pytest.mark.parametrize("rate_hz", [8000, 22050, 44100, 48000, 96000])
def test_wrong_rate_is_resampled(rate_hz: int) -> None:
    pcm = (_tone(rate_hz) * 32767).astype(np.int16).tobytes()
    out = to_mono_16k(pcm, rate_hz)
    assert out.dtype == np.float32
    assert abs(len(out) - 16000) <= 2
    # the 440 Hz tone survives: dominant FFT bin at 440 Hz
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / len(out) - 440) < 5


def test_stereo_is_downmixed() -> None:
    left = _tone(48000)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    interleaved = (stereo * 32767).astype(np.int16).reshape(-1).tobytes()
    out = to_mono_16k(interleaved, 48000, channels=2)
    assert abs(len(out) - 16000) <= 2
    assert 0.2 < np.abs(out).max() < 0.3  # half of 0.5: mean of the two channels
    out_arr = to_mono_16k(stereo, 48000, channels=2)
    np.testing.assert_allclose(out_arr, out, atol=1e-3)


def test_odd_byte_count_is_rejected() -> None:
    with pytest.raises(AudioFormatError, match="not a whole number"):
        to_mono_16k(b"\x00\x01\x02", 16000)
    with pytest.raises(AudioFormatError, match="2 channel"):
        to_mono_16k(b"\x00" * 6, 16000, channels=2)


def test_container_bytes_are_rejected() -> None:
    with pytest.raises(AudioFormatError, match="WAV/RIFF header"):
        to_mono_16k(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 32, 16000)
    with pytest.raises(AudioFormatError, match="Ogg"):
        to_mono_16k(b"OggS" + b"\x00" * 60, 16000)


@pytest.mark.parametrize("rate_hz", [0, 4000, 7999, 192001, 1_000_000])
def test_unsupported_rate(rate_hz: int) -> None:
    with pytest.raises(AudioFormatError, match="sample rate"):
        to_mono_16k(b"\x00\x00" * 100, rate_hz)


def test_nan_and_bad_types() -> None:
    x = np.zeros(100, np.float32)
    x[10] = np.nan
    with pytest.raises(AudioFormatError, match="NaN"):
        to_mono_16k(x, 16000)
    with pytest.raises(AudioFormatError, match="NaN"):
        to_mono_16k(x.tobytes(), 16000, sample_format="float32")
    with pytest.raises(AudioFormatError, match="sample_format"):
        to_mono_16k(b"\x00\x00", 16000, sample_format="mp3")
    with pytest.raises(AudioFormatError, match="bytes or a numpy array"):
        to_mono_16k("hello", 16000)  # type: ignore[arg-type]


def test_clipping_is_clipped() -> None:
    loud = np.array([2.0, -3.0, 0.5], dtype=np.float32)
    np.testing.assert_array_equal(to_mono_16k(loud, 16000), [1.0, -1.0, 0.5])
    full = np.array([32767, -32768], dtype=np.int16)
    out = to_mono_16k(full, 16000)
    assert out.max() <= 1.0 and out.min() >= -1.0


def test_silence_and_empty() -> None:
    assert to_mono_16k(b"", 16000).shape == (0,)
    assert not to_mono_16k(np.zeros(4410, np.int16), 44100).any()


def test_read_wav_stereo_44k(tmp_path) -> None:
    path = tmp_path / "stereo.wav"
    tone = (_tone(44100, 0.5) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(44100)
        wav.writeframes(np.stack([tone, tone], axis=1).tobytes())
    out = read_wav(path)
    assert abs(len(out) - 8000) <= 2
    assert 0.45 < np.abs(out).max() <= 0.51


def test_read_wav_garbage(tmp_path) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(b"not a wav file at all")
    with pytest.raises(AudioFormatError, match="not a readable PCM WAV"):
        read_wav(path)
