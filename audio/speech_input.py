"""VAD-gated streaming ASR: audio in, speech_started / asr_word / speech_stopped out.

Only audio inside a speech turn (plus prefix padding) ever reaches whisper, so silence and
noise cannot produce hallucinated words. ``SpeechInput`` is sync and I/O-free;
``AsyncSpeechInput`` drives it from its own worker thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .asr import StreamingAsr
from .convert import TARGET_SAMPLE_RATE_HZ
from .events import AsrWord, SpeechStarted, SpeechStopped
from .vad import VadSegmenter

__all__ = ["AsyncSpeechInput", "SpeechEvent", "SpeechInput"]

logger = logging.getLogger(__name__)

SpeechEvent = SpeechStarted | SpeechStopped | AsrWord

_SR = TARGET_SAMPLE_RATE_HZ


@dataclass(frozen=True, slots=True)
class _Feed:
    samples: np.ndarray
    t_s: float


@dataclass(frozen=True, slots=True)
class _Finish:
    pass


class SpeechInput:
    """Sync pipeline VAD -> (gated) StreamingAsr.

    ``push`` = ``segment`` (cheap: VAD, returns turn events at once) + ``recognize`` (whisper
    passes, every ``asr_interval_ms`` of new speech, and a final pass at each turn end).
    """

    def __init__(
        self,
        vad_segmenter: VadSegmenter,
        asr: StreamingAsr,
        asr_interval_ms: int = 1000,
        history_s: float = 3.0,
    ) -> None:
        self.segmenter = vad_segmenter
        self.asr = asr
        self.asr_interval_ms = asr_interval_ms
        self._history_s = max(history_s, vad_segmenter.prefix_padding_s + 2.0)
        self.reset()

    def reset(self) -> None:
        """New stream: stream time restarts at 0 and all turn state is dropped."""
        self.segmenter.reset()
        self.asr.reset()
        self._history = np.zeros(0, dtype=np.float32)
        self._history_start_s = 0.0
        self._in_turn = False
        self._fed_until_s = 0.0
        self._work: list[_Feed | _Finish] = []
        self._unprocessed_s = 0.0  # speech fed since the last whisper pass

    @property
    def t_s(self) -> float:
        """Stream time at the end of the audio pushed so far."""
        return self._history_start_s + len(self._history) / _SR

    def push(self, samples_16k: np.ndarray) -> list[SpeechEvent]:
        """Consume float32 16 kHz mono audio of any length; return events in stream order."""
        return self.segment(samples_16k) + self.recognize()

    def flush(self) -> list[SpeechEvent]:
        """End of stream: close an open turn and commit its words."""
        events: list[SpeechEvent] = []
        for event in self.segmenter.flush():
            events.append(event)
            self._on_event(event)
        return events + self.recognize()

    def segment(self, samples_16k: np.ndarray) -> list[SpeechEvent]:
        """Run the VAD only and queue speech audio for ``recognize``; never calls whisper."""
        samples = np.asarray(samples_16k, dtype=np.float32).reshape(-1)
        self._append_history(samples)
        events: list[SpeechEvent] = list(self.segmenter.push(samples))
        for event in events:
            self._on_event(event)
        if self._in_turn:
            self._feed_until(self.t_s)
        return events

    def recognize(self) -> list[SpeechEvent]:
        """Do the queued whisper work; returns committed and tentative words."""
        events: list[SpeechEvent] = []
        work, self._work = self._work, []
        for item in work:
            if isinstance(item, _Feed):
                self.asr.push(item.samples, t_s=item.t_s)
                self._unprocessed_s += len(item.samples) / _SR
            else:
                events.extend(self.asr.finish())
                self._unprocessed_s = 0.0
        if self._in_turn and self._unprocessed_s * 1000 >= self.asr_interval_ms:
            self._unprocessed_s = 0.0
            events.extend(self.asr.process())
        return events

    # -- internals ----------------------------------------------------------------------

    def _on_event(self, event: SpeechStarted | SpeechStopped) -> None:
        if isinstance(event, SpeechStarted):
            self._in_turn = True
            want_s = event.t_s - self.segmenter.prefix_padding_s
            self._fed_until_s = max(self._history_start_s, want_s)
            missing = int(round((self._fed_until_s - want_s) * _SR))
            if missing > 0:
                # Speech right at stream start: pad with silence so whisper still gets a
                # lead-in (it misreads words that start at the very first sample).
                self._work.append(_Feed(np.zeros(missing, np.float32), self._fed_until_s - missing / _SR))
        else:
            self._feed_until(self.t_s)
            self._in_turn = False
            self._work.append(_Finish())

    def _feed_until(self, end_s: float) -> None:
        i0 = max(0, int(round((self._fed_until_s - self._history_start_s) * _SR)))
        i1 = max(i0, int(round((end_s - self._history_start_s) * _SR)))
        if i1 > i0:
            self._work.append(_Feed(self._history[i0:i1].copy(), self._history_start_s + i0 / _SR))
        self._fed_until_s = self._history_start_s + i1 / _SR

    def _append_history(self, samples: np.ndarray) -> None:
        history = np.concatenate([self._history, samples])
        excess = len(history) - int(self._history_s * _SR)
        if excess > 0:
            history = history[excess:]
            self._history_start_s += excess / _SR
        self._history = history


class _Flush:
    pass


class _Closed:
    pass


class AsyncSpeechInput:
    """Runs a ``SpeechInput`` on one private worker thread; events come out of ``events()``.

    ``push`` never waits for whisper: audio queues up and is coalesced, so a slow pass makes
    the next one bigger instead of stalling the transport. Close with ``aclose()``.
    """

    def __init__(self, pipeline: SpeechInput) -> None:
        self.pipeline = pipeline
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-asr")
        self._inbox: asyncio.Queue[np.ndarray | _Flush] = asyncio.Queue()
        self._outbox: asyncio.Queue[SpeechEvent | _Closed] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncSpeechInput:
        self._ensure_started()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def push(self, samples_16k: np.ndarray) -> None:
        """Queue float32 16 kHz audio; returns at once."""
        self._ensure_started()
        self._inbox.put_nowait(np.asarray(samples_16k, dtype=np.float32).reshape(-1))

    async def flush(self) -> None:
        """Queue an end-of-stream: the open turn is closed and its words committed."""
        self._ensure_started()
        self._inbox.put_nowait(_Flush())

    async def get(self) -> SpeechEvent:
        """Next event; raises ``EOFError`` once closed (or the worker's error if it failed)."""
        item = await self._outbox.get()
        if isinstance(item, _Closed):
            self._outbox.put_nowait(item)  # keep later get() calls failing the same way
            if self._error is not None:
                raise self._error
            raise EOFError("AsyncSpeechInput is closed")
        return item

    async def events(self) -> AsyncIterator[SpeechEvent]:
        """Iterate events until ``aclose()``."""
        while True:
            try:
                yield await self.get()
            except EOFError:
                return

    def __aiter__(self) -> AsyncIterator[SpeechEvent]:
        return self.events()

    async def aclose(self) -> None:
        """Cancel the worker task, release the thread pool, end the event iterators."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        # A whisper pass already running finishes in the background; its result is dropped.
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._outbox.put_nowait(_Closed())

    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError("AsyncSpeechInput is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="speech-input")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch: list[np.ndarray] = []
                flush = False
                item = await self._inbox.get()
                while True:
                    if isinstance(item, _Flush):
                        flush = True
                        break
                    batch.append(item)
                    if self._inbox.empty():
                        break
                    item = self._inbox.get_nowait()
                if batch:
                    audio = np.concatenate(batch)
                    for event in await loop.run_in_executor(self._executor, self.pipeline.segment, audio):
                        self._outbox.put_nowait(event)
                    for event in await loop.run_in_executor(self._executor, self.pipeline.recognize):
                        self._outbox.put_nowait(event)
                if flush:
                    for event in await loop.run_in_executor(self._executor, self.pipeline.flush):
                        self._outbox.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surface worker failures to the consumer, then stop
            logger.exception("speech input worker failed")
            self._error = exc
            self._closed = True
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._outbox.put_nowait(_Closed())
