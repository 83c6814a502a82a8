"""Acoustic end-of-turn features of the user's speech, computed when a pause starts.

When the VAD has heard ``analyze_after_silence_ms`` of silence after speech, a
:class:`TurnFeatureTracker` snapshots the user's recent audio and computes, off the event loop:

- Smart Turn v3.2's probability that the turn is complete (an 8 MB ONNX audio model from the
  ``pipecat-ai`` wheel, run with onnxruntime on Whisper log-mel features of the last <= 8 s);
- prosody at the end of the speech: pitch slope and energy slope over the last voiced 0.5 s, and
  where the final pitch sits relative to the utterance (numpy only);
- the VAD's frame probabilities over the last second of speech and the whole segment, and the
  utterance's voiced duration.

The result, a :class:`TurnAudioFeatures` event, goes to the session like any speech event and
reaches the policies inside the ``Observation`` (policies never run models themselves).
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .convert import TARGET_SAMPLE_RATE_HZ
from .events import SpeechStarted, SpeechStopped

__all__ = [
    "SmartTurn", "TurnAudioFeatures", "TurnFeatureTracker", "default_turn_features", "pitch_track", "prosody",
    "shared_smart_turn", "smart_turn_model_path", "whisper_log_mel",
]

log = logging.getLogger(__name__)

_SR = TARGET_SAMPLE_RATE_HZ
SMART_TURN_FILE = "smart-turn-v3.2-cpu.onnx"


@dataclass(frozen=True, slots=True)
class TurnAudioFeatures:
    """What the user's audio says about the pause that started at ``voiced_end_s`` (stream s)."""

    t_s: float  # stream time of the end of the analysed audio
    voiced_end_s: float  # end of the last voiced VAD frame
    speech_s: float  # voiced duration of the utterance that just paused
    silence_ms: float  # trailing silence when the snapshot was taken
    eot_prob: float | None  # Smart Turn v3.2's P(turn complete); None without the model
    pitch_slope_st_s: float  # pitch slope over the last voiced 0.5 s, semitones per second
    pitch_end_st: float  # final pitch relative to the utterance's median pitch, semitones
    energy_slope_db_s: float  # loudness slope over the last voiced 0.5 s, dB per second
    vad_mean_1s: float  # mean VAD probability over the last 1 s before the voiced end
    vad_mean: float  # mean VAD probability over the analysed segment
    compute_ms: float = 0.0
    type: str = "turn_audio_features"


# ---- Whisper log-mel features (what Smart Turn v3 was trained on) -------------------------------
_N_FFT = 400
_HOP = 160
_N_MELS = 80


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_part = f >= 1000.0
    return np.where(log_part, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((m - 15.0) * (np.log(6.4) / 27.0)), 200.0 * m / 3.0)


@functools.lru_cache(maxsize=1)
def _mel_filters() -> np.ndarray:
    """(n_fft/2+1, 80) Slaney-normalised triangular filters from 0 Hz to 8 kHz."""
    hz = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(_SR / 2)), _N_MELS + 2))
    fft_hz = np.linspace(0, _SR // 2, _N_FFT // 2 + 1)
    slopes = hz[None, :] - fft_hz[:, None]
    width = np.diff(hz)
    down = -slopes[:, :-2] / width[:-1]
    up = slopes[:, 2:] / width[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (hz[2:] - hz[:-2]))[None, :]


def whisper_log_mel(audio_16k: np.ndarray, n_samples: int = 8 * _SR) -> np.ndarray:
    """Whisper's log-mel spectrogram, (80, n_samples / 160), as ``WhisperFeatureExtractor`` with
    ``chunk_length=8`` and ``do_normalize=True`` computes it: zero-mean unit-variance waveform,
    centred STFT (periodic Hann 400, hop 160, reflect padding), power, mel, log10, clamp to the
    maximum - 8, then (x + 4) / 4. Shorter input is zero-padded at the end and normalised with the
    padding (as pipecat does; transformers would leave the padding out): pass ``n_samples``
    exactly, as :meth:`SmartTurn.probability` does."""
    x = np.asarray(audio_16k, dtype=np.float32).reshape(-1)[:n_samples]
    x = np.pad(x, (0, n_samples - len(x)))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), (_N_FFT // 2, _N_FFT // 2), mode="reflect")
    window = np.hanning(_N_FFT + 1)[:-1]
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP]  # (n_frames, 400)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (n_frames, 201)
    mel = np.maximum(1e-10, power @ _mel_filters()).T  # (80, n_frames)
    log_spec = np.log10(mel)[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


# ---- Smart Turn v3.2 ----------------------------------------------------------------------------
def smart_turn_model_path() -> Path:
    """The ONNX file inside the ``pipecat-ai`` wheel (installed with ``--no-deps``; never imported)."""
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Smart Turn needs the pipecat-ai wheel for its ONNX weights: "
                          "pip install --no-deps pipecat-ai")
    path = Path(next(iter(spec.submodule_search_locations))) / "audio" / "turn" / "smart_turn" / "data" / SMART_TURN_FILE
    if not path.exists():
        raise ImportError(f"pipecat-ai is installed but {path} is missing (Smart Turn v3.2 needs pipecat-ai >= 0.0.9x)")
    return path


class SmartTurn:
    """Smart Turn v3.2 (BSD-2, Daily): P(the user's turn is complete) from the last <= 8 s of audio.
    One onnxruntime session; ``probability`` may be called from any thread."""

    max_s = 8.0

    def __init__(self, model_path: str | Path | None = None, threads: int = 1) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = threads
        opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        path = Path(model_path) if model_path else smart_turn_model_path()
        self._session = onnxruntime.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def probability(self, audio_16k: np.ndarray) -> float:
        """Keep the last 8 s, left-pad shorter audio with zeros (as pipecat does), run the model."""
        n = int(self.max_s * _SR)
        x = np.asarray(audio_16k, dtype=np.float32).reshape(-1)[-n:]
        x = np.pad(x, (n - len(x), 0))
        features = whisper_log_mel(x, n)[None]  # (1, 80, 800)
        out = self._session.run(None, {self._input: features})[0]
        return float(np.asarray(out).reshape(-1)[0])


@functools.lru_cache(maxsize=1)
def shared_smart_turn() -> SmartTurn | None:
    """One model for every stream in this process; None when the pipecat-ai wheel is missing."""
    try:
        return SmartTurn()
    except ImportError as exc:
        log.warning("Smart Turn unavailable (%s); audio end-of-turn probability will be None", exc)
        return None


# ---- prosody ------------------------------------------------------------------------------------
def pitch_track(audio_16k: np.ndarray, frame_ms: float = 40.0, hop_ms: float = 10.0, fmin_hz: float = 60.0,
                fmax_hz: float = 400.0, min_clarity: float = 0.45) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Autocorrelation pitch per hop: (frame centre times s, f0 Hz or NaN where unvoiced, level dB)."""
    x = np.asarray(audio_16k, dtype=np.float64).reshape(-1)
    frame, hop = int(_SR * frame_ms / 1000), int(_SR * hop_ms / 1000)
    if len(x) < frame:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[::hop]  # (n, frame)
    frames = frames - frames.mean(axis=1, keepdims=True)
    level_db = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)
    spec = np.fft.rfft(frames * np.hanning(frame), n=2 * frame, axis=1)
    ac = np.fft.irfft(np.abs(spec) ** 2, axis=1)[:, :frame]
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    lo, hi = int(_SR / fmax_hz), min(frame - 2, int(_SR / fmin_hz))
    lags = lo + np.argmax(ac[:, lo:hi], axis=1)
    peak = ac[np.arange(len(ac)), lags]
    # parabolic interpolation around the peak for sub-sample lag
    a, b, c = ac[np.arange(len(ac)), lags - 1], peak, ac[np.arange(len(ac)), lags + 1]
    denom = a - 2 * b + c
    shift = np.where(np.abs(denom) > 1e-12, 0.5 * (a - c) / np.where(denom == 0, 1, denom), 0.0)
    f0 = _SR / (lags + np.clip(shift, -1, 1))
    loud = level_db > level_db.max() - 30.0
    f0 = np.where((peak >= min_clarity) & loud, f0, np.nan)
    times = (np.arange(len(frames)) * hop + frame / 2) / _SR
    return times, f0, level_db


def _slope(t: np.ndarray, y: np.ndarray) -> float:
    if len(t) < 3 or float(np.ptp(t)) <= 0:
        return 0.0
    return float(np.polyfit(t, y, 1)[0])


def prosody(audio_16k: np.ndarray, window_s: float = 0.5) -> tuple[float, float, float]:
    """(pitch slope st/s, final pitch vs the median st, energy slope dB/s) over the last voiced
    ``window_s`` of ``audio_16k``. Falling pitch and energy are the classic end-of-turn cues."""
    times, f0, level_db = pitch_track(audio_16k)
    if len(times) == 0:
        return 0.0, 0.0, 0.0
    voiced_level = level_db > level_db.max() - 35.0
    end_t = float(times[np.nonzero(voiced_level)[0][-1]])
    win = (times >= end_t - window_s) & (times <= end_t)
    voiced = ~np.isnan(f0)
    st = 12 * np.log2(np.where(voiced, f0, 100.0) / 100.0)
    pv = win & voiced
    pitch_slope = _slope(times[pv], st[pv])
    pitch_end = float(np.median(st[pv][-5:]) - np.median(st[voiced])) if pv.any() else 0.0
    ev = win & voiced_level
    energy_slope = _slope(times[ev], level_db[ev])
    def clip(v: float, m: float) -> float:  # keeps a bad frame's outlier bounded
        return float(np.clip(v, -m, m))

    return clip(pitch_slope, 60.0), clip(pitch_end, 12.0), clip(energy_slope, 120.0)


# ---- the tracker --------------------------------------------------------------------------------
class _RecordingVad:
    """Wraps the segmenter's frame VAD and reports each frame's speech probability (1/0 for VADs
    without probabilities) to ``on_frame``."""

    def __init__(self, inner: Any, on_frame: Callable[[float], None]) -> None:
        self.inner = inner
        self.frame_samples = inner.frame_samples
        self._on_frame = on_frame

    def is_speech(self, frame: np.ndarray) -> bool:
        probability = getattr(self.inner, "probability", None)
        if probability is not None:
            p = float(probability(frame))
            voiced = p >= float(getattr(self.inner, "threshold", 0.5))
        else:
            voiced = bool(self.inner.is_speech(frame))
            p = float(voiced)
        self._on_frame(p)
        return voiced

    def reset(self) -> None:
        self.inner.reset()


@dataclass(frozen=True, slots=True)
class _Snapshot:
    audio: np.ndarray  # from the segment start (minus pre-speech) to t_s
    start_s: float
    onset_s: float  # onset of the utterance that paused
    voiced_end_s: float
    t_s: float
    silence_ms: float
    vad_probs: np.ndarray  # frames from start_s to t_s
    frame_s: float


class TurnFeatureTracker:
    """Keeps the last ``max_audio_s`` of the user's audio and the VAD's frame probabilities, and
    once a pause of ``analyze_after_silence_ms`` starts, computes :class:`TurnAudioFeatures`.

    ``push`` runs with the speech input (cheap); ``due`` / ``snapshot`` say when and copy what to
    analyse; ``analyze`` is the heavy part (~30 ms with Smart Turn) and runs on another thread.
    ``smart_turn``: the model, or a function that loads it (called by ``analyze``).
    Like pipecat, the analysed segment starts ``pre_speech_s`` before the utterance's onset, and
    an utterance that follows the previous one within ``join_gap_s`` continues its segment.
    """

    def __init__(self, smart_turn: SmartTurn | Callable[[], SmartTurn | None] | None = None,
                 analyze_after_silence_ms: float = 100.0,
                 max_audio_s: float = 8.0, pre_speech_s: float = 0.5, join_gap_s: float = 3.0) -> None:
        self.smart_turn = smart_turn
        self.analyze_after_silence_ms = analyze_after_silence_ms
        self.max_audio_s = max_audio_s
        self.pre_speech_s = pre_speech_s
        self.join_gap_s = join_gap_s
        self._probs: collections.deque[float] = collections.deque(maxlen=int(max_audio_s * 100) + 64)
        self._frame_s = 0.01
        self.reset()

    def attach(self, segmenter: Any) -> None:
        """Record the VAD frame probabilities of ``segmenter`` (wraps its public ``vad``)."""
        if not isinstance(segmenter.vad, _RecordingVad):
            segmenter.vad = _RecordingVad(segmenter.vad, self._probs.append)
        self._frame_s = segmenter.vad.frame_samples / _SR

    def reset(self) -> None:
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._n = 0
        self._t_s = 0.0
        self._probs.clear()
        self._onset_s: float | None = None  # of the utterance in progress (or that just paused)
        self._segment_start_s: float | None = None
        self._last_end_s: float | None = None
        self._in_speech = False
        self._voiced_end_s = 0.0
        self._silence_ms = 0.0
        self._analysed_end_s: float | None = None

    @property
    def t_s(self) -> float:
        return self._t_s

    def push(self, samples_16k: np.ndarray, events: list[Any], voiced_end_s: float, silence_ms: float) -> None:
        """After the segmenter consumed ``samples_16k`` and returned ``events``."""
        samples = np.asarray(samples_16k, dtype=np.float32).reshape(-1)
        self._chunks.append(samples)
        self._n += len(samples)
        self._t_s += len(samples) / _SR
        keep = int(self.max_audio_s * _SR) + len(samples)
        while self._chunks and self._n - len(self._chunks[0]) >= keep:
            self._n -= len(self._chunks.popleft())
        for ev in events:
            if isinstance(ev, SpeechStarted):
                self._in_speech = True
                self._onset_s = ev.t_s
                joined = self._last_end_s is not None and ev.t_s - self._last_end_s <= self.join_gap_s
                if not joined or self._segment_start_s is None:
                    self._segment_start_s = ev.t_s
            elif isinstance(ev, SpeechStopped):
                self._in_speech = False
                self._last_end_s = ev.t_s
        self._voiced_end_s = voiced_end_s
        self._silence_ms = silence_ms

    def due(self) -> bool:
        """A pause has started after speech and has not been analysed yet."""
        return (self._onset_s is not None and self._silence_ms >= self.analyze_after_silence_ms
                and self._voiced_end_s > self._onset_s and self._analysed_end_s != self._voiced_end_s
                and (self._in_speech or (self._last_end_s is not None and self._t_s - self._last_end_s < 1.0)))

    def snapshot(self) -> _Snapshot | None:
        """Copy what ``analyze`` needs (call under the speech input's lock) and mark it analysed."""
        if not self.due():
            return None
        assert self._onset_s is not None and self._segment_start_s is not None
        self._analysed_end_s = self._voiced_end_s
        audio = np.concatenate(list(self._chunks)) if self._chunks else np.zeros(0, np.float32)
        buf_start_s = self._t_s - len(audio) / _SR
        start_s = max(buf_start_s, self._segment_start_s - self.pre_speech_s, self._t_s - self.max_audio_s)
        audio = audio[int(round((start_s - buf_start_s) * _SR)):]
        n_frames = min(len(self._probs), int(round((self._t_s - start_s) / self._frame_s)))
        probs = np.array(list(self._probs)[len(self._probs) - n_frames:], dtype=np.float32)
        return _Snapshot(audio, start_s, self._onset_s, self._voiced_end_s, self._t_s, self._silence_ms, probs,
                         self._frame_s)

    def analyze(self, snap: _Snapshot) -> TurnAudioFeatures:
        """The heavy part: Smart Turn and prosody on a snapshot (any thread)."""
        t0 = time.perf_counter()
        model = self.smart_turn() if callable(self.smart_turn) else self.smart_turn  # a loader: load here, off the loop
        eot = model.probability(snap.audio) if model is not None and len(snap.audio) else None
        voiced = snap.audio[:max(0, int(round((snap.voiced_end_s - snap.start_s) * _SR)))]
        pitch_slope, pitch_end, energy_slope = prosody(voiced)
        # VAD frames: the last one ends at t_s; those before the voiced end describe the speech
        frames_end = len(snap.vad_probs) - int(round((snap.t_s - snap.voiced_end_s) / snap.frame_s))
        speech_probs = snap.vad_probs[:max(0, frames_end)]
        last_1s = speech_probs[-max(1, int(round(1.0 / snap.frame_s))):]
        return TurnAudioFeatures(
            t_s=snap.t_s, voiced_end_s=snap.voiced_end_s, speech_s=max(0.0, snap.voiced_end_s - snap.onset_s),
            silence_ms=snap.silence_ms, eot_prob=eot, pitch_slope_st_s=pitch_slope, pitch_end_st=pitch_end,
            energy_slope_db_s=energy_slope, vad_mean_1s=float(last_1s.mean()) if len(last_1s) else 0.0,
            vad_mean=float(speech_probs.mean()) if len(speech_probs) else 0.0,
            compute_ms=(time.perf_counter() - t0) * 1000)


def default_turn_features() -> TurnFeatureTracker:
    """A tracker with the process-wide Smart Turn model (or none, if pipecat-ai is missing), loaded
    at the first pause on the analysing thread rather than when a session opens."""
    return TurnFeatureTracker(shared_smart_turn)
