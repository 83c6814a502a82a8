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

A voice server's LLM borrows the other cores whenever no speech stage is running
(:data:`SPEECH_STAGES`, counted around each whisper pass, turn analysis and TTS synthesis): text
sessions on the default server, and the hand-over between a user's last words and the first TTS
clause, then run at the text-only speed, while the split above still holds whenever a stage runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["SPEECH_STAGES", "SpeechStages", "llm_borrows_cores", "llm_threads", "speech_stage", "stage_threads",
           "time_interleaved"]

T = TypeVar("T")
K = TypeVar("K")


class SpeechStages:
    """How many speech stages (whisper passes, turn analysis, TTS synthesis) run right now, in this
    process: the LLM takes every core only while none does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1

    @property
    def idle(self) -> bool:
        return self._running == 0


SPEECH_STAGES = SpeechStages()


def speech_stage(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` counted in :data:`SPEECH_STAGES` while it runs (wrap the callable an executor runs,
    so that queueing for the executor does not count)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        with SPEECH_STAGES.running():
            return fn(*args, **kwargs)

    return run


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


def llm_borrows_cores(threads: int) -> bool:
    """Whether an LLM stage given ``threads`` takes every core while no speech stage runs: it has
    fewer than all, ``$DUPLEX_TORCH_THREADS`` does not fix its count, and
    ``$DUPLEX_LLM_BORROW_CORES`` is not ``0``."""
    return (threads < (os.cpu_count() or 1) and not os.environ.get("DUPLEX_TORCH_THREADS", "").strip()
            and os.environ.get("DUPLEX_LLM_BORROW_CORES", "1").strip() != "0")


def time_interleaved(candidates: dict[K, Callable[[], object]], rounds: int = 8) -> dict[K, float]:
    """Best seconds of each candidate over ``rounds`` rounds (the first one a warm-up, untimed),
    every round timing every candidate, at one torch/OpenMP thread: what a load-time probe that
    picks a kernel needs on a shared host. Timed one after another, a slow spell decided the pick;
    with two threads, any other busy process (a voice server loads whisper and Piper meanwhile)
    left an OpenMP candidate waiting out a descheduled thread's time slice at every barrier, and
    the decode-format probe picked a format 3-5x slower in 5 of 8 tries under load."""
    import time

    import torch

    if rounds < 2:
        raise ValueError("rounds must be >= 2 (the first one warms up)")
    best = {key: float("inf") for key in candidates}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(rounds):
            for key, run in candidates.items():
                t0 = time.perf_counter()
                run()
                if i:
                    best[key] = min(best[key], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best
