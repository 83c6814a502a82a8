"""Voice activity detection: per-frame classifiers and a segmenter that turns them into turns.

The segmenter is a sync, I/O-free stage: ``push`` audio of any length, get events back.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from .convert import TARGET_SAMPLE_RATE_HZ, to_pcm16
from .events import SpeechStarted, SpeechStopped

__all__ = ["FrameVad", "SileroVad", "VadSegmenter", "WebRtcVad", "spectral_flatness"]

logger = logging.getLogger(__name__)


class FrameVad(Protocol):
    """A per-frame speech classifier over float32 16 kHz frames of ``frame_samples``."""

    frame_samples: int

    def is_speech(self, frame: np.ndarray) -> bool: ...

    def reset(self) -> None: ...


def spectral_flatness(frame: np.ndarray) -> float:
    """Geometric / arithmetic mean of the power spectrum: ~0.56 for white noise, <0.1 for voice."""
    power = np.abs(np.fft.rfft(frame * np.hanning(len(frame)))) ** 2 + 1e-12
    power = power[1:]
    return float(np.exp(np.mean(np.log(power))) / np.mean(power))


class WebRtcVad:
    """WebRTC's GMM VAD plus two cheap guards it lacks.

    WebRTC flags any broadband noise as speech, so frames that are spectrally flat (white-ish
    noise) or below ``min_level_dbfs`` are rejected before asking it.
    """

    def __init__(
        self,
        aggressiveness: int = 2,
        frame_ms: int = 30,
        max_spectral_flatness: float | None = 0.3,
        min_level_dbfs: float = -55.0,
    ) -> None:
        import webrtcvad

        if frame_ms not in (10, 20, 30):
            raise ValueError(f"WebRTC VAD frames must be 10, 20 or 30 ms, not {frame_ms}")
        if not 0 <= aggressiveness <= 3:
            raise ValueError(f"aggressiveness must be 0..3, not {aggressiveness}")
        self._vad = webrtcvad.Vad(aggressiveness)
        self.frame_ms = frame_ms
        self.frame_samples = TARGET_SAMPLE_RATE_HZ * frame_ms // 1000
        self.max_spectral_flatness = max_spectral_flatness
        self.min_level_dbfs = min_level_dbfs

    def is_speech(self, frame: np.ndarray) -> bool:
        if len(frame) != self.frame_samples:
            raise ValueError(f"expected {self.frame_samples} samples, got {len(frame)}")
        rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64))))
        if 20 * np.log10(rms + 1e-10) < self.min_level_dbfs:
            return False
        if (
            self.max_spectral_flatness is not None
            and spectral_flatness(frame) > self.max_spectral_flatness
        ):
            return False
        return bool(self._vad.is_speech(to_pcm16(frame).tobytes(), TARGET_SAMPLE_RATE_HZ))

    def reset(self) -> None:
        """Stateless per frame; nothing to reset."""


def _silero_model_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SileroVad needs the 'silero-vad' package for its ONNX weights: "
            "pip install --no-deps silero-vad (onnxruntime must be installed; torch is not used)"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "silero_vad.onnx"
    if not path.exists():
        raise ImportError(f"silero-vad is installed but {path} is missing")
    return path


class SileroVad:
    """Silero VAD v5/v6 through onnxruntime (no torch): robust to noise, ~0.1 ms per frame."""

    frame_samples = 512  # 32 ms at 16 kHz, fixed by the model
    _context_samples = 64

    def __init__(self, threshold: float = 0.5, model_path: str | Path | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:  # pragma: no cover - onnxruntime is a faster-whisper dep
            raise ImportError("SileroVad needs onnxruntime: pip install onnxruntime") from exc
        path = Path(model_path) if model_path else _silero_model_path()
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, self._context_samples), dtype=np.float32)

    def probability(self, frame: np.ndarray) -> float:
        """Speech probability of one 512-sample frame (the model is recurrent: feed in order)."""
        if len(frame) != self.frame_samples:
            raise ValueError(f"expected {self.frame_samples} samples, got {len(frame)}")
        x = np.concatenate([self._context, frame.astype(np.float32)[None, :]], axis=1)
        out, self._state = self._session.run(
            None,
            {"input": x, "state": self._state, "sr": np.array(TARGET_SAMPLE_RATE_HZ, np.int64)},
        )
        self._context = x[:, -self._context_samples :]
        return float(out.reshape(-1)[0])

    def is_speech(self, frame: np.ndarray) -> bool:
        return self.probability(frame) >= self.threshold


class VadSegmenter:
    """Frame VAD decisions -> SpeechStarted / SpeechStopped with hysteresis.

    Start needs ``min_speech_ms`` of voiced frames within a short window (clicks and blips
    never open a turn); stop needs ``min_silence_ms`` of unvoiced frames in a row (short pauses
    between words never close one). Times are stream seconds since the first pushed sample.
    """

    def __init__(
        self,
        vad: FrameVad,
        prefix_padding_ms: int = 300,
        min_silence_ms: int = 500,
        min_speech_ms: int = 200,
        start_window_ms: int | None = None,
    ) -> None:
        self.vad = vad
        self.prefix_padding_ms = prefix_padding_ms
        self.min_silence_ms = min_silence_ms
        self.min_speech_ms = min_speech_ms
        self._frame_samples = vad.frame_samples
        frame_ms = 1000 * self._frame_samples / TARGET_SAMPLE_RATE_HZ
        window_ms = start_window_ms if start_window_ms is not None else int(min_speech_ms * 1.5)
        self._window_frames = max(1, round(max(window_ms, min_speech_ms) / frame_ms))
        self._start_frames = max(1, round(min_speech_ms / frame_ms))
        self._stop_frames = max(1, round(min_silence_ms / frame_ms))
        self.reset()

    @property
    def prefix_padding_s(self) -> float:
        return self.prefix_padding_ms / 1000

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def t_s(self) -> float:
        """Stream time of the end of all audio pushed so far."""
        return self._samples_seen / TARGET_SAMPLE_RATE_HZ

    @property
    def trailing_silence_ms(self) -> float:
        """Unvoiced audio classified since the last voiced frame (0 right after speech).

        Counts whole classified frames only, so it lags ``t_s`` by less than one frame; before any
        voiced frame it is the whole stream. Lets ASR skip or anticipate passes at a pause.
        """
        frame_ms = 1000 * self._frame_samples / TARGET_SAMPLE_RATE_HZ
        return (self._frames_done - self._last_voiced_end_frame) * frame_ms

    @property
    def last_voiced_end_s(self) -> float:
        """Stream time of the end of the latest voiced frame (0.0 before any)."""
        return self._frame_time(self._last_voiced_end_frame)

    def reset(self) -> None:
        """Forget everything, including stream time (a new stream starts at 0)."""
        self.vad.reset()
        self._pending = np.zeros(0, dtype=np.float32)
        self._samples_seen = 0
        self._frames_done = 0
        self._in_speech = False
        self._window: collections.deque[bool] = collections.deque(maxlen=self._window_frames)
        self._silent_run = 0
        self._last_voiced_end_frame = 0

    def push(self, samples_16k: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        """Consume float32 16 kHz audio of any length; return the turn events it confirms."""
        samples = np.asarray(samples_16k, dtype=np.float32).reshape(-1)
        self._samples_seen += len(samples)
        buf = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        n_frames = len(buf) // self._frame_samples
        events: list[SpeechStarted | SpeechStopped] = []
        for i in range(n_frames):
            frame = buf[i * self._frame_samples : (i + 1) * self._frame_samples]
            event = self._step(self.vad.is_speech(frame))
            if event is not None:
                events.append(event)
        self._pending = buf[n_frames * self._frame_samples :].copy()
        return events

    def flush(self) -> list[SpeechStarted | SpeechStopped]:
        """End of stream: close an open turn at the end of its last voiced frame."""
        if not self._in_speech:
            return []
        self._in_speech = False
        self._window.clear()
        return [SpeechStopped(t_s=self._frame_time(self._last_voiced_end_frame))]

    def _frame_time(self, frame_index: int) -> float:
        return frame_index * self._frame_samples / TARGET_SAMPLE_RATE_HZ

    def _step(self, voiced: bool) -> SpeechStarted | SpeechStopped | None:
        index = self._frames_done
        self._frames_done += 1
        if voiced:
            self._last_voiced_end_frame = index + 1
        if not self._in_speech:
            self._window.append(voiced)
            if sum(self._window) >= self._start_frames:
                # Onset = first voiced frame of the window that triggered.
                first = next(i for i, v in enumerate(self._window) if v)
                onset = index - len(self._window) + 1 + first
                self._in_speech = True
                self._silent_run = 0
                self._window.clear()
                logger.debug("speech started at %.2f s", self._frame_time(onset))
                return SpeechStarted(t_s=self._frame_time(onset))
            return None
        self._silent_run = 0 if voiced else self._silent_run + 1
        if self._silent_run >= self._stop_frames:
            self._in_speech = False
            self._silent_run = 0
            end = self._frame_time(self._last_voiced_end_frame)
            logger.debug("speech stopped at %.2f s", end)
            return SpeechStopped(t_s=end)
        return None
