"""Deterministic stand-ins for whisper, VAD and TTS, for fast tests of the audio stages."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from .convert import TARGET_SAMPLE_RATE_HZ
from .tts import Speech

__all__ = ["EnergyVad", "FakeTts", "FakeWhisper"]


class EnergyVad:
    """Frame is speech when its RMS exceeds ``threshold``: exact on synthetic tone bursts."""

    def __init__(self, threshold: float = 0.05, frame_ms: int = 20) -> None:
        self.threshold = threshold
        self.frame_samples = TARGET_SAMPLE_RATE_HZ * frame_ms // 1000

    def is_speech(self, frame: np.ndarray) -> bool:
        return float(np.sqrt(np.mean(np.square(frame)))) > self.threshold

    def reset(self) -> None:
        pass


@dataclass
class _FakeWord:
    word: str
    start: float
    end: float
    probability: float = 0.9


@dataclass
class _FakeSegment:
    words: list[_FakeWord] | None
    start: float
    end: float
    text: str = ""
    no_speech_prob: float = 0.01
    avg_logprob: float = -0.2
    compression_ratio: float = 1.2


@dataclass
class FakeWhisper:
    """Mimics ``WhisperModel.transcribe``: one word per ``word_s`` of loud audio in the buffer.

    Words are named by their position in the buffer ("w0", "w1", ...) offset by
    ``first_index``; the last word of each pass is garbled (like a real cut-off word) so
    LocalAgreement has to wait for the next pass before committing it.
    """

    word_s: float = 0.5
    delay_s: float = 0.0
    no_speech_prob: float = 0.01
    calls: list[dict[str, Any]] = field(default_factory=list)
    model: Any = field(default_factory=lambda: SimpleNamespace(is_multilingual=False))
    word_namer: Callable[[int], str] = staticmethod(lambda i: f"w{i}")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def transcribe(self, audio: np.ndarray, **kwargs: Any) -> tuple[list[_FakeSegment], Any]:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.calls.append({"n_samples": len(audio), **kwargs})
        frame = TARGET_SAMPLE_RATE_HZ // 100
        n = len(audio) // frame
        loud = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1)) > 0.05 if n else []
        loud_idx = np.nonzero(loud)[0]
        if not len(loud_idx):
            return [], None
        start_s, end_s = loud_idx[0] / 100, (loud_idx[-1] + 1) / 100
        words = []
        t = start_s
        i = 0
        while t + self.word_s <= end_s + 1e-6:
            words.append(_FakeWord(f" {self.word_namer(i)}", t, t + self.word_s))
            t += self.word_s
            i += 1
        if end_s - t > 0.1:  # partial word at the buffer end: garbled
            words.append(_FakeWord(f" {self.word_namer(i)}~{len(audio)}", t, end_s))
        text = "".join(w.word for w in words)
        if kwargs.get("word_timestamps") is False:
            words = []  # as faster-whisper: no word list without alignment
        seg = _FakeSegment(words or None, start_s, end_s, text,
                           no_speech_prob=self.no_speech_prob,
                           avg_logprob=-1.2 if self.no_speech_prob > 0.5 else -0.2)
        return [seg], None


class FakeTts:
    """``chars_per_s`` characters of constant tone per second; optional per-call delay."""

    name = "fake"

    def __init__(self, sample_rate_hz: int = 16000, chars_per_s: float = 15.0,
                 delay_s: float = 0.0) -> None:
        self.sample_rate_hz = sample_rate_hz
        self.chars_per_s = chars_per_s
        self.delay_s = delay_s
        self.started = threading.Event()

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        speech = self.synthesize_speech(text)
        return speech.pcm, speech.sample_rate_hz

    def synthesize_speech(self, text: str, should_stop: Callable[[], bool] | None = None) -> Speech:
        self.started.set()
        if self.delay_s:
            time.sleep(self.delay_s)
        n = int(len(text.strip()) / self.chars_per_s * self.sample_rate_hz)
        pcm = (np.sin(np.arange(n) * 0.1) * 8000).astype(np.int16)
        return Speech(pcm, self.sample_rate_hz)
