"""SimulEval latency (AL, LAAL, AP, DAL) and quality (BLEU, chrF via sacrebleu).

Definitions exactly as SimulEval's latency scorers with its CLI defaults (``use_ref_len``: |Y| is
the reference length in words when a reference is given; the corpus score is the mean over
sentences), as in design.md section 4. d_i = source units read when target word i was written.

- AL = (1/τ) Σ_{i≤τ} [d_i − (i−1)·|X|/|Y|], τ = first i with d_i ≥ |X|; if d_1 > |X|, AL = d_1.
- LAAL: AL with |Y| → max(|Y|, |hyp|).
- AP = Σ d_i / (|X|·|Y|).
- DAL: d'_1 = d_1, d'_i = max(d_i, d'_{i−1} + |X|/|hyp|); DAL = mean_i [d'_i − (i−1)·|X|/|hyp|]
  (SimulEval uses the hypothesis length here, whatever ``use_ref_len`` says).

Computation-aware variants put elapsed times in place of d_i, with the source on the same time
axis (|X| = its duration). SimulEval defines them for speech only; for a text source we give every
source word a duration (``word_interval_ms``, 300 ms as SimulEval's ATD assumes for speech), so word
j arrives at j·interval, and the elapsed time of a target word is when it was written on a clock
that waits for the words it reads and advances by the measured compute time.

Speech source (:func:`speech_latency`), as SimulEval scores speech input: d_i = ms of source audio
read when target word i was written, |X| = the source duration in ms, |Y| = the reference length in
words, so AL, LAAL and DAL are in ms (AP stays a ratio); the ``*_CA`` variants put ``elapsed`` (ms,
audio arrival plus compute) in place of d_i on the same |X|. StreamLAAL (Papi et al. 2024, FBK's
``stream_laal.py``) is LAAL after the stream's output is resegmented to the reference sentences,
each sentence's delays taken from its start (``source_offset_ms``) and clamped at 0: with one WAV
per reference sentence the segmentation is given, so no mwerSegmenter is needed, and with offset 0
it equals the sentence-level LAAL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Any

__all__ = ["InstanceDelays", "al", "ap", "corpus_latency", "corpus_quality", "dal", "laal", "speech_latency",
           "stream_laal"]


def al(delays: Sequence[float], source_length: float, target_length: float) -> float:
    """Average Lagging of one sentence (``target_length``: |Y|, the reference length)."""
    return _lagging(delays, source_length, target_length)


def laal(delays: Sequence[float], source_length: float, target_length: float) -> float:
    """Length-adaptive AL: |Y| → max(|Y|, |hyp|)."""
    return _lagging(delays, source_length, max(len(delays), target_length))


def _lagging(delays: Sequence[float], source_length: float, target_length: float) -> float:
    if not delays:
        raise ValueError("no target words: latency is undefined")
    if delays[0] > source_length:
        return float(delays[0])
    rate = source_length / target_length  # |X| / |Y|
    total = 0.0
    tau = 0
    for i_minus_1, d in enumerate(delays):
        total += d - i_minus_1 * rate
        tau = i_minus_1 + 1
        if d >= source_length:
            break
    return total / tau


def ap(delays: Sequence[float], source_length: float, target_length: float) -> float:
    """Average Proportion."""
    if not delays:
        raise ValueError("no target words: latency is undefined")
    return float(sum(delays)) / (source_length * target_length)


def dal(delays: Sequence[float], source_length: float, target_length: float | None = None) -> float:
    """Differentiable AL (|Y| = the hypothesis length, as SimulEval computes it)."""
    if not delays:
        raise ValueError("no target words: latency is undefined")
    rate = source_length / len(delays)
    total = 0.0
    last = 0.0
    for i_minus_1, d in enumerate(delays):
        g = d if i_minus_1 == 0 else max(d, last + rate)
        total += g - i_minus_1 * rate
        last = g
    return total / len(delays)


@dataclass(frozen=True, slots=True)
class InstanceDelays:
    """One sentence as SimulEval logs it: delays in source words (text) or ms (speech), elapsed in
    ms (computation-aware). ``source_offset_ms``: where a speech sentence starts in the stream its
    delays are measured on (StreamLAAL); 0 for a sentence heard on its own."""

    delays: tuple[float, ...]
    source_length: float
    reference_length: int | None
    elapsed_ms: tuple[float, ...] | None = None
    source_duration_ms: float | None = None
    source_offset_ms: float = 0.0
    type: str = "instance_delays"


_SCORERS = {"AL": al, "LAAL": laal, "AP": ap, "DAL": dal}


def corpus_latency(instances: Sequence[InstanceDelays]) -> dict[str, float]:
    """Mean over sentences of AL, LAAL, AP, DAL (and their ``*_CA`` computation-aware variants in ms
    when every instance has elapsed times). Sentences without target words are skipped, as SimulEval does."""
    out: dict[str, float] = {}
    scored = [ins for ins in instances if ins.delays]
    if not scored:
        return out
    for name, fn in _SCORERS.items():
        out[name] = mean(fn(ins.delays, ins.source_length, ins.reference_length or len(ins.delays))
                         for ins in scored)
    if all(ins.elapsed_ms is not None and ins.source_duration_ms for ins in scored):
        for name, fn in _SCORERS.items():
            out[f"{name}_CA" if name == "AP" else f"{name}_CA_ms"] = mean(
                fn(ins.elapsed_ms or (), ins.source_duration_ms or 0.0,
                   ins.reference_length or len(ins.delays)) for ins in scored)
    return out


def stream_laal(delays: Sequence[float], source_length: float, target_length: float,
                source_offset: float = 0.0) -> float:
    """StreamLAAL of one resegmented sentence: LAAL of its delays taken from the sentence start."""
    return laal([max(0.0, d - source_offset) for d in delays], source_length, target_length)


def speech_latency(instances: Sequence[InstanceDelays]) -> dict[str, float]:
    """Corpus latency of a speech source in ms: ``StreamLAAL_ms``, ``LAAL_ms``, ``AL_ms``, ``AP``,
    ``DAL_ms``, and with elapsed times their ``*_CA`` computation-aware variants (``AP_CA``).
    Delays, elapsed and ``source_length`` are all ms; sentences without target words are skipped."""
    scored = [ins for ins in instances if ins.delays]
    if not scored:
        return {}
    variants: list[tuple[str, Callable[[InstanceDelays], Sequence[float]]]] = [("", lambda ins: ins.delays)]
    if all(ins.elapsed_ms is not None for ins in scored):
        variants.append(("_CA", lambda ins: ins.elapsed_ms or ()))
    out: dict[str, float] = {}
    for suffix, times in variants:
        out[f"StreamLAAL{suffix}_ms"] = mean(
            stream_laal(times(ins), ins.source_length, ins.reference_length or len(ins.delays), ins.source_offset_ms)
            for ins in scored)
        for name, fn in _SCORERS.items():
            key = f"{name}{suffix}" if name == "AP" else f"{name}{suffix}_ms"
            out[key] = mean(fn([max(0.0, t - ins.source_offset_ms) for t in times(ins)], ins.source_length,
                               ins.reference_length or len(ins.delays)) for ins in scored)
    return out


def corpus_quality(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF from sacrebleu (default settings: 13a tokenization, chrF n=6, β=2)."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    refs = [list(references)]
    return {"BLEU": round(bleu.corpus_score(list(hypotheses), refs).score, 2),
            "chrF": round(chrf.corpus_score(list(hypotheses), refs).score, 2),
            "sacrebleu": f"{bleu.get_signature()} | {chrf.get_signature()}"}
