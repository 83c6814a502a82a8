"""One OpenMP thread team per process: the engine's, on the thread that runs the ticks.

PyTorch and the int8 and attention kernels (:mod:`duplex.engine.int8_kernel`) share one GNU OpenMP
runtime (torch's ``libgomp.so.1``, which the kernels' own ``libgomp.so.1`` resolves to). That
runtime gives every thread that opens a parallel region a pool of its own, and while it manages more
threads in all than the process may run on CPUs, every thread waiting at a barrier spins 100 times
instead of 300,000 before it sleeps on a futex (libgomp's "throttled" spin). A decode step meets
about 400 barriers (a dozen per layer), so each then costs a sleep and a wake-up.

The server had a pool on the thread that loaded the model, one on the scheduler's thread and one on
each job thread that had ever run a tick or sampled. On the 2-core EPYC one decode step took
14.6-17.1 ms while four other threads' idle pools were alive against 11.1-12.4 ms once they had
given them back (one process, one after the other), and a soak's one-row ticks 20 ms on average
against 10.7 ms for the engine alone. Here the loading
thread gives its pool back (:func:`release_pool`), job threads run their torch ops on one thread
(:func:`serial_thread`), and only the scheduler's thread runs forwards; it gives its own pool back
whenever nothing is queued, so that a second engine (translation) adds no idle pool, and no idle
thread spins on a core that the event loop wants. (Not after every tick: the call waits for the
worker to end its spin, ~2 ms, which then sat between every two ticks.)

Everything here is a no-op where the process has no GNU OpenMP runtime loaded (another OpenMP, a
build without it): the engine then runs as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

__all__ = ["release_pool", "runtime", "serial_thread"]

log = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: the pool's threads end; the next region starts new ones


@functools.lru_cache(maxsize=1)
def runtime() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch loaded (the one the kernels use), or None."""
    torch.get_num_threads()  # torch's own runtime is loaded and initialised by now
    try:
        lib = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except (OSError, AttributeError):  # not loaded (another OpenMP, or none), or no RTLD_NOLOAD
        return None
    lib.omp_set_num_threads.argtypes = [ctypes.c_int]
    if hasattr(lib, "omp_pause_resource_all"):  # OpenMP 5.0 and later
        lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
        lib.omp_pause_resource_all.restype = ctypes.c_int
    return lib


def release_pool() -> bool:
    """End the calling thread's OpenMP pool (the threads its parallel regions started), so that they
    no longer count against the CPUs: on the thread that loaded the model, and on the tick thread
    once the engine is idle (its argument types are set once, in :func:`runtime`: this runs often).
    True if a runtime took the request."""
    lib = runtime()
    if lib is None or not hasattr(lib, "omp_pause_resource_all"):  # none, or older than OpenMP 5.0
        return False
    ok = lib.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
    if not ok:
        log.debug("openmp: omp_pause_resource_all refused (inside a parallel region?)")
    return ok


def serial_thread() -> bool:
    """Run the calling thread's torch ops on that thread alone: its parallel regions then start no
    pool. For threads that only sample and keep books while another thread runs the forwards. True
    if the runtime took it (torch's thread count is per thread under OpenMP, so others keep theirs)."""
    lib = runtime()
    if lib is None:
        return False
    torch.get_num_threads()  # torch sets a new thread's count on its first call: do that first
    lib.omp_set_num_threads(1)
    return torch.get_num_threads() == 1
