"""Acoustic turn features: Whisper log-mel (same as transformers'), pitch and energy slopes on
synthetic tones, the tracker's pause snapshots, and the features reaching the session's Observation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from duplex.audio import SpeechInput, StreamingAsr, VadSegmenter
from duplex.audio.fakes import EnergyVad, FakeWhisper
from duplex.audio.turn_features import TurnAudioFeatures, TurnFeatureTracker, pitch_track, prosody, whisper_log_mel

SR = 16_000


def _chirp(f0: float, f1: float, seconds: float = 1.0, amp0: float = 0.3, amp1: float = 0.3) -> np.ndarray:
    """A voice-like harmonic tone whose pitch glides f0 -> f1 (exponentially) and level amp0 -> amp1."""
    t = np.arange(int(seconds * SR)) / SR
    freq = f0 * (f1 / f0) ** (t / seconds)
    phase = 2 * np.pi * np.cumsum(freq) / SR
    wave = sum(np.sin(k * phase) / k for k in range(1, 5))
    return (wave * np.linspace(amp0, amp1, len(t)) / 2).astype(np.float32)


class _FakeSmartTurn:
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.nice: list[int] = []  # the calling thread's nice value at each call

    def probability(self, audio: np.ndarray) -> float:
        import os
        import threading

        self.seen.append(len(audio))
        self.nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return 0.75


def test_whisper_log_mel_matches_transformers():
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    # 8 s exactly, as SmartTurn.probability always passes (left-padded with zeros)
    audio = np.concatenate([np.zeros(SR * 4, np.float32), (rng.standard_normal(SR * 3) * 0.1).astype(np.float32),
                            _chirp(120, 240, 1.0)])
    ref = transformers.WhisperFeatureExtractor(chunk_length=8)(
        audio, sampling_rate=SR, padding="max_length", max_length=8 * SR, truncation=True, do_normalize=True,
        return_tensors="np").input_features[0]
    ours = whisper_log_mel(audio)
    assert ours.shape == ref.shape == (80, 800)
    assert np.abs(ours - ref).max() < 1e-4


def test_pitch_track_finds_a_steady_pitch():
    _, f0, _ = pitch_track(_chirp(200, 200))
    assert np.nanmedian(f0) == pytest.approx(200, rel=0.02)
    assert np.mean(np.isnan(f0)) < 0.1


@pytest.mark.parametrize("f0,f1,sign", [(140, 260, 1), (260, 140, -1)])
def test_pitch_slope_follows_rising_and_falling_tones(f0: float, f1: float, sign: int):
    pitch_slope, pitch_end, _ = prosody(_chirp(f0, f1))
    # 140 -> 260 Hz over 1 s is +10.7 semitones per second
    assert sign * pitch_slope == pytest.approx(12 * np.log2(260 / 140), rel=0.2)
    assert sign * pitch_end > 2  # the end sits above (rising) or below (falling) the median


def test_energy_slope_follows_fading_and_swelling_level():
    _, _, fading = prosody(_chirp(180, 180, amp0=0.4, amp1=0.05))
    _, _, swelling = prosody(_chirp(180, 180, amp0=0.05, amp1=0.4))
    _, _, steady = prosody(_chirp(180, 180))
    assert fading < -10 and swelling > 10 and abs(steady) < 3


def test_tracker_snapshots_each_pause_once():
    smart = _FakeSmartTurn()
    tracker = TurnFeatureTracker(smart, analyze_after_silence_ms=100)  # type: ignore[arg-type]
    speech = SpeechInput(VadSegmenter(EnergyVad(), min_silence_ms=300), StreamingAsr(FakeWhisper()),
                         turn_features=tracker)
    audio = np.concatenate([np.zeros(SR // 2, np.float32), _chirp(220, 150, 1.5), np.zeros(SR, np.float32)])
    features: list[TurnAudioFeatures] = []
    due_at = []
    for start in range(0, len(audio), 320):  # 20 ms frames, as the transports send them
        speech.segment(audio[start:start + 320])
        if speech.turn_analysis_due():
            due_at.append(speech.segmenter.t_s)
            features += speech.analyze_turn()
    assert len(features) == 1 and len(due_at) == 1
    f = features[0]
    assert due_at[0] == pytest.approx(2.1, abs=0.05)  # 100 ms into the pause
    assert f.eot_prob == 0.75 and f.speech_s == pytest.approx(1.5, abs=0.05)
    assert f.voiced_end_s == pytest.approx(2.0, abs=0.03) and f.silence_ms >= 100
    assert f.vad_mean_1s > 0.9 and 0.5 < f.vad_mean <= 1.0
    assert f.pitch_slope_st_s < -3  # the tone fell
    # pipecat's segment: 0.5 s before the onset up to now
    assert smart.seen[0] / SR == pytest.approx(0.5 + 1.5 + 0.1, abs=0.06)
    speech.reset()
    assert not speech.turn_analysis_due()


async def test_features_reach_the_observation(tiny_engine):
    from duplex.audio.events import AsrWord, SpeechStarted, SpeechStopped
    from duplex.session.clock import ManualClock
    from duplex.session.core import Session, SessionConfig

    from tests.fakes import settle

    async def until(cond) -> None:
        """The loop takes the features in after the committed words' prefill (an engine job on
        another thread): poll for it instead of a fixed wait; 30 s only guards against a hang."""
        for _ in range(3000):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition never held")

    clock = ManualClock()
    session = Session(tiny_engine, SessionConfig(policy="smart-turn"), clock=clock)
    await session.start()
    features = TurnAudioFeatures(t_s=1.1, voiced_end_s=1.0, speech_s=0.8, silence_ms=100, eot_prob=0.9,
                                 pitch_slope_st_s=-4.0, pitch_end_st=-2.0, energy_slope_db_s=-20.0,
                                 vad_mean_1s=0.9, vad_mean=0.8)
    for ev in (SpeechStarted(0.2), AsrWord("hello there", 0.2, 0.9, committed=True), features):
        assert session.submit(ev)
    await until(lambda: session.observe().audio_eot_prob is not None)
    obs = session.observe()
    assert obs.audio_eot_prob == 0.9 and obs.pitch_slope_st_s == -4.0 and obs.speech_s == 0.8
    assert obs.committed_words == 2 and obs.tentative_words == 0
    session.submit(SpeechStarted(1.5))  # the user goes on: the pause those features described is over
    await until(lambda: session.observe().audio_eot_prob is None)
    session.submit(SpeechStopped(2.0))
    await settle(session)
    await session.close()


async def test_voice_pipeline_delivers_features_to_the_policy(tiny_engine):
    """Served path: the async speech input computes the features on its own thread at the pause and
    the pipeline hands them to the session; the smart-turn policy then sees them and replies."""
    from duplex.session.events import PolicyDecided, TurnStarted

    smart, seen = await _served_turn(tiny_engine, "smart-turn", {})
    decided = [o.observation for o in seen if isinstance(o, PolicyDecided)]
    assert any(d["audio_eot_prob"] == 0.75 and d["speech_s"] > 0.5 for d in decided)
    assert any(isinstance(o, TurnStarted) and o.speaker == "agent" for o in seen)
    # ... on a thread that yields the CPU to whisper's turn-end pass and the decode (Linux nice)
    import os

    from duplex.audio.speech_input import TURN_THREAD_NICE

    if os.getpriority(os.PRIO_PROCESS, 0) < TURN_THREAD_NICE:
        assert smart.nice and set(smart.nice) == {TURN_THREAD_NICE}


async def _served_turn(tiny_engine, policy: str, params: dict) -> tuple[_FakeSmartTurn, list[object]]:
    """One spoken turn through the voice pipeline (fake VAD/ASR, fake Smart Turn) until the agent
    replies; returns the Smart Turn stand-in and every output."""
    from duplex.engine.sampling import SamplingConfig
    from duplex.session.config import SessionConfig
    from duplex.session.events import TurnStarted
    from duplex.voice.config import VoiceConfig
    from duplex.voice.pipeline import VoicePipeline

    smart = _FakeSmartTurn()
    speech = SpeechInput(VadSegmenter(EnergyVad(), min_silence_ms=200, min_speech_ms=60), StreamingAsr(FakeWhisper()),
                         asr_interval_ms=400, turn_features=TurnFeatureTracker(smart))  # type: ignore[arg-type]
    session = SessionConfig(policy=policy, policy_params=params, log_decisions=True,
                            sampling=SamplingConfig(temperature=1.0, seed=0, max_tokens=4))
    voice = VoicePipeline(tiny_engine, VoiceConfig(session=session), speech_factory=lambda: speech)
    await voice.start()
    seen: list[object] = []

    async def read() -> None:
        async for out in voice.outputs():
            seen.append(out)
            if isinstance(out, TurnStarted) and out.speaker == "agent":
                return

    reader = asyncio.ensure_future(read())
    try:
        await voice.feed_audio(np.concatenate([np.zeros(SR // 5, np.float32), _chirp(200, 150, 1.0),
                                               np.zeros(SR // 2, np.float32)]), realtime=False)
        await asyncio.wait_for(reader, 60)  # a hang guard only
    finally:
        reader.cancel()
        await voice.close()
    return smart, seen


async def test_turn_features_are_skipped_when_the_words_settle_the_turn(tiny_engine):
    """A policy that reads the features but takes the turn at the first tick after the final words
    never makes the pipeline run Smart Turn: the reply's first audio does not share the CPU with it."""
    from duplex.session.events import PolicyDecided

    smart, seen = await _served_turn(tiny_engine, "learned", {"threshold": 0.0})
    decided = [o for o in seen if isinstance(o, PolicyDecided) and o.observation["silence_s"] is not None]
    assert decided and decided[0].action["type"] == "speak"
    assert smart.seen == []


async def test_turn_features_run_once_the_policy_is_undecided_after_the_final_words(tiny_engine):
    """The same turn with a policy that waits: the features are computed (once) while it listens,
    and the ticks before them had none."""
    from duplex.session.events import PolicyDecided

    smart, seen = await _served_turn(tiny_engine, "learned", {"threshold": 1.0, "max_gap_ms": 1500.0})
    listening = [o.observation for o in seen if isinstance(o, PolicyDecided) and o.observation["silence_s"] is not None]
    assert len(smart.seen) == 1
    assert listening[0]["audio_eot_prob"] is None and any(d["audio_eot_prob"] == 0.75 for d in listening)
