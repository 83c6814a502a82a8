"""Turn whatever a transport delivers into float32 mono 16 kHz, the one format the stages use."""

from __future__ import annotations

import logging
import wave
from pathlib import Path

import numpy as np
import soxr

from .events import AudioFormatError

__all__ = ["MIN_SAMPLE_RATE_HZ", "MAX_SAMPLE_RATE_HZ", "TARGET_SAMPLE_RATE_HZ", "read_wav",
           "to_mono_16k", "to_pcm16"]

logger = logging.getLogger(__name__)

TARGET_SAMPLE_RATE_HZ = 16_000
MIN_SAMPLE_RATE_HZ = 8_000
MAX_SAMPLE_RATE_HZ = 192_000

# sample_format -> (numpy dtype, scale to [-1, 1])
_FORMATS: dict[str, tuple[str, float]] = {
    "pcm16": ("<i2", 1 / 32768.0),
    "pcm32": ("<i4", 1 / 2147483648.0),
    "float32": ("<f4", 1.0),
    "u8": ("u1", 1 / 128.0),
}


# 4-byte magic numbers (a 2**-32 chance on raw PCM) of containers people send by mistake instead of raw PCM frames.
_CONTAINER_MAGIC: dict[bytes, str] = {
    b"RIFF": "WAV/RIFF", b"ID3\x03": "MP3", b"ID3\x04": "MP3", b"OggS": "Ogg/Opus",
    b"fLaC": "FLAC", b"\x1aE\xdf\xa3": "WebM/Matroska", b"FORM": "AIFF",
}


def _decode_bytes(data: bytes, sample_format: str, channels: int) -> np.ndarray:
    for magic, name in _CONTAINER_MAGIC.items():
        if data.startswith(magic):
            raise AudioFormatError(
                f"data starts with a {name} header: expected raw {sample_format} frames, "
                "decode the container first (read_wav handles WAV files)"
            )
    dtype, scale = _FORMATS[sample_format]
    width = np.dtype(dtype).itemsize
    if len(data) % (width * channels):
        raise AudioFormatError(
            f"{len(data)} bytes is not a whole number of {sample_format} frames "
            f"({width} bytes x {channels} channel(s)); truncated or not raw PCM"
        )
    raw = np.frombuffer(data, dtype=dtype)
    if sample_format == "u8":
        return (raw.astype(np.float32) - 128.0) * scale
    return raw.astype(np.float32) * np.float32(scale)


def to_mono_16k(
    data: bytes | bytearray | memoryview | np.ndarray,
    sample_rate_hz: int,
    channels: int = 1,
    sample_format: str = "pcm16",
) -> np.ndarray:
    """Decode, downmix, resample (soxr) and clip to float32 mono 16 kHz in [-1, 1].

    ``bytes`` are interleaved little-endian frames in ``sample_format`` (pcm16, pcm32, float32,
    u8). Arrays may be int16/int32 (scaled) or float, shaped (n,) or (n, channels).
    """
    if not isinstance(sample_rate_hz, (int, np.integer)) or isinstance(sample_rate_hz, bool):
        raise AudioFormatError(f"sample_rate_hz must be an int, got {sample_rate_hz!r}")
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise AudioFormatError(
            f"unsupported sample rate {sample_rate_hz} Hz "
            f"(supported {MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz)"
        )
    if channels < 1 or channels > 32:
        raise AudioFormatError(f"unsupported channel count {channels}")
    if sample_format not in _FORMATS:
        raise AudioFormatError(
            f"unsupported sample_format {sample_format!r}; use one of {sorted(_FORMATS)}"
        )

    if isinstance(data, (bytes, bytearray, memoryview)):
        x = _decode_bytes(bytes(data), sample_format, channels).reshape(-1, channels)
    elif isinstance(data, np.ndarray):
        x = _array_to_float(data)
        if x.ndim == 1:
            if channels > 1:
                if x.size % channels:
                    raise AudioFormatError(
                        f"{x.size} interleaved samples is not a multiple of {channels} channels"
                    )
                x = x.reshape(-1, channels)
            else:
                x = x[:, None]
        elif x.ndim == 2:
            if x.shape[1] != channels and x.shape[0] == channels:
                x = x.T  # (channels, n) layout
            if x.shape[1] != channels:
                raise AudioFormatError(f"array shape {data.shape} does not match {channels} channels")
        else:
            raise AudioFormatError(f"audio array must be 1-D or 2-D, got shape {data.shape}")
    else:
        raise AudioFormatError(f"audio must be bytes or a numpy array, got {type(data).__name__}")

    if not np.all(np.isfinite(x)):
        raise AudioFormatError("audio contains NaN or infinite samples (not valid PCM)")

    mono = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if sample_rate_hz != TARGET_SAMPLE_RATE_HZ and mono.size:
        mono = soxr.resample(mono, sample_rate_hz, TARGET_SAMPLE_RATE_HZ, quality="HQ")
    return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)


def _array_to_float(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.int16:
        return data.astype(np.float32) / 32768.0
    if data.dtype == np.int32:
        return data.astype(np.float32) / 2147483648.0
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(data.dtype, np.floating):
        return data.astype(np.float32, copy=False)
    raise AudioFormatError(f"unsupported audio array dtype {data.dtype}")


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16 with clipping (what devices and WebRTC VAD want)."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def read_wav(path: str | Path) -> np.ndarray:
    """Read a PCM WAV file (8/16/32-bit, any channel count and rate) as float32 mono 16 kHz."""
    try:
        with wave.open(str(path), "rb") as wav:
            width = wav.getsampwidth()
            channels = wav.getnchannels()
            rate = wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise AudioFormatError(f"{path}: not a readable PCM WAV file ({exc})") from exc
    formats = {1: "u8", 2: "pcm16", 4: "pcm32"}
    if width not in formats:
        raise AudioFormatError(f"{path}: unsupported sample width {width * 8} bits")
    return to_mono_16k(frames, rate, channels=channels, sample_format=formats[width])
