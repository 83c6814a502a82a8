"""A speech source for offline translation: one WAV per source line, heard through the voice
pipeline's VAD + streaming whisper, each committed word fed to the policy at its audio position.

Naming: line ``i`` (0-based, blank lines skipped, the same ``index`` as in instances.log) of the
source file is ``DIR/{i:04d}.wav`` (``0000.wav``, ``0001.wav``, ...); ``render-speech`` writes
them with a TTS voice (16 kHz mono PCM16) plus ``DIR/manifest.json``. Any WAV format
:func:`~duplex.audio.convert.read_wav` reads works as input.

Timing follows SimulEval for speech input: a target word's delay is the ms of source audio read
when it was written; ``elapsed`` is the same on a clock that waits for the audio to arrive and
advances by the measured compute (VAD, whisper passes, translation), so a source word counts from
when the ASR committed it plus what computing it cost; ``source_length`` is the WAV's duration in ms.
"""

from __future__ import annotations

import json
import logging
import os
import time
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from duplex.audio.events import AsrWord
from duplex.audio.speech_input import SpeechInput
from duplex.translate.evaluate import (
    evaluate_each,
    parse_policy,
    stable_prefix_delays,
)
from duplex.translate.instances import score_records
from duplex.translate.policies import SimulPolicy, make_simul_policy
from duplex.translate.translator import TranslationModel

__all__ = ["CHUNK_MS", "SpeechSentenceResult", "default_speech_dir", "evaluate_speech", "render_speech",
           "score_speech_sentences", "source_wav", "source_wavs", "speech_input_factory", "translate_speech_corpus",
           "translate_speech_sentence"]

log = logging.getLogger(__name__)

_SR = 16_000
CHUNK_MS = 20  # the size of the audio frames a browser or microphone delivers to the voice pipeline


def default_speech_dir(voice: str) -> Path:
    """Where ``render-speech`` caches a voice's WAVs (not in the repository): $XDG_CACHE_HOME or
    ~/.cache, then ``duplex/translate/speech-<voice>`` (``piper:joe`` -> ``speech-piper-joe``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "duplex" / "translate" / f"speech-{voice.replace(':', '-')}"


def source_wav(audio_dir: str | Path, index: int) -> Path:
    """The WAV of source line ``index`` (0-based): ``DIR/0000.wav``."""
    return Path(audio_dir) / f"{index:04d}.wav"


def source_wavs(audio_dir: str | Path, n: int) -> list[Path]:
    """The WAVs of the first ``n`` source lines; a missing one is a ValueError naming it."""
    paths = [source_wav(audio_dir, i) for i in range(n)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of {n} source WAVs missing in {audio_dir} (first: {missing[0].name}); "
                         "render them with `duplex translate render-speech`")
    return paths


def _write_wav_16k(path: Path, audio: np.ndarray) -> None:
    from duplex.audio.convert import to_pcm16

    tmp = path.with_suffix(".wav.tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(_SR)
        w.writeframes(to_pcm16(audio).tobytes())
    os.replace(tmp, path)  # an interrupted render never leaves a truncated WAV that looks done


def render_speech(sources: Sequence[str], voice: str, out_dir: str | Path, *, overwrite: bool = False,
                  on_sentence: Callable[[int, Path], None] | None = None) -> list[Path]:
    """Synthesize every source line with ``voice`` (eval's voices: ``piper:joe``, ``flite:kal``, ...)
    into ``out_dir/{i:04d}.wav``; existing WAVs are kept unless ``overwrite``, so a render resumes."""
    from duplex.eval.voices import VoiceBank

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bank = VoiceBank()
    paths: list[Path] = []
    durations_ms: list[float] = []
    for i, text in enumerate(sources):
        path = source_wav(out, i)
        if overwrite or not path.is_file():
            _write_wav_16k(path, bank(text, voice))
        with wave.open(str(path), "rb") as w:
            durations_ms.append(round(1000.0 * w.getnframes() / w.getframerate(), 1))
        paths.append(path)
        if on_sentence is not None:
            on_sentence(i, path)
    manifest = {"voice": voice, "sentences": len(sources), "naming": "{index:04d}.wav, index = 0-based source line",
                "sample_rate_hz": _SR, "durations_ms": durations_ms, "sources": list(sources)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def speech_input_factory(asr_model: str | None = None, *, threads: int | None = None) -> Callable[[], SpeechInput]:
    """The voice pipeline's speech input (WebRTC VAD + streaming whisper, the voice defaults),
    with a translation session's pass schedule and without the end-of-turn features a
    translation does not read. Loads whisper once."""
    from duplex.audio.asr import load_whisper
    from duplex.translate.session import TranslateSession
    from duplex.voice.config import default_voice_config, make_speech_input

    whisper = load_whisper(asr_model, cpu_threads=threads)
    config = default_voice_config()
    return lambda: make_speech_input(whisper, config, turn_features=None,
                                     asr_interval_ms=TranslateSession.asr_interval_ms)


@dataclass(frozen=True, slots=True)
class SpeechSentenceResult:
    """One spoken sentence in SimulEval's speech terms: delays and elapsed in ms of source audio."""

    index: int
    wav: str
    transcript: str  # the words the ASR committed, as the translator read them
    source_word_ms: tuple[float, ...]  # audio position at which each transcript word was committed
    prediction: str
    reference: str | None
    delays_ms: tuple[float, ...]
    elapsed_ms: tuple[float, ...]
    source_duration_ms: float
    asr_compute_s: float
    translate_compute_s: float
    revisions: int
    type: str = "speech_sentence_result"

    def to_log(self) -> dict[str, Any]:
        return {"index": self.index, "source": [self.wav], "source_type": "speech",
                "transcript": self.transcript, "source_word_delays": [round(t, 1) for t in self.source_word_ms],
                "prediction": self.prediction, "delays": [round(d, 1) for d in self.delays_ms],
                "elapsed": [round(e, 3) for e in self.elapsed_ms], "prediction_length": len(self.delays_ms),
                "reference": self.reference, "source_length": round(self.source_duration_ms, 1)}


def translate_speech_sentence(model: TranslationModel, policy: SimulPolicy, speech: SpeechInput, audio: np.ndarray,
                              *, index: int = 0, wav: str = "", reference: str | None = None,
                              chunk_ms: int = CHUNK_MS, timer: Callable[[], float] = time.perf_counter
                              ) -> SpeechSentenceResult:
    """Push ``audio`` (float32 16 kHz) through ``speech`` in ``chunk_ms`` frames; every committed
    word goes to the model and policy at once, and each target word is logged at the audio read
    so far (delay) and on the computation-aware clock (elapsed)."""
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    duration_ms = 1000.0 * len(samples) / _SR
    speech.reset()
    model.reset()
    policy.reset()
    source: list[tuple[str, float]] = []  # (word, audio ms when committed)
    written: list[tuple[str, float, float]] = []  # (word, audio ms read, elapsed ms)
    shown: list[tuple[float, float, list[str]]] = []  # re-translation: what a viewer sees after each step
    clock_ms = 0.0
    asr_s = translate_s = 0.0

    def hear(events: Sequence[Any], audio_ms: float, dt: float) -> None:
        nonlocal clock_ms, asr_s, translate_s
        asr_s += dt
        clock_ms = max(clock_ms, audio_ms) + dt * 1000.0  # the audio has arrived, then the ASR ran
        for ev in events:
            text = ev.text.strip() if isinstance(ev, AsrWord) and ev.committed else ""
            if not text:
                continue
            source.append((text, audio_ms))
            t0 = timer()
            model.read([text])
            out = policy.on_source(model, len(source), False)
            step = timer() - t0
            translate_s += step
            clock_ms += step * 1000.0
            written.extend((w.text, audio_ms, clock_ms) for w in out)
            shown.append((audio_ms, clock_ms, [w for w, _, _ in written] + list(policy.hypothesis)))

    step_samples = max(1, _SR * chunk_ms // 1000)
    for start in range(0, len(samples), step_samples):
        end = min(start + step_samples, len(samples))
        t0 = timer()
        events = speech.push(samples[start:end])
        hear(events, 1000.0 * end / _SR, timer() - t0)
    t0 = timer()
    events = speech.flush()  # end of the source: the last turn's final pass
    hear(events, duration_ms, timer() - t0)
    t0 = timer()
    out = policy.on_source(model, len(source), True)
    step = timer() - t0
    translate_s += step
    clock_ms = max(clock_ms, duration_ms) + step * 1000.0
    written.extend((w.text, duration_ms, clock_ms) for w in out)
    shown.append((duration_ms, clock_ms, [w for w, _, _ in written] + list(policy.hypothesis)))

    final = [w for w, _, _ in written]
    if policy.name == "retranslate":
        delays, elapsed, revisions = stable_prefix_delays(final, shown)
    else:
        delays, elapsed, revisions = [d for _, d, _ in written], [e for _, _, e in written], 0
    return SpeechSentenceResult(index, wav, " ".join(w for w, _ in source), tuple(t for _, t in source),
                                " ".join(final), reference, tuple(float(d) for d in delays), tuple(elapsed),
                                duration_ms, asr_s, translate_s, revisions)


def translate_speech_corpus(model: TranslationModel, wavs: Sequence[str | Path], references: Sequence[str | None],
                            spec: str, speech_factory: Callable[[], SpeechInput], *, chunk_ms: int = CHUNK_MS,
                            on_sentence: Callable[[SpeechSentenceResult], None] | None = None
                            ) -> list[SpeechSentenceResult]:
    """One policy (``wait-k:k=3``) over every WAV, in order, through one speech input (reset per WAV)."""
    from duplex.audio.convert import read_wav

    name, params = parse_policy(spec)
    policy = make_simul_policy(name, **params)
    speech = speech_factory()
    out: list[SpeechSentenceResult] = []
    for i, (wav, ref) in enumerate(zip(wavs, references, strict=True)):
        res = translate_speech_sentence(model, policy, speech, read_wav(wav), index=i, wav=str(wav), reference=ref,
                                        chunk_ms=chunk_ms)
        out.append(res)
        if on_sentence is not None:
            on_sentence(res)
    return out


def score_speech_sentences(sentences: Sequence[SpeechSentenceResult], *, wall_s: float | None = None
                           ) -> dict[str, Any]:
    """What ``translate score`` computes from the run's instances.log (speech latency in ms), plus
    the compute cost as a real-time factor of the source audio, and three examples."""
    scores = score_records([r.to_log() for r in sentences])
    audio_s = sum(r.source_duration_ms for r in sentences) / 1000.0
    scores["source_audio_s"] = round(audio_s, 1)
    scores["asr_rtf"] = round(sum(r.asr_compute_s for r in sentences) / max(audio_s, 1e-9), 3)
    scores["translate_rtf"] = round(sum(r.translate_compute_s for r in sentences) / max(audio_s, 1e-9), 3)
    scores["revisions"] = sum(r.revisions for r in sentences)
    if wall_s is not None:
        scores["wall_s"] = round(wall_s, 1)
    scores["examples"] = [{"transcript": r.transcript, "prediction": r.prediction, "reference": r.reference}
                          for r in sentences[:3]]
    return scores


def evaluate_speech(model: TranslationModel, wavs: Sequence[str | Path], references: Sequence[str],
                    policies: Sequence[str], speech_factory: Callable[[], SpeechInput], *,
                    progress: Callable[[str], None] | None = None, instances_dir: str | Path | None = None
                    ) -> dict[str, Any]:
    """``translate eval --source-audio``: every policy over every WAV -> {policy: speech scores}."""
    def translate(spec: str, report: Callable[[Any], None]) -> tuple[list[Any], dict[str, Any]]:
        return translate_speech_corpus(model, wavs, references, spec, speech_factory, on_sentence=report), {}

    return evaluate_each(policies, len(wavs), translate, score_speech_sentences, progress=progress,
                         instances_dir=instances_dir)
