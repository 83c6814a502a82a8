"""Offline evaluation of the simultaneous policies on a test set: BLEU/chrF and SimulEval latency.

Each sentence runs through the same :class:`SimulTranslator` and policy objects a live session
uses, one source word at a time. Delays are counted in source words; the computation-aware
variants time every step (see :mod:`duplex.translate.metrics` for the timed text source).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duplex.translate.instances import (
    DEFAULT_WORD_INTERVAL_MS,
    score_records,
    write_instances,
)
from duplex.translate.policies import SimulPolicy, make_simul_policy
from duplex.translate.translator import TranslationModel

__all__ = ["DEFAULT_POLICIES", "SentenceResult", "evaluate", "load_test_set", "markdown_table", "model_stats",
           "policy_dir_name", "read_lines", "score_sentences", "stats_delta", "translate_corpus",
           "translate_sentence"]

log = logging.getLogger(__name__)

DEFAULT_POLICIES = ("wait-k:k=1", "wait-k:k=3", "wait-k:k=5", "local-agreement", "retranslate", "offline")
DATA_DIR = Path(__file__).resolve().parents[2] / "eval" / "data"


@dataclass(frozen=True, slots=True)
class SentenceResult:
    """One sentence in SimulEval's instances.log terms (delays in words, elapsed in ms)."""

    index: int
    source: str
    prediction: str
    reference: str | None
    delays: tuple[int, ...]
    elapsed_ms: tuple[float, ...]
    source_duration_ms: float
    revisions: int  # re-translation: displayed words later changed
    compute_s: float
    type: str = "sentence_result"

    def to_log(self) -> dict[str, Any]:
        return {"index": self.index, "prediction": self.prediction, "delays": list(self.delays),
                "elapsed": [round(e, 3) for e in self.elapsed_ms], "prediction_length": len(self.delays),
                "reference": self.reference, "source_length": len(self.source.split()),
                "source_duration_ms": self.source_duration_ms}


def read_lines(path: str | Path) -> list[str]:
    """One sentence per line, blank lines skipped."""
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def load_test_set(src: str | Path | None = None, ref: str | Path | None = None) -> tuple[list[str], list[str]]:
    """One sentence per line; default: the committed en->es set in eval/data/."""
    src_path = Path(src) if src else DATA_DIR / "translate_en.txt"
    ref_path = Path(ref) if ref else DATA_DIR / "translate_es.txt"
    sources, refs = read_lines(src_path), read_lines(ref_path)
    if len(sources) != len(refs):
        raise ValueError(f"{src_path} has {len(sources)} sentences but {ref_path} has {len(refs)}")
    return sources, refs


def parse_policy(spec: str) -> tuple[str, dict[str, Any]]:
    """``wait-k:k=3`` -> ("wait-k", {"k": 3})."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return name.strip(), params


def translate_sentence(model: TranslationModel, policy: SimulPolicy, source: str, *, index: int = 0,
                       reference: str | None = None, word_interval_ms: float = DEFAULT_WORD_INTERVAL_MS,
                       timer: Callable[[], float] = time.perf_counter) -> SentenceResult:
    """Feed ``source`` word by word; log when each target word was written (in words and ms)."""
    words = source.split()
    model.reset()
    policy.reset()
    written: list[tuple[str, int, float]] = []  # (word, source words read, elapsed ms)
    shown: list[tuple[int, float, list[str]]] = []  # what a viewer sees after each step (re-translation)
    clock_ms = 0.0
    compute = 0.0
    for j in range(1, len(words) + 2):
        finished = j > len(words)
        n_read = min(j, len(words))
        if not finished:
            clock_ms = max(clock_ms, j * word_interval_ms)  # word j has fully arrived
        t0 = timer()
        if not finished:
            model.read([words[j - 1]])
        out = policy.on_source(model, n_read, finished)
        dt = timer() - t0
        compute += dt
        clock_ms += dt * 1000.0
        written += [(w.text, n_read, clock_ms) for w in out]
        shown.append((n_read, clock_ms, [w for w, _, _ in written] + list(policy.hypothesis)))
    final = [w for w, _, _ in written]
    if policy.name == "retranslate":
        delays, elapsed, revisions = stable_prefix_delays(final, shown)
    else:
        delays = [d for _, d, _ in written]
        elapsed = [e for _, _, e in written]
        revisions = 0
    return SentenceResult(index, source, " ".join(final), reference, tuple(delays), tuple(elapsed),
                          len(words) * word_interval_ms, revisions, compute)


def stable_prefix_delays(final: list[str], shown: Sequence[tuple[Any, float, list[str]]]
                         ) -> tuple[list[Any], list[float], int]:
    """Re-translation shows a new hypothesis after every word. Target word i counts as written at
    the first step from which every later display agrees with the final translation up to word i
    (the usual way to put re-translation on the SimulEval axis); ``revisions`` counts displayed
    words that a later display changed."""
    delays: list[Any] = []  # source words read (text) or ms of audio (speech)
    elapsed: list[float] = []
    for i in range(len(final)):
        first = len(shown) - 1
        for s in range(len(shown) - 1, -1, -1):
            if shown[s][2][:i + 1] == final[:i + 1]:
                first = s
            else:
                break
        delays.append(shown[first][0])
        elapsed.append(shown[first][1])
    revisions = 0
    for (_, _, a), (_, _, b) in itertools.pairwise(shown):
        common = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        revisions += len(a) - common
    return delays, elapsed, revisions


_stable_prefix_delays = stable_prefix_delays  # the name tests/test_translate.py imports


def translate_corpus(model: TranslationModel, sources: Sequence[str], references: Sequence[str | None],
                     spec: str, *, word_interval_ms: float = DEFAULT_WORD_INTERVAL_MS,
                     on_sentence: Callable[[SentenceResult], None] | None = None) -> list[SentenceResult]:
    """One policy (``wait-k:k=3``) over every sentence, in order; ``on_sentence`` sees each result
    as it is done (progress)."""
    name, params = parse_policy(spec)
    policy = make_simul_policy(name, **params)
    sentences: list[SentenceResult] = []
    for i, (src, ref) in enumerate(zip(sources, references, strict=True)):
        res = translate_sentence(model, policy, src, index=i, reference=ref, word_interval_ms=word_interval_ms)
        sentences.append(res)
        if on_sentence is not None:
            on_sentence(res)
    return sentences


def score_sentences(sentences: Sequence[SentenceResult], *, wall_s: float | None = None) -> dict[str, Any]:
    """The scores of one policy's run: exactly what ``translate score`` computes from its
    instances.log, plus the compute cost, re-translation's revisions and three examples."""
    src_words = sum(len(r.source.split()) for r in sentences)
    scores = score_records([r.to_log() for r in sentences])
    scores["compute_ms_per_source_word"] = round(1000 * sum(r.compute_s for r in sentences) / max(src_words, 1), 1)
    scores["revisions"] = sum(r.revisions for r in sentences)
    if wall_s is not None:
        scores["wall_s"] = round(wall_s, 1)
    scores["examples"] = [{"source": r.source, "prediction": r.prediction, "reference": r.reference}
                          for r in sentences[:3]]
    return scores


def model_stats(model: TranslationModel) -> dict[str, Any]:
    """The translator's cost counters (forwards, re-encoded tokens) and layout, if it has them."""
    stats = getattr(model, "stats", None)
    out: dict[str, Any] = {"layout": getattr(model, "layout", None)}
    for key in ("forwards", "decoded_tokens", "reencoded_tokens"):
        out[key] = getattr(stats, key, None)
    return out


def stats_delta(before: dict[str, Any], after: dict[str, Any], sentences: Sequence[SentenceResult]
                ) -> dict[str, Any]:
    """One run's share of the counters, and forwards per source word: the cost that layouts change."""
    out: dict[str, Any] = {"layout": after["layout"]}
    if after["forwards"] is None:
        return out
    src_words = max(1, sum(len(r.source.split()) for r in sentences))
    for key in ("forwards", "decoded_tokens", "reencoded_tokens"):
        out[key] = after[key] - before[key]
    out["forwards_per_source_word"] = round(out["forwards"] / src_words, 3)
    return out


def policy_dir_name(spec: str) -> str:
    """``wait-k:k=3`` -> ``wait-k_k3`` (one instances.log folder per policy)."""
    return spec.replace(":", "_").replace("=", "")


def evaluate_each(policies: Sequence[str], total: int,
                  translate: Callable[[str, Callable[[Any], None]], tuple[list[Any], dict[str, Any]]],
                  score: Callable[..., dict[str, Any]], *, progress: Callable[[str], None] | None = None,
                  instances_dir: str | Path | None = None) -> dict[str, Any]:
    """The policy loop every source shares: ``translate(spec, on_sentence)`` -> (sentences, extra
    figures), ``score(sentences, wall_s=...)``; one instances.log per policy when asked."""
    results: dict[str, Any] = {}
    for spec in policies:
        t0 = time.perf_counter()

        def report(res: Any, spec: str = spec) -> None:
            if progress is not None:
                progress(f"[{spec}] {res.index + 1}/{total} {res.prediction}")

        sentences, extra = translate(spec, report)
        results[spec] = {**score(sentences, wall_s=time.perf_counter() - t0), **extra}
        if instances_dir is not None:
            write_instances(Path(instances_dir) / policy_dir_name(spec) / "instances.log",
                            (r.to_log() for r in sentences))
    return results


def evaluate(model: TranslationModel, sources: Sequence[str], references: Sequence[str],
             policies: Sequence[str] = DEFAULT_POLICIES, *, word_interval_ms: float = DEFAULT_WORD_INTERVAL_MS,
             progress: Callable[[str], None] | None = None, instances_dir: str | Path | None = None
             ) -> dict[str, Any]:
    """Every policy over every sentence -> {policy: {BLEU, chrF, AL, LAAL, AP, DAL, *_CA_ms, ...}}."""
    def translate(spec: str, report: Callable[[Any], None]) -> tuple[list[Any], dict[str, Any]]:
        before = model_stats(model)
        sentences = translate_corpus(model, sources, references, spec, word_interval_ms=word_interval_ms,
                                     on_sentence=report)
        return sentences, stats_delta(before, model_stats(model), sentences)

    return evaluate_each(policies, len(sources), translate, score_sentences, progress=progress,
                         instances_dir=instances_dir)


def markdown_table(result: dict[str, Any]) -> str:
    """The README table, every number read from an ``eval`` JSON (``duplex translate report FILE``)."""
    if any(r.get("source_type") == "speech" for r in result["policies"].values()):
        return _speech_table(result)
    head = ("| policy | BLEU | chrF | AL | LAAL | AP | DAL | AL_CA (s) | LAAL_CA (s) | compute ms / source word |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, r in result["policies"].items():
        ca = [f"{r[k] / 1000:.2f}" if k in r else "" for k in ("AL_CA_ms", "LAAL_CA_ms")]
        rows.append(f"| {name} | {r['BLEU']:.1f} | {r['chrF']:.1f} | {r['AL']:.2f} | {r['LAAL']:.2f} | "
                    f"{r['AP']:.2f} | {r['DAL']:.2f} | {ca[0]} | {ca[1]} | {r['compute_ms_per_source_word']:.0f} |")
    return "\n".join([head, *rows])


def _speech_table(result: dict[str, Any]) -> str:
    """``eval --source-audio``: latency in s of source audio, the ASR's and translator's real-time factors."""
    head = ("| policy | BLEU | chrF | StreamLAAL (s) | StreamLAAL_CA (s) | AL (s) | AP | DAL (s) | ASR RTF | "
            "translate RTF |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, r in result["policies"].items():
        s = {k: f"{r[k] / 1000:.2f}" if k in r else ""
             for k in ("StreamLAAL_ms", "StreamLAAL_CA_ms", "AL_ms", "DAL_ms")}
        rows.append(f"| {name} | {r['BLEU']:.1f} | {r['chrF']:.1f} | {s['StreamLAAL_ms']} | {s['StreamLAAL_CA_ms']} | "
                    f"{s['AL_ms']} | {r['AP']:.2f} | {s['DAL_ms']} | {r['asr_rtf']:.2f} | {r['translate_rtf']:.2f} |")
    return "\n".join([head, *rows])
