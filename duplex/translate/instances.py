"""SimulEval's ``instances.log``: write it, read it back, and score it.

One JSON object a line: ``index``, ``prediction``, ``delays`` (source words read when each target
word was written), ``elapsed`` (ms, computation-aware), ``prediction_length``, ``reference`` and
``source_length`` (words), as SimulEval writes them, so its ``--score-only`` can read our logs and
``duplex translate score`` can read its own. We add ``source_duration_ms`` (the timed text source's
length on the ``elapsed`` axis; SimulEval ignores unknown keys). A speech source's records say
``"source_type": "speech"``: their ``delays``, ``elapsed`` and ``source_length`` are ms of source
audio, as SimulEval logs speech input, and they score in ms
(:func:`~duplex.translate.metrics.speech_latency`). ``translate run`` and ``translate
eval`` score through :func:`score_records`, so ``scores.json`` equals ``translate score``'s output.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from duplex.translate.metrics import (
    InstanceDelays,
    corpus_latency,
    corpus_quality,
    speech_latency,
)

__all__ = ["DEFAULT_WORD_INTERVAL_MS", "is_speech", "read_instances", "score_instances", "score_records",
           "write_instances"]

DEFAULT_WORD_INTERVAL_MS = 300.0  # SimulEval's ATD assumes 300 ms a word for speech; we time text the same way
_REQUIRED = ("index", "prediction", "delays", "source_length")


def write_instances(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """One JSON line per sentence (UTF-8, not ASCII-escaped, as SimulEval writes Spanish)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return out


def read_instances(path: str | Path) -> list[dict[str, Any]]:
    """Parse an ``instances.log``; a malformed line is a ValueError naming the file and line."""
    records: list[dict[str, Any]] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg})") from exc
        missing = [k for k in _REQUIRED if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"{path}:{n}: missing {', '.join(missing)}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no instances")
    return records


_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


def is_speech(record: dict[str, Any]) -> bool:
    """A record of a speech source (latency in ms of audio): ours say ``source_type: speech``;
    SimulEval's own speech logs are known by their ``source`` audio file."""
    if "source_type" in record:
        return record["source_type"] == "speech"
    source = record.get("source")
    return isinstance(source, list) and bool(source) and str(source[0]).lower().endswith(_AUDIO_SUFFIXES)


def _delays(record: dict[str, Any], word_interval_ms: float) -> InstanceDelays:
    reference = record.get("reference")
    elapsed = record.get("elapsed")
    duration = record.get("source_duration_ms")
    if is_speech(record):
        duration = record["source_length"]  # already ms: delays and elapsed share its axis
    elif duration is None and elapsed is not None:
        duration = record["source_length"] * word_interval_ms
    return InstanceDelays(
        delays=tuple(record["delays"]), source_length=record["source_length"],
        reference_length=len(reference.split()) if isinstance(reference, str) and reference.strip() else None,
        elapsed_ms=tuple(elapsed) if elapsed is not None else None, source_duration_ms=duration,
        source_offset_ms=float(record.get("source_offset_ms", 0.0)))


def score_records(records: Sequence[dict[str, Any]], *,
                  word_interval_ms: float = DEFAULT_WORD_INTERVAL_MS) -> dict[str, Any]:
    """Corpus AL, LAAL, AP, DAL (SimulEval's CLI defaults: |Y| = the reference length when there is
    one); ``*_CA_ms``/``AP_CA`` when every sentence has ``elapsed``; BLEU and chrF (sacrebleu) when
    every sentence has a reference. Sentences without target words are skipped for latency.
    A speech log (every record ``source_type: speech``) gives the speech variants in ms instead."""
    speech = [is_speech(r) for r in records]
    if any(speech) and not all(speech):
        raise ValueError("instances mix a speech source and a text source: score them apart")
    instances = [_delays(r, word_interval_ms) for r in records]
    if all(speech):
        latency = speech_latency(instances)
        scores: dict[str, Any] = {"sentences": len(records), "source_type": "speech",
                                  **{k: round(v, 3) for k, v in latency.items()}}
    else:
        latency = corpus_latency(instances)
        scores = {"sentences": len(records), **{k: round(v, 3) for k, v in latency.items()}}
    if not all(speech) and any(r.get("elapsed") is not None for r in records) and "AL_CA_ms" in latency \
            and not all("source_duration_ms" in r for r in records):
        scores["word_interval_ms"] = word_interval_ms
    references = [r.get("reference") for r in records]
    if all(isinstance(ref, str) for ref in references):
        scores.update(corpus_quality([str(r["prediction"]) for r in records], [str(ref) for ref in references]))
    return scores


def score_instances(path: str | Path, *, word_interval_ms: float = DEFAULT_WORD_INTERVAL_MS) -> dict[str, Any]:
    """``duplex translate score``: the scores of one ``instances.log``."""
    return score_records(read_instances(path), word_interval_ms=word_interval_ms)
