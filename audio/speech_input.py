"""VAD-gated streaming ASR: audio in, speech_started / asr_word / speech_stopped out.

Only audio inside a speech turn (plus prefix padding) ever reaches whisper, so silence and
noise cannot produce hallucinated words. ``SpeechInput`` is sync and I/O-free;
``AsyncSpeechInput`` drives it from its own worker thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from duplex.cpu import speech_stage
from duplex.tasks import cancel_and_wait

from .asr import StreamingAsr
from .convert import TARGET_SAMPLE_RATE_HZ
from .events import AsrWord, SpeechStarted, SpeechStopped
from .turn_features import TurnAudioFeatures, TurnFeatureTracker
from .vad import VadSegmenter

__all__ = ["AsyncSpeechInput", "SpeechEvent", "SpeechInput", "merge_words"]

logger = logging.getLogger(__name__)

SpeechEvent = SpeechStarted | SpeechStopped | AsrWord

_SR = TARGET_SAMPLE_RATE_HZ


@dataclass(frozen=True, slots=True)
class _Feed:
    samples: np.ndarray
    t_s: float


@dataclass(frozen=True, slots=True)
class _Finish:
    t_s: float = float("nan")  # stream time the turn ended (its SpeechStopped)


class SpeechInput:
    """Sync pipeline VAD -> (gated) StreamingAsr.

    ``push`` = ``segment`` (cheap: VAD, returns turn events at once) + ``recognize`` (whisper
    passes, every ``asr_interval_ms`` of new speech, and a final pass at each turn end).

    ``segment`` and ``recognize`` may run on different threads (``AsyncSpeechInput`` does, so
    turn events never wait behind a whisper pass); a lock guards the hand-over between them.

    Pauses: once the VAD has heard ``skip_pass_after_silence_ms`` of silence, periodic passes
    stop (the final pass redoes that audio anyway); at ``speculate_after_silence_ms`` one pass
    runs ahead of the turn end, and if nothing voiced follows, the turn's final pass reuses it,
    so the final words are ready about when the VAD confirms the end. ``None`` disables either.
    Those two passes skip whisper's word alignment unless ``final_word_times`` (see
    :meth:`StreamingAsr.process`): the turn's last words arrive ~70 ms sooner.

    ``turn_features``: at the start of each pause, :meth:`analyze_turn` (any thread; the async
    driver runs it on its own thread) yields :class:`TurnAudioFeatures` (Smart Turn, prosody, VAD
    history) for the turn policy.
    """

    def __init__(
        self,
        vad_segmenter: VadSegmenter,
        asr: StreamingAsr,
        asr_interval_ms: int = 1000,
        history_s: float = 3.0,
        skip_pass_after_silence_ms: float | None = 100.0,
        speculate_after_silence_ms: float | None = 150.0,
        turn_features: TurnFeatureTracker | None = None,
        final_word_times: bool = False,
    ) -> None:
        self.segmenter = vad_segmenter
        self.turn_features = turn_features
        if turn_features is not None:
            turn_features.attach(vad_segmenter)
        self.asr = asr
        self.asr_interval_ms = asr_interval_ms
        self.skip_pass_after_silence_ms = skip_pass_after_silence_ms
        self.speculate_after_silence_ms = speculate_after_silence_ms
        self.final_word_times = final_word_times
        self._history_s = max(history_s, vad_segmenter.prefix_padding_s + 2.0)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """New stream: stream time restarts at 0 and all turn state is dropped."""
        with self._lock:
            self.segmenter.reset()
            self.asr.reset()
            if self.turn_features is not None:
                self.turn_features.reset()
            self._history = np.zeros(0, dtype=np.float32)
            self._history_start_s = 0.0
            self._in_turn = False
            self._fed_until_s = 0.0
            self._work: list[_Feed | _Finish] = []
            self._unprocessed_s = 0.0  # speech fed since the last whisper pass
            self._speculated_end_s: float | None = None  # last voiced end a speculative pass saw
            self.last_pass_speculative = False  # the latest ``recognize`` ran a speculative pass
            self._finalized_until_s = float("-inf")

    @property
    def t_s(self) -> float:
        """Stream time at the end of the audio pushed so far."""
        return self._history_start_s + len(self._history) / _SR

    @property
    def finalized_until_s(self) -> float:
        """End time (``SpeechStopped.t_s``) of the latest turn whose final pass has been done."""
        return self._finalized_until_s

    def push(self, samples_16k: np.ndarray) -> list[SpeechEvent]:
        """Consume float32 16 kHz mono audio of any length; return events in stream order."""
        return self.segment(samples_16k) + self.recognize()

    def flush(self) -> list[SpeechEvent]:
        """End of stream: close an open turn and commit its words."""
        return self.close_turn() + self.recognize()

    def close_turn(self) -> list[SpeechEvent]:
        """The VAD half of ``flush``: end an open turn now; its final pass is left to ``recognize``."""
        with self._lock:
            events: list[SpeechEvent] = list(self.segmenter.flush())
            for event in events:
                self._on_event(event)
        return events

    def segment(self, samples_16k: np.ndarray) -> list[SpeechEvent]:
        """Run the VAD only and queue speech audio for ``recognize``; never calls whisper."""
        samples = np.asarray(samples_16k, dtype=np.float32).reshape(-1)
        with self._lock:
            self._append_history(samples)
            events: list[SpeechEvent] = list(self.segmenter.push(samples))
            for event in events:
                self._on_event(event)
            if self._in_turn:
                self._feed_until(self.t_s)
            if self.turn_features is not None:
                self.turn_features.push(samples, list(events), self.segmenter.last_voiced_end_s,
                                        self.segmenter.trailing_silence_ms)
        return events

    def turn_analysis_due(self) -> bool:
        """A pause has started that :meth:`analyze_turn` has not described yet."""
        with self._lock:
            return self.turn_features is not None and self.turn_features.due()

    def analyze_turn(self) -> list[TurnAudioFeatures]:
        """Acoustic end-of-turn features of the pause that just started (empty if none is due).
        Only the snapshot holds the lock; the model runs outside it."""
        tracker = self.turn_features
        if tracker is None:
            return []
        with self._lock:
            snap = tracker.snapshot()
        return [] if snap is None else [tracker.analyze(snap)]

    def recognize(self) -> list[SpeechEvent]:
        """Do the queued whisper work; returns committed and tentative words."""
        with self._lock:
            work, self._work = self._work, []
            in_turn = self._in_turn
            silence_ms = self.segmenter.trailing_silence_ms
            voiced_end_s = self.segmenter.last_voiced_end_s
        events: list[SpeechEvent] = []
        self.last_pass_speculative = False
        for item in work:
            if isinstance(item, _Feed):
                self.asr.push(item.samples, t_s=item.t_s)
                self._unprocessed_s += len(item.samples) / _SR
            else:
                spec = self._speculated_end_s
                reuse = spec is not None and abs(spec - item.t_s) < 1e-6
                logger.debug("final pass for the turn ending at %.2f s (%s)", item.t_s,
                             "reusing the speculative pass" if reuse else "new pass")
                events.extend(self.asr.finish(reuse_last_pass=reuse, word_times=self.final_word_times))
                self._unprocessed_s = 0.0
                self._speculated_end_s = None
                if item.t_s == item.t_s:  # not NaN
                    self._finalized_until_s = max(self._finalized_until_s, item.t_s)
        if not in_turn:
            return events
        speculate = self.speculate_after_silence_ms
        skip = self.skip_pass_after_silence_ms
        if (speculate is not None and silence_ms >= speculate and self.asr.has_new_audio
                and self._speculated_end_s != voiced_end_s):
            # A pause: run the final pass now; the turn end reuses it if only silence follows.
            logger.debug("speculative pass after %.0f ms of silence (voiced end %.2f s)", silence_ms, voiced_end_s)
            self._speculated_end_s = voiced_end_s
            self._unprocessed_s = 0.0
            self.last_pass_speculative = True
            events.extend(self.asr.process(word_times=self.final_word_times))
        elif self._unprocessed_s * 1000 >= self.asr_interval_ms and (skip is None or silence_ms < skip):
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
            self._work.append(_Finish(event.t_s))

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


TURN_THREAD_NICE = 10


def _below_the_turn_end_path() -> None:
    """The turn-feature thread's initializer: Smart Turn and prosody start with every pause, beside
    whisper's turn-end pass and the reply's decode, and on 2 cores they had delayed that pass's
    words (0.35-0.66 s after the end of speech with the learned policy, 0.25-0.30 s without the
    features). Linux threads take their own nice value, so this thread runs only on what they leave."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TURN_THREAD_NICE)


class AsyncSpeechInput:
    """Drives a ``SpeechInput``: the VAD on the event loop, whisper on one private worker thread.

    Two tasks, so turn events are never late: the VAD task segments each pushed block at once
    (``segment`` is cheap) and emits SpeechStarted/SpeechStopped immediately, even while a
    whisper pass is running; the ASR task runs ``recognize`` on the worker thread whenever new
    work is queued. ``push`` never waits for whisper: audio queues up and is coalesced, so a
    slow pass makes the next one bigger instead of stalling the transport. Words of a turn may
    therefore arrive after a later SpeechStarted (their times say which turn they belong to).
    Close with ``aclose()``.
    """

    def __init__(self, pipeline: SpeechInput, max_queued_blocks: int = 512, executor: Executor | None = None,
                 turn_executor: Executor | None = None) -> None:
        self.pipeline = pipeline
        # ``executor``/``turn_executor``: where whisper and the turn features run (default: a private
        # thread each); the evaluation's simulated clock passes executors on its virtual timeline
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-asr")
        # bounded: past it push() waits (the transport stops reading), it never drops audio
        self._inbox: asyncio.Queue[np.ndarray | _Flush] = asyncio.Queue(max_queued_blocks)
        self._outbox: asyncio.Queue[SpeechEvent | TurnAudioFeatures | _Closed] = asyncio.Queue()
        self._asr_wake = asyncio.Event()
        self._asr_flush = False  # the pipeline has no close_turn(): run its flush() on the worker
        self._tasks: list[asyncio.Task[None]] = []
        self._turn_executor: Executor | None = turn_executor  # turn features, beside whisper
        self._turn_task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncSpeechInput:
        self._ensure_started()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def push(self, samples_16k: np.ndarray) -> None:
        """Queue float32 16 kHz audio; returns at once unless ``max_queued_blocks`` wait (then it
        waits for the VAD task: backpressure, never loss)."""
        self._ensure_started()
        await self._inbox.put(np.asarray(samples_16k, dtype=np.float32).reshape(-1))

    async def flush(self) -> None:
        """Queue an end-of-stream: the open turn is closed and its words committed."""
        self._ensure_started()
        await self._inbox.put(_Flush())

    async def get(self) -> SpeechEvent | TurnAudioFeatures:
        """Next event; raises ``EOFError`` once closed (or the worker's error if it failed)."""
        item = await self._outbox.get()
        if isinstance(item, _Closed):
            self._outbox.put_nowait(item)  # keep later get() calls failing the same way
            if self._error is not None:
                raise self._error
            raise EOFError("AsyncSpeechInput is closed")
        return item

    async def events(self) -> AsyncIterator[SpeechEvent | TurnAudioFeatures]:
        """Iterate events until ``aclose()``."""
        while True:
            try:
                yield await self.get()
            except EOFError:
                return

    def __aiter__(self) -> AsyncIterator[SpeechEvent | TurnAudioFeatures]:
        return self.events()

    async def aclose(self) -> None:
        """Cancel the worker tasks, release the thread pool, end the event iterators."""
        if self._closed:
            return
        self._closed = True
        await self._cancel_tasks()
        # A whisper pass already running finishes in the background; its result is dropped.
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._turn_executor is not None:
            self._turn_executor.shutdown(wait=False, cancel_futures=True)
        self._outbox.put_nowait(_Closed())

    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError("AsyncSpeechInput is closed")
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._run(), name="speech-input-vad"),
                           loop.create_task(self._run_asr(), name="speech-input-asr")]

    async def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        await cancel_and_wait(*(t for t in [*self._tasks, self._turn_task] if t is not current),
                              what="speech input worker")  # a failure already went through _fail

    def _fail(self, exc: Exception) -> None:
        logger.error("speech input worker failed", exc_info=exc)
        if self._closed:
            return
        self._error = exc
        self._closed = True
        for task in [*self._tasks, self._turn_task]:
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._turn_executor is not None:
            self._turn_executor.shutdown(wait=False, cancel_futures=True)
        self._outbox.put_nowait(_Closed())

    async def _run(self) -> None:
        """VAD task: segment every block as it arrives (cheap, on the loop), wake the ASR task."""
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
                    for event in self.pipeline.segment(np.concatenate(batch)):
                        self._outbox.put_nowait(event)
                    self._maybe_analyze_turn()
                if flush:
                    close_turn = getattr(self.pipeline, "close_turn", None)
                    if close_turn is None:
                        self._asr_flush = True
                    else:
                        for event in close_turn():
                            self._outbox.put_nowait(event)
                self._asr_wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surface failures to the consumer, then stop
            self._fail(exc)

    def analyze_turn_if_due(self) -> None:
        """Check now (not at the next audio block) whether a pause wants its turn features: the
        consumer calls this when its own reason to want them starts (on the event loop)."""
        if self._tasks and not self._closed:
            self._maybe_analyze_turn()

    def _maybe_analyze_turn(self) -> None:
        """A pause just started: compute its turn features on their own thread, so neither the
        loop nor the whisper pass of the same pause waits for them."""
        due = getattr(self.pipeline, "turn_analysis_due", None)
        if due is None or (self._turn_task is not None and not self._turn_task.done()) or not due():
            return
        self._turn_task = asyncio.get_running_loop().create_task(self._analyze_turn(), name="speech-input-turn")

    async def _analyze_turn(self) -> None:
        if self._turn_executor is None:
            self._turn_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-turn",
                                                     initializer=_below_the_turn_end_path)
        try:
            events = await asyncio.get_running_loop().run_in_executor(self._turn_executor,
                                                                      speech_stage(self.pipeline.analyze_turn))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the features are advisory: the speech input goes on without them
            logger.exception("turn feature analysis failed")
            return
        for event in events:
            self._outbox.put_nowait(event)

    async def _run_asr(self) -> None:
        """ASR task: run the queued whisper work on the worker thread, one batch at a time."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._asr_wake.wait()
                self._asr_wake.clear()
                work = self.pipeline.recognize
                if self._asr_flush:
                    self._asr_flush = False
                    work = self.pipeline.flush
                for event in await loop.run_in_executor(self._executor, speech_stage(work)):
                    self._outbox.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)


def merge_words(events: list[SpeechEvent]) -> list[SpeechEvent]:
    """Consecutive words with the same ``committed`` flag become one phrase, so a whisper pass is
    prefilled in one forward step rather than one per word."""
    out: list[SpeechEvent] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, AsrWord) and isinstance(prev, AsrWord) and prev.committed == ev.committed:
            n1, n2 = len(prev.text.split()), len(ev.text.split())
            prob = (prev.probability * n1 + ev.probability * n2) / max(1, n1 + n2)  # the words' mean
            out[-1] = AsrWord(f"{prev.text} {ev.text}", prev.start_s, ev.end_s, ev.committed, round(prob, 3))
        else:
            out.append(ev)
    return out
