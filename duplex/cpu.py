"""How many threads each CPU stage's kernels use.

The voice path runs three CPU-bound stages at once: the LLM's decode steps (torch and the int8
kernels, OpenMP), whisper passes (CTranslate2) and Piper synthesis (onnxruntime). Each pool's
threads meet at a barrier after every parallel region, and when another stage holds one of the
cores that barrier waits out a descheduled thread's time slice. On the 2-core dev machine, under
another process's load, ``bench realtime``'s first audio p50 went from 1.19 s (2 threads) to
0.72 s (a single-threaded LLM; bench/results/ab-threads/). So by
default the LLM and the TTS get half the cores, at least one: on 2 cores they run single-threaded
and the OS interleaves them (``$DUPLEX_TORCH_THREADS``, ``$DUPLEX_TTS_THREADS`` override it).
Whisper keeps every core (``audio.asr.load_whisper``, ``$DUPLEX_ASR_THREADS``): its turn-end pass is
on the critical path and took twice as long single-threaded.

A text-only server (no ASR, no TTS) has no other stage to leave cores to, and its LLM gets them all:
``bench server`` back to back on the quiet 2-core machine, 1 vs 2 threads, N = 1 53.1 vs 59.9 and
N = 8 117.5 vs 130.8 tokens/s, TTFT p95 at N = 8 919 vs 691 ms.
"""

from __future__ import annotations

import os

__all__ = ["llm_threads", "stage_threads"]


def stage_threads(env_var: str) -> int:
    """Threads for one stage: ``env_var`` if set, else half the cores (at least 1)."""
    value = os.environ.get(env_var, "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError as exc:
            raise ValueError(f"${env_var} must be a whole number of threads, not {value!r}") from exc
    return max(1, (os.cpu_count() or 1) // 2)


def llm_threads(text_only: bool) -> int:
    """The LLM stage's threads: every core when no ASR or TTS runs beside it, else
    :func:`stage_threads` (``$DUPLEX_TORCH_THREADS`` decides either way)."""
    if text_only and not os.environ.get("DUPLEX_TORCH_THREADS", "").strip():
        return os.cpu_count() or 1
    return stage_threads("DUPLEX_TORCH_THREADS")
