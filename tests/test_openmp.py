"""duplex.engine.openmp: a thread's OpenMP pool can be given back, and a thread can run its torch
ops alone, so that the engine's forwards keep the only pool (counted in threads, not timed)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from duplex.engine.openmp import release_pool, runtime, serial_thread
from duplex.engine.sampling import Sampler, SamplingConfig

pytestmark = pytest.mark.skipif(runtime() is None or (os.cpu_count() or 1) < 2,
                                reason="needs torch's GNU OpenMP runtime and 2+ cores")


def _threads() -> int:
    """The process's threads once none has started or ended for a while (threads a pool gives back
    end on their own, after the call returns)."""
    counts = [len(os.listdir("/proc/self/task"))]
    for _ in range(500):  # a hang guard: 10 s
        time.sleep(0.02)
        counts.append(len(os.listdir("/proc/self/task")))
        if len(counts) >= 5 and len(set(counts[-5:])) == 1:
            break
    return counts[-1]


def _parallel_op() -> None:
    """What a job thread runs: sampling over a vocabulary, copies of cache-sized tensors (each a
    parallel region on the calling thread, where it may run more than one thread)."""
    sampler = Sampler(SamplingConfig(temperature=0.7, top_p=0.9))
    for seed in range(3):
        sampler(torch.randn(49152, generator=torch.Generator().manual_seed(seed)))
        torch.cat([torch.ones(30, 3, 1024, 64), torch.ones(30, 3, 1024, 64)], dim=2).sum()


def _in_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_release_pool_ends_the_threads_a_pool_started() -> None:
    def run() -> tuple[int, int, int, bool]:
        torch.set_num_threads(2)
        before = _threads()
        _parallel_op()
        with_pool = _threads()
        released = release_pool()
        return before, with_pool, _threads(), released

    before, with_pool, after, released = _in_thread(run)
    assert released
    assert with_pool > before  # the region started this thread's own pool
    assert after == before  # and giving it back ended those threads


def test_serial_thread_runs_torch_ops_without_a_pool_and_leaves_other_threads_alone() -> None:
    main_threads = torch.get_num_threads()

    def run() -> tuple[bool, int, int, int]:
        torch.set_num_threads(2)
        ok = serial_thread()
        before = _threads()
        _parallel_op()
        return ok, torch.get_num_threads(), before, _threads()

    ok, count, before, after = _in_thread(run)
    assert ok and count == 1
    assert after == before  # no pool: nothing started
    assert torch.get_num_threads() == main_threads
