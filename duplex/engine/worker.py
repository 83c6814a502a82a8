"""The engine: owns the model and runs every model call on one worker thread per device.

Sessions never touch torch from the event loop. They hand sequence operations to
:meth:`Engine.run`, which executes them on the device worker in submission order; the loop stays
free to read sockets and handle barge-ins while a decode step runs. Several sequences share one
loaded model, each with its own cache. The single worker is also where cross-session batching of
decode steps will go.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from duplex.engine.models import LoadedModel, load_model
from duplex.engine.sequence import SequenceConfig, SharedSequence, Speaker
from duplex.engine.template import TurnTemplate

__all__ = ["Engine"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine:
    """One loaded model + its device worker. Create sequences with :meth:`new_sequence`."""

    def __init__(self, lm: LoadedModel, threads: int | None = None) -> None:
        self.lm = lm
        self.template = TurnTemplate.from_tokenizer(lm.tokenizer)
        self._threads = threads or int(os.environ.get("DUPLEX_TORCH_THREADS", 0)) or (os.cpu_count() or 1)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"duplex-{lm.device.type}", initializer=self._init_worker
        )
        self._closed = False

    def _init_worker(self) -> None:
        if self.lm.device.type == "cpu":
            torch.set_num_threads(self._threads)

    @classmethod
    def load(cls, name_or_path: str | None = None, device: str = "auto", dtype: str = "auto",
             quantize: str | None = "auto") -> Engine:
        return cls(load_model(name_or_path, device=device, dtype=dtype, quantize=quantize))

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    def new_sequence(self, config: SequenceConfig | None = None) -> SharedSequence:
        """An empty sequence sharing this engine's model (no model call yet)."""
        return SharedSequence(self.lm, self.template, config)

    async def start_sequence(self, system_prompt: str | None = None, config: SequenceConfig | None = None) -> SharedSequence:
        """Create a sequence and prefill its system prompt on the worker."""
        seq = SharedSequence(self.lm, self.template, config)
        if system_prompt:
            await self.run(seq.add_message, Speaker.SYSTEM, system_prompt)
        return seq

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the device worker and await its result."""
        if self._closed:
            raise RuntimeError("engine is closed")
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        if not log.isEnabledFor(logging.DEBUG):
            return await loop.run_in_executor(self._executor, call)
        t0 = time.perf_counter()
        result = await loop.run_in_executor(self._executor, call)
        log.debug("engine %s: %.1f ms (incl. queueing)", getattr(fn, "__name__", fn), 1000 * (time.perf_counter() - t0))
        return result

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
