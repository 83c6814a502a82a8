"""VAD segmentation: turns from real speech, hysteresis against noise, clicks and silence."""

from __future__ import annotations

import numpy as np
import pytest

from duplex.audio.commands import LIBRIVOX_DIR, librivox_samples
from duplex.audio.convert import read_wav
from duplex.audio.events import SpeechStarted, SpeechStopped
from duplex.audio.fakes import EnergyVad
from duplex.audio.vad import SileroVad, VadSegmenter, WebRtcVad

SR = 16000


def _run(seg: VadSegmenter, audio: np.ndarray, chunk: int) -> list:
    events = []
    for i in range(0, len(audio), chunk):
        events += seg.push(audio[i : i + chunk])
    return events + seg.flush()


def _burst(seconds: float, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(np.arange(int(SR * seconds)) * 0.3)).astype(np.float32)


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(SR * seconds), np.float32)


def test_segmenter_turns_and_times_with_energy_vad() -> None:
    audio = np.concatenate([_silence(1.0), _burst(1.0), _silence(0.2), _burst(0.5),
                            _silence(1.0), _burst(0.8), _silence(0.7)])
    events = _run(VadSegmenter(EnergyVad(), min_silence_ms=500), audio, 333)
    assert [e.type for e in events] == ["speech_started", "speech_stopped"] * 2
    # the 0.2 s pause is not a turn end
    assert events[0].t_s == pytest.approx(1.0, abs=0.02)
    assert events[1].t_s == pytest.approx(2.7, abs=0.02)
    assert events[2].t_s == pytest.approx(3.7, abs=0.02)
    assert events[3].t_s == pytest.approx(4.5, abs=0.02)


def test_chunk_size_does_not_change_events() -> None:
    audio = np.concatenate([_silence(0.5), _burst(0.7), _silence(0.8), _burst(0.4), _silence(0.1)])
    reference = _run(VadSegmenter(EnergyVad()), audio, len(audio))
    for chunk in (1, 160, 479, 4096):
        assert _run(VadSegmenter(EnergyVad()), audio, chunk) == reference
    assert reference[-1] == SpeechStopped(t_s=pytest.approx(2.4, abs=0.02))


def test_clicks_and_blips_are_not_turns() -> None:
    audio = _silence(3.0)
    for at_s in (0.5, 1.0, 1.7, 2.2):  # single clicks and 60 ms blips
        audio[int(at_s * SR) : int(at_s * SR) + 40] = 0.9
    audio[int(2.5 * SR) : int(2.56 * SR)] = _burst(0.06)
    for vad in (EnergyVad(), WebRtcVad()):
        assert _run(VadSegmenter(vad), audio, 512) == []


@pytest.mark.parametrize("amp", [0.01, 0.1, 0.5])
def test_white_noise_and_silence_produce_no_turn(amp: float) -> None:
    rng = np.random.default_rng(1)
    noise = np.clip(rng.normal(0, amp, SR * 4), -1, 1).astype(np.float32)
    assert _run(VadSegmenter(WebRtcVad()), noise, 1000) == []
    assert _run(VadSegmenter(WebRtcVad()), _silence(2.0), 1000) == []


def test_stream_time_and_reset() -> None:
    seg = VadSegmenter(EnergyVad())
    seg.push(_silence(1.5))
    assert seg.t_s == pytest.approx(1.5)
    seg.reset()
    assert seg.t_s == 0.0
    assert not seg.in_speech


def _librivox_with_gaps(gap_s: float = 1.0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    try:
        samples = librivox_samples()
    except FileNotFoundError:
        pytest.skip(f"pocketsphinx-testdata not installed ({LIBRIVOX_DIR})")
    parts, spans, t = [], [], 0.0
    for path, _ in samples:
        clip = read_wav(path)
        parts += [_silence(gap_s), clip]
        t += gap_s
        spans.append((t, t + len(clip) / SR))
        t += len(clip) / SR
    parts.append(_silence(gap_s))
    return np.concatenate(parts), spans


@pytest.mark.parametrize("make_vad", [WebRtcVad, SileroVad], ids=["webrtc", "silero"])
def test_real_speech_with_inserted_silences(make_vad) -> None:
    audio, spans = _librivox_with_gaps()
    try:
        vad = make_vad()
    except ImportError as exc:
        pytest.skip(str(exc))
    events = _run(VadSegmenter(vad), audio, 1600)
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert len(starts) == len(stops) == len(spans)
    for (clip_start, clip_end), start, stop in zip(spans, starts, stops):
        # clips carry a little leading/trailing silence of their own
        assert clip_start - 0.05 <= start.t_s <= clip_start + 0.5
        assert clip_end - 0.6 <= stop.t_s <= clip_end + 0.05


def test_trailing_silence_and_last_voiced_end() -> None:
    from duplex.audio.fakes import EnergyVad

    seg = VadSegmenter(EnergyVad(), min_silence_ms=500)
    tone = (0.3 * np.sin(np.arange(8000) * 0.2)).astype(np.float32)
    seg.push(tone)
    assert seg.trailing_silence_ms == 0.0 and seg.last_voiced_end_s == pytest.approx(0.5)
    seg.push(np.zeros(3200, np.float32))
    assert seg.trailing_silence_ms == pytest.approx(200.0)
    assert seg.in_speech and seg.last_voiced_end_s == pytest.approx(0.5)
