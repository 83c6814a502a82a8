"""Local microphone and speaker through PortAudio (sounddevice), bridged to asyncio.

PortAudio callbacks run on their own thread; they only copy buffers and hand them to the
event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Any

import numpy as np

from .convert import TARGET_SAMPLE_RATE_HZ

__all__ = ["AudioDeviceError", "MicrophoneStream", "SpeakerStream", "find_device"]

logger = logging.getLogger(__name__)


class AudioDeviceError(RuntimeError):
    """No usable audio device (or no PortAudio at all); the message says which and why."""


def _sounddevice() -> Any:
    try:
        import sounddevice
    except OSError as exc:  # raised at import when libportaudio is missing
        raise AudioDeviceError(
            f"PortAudio is not available ({exc}); install the system package "
            "(Debian/Ubuntu: apt-get install libportaudio2) to use local audio devices"
        ) from exc
    return sounddevice


def find_device(kind: str, device: int | str | None = None) -> dict[str, Any]:
    """Info dict of the input/output device to use; ``AudioDeviceError`` if there is none."""
    if kind not in ("input", "output"):
        raise ValueError("kind must be 'input' or 'output'")
    sd = _sounddevice()
    try:
        info = sd.query_devices(device, kind=kind)
    except (sd.PortAudioError, ValueError) as exc:
        try:
            names = [d["name"] for d in sd.query_devices()]
        except Exception:  # pragma: no cover - listing is best effort
            names = []
        listing = ", ".join(names) if names else "none"
        which = f"device {device!r}" if device is not None else f"default {kind} device"
        raise AudioDeviceError(
            f"no audio {kind} device: the {which} is not usable ({exc}); "
            f"devices PortAudio can see: {listing}"
        ) from exc
    channels_key = "max_input_channels" if kind == "input" else "max_output_channels"
    if int(info.get(channels_key, 0)) < 1:
        raise AudioDeviceError(f"audio device {info.get('name')!r} has no {kind} channels")
    return dict(info)


class MicrophoneStream:
    """Captures mono audio, converts it to float32 16 kHz, and queues it for the event loop."""

    def __init__(self, device: int | str | None = None, block_ms: int = 20,
                 max_queued_blocks: int = 500) -> None:
        self.device = device
        self.block_ms = block_ms
        self.queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=max_queued_blocks)
        self.dropped_blocks = 0
        self._stream: Any = None
        self._resampler: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Open the default (or given) input device; raises ``AudioDeviceError``."""
        sd = _sounddevice()
        info = find_device("input", self.device)
        rate = int(info.get("default_samplerate") or TARGET_SAMPLE_RATE_HZ)
        if rate != TARGET_SAMPLE_RATE_HZ:
            import soxr

            self._resampler = soxr.ResampleStream(rate, TARGET_SAMPLE_RATE_HZ, 1, dtype="float32")
        self._loop = asyncio.get_running_loop()
        try:
            self._stream = sd.InputStream(
                device=self.device, samplerate=rate, channels=1, dtype="float32",
                blocksize=rate * self.block_ms // 1000, callback=self._callback,
            )
            self._stream.start()
        except sd.PortAudioError as exc:
            raise AudioDeviceError(f"cannot open input device {info.get('name')!r}: {exc}") from exc
        logger.info("microphone %s open at %d Hz", info.get("name"), rate)

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status:
            logger.debug("input status: %s", status)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._put, indata[:, 0].copy())

    def _put(self, block: np.ndarray) -> None:
        if self._resampler is not None:
            block = self._resampler.resample_chunk(block)
        if self.queue.full():
            self.queue.get_nowait()  # keep the newest audio: the consumer is behind
            self.dropped_blocks += 1
        self.queue.put_nowait(block.astype(np.float32, copy=False))

    async def read(self) -> np.ndarray:
        """Next block of float32 16 kHz mono audio."""
        return await self.queue.get()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None


class SpeakerStream:
    """Plays int16 mono chunks; counts samples actually played; ``stop()`` drops the rest.

    ``marks`` receives the running played-samples count after each device callback, which a
    ``PlaybackLedger`` turns into the index of the first token not yet heard.
    """

    def __init__(self, sample_rate_hz: int = 22050, device: int | str | None = None,
                 block_ms: int = 20) -> None:
        self.sample_rate_hz = sample_rate_hz
        self.device = device
        self.block_ms = block_ms
        self.marks: asyncio.Queue[int] = asyncio.Queue()
        self._lock = threading.Lock()
        self._pending: collections.deque[np.ndarray] = collections.deque()
        self._played_samples = 0
        self.paused = False  # hold the queue (the agent was paused): render plays silence
        self._stream: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def played_samples(self) -> int:
        """Samples handed to the device since start (not counting silence fill)."""
        with self._lock:
            return self._played_samples

    @property
    def heard_samples(self) -> int:
        """``played_samples`` minus the device's output latency: what has left the speaker."""
        latency_s = float(self._stream.latency) if self._stream is not None else 0.0
        return max(0, self.played_samples - int(latency_s * self.sample_rate_hz))

    @property
    def queued_samples(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._pending)

    async def start(self) -> None:
        """Open the default (or given) output device; raises ``AudioDeviceError``."""
        sd = _sounddevice()
        info = find_device("output", self.device)
        self._loop = asyncio.get_running_loop()
        try:
            self._stream = sd.OutputStream(
                device=self.device, samplerate=self.sample_rate_hz, channels=1, dtype="int16",
                blocksize=self.sample_rate_hz * self.block_ms // 1000, callback=self._callback,
            )
            self._stream.start()
        except sd.PortAudioError as exc:
            raise AudioDeviceError(f"cannot open output device {info.get('name')!r}: {exc}") from exc

    def play(self, pcm: np.ndarray) -> None:
        """Queue int16 mono audio at ``sample_rate_hz`` (thread-safe)."""
        with self._lock:
            self._pending.append(np.asarray(pcm, dtype=np.int16).reshape(-1))

    def stop(self) -> int:
        """Drop all queued audio at once (barge-in); returns how many samples were dropped."""
        with self._lock:
            dropped = sum(len(p) for p in self._pending)
            self._pending.clear()
            self.paused = False  # a stop ends any pause: the next turn plays
        return dropped

    def pause(self) -> None:
        """Stop playing but keep the queue: ``resume`` plays on from the same sample."""
        with self._lock:
            self.paused = True

    def resume(self) -> None:
        with self._lock:
            self.paused = False

    def render(self, out: np.ndarray) -> int:
        """Fill ``out`` (int16, 1-D) from the queue, zero the rest; returns samples played.

        This is the device callback's whole job, kept public so it can be tested headless.
        """
        frames = len(out)
        filled = 0
        with self._lock:
            while filled < frames and self._pending and not self.paused:
                head = self._pending[0]
                n = min(frames - filled, len(head))
                out[filled : filled + n] = head[:n]
                filled += n
                if n == len(head):
                    self._pending.popleft()
                else:
                    self._pending[0] = head[n:]
            self._played_samples += filled
            played = self._played_samples
        out[filled:] = 0
        if filled and self._loop is not None:
            self._loop.call_soon_threadsafe(self.marks.put_nowait, played)
        return filled

    def _callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status:
            logger.debug("output status: %s", status)
        self.render(outdata[:, 0])

    def close(self) -> None:
        self.stop()
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None
