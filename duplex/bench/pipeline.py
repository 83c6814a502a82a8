"""Local voice pipeline latency: end of user speech -> first agent audio chunk, on the real models.

Each utterance (Piper-synthesised questions, plus the LibriVox clips of ``pocketsphinx-testdata``)
is fed to a fresh :class:`~duplex.voice.pipeline.VoiceSession` at real time in 20 ms blocks, as a microphone
would deliver it. The latency is broken into stages, each measured on the same clock:

- ``vad``: the VAD confirms the end of speech (its minimum-silence hysteresis),
- ``asr_final``: whisper's final pass over the utterance delivers the last words,
- ``policy``: the last words are prefilled and the turn-taking policy hands the floor over,
- ``llm_first_text``: footer + header prefill and decoding up to the first complete word,
- ``tts_first_chunk``: the first clause fills up and is synthesised.

Baseline, measured in the same run on the same utterances: the classic sequential cascade — wait
for 500 ms of silence, transcribe the whole utterance, prefill the whole prompt from scratch (a
stateless chat API), generate the full first sentence, then synthesise it.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from duplex.audio.asr import load_whisper
from duplex.audio.commands import librivox_samples
from duplex.audio.convert import read_wav, to_mono_16k
from duplex.audio.events import SpeechStarted, SpeechStopped
from duplex.audio.tts import TtsEngine, load_tts
from duplex.audio.vad import VadSegmenter, WebRtcVad
from duplex.engine.worker import Engine
from duplex.session.events import AgentTextDelta, TurnStarted, UserTranscript
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import SharedSequence, Speaker
from duplex.session.core import DEFAULT_INSTRUCTIONS
from duplex.voice.pipeline import (VAD_MIN_SILENCE_MS, VOICE_POLICY, VOICE_POLICY_PARAMS, AudioOut, SpeechFinalized, VoiceConfig,
                    VoiceSession, default_voice_config, make_speech_input)

__all__ = ["QUESTIONS", "VOICE_POLICY", "VOICE_POLICY_PARAMS", "bench_pipeline", "make_speech_input", "speech_end_s"]

_SR = 16_000
TARGET_MS = 800.0
QUESTIONS = (
    "What is the capital of France?",
    "How far away is the moon?",
    "Can you recommend a good book to read?",
    "Why is the sky blue?",
    "Tell me a fun fact about cats.",
    "What should I cook for dinner tonight?",
    "How do I make a cup of tea?",
    "What is the tallest mountain in the world?",
)
_STAGES = ("vad", "asr_final", "policy", "llm_first_text", "tts_first_chunk")
_BASELINE_STAGES = ("vad", "asr", "prefill", "generate_sentence", "tts")


def _progress(out: TextIO, msg: str) -> None:
    print(f"[bench pipeline] {msg}", file=out, flush=True)


def speech_end_s(audio_16k: np.ndarray, rel_level: float = 0.05, frame_ms: int = 10) -> float:
    """End of the last 10 ms frame louder than ``rel_level`` x the loudest one: the true end."""
    frame = _SR * frame_ms // 1000
    n = len(audio_16k) // frame
    if n == 0:
        return 0.0
    rms = np.sqrt(np.mean(audio_16k[: n * frame].reshape(n, frame) ** 2, axis=1))
    loud = np.nonzero(rms > rel_level * float(rms.max()))[0]
    return float((loud[-1] + 1) * frame / _SR) if len(loud) else 0.0


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    return {"p50": round(float(np.percentile(values, 50)), 1), "p95": round(float(np.percentile(values, 95)), 1),
            "mean": round(float(np.mean(values)), 1)}


@dataclass(slots=True)
class _Utterance:
    name: str
    kind: str  # question | librivox
    audio: np.ndarray = field(repr=False)
    end_s: float  # true end of speech within ``audio``


def _utterances(tts: TtsEngine, n_questions: int) -> list[_Utterance]:
    out = []
    for i in range(n_questions):
        text = QUESTIONS[i % len(QUESTIONS)]
        pcm, rate = tts.synthesize(text)
        audio = to_mono_16k(pcm, rate)
        out.append(_Utterance(text, "question", audio, speech_end_s(audio)))
    try:
        clips = librivox_samples()
    except FileNotFoundError:
        clips = []
    for path, _ref in clips[:5]:
        audio = read_wav(path)
        out.append(_Utterance(path.stem, "librivox", audio, speech_end_s(audio)))
    return out


def _voice_config() -> VoiceConfig:
    return default_voice_config(sampling=SamplingConfig(temperature=0.0, max_tokens=48))


async def _trial(engine: Engine, whisper: Any, tts: TtsEngine, utt: _Utterance, lead_s: float = 0.5,
                 timeout_s: float = 10.0) -> dict[str, Any]:
    """Feed one utterance at real time; stamp each stage as its output arrives."""
    voice = VoiceSession(engine, make_speech_input(whisper), tts, _voice_config())
    await voice.start()
    audio = np.concatenate([np.zeros(int(lead_s * _SR), np.float32), utt.audio,
                            np.zeros(int(timeout_s * _SR), np.float32)])
    end_stream_s = lead_s + utt.end_s
    stamps: dict[str, float] = {}
    user_text = reply = ""
    t0 = voice.clock.now()
    feeder = asyncio.create_task(voice.feed_audio(audio), name="bench-feed")
    async def consume() -> None:
        nonlocal user_text, reply
        async for item in voice.outputs():
            now = voice.clock.now()
            if isinstance(item, SpeechStarted) and "vad" in stamps and "turn" not in stamps:
                stamps.pop("vad")  # the user went on after a pause: not the end yet
                stamps.pop("asr_final", None)
            elif isinstance(item, SpeechStopped) and item.t_s >= end_stream_s - 0.6:
                stamps.setdefault("vad", now)
            elif isinstance(item, SpeechFinalized) and "vad" in stamps:
                stamps.setdefault("asr_final", now)
            elif isinstance(item, UserTranscript) and item.committed:
                user_text = item.text
            elif isinstance(item, TurnStarted) and item.speaker == "agent":
                stamps.setdefault("turn", item.t)
            elif isinstance(item, AgentTextDelta) and "turn" in stamps:
                stamps.setdefault("text", item.t)
            elif isinstance(item, AudioOut):
                stamps["audio"] = item.t
                reply = item.chunk.text
                return

    try:
        await asyncio.wait_for(consume(), timeout_s + lead_s + len(utt.audio) / _SR)
    except (TimeoutError, asyncio.TimeoutError):
        pass
    finally:
        feeder.cancel()
        try:
            await feeder
        except asyncio.CancelledError:
            pass
        await voice.close()
    end_t = t0 + end_stream_s
    result: dict[str, Any] = {"utterance": utt.name, "kind": utt.kind, "heard": user_text,
                              "first_clause": reply.strip()}
    if "audio" not in stamps:
        result["error"] = f"no agent audio within {timeout_s} s (stages seen: {sorted(stamps)})"
        return result
    marks = [end_t, stamps.get("vad"), stamps.get("asr_final"), stamps.get("turn"), stamps.get("text"), stamps["audio"]]
    if all(m is not None for m in marks):
        result["stages_ms"] = {name: round((b - a) * 1000, 1)  # type: ignore[operator]
                               for name, a, b in zip(_STAGES, marks, marks[1:])}
    result["total_ms"] = round((stamps["audio"] - end_t) * 1000, 1)
    return result


def _baseline(engine: Engine, whisper: Any, tts: TtsEngine, utt: _Utterance) -> dict[str, Any]:
    """The sequential cascade, stage by stage, nothing overlapped."""
    lm = engine.lm
    audio = np.concatenate([np.zeros(_SR // 2, np.float32), utt.audio, np.zeros(2 * _SR, np.float32)])
    seg = VadSegmenter(WebRtcVad(), min_silence_ms=500)
    stopped_at = None
    step = _SR // 50
    for i in range(0, len(audio), step):  # stream time at which the VAD confirms the end
        if any(isinstance(e, SpeechStopped) for e in seg.push(audio[i:i + step])) and (i + step) / _SR > 0.5 + utt.end_s - 0.6:
            stopped_at = (i + step) / _SR
            break
    stages: dict[str, float] = {"vad": ((stopped_at or len(audio) / _SR) - 0.5 - utt.end_s) * 1000}
    t = time.perf_counter()
    segments, _ = whisper.transcribe(utt.audio, beam_size=1, language=None, word_timestamps=False,
                                     condition_on_previous_text=False, vad_filter=False)
    text = " ".join(s.text.strip() for s in segments)
    stages["asr"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    seq = SharedSequence(lm, engine.template)
    seq.add_message(Speaker.SYSTEM, DEFAULT_INSTRUCTIONS)
    seq.add_message(Speaker.USER, text)
    seq.begin_turn(Speaker.AGENT)
    _ = seq.logits
    stages["prefill"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    sampler = Sampler(SamplingConfig(temperature=0.0))
    ids: list[int] = []
    sentence = ""
    for _ in range(48):
        token = seq.sample(sampler)
        if token in engine.template.end_of_agent_turn_ids:
            break
        ids.append(token)
        seq.append([token])
        sentence = lm.tokenizer.decode(ids, skip_special_tokens=True)
        if re.search(r"[.!?](\s|$)", sentence.strip()[-2:] + " ") and len(sentence.split()) > 1:
            break
    stages["generate_sentence"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    tts.synthesize(sentence.strip() or "Okay.")
    stages["tts"] = (time.perf_counter() - t) * 1000
    return {"utterance": utt.name, "kind": utt.kind, "stages_ms": {k: round(v, 1) for k, v in stages.items()},
            "total_ms": round(sum(stages.values()), 1), "reply_tokens": len(ids)}


def _summary(trials: list[dict[str, Any]], stages: tuple[str, ...]) -> dict[str, Any]:
    ok = [t for t in trials if "total_ms" in t]
    return {
        "n": len(ok),
        "errors": len(trials) - len(ok),
        "end_of_speech_to_first_audio_ms": _stats([t["total_ms"] for t in ok]),
        "stages_ms": {s: _stats([t["stages_ms"][s] for t in ok if "stages_ms" in t]) for s in stages},
    }


async def bench_pipeline(model: str | None, trials: int = 5, progress: TextIO = sys.stderr) -> dict[str, Any]:
    """End of user speech -> first agent audio chunk, p50/p95 over ``trials`` spoken questions
    (at least 5) plus the LibriVox clips, against the sequential cascade measured alongside."""
    n_questions = max(5, trials)
    _progress(progress, "loading models (LLM, whisper tiny.en, piper) ...")
    t = time.perf_counter()
    engine, whisper, tts = await asyncio.gather(
        asyncio.to_thread(Engine.load, model, "auto", "auto"),
        asyncio.to_thread(load_whisper, None),
        asyncio.to_thread(load_tts, "piper"),
    )
    load_s = time.perf_counter() - t
    try:
        utterances = await asyncio.to_thread(_utterances, tts, n_questions)
        _progress(progress, f"warm-up on {utterances[0].name!r}")
        await _trial(engine, whisper, tts, utterances[0])
        results = []
        for i, utt in enumerate(utterances):
            r = await _trial(engine, whisper, tts, utt)
            results.append(r)
            _progress(progress, f"{i + 1}/{len(utterances)} {utt.kind} {r.get('total_ms', r.get('error'))} ms "
                                f"{r.get('stages_ms', '')} heard={r['heard']!r} says={r['first_clause']!r}")
        base = []
        for utt in utterances:
            b = await asyncio.to_thread(_baseline, engine, whisper, tts, utt)
            base.append(b)
            _progress(progress, f"baseline {utt.kind} {b['total_ms']} ms {b['stages_ms']}")
    finally:
        engine.close()

    questions = [r for r in results if r["kind"] == "question"]
    stream = _summary(questions, _STAGES)
    p50 = stream["end_of_speech_to_first_audio_ms"]["p50"]
    base_q = _summary([b for b in base if b["kind"] == "question"], _BASELINE_STAGES)
    base_p50 = base_q["end_of_speech_to_first_audio_ms"]["p50"]
    return {
        "what": "end of user speech (WAV fed at real time) -> first agent audio chunk",
        "model": engine.lm.name,
        "dtype": str(engine.lm.dtype).removeprefix("torch."),
        "asr": "faster-whisper tiny.en int8",
        "tts": tts.name,
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),  # other processes sharing the cores inflate stages
        "load_s": round(load_s, 2),
        "config": {"vad_min_silence_ms": VAD_MIN_SILENCE_MS, "policy": VOICE_POLICY,
                   "policy_params": VOICE_POLICY_PARAMS, "first_clause_words": _voice_config().first_clause_words},
        "target_ms": TARGET_MS,
        "target_met": p50 is not None and p50 < TARGET_MS,
        "questions": stream,
        "librivox": _summary([r for r in results if r["kind"] == "librivox"], _STAGES),
        "baseline": {
            "what": "sequential cascade: 500 ms VAD silence, offline whisper on the whole utterance, "
                    "re-prefill the whole prompt, generate the full first sentence, then TTS it",
            "questions": base_q,
            "librivox": _summary([b for b in base if b["kind"] == "librivox"], _BASELINE_STAGES),
        },
        "speedup_p50": round(base_p50 / p50, 2) if p50 and base_p50 else None,
        "trials": results,
        "baseline_trials": base,
    }
