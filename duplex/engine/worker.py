"""The engine: owns the model and its scheduler; every model call goes through them.

Sessions never touch torch from the event loop. They hand sequence operations to
:meth:`Engine.run` / :meth:`Engine.run_for`, which execute them off the loop, in submission order
per sequence; the loop stays free to read sockets and handle barge-ins while a step runs. Several
sequences share one loaded model, each with its own cache; :mod:`duplex.engine.scheduler` batches
their decode steps into one forward and cuts long prefills into bounded chunks between them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch

from duplex.cpu import SPEECH_STAGES, llm_borrows_cores, stage_threads
from duplex.engine.decode_ahead import DecodeLink, submit_step
from duplex.engine.models import LoadedModel, load_model
from duplex.engine.openmp import release_pool
from duplex.engine.sampling import Sampler
from duplex.engine.scheduler import Scheduler, SchedulerStats
from duplex.engine.sequence import SequenceConfig, SharedSequence, Speaker, Status
from duplex.engine.template import TurnTemplate

__all__ = ["Engine"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# The forward thread gives the GIL back at every torch op and C kernel call (hundreds per forward)
# and must win it back from the event loop each time: with Python's default 5 ms switch interval
# it waits up to that long whenever the loop is busy (8 sessions starting turns at once: a 152-token
# tick took 331 ms in the server, 125 ms alone). At 0.5 ms the same tick took 210 ms.
_SWITCH_INTERVAL_S = 0.0005


def _first_words_tokens() -> int | None:
    """``$DUPLEX_FIRST_WORDS_TOKENS``: a token count, ``off`` (None), or unset (16)."""
    value = os.environ.get("DUPLEX_FIRST_WORDS_TOKENS", "").strip().lower()
    if value in ("off", "none"):
        return None
    try:
        return max(1, int(value)) if value else 16
    except ValueError as exc:
        raise ValueError(f"$DUPLEX_FIRST_WORDS_TOKENS must be a token count or 'off', not {value!r}") from exc


class Engine:
    """One loaded model + its scheduler. Create sequences with :meth:`new_sequence`.

    ``scheduler``: ``batched`` (default; one forward per tick over all sessions), ``chunked``
    (the same fair order, one forward per session) or ``fifo`` (the old single worker), also from
    ``$DUPLEX_SCHEDULER``; ``chunk_tokens``: the prefill tokens per tick (``$DUPLEX_PREFILL_CHUNK``;
    ``$DUPLEX_FIRST_WORDS_TOKENS``: those of a tick while a reply waits for its first words, 16;
    ``off`` for no such limit);
    ``borrow_cores``: with fewer ``threads`` than cores, take them all while no speech stage runs
    (:mod:`duplex.cpu`; ``$DUPLEX_LLM_BORROW_CORES=0`` turns it off too).
    """

    def __init__(self, lm: LoadedModel, threads: int | None = None, scheduler: str | None = None,
                 chunk_tokens: int | None = None, borrow_cores: bool = True) -> None:
        self.lm = lm
        self.template = TurnTemplate.from_tokenizer(lm.tokenizer)
        self._threads = threads or stage_threads("DUPLEX_TORCH_THREADS")  # see duplex.cpu: half the cores
        # a voice engine's share of the cores, and every core while no speech stage runs (duplex.cpu)
        self._borrow = borrow_cores and lm.device.type == "cpu" and llm_borrows_cores(self._threads)
        self._all_threads = os.cpu_count() or 1
        self.scheduler = Scheduler(
            lm.model, mode=scheduler or os.environ.get("DUPLEX_SCHEDULER", "batched"),
            chunk_tokens=chunk_tokens or int(os.environ.get("DUPLEX_PREFILL_CHUNK", "0")) or 64,
            init_thread=self._init_worker, name=f"duplex-{lm.device.type}",
            before_tick=self._tick_threads if self._borrow else None,
            first_words_tokens=_first_words_tokens(),
        )
        self._closed = False
        if lm.device.type == "cpu":
            # this thread (the one that loaded the model) runs no forward from now on: its OpenMP
            # pool must not count against the cores that the scheduler's thread runs them on
            release_pool()
        if sys.getswitchinterval() > _SWITCH_INTERVAL_S:
            sys.setswitchinterval(_SWITCH_INTERVAL_S)

    def _init_worker(self) -> None:
        if self.lm.device.type == "cpu":
            torch.set_num_threads(self._threads)

    def tick_threads(self) -> int:
        """Threads the next tick's forward gets: every core while no speech stage runs, else the
        engine's share (duplex.cpu)."""
        return self._all_threads if self._borrow and SPEECH_STAGES.idle else self._threads

    def _tick_threads(self) -> None:
        """Scheduler hook, on the tick's thread: set its OpenMP team size for this forward."""
        n = self.tick_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    @classmethod
    def load(cls, name_or_path: str | None = None, device: str = "auto", dtype: str = "auto",
             quantize: str | None = "auto", threads: int | None = None, scheduler: str | None = None) -> Engine:
        return cls(load_model(name_or_path, device=device, dtype=dtype, quantize=quantize), threads=threads,
                   scheduler=scheduler)

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def stats(self) -> SchedulerStats:
        return self.scheduler.stats

    def describe(self) -> dict[str, Any]:
        """What runs this engine's forwards (model, format, threads, the C kernels' instruction
        sets), for ``/healthz`` and the benchmarks' JSON: a slow server can then be told apart from
        one that picked a slow kernel at load, as the decode-format probe once did under load."""
        lm = self.lm
        out: dict[str, Any] = {
            "model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
            "quantization": lm.quantization, "threads": self._threads,
            "threads_while_no_speech_stage": self._all_threads if self._borrow else self._threads,
            "scheduler": self.scheduler.mode, "chunk_tokens": self.scheduler.chunk_tokens,
            "first_words_tokens": self.scheduler.first_words_tokens,
        }
        if lm.device.type == "cpu":
            from duplex.engine.attention import attention_isa
            from duplex.engine.int8_kernel import kernel_choice, q16_isa

            out["attention_isa"] = attention_isa()
            if lm.quantization == "int8":
                out["int8_kernel"] = kernel_choice()
                out["int8_isa"] = q16_isa()
        return out

    def new_sequence(self, config: SequenceConfig | None = None) -> SharedSequence:
        """An empty sequence sharing this engine's model (no model call yet); its forwards go
        through the scheduler, so call its methods via :meth:`run_for` (or :meth:`run`)."""
        return SharedSequence(self.lm, self.template, config, runner=self.scheduler)

    async def start_sequence(self, system_prompt: str | None = None, config: SequenceConfig | None = None) -> SharedSequence:
        """Create a sequence and prefill its system prompt (in chunks, between other sessions' steps)."""
        seq = self.new_sequence(config)
        if system_prompt:
            await self.run_for(seq, seq.add_message, Speaker.SYSTEM, system_prompt)
        return seq

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` off the loop and await its result. A bound method of a
        :class:`SharedSequence` runs in that sequence's lane (:meth:`run_for`); anything else in
        one shared lane, in submission order. Code that touches a sequence through some other
        callable must use :meth:`run_for`, or it could interleave with that sequence's steps."""
        owner = getattr(fn, "__self__", None)
        return await self._submit(owner if isinstance(owner, SharedSequence) else None, fn, *args, **kwargs)

    async def run_for(self, seq: SharedSequence | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` after ``seq``'s earlier calls (FIFO per sequence); other sequences' work
        interleaves with it at forward boundaries."""
        return await self._submit(seq, fn, *args, **kwargs)

    async def run_urgent(self, seq: SharedSequence | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """:meth:`run_for` for work a user is waiting on: a reply's hand-over and its steps until
        its first words are out. The scheduler runs it in an express tick, ahead of other
        sessions' streaming (which waits at most that one tick)."""
        return await self._submit(seq, fn, *args, _urgent=True, **kwargs)

    def decode_step(self, seq: SharedSequence, token: int, sampler: Sampler, *, chain: bool,
                    urgent: Callable[[], bool], status: Status = Status.UNSPOKEN) -> DecodeLink:
        """Queue a reply's step: append ``token``, sample the next; with ``chain`` the step queues the
        following one itself (:mod:`duplex.engine.decode_ahead`). ``urgent()``: is the user waiting
        for this step (the reply's first words)? Asked again for each step queued ahead."""
        if self._closed:
            raise RuntimeError("engine is closed")
        return submit_step(self.scheduler, seq, token, sampler, chain=chain, urgent=urgent, status=status)

    async def decode(self, seq: SharedSequence, sampler: Sampler, status: Status = Status.UNSPOKEN) -> int:
        """One decode step: sample the next token and append it; batched with other sessions' steps."""
        return await self.run_for(seq, seq.step, sampler, status)

    async def prefill(self, seq: SharedSequence, ids: Sequence[int], status: Status = Status.COMMITTED) -> None:
        """Append ``ids`` to the open turn; long inputs run in ``chunk_tokens`` pieces between ticks
        that keep other sessions decoding."""
        await self.run_for(seq, seq.append, list(ids), status)

    async def _submit(self, lane: Hashable, fn: Callable[..., T], *args: Any, _urgent: bool = False, **kwargs: Any) -> T:
        if self._closed:
            raise RuntimeError("engine is closed")
        future = asyncio.wrap_future(self.scheduler.submit(lane, fn, *args, urgent=_urgent, **kwargs))
        if not log.isEnabledFor(logging.DEBUG):
            return await future
        t0 = time.perf_counter()
        result = await future
        log.debug("engine %s: %.1f ms (incl. queueing)", getattr(fn, "__name__", fn), 1000 * (time.perf_counter() - t0))
        return result

    def close(self) -> None:
        self._closed = True
        self.scheduler.close()
