"""Virtual time for offline replay: a clock that only the replay driver moves, and an engine
adapter that runs model calls inline and charges their compute to that clock.

``replay-measured`` mode charges each call its measured wall time (the worker is busy that long, and
calls queue behind each other as on the real single device worker); ``ideal`` charges nothing,
which isolates the policy from the hardware and makes replays bit-identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from duplex.session.clock import ManualClock
from duplex.engine.models import LoadedModel
from duplex.engine.sequence import SequenceConfig, SharedSequence, Speaker
from duplex.engine.template import TurnTemplate

__all__ = ["CLOCK_MODES", "StageTimer", "VirtualClock", "VirtualEngine"]

T = TypeVar("T")
CLOCK_MODES = ("ideal", "replay-measured")  # virtual-time replays; ``duplex eval run`` adds "measured" (served)


class VirtualClock(ManualClock):
    """The evaluation's timeline: the shared manual clock, advanced by the replay driver."""


class StageTimer:
    """One pipeline stage as a single worker on the virtual timeline: a job submitted at ``t``
    starts when the worker is free and finishes its (measured or zero) compute time later."""

    def __init__(self, measured: bool) -> None:
        self.measured = measured
        self.busy_until = 0.0
        self.compute_s = 0.0
        self.calls = 0

    def run(self, t: float, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        """Run ``fn`` now (wall time); return its result and the virtual time it is ready."""
        t0 = time.perf_counter()
        result = fn(*args)
        dt = time.perf_counter() - t0
        self.compute_s += dt
        self.calls += 1
        start = max(t, self.busy_until)
        self.busy_until = start + (dt if self.measured else 0.0)
        return result, self.busy_until


class VirtualEngine:
    """Duck-types :class:`duplex.engine.worker.Engine` for a :class:`~duplex.session.core.Session`: the same
    sequence calls, run inline on the caller's thread, finishing on the virtual clock."""

    def __init__(self, lm: LoadedModel, clock: VirtualClock, measured: bool,
                 template: TurnTemplate | None = None) -> None:
        self.lm = lm
        self.template = template or TurnTemplate.from_tokenizer(lm.tokenizer)
        self.clock = clock
        self.stage = StageTimer(measured)

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def calls(self) -> int:
        return self.stage.calls

    def new_sequence(self, config: SequenceConfig | None = None) -> SharedSequence:
        return SharedSequence(self.lm, self.template, config)

    async def start_sequence(self, system_prompt: str | None = None,
                             config: SequenceConfig | None = None) -> SharedSequence:
        seq = SharedSequence(self.lm, self.template, config)
        if system_prompt:
            await self.run(seq.add_message, Speaker.SYSTEM, system_prompt)
        return seq

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result, ready = self.stage.run(self.clock.now(), lambda: fn(*args, **kwargs))
        await self.clock.sleep_until(ready)
        return result

    def close(self) -> None:
        """Nothing to release: there is no worker thread."""
