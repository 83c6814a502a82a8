"""Bounded outgoing queue and token-bucket rate limiter for one server session / connection.

The outbox is where backpressure is decided. Agent audio to a slow reader is dropped oldest-first
(with a coalesced ``audio.dropped`` notice); JSON events are never dropped: past a hard cap the
outbox reports an overflow and the server closes that connection instead of growing memory.
Sent events stay in a small replay ring so a resumed client can ask for what it missed.
"""

from __future__ import annotations

import asyncio
import collections
import json
from dataclasses import dataclass, field
from typing import Any

from duplex.serving.protocol import encode_audio_frame

__all__ = ["Outbox", "OutboxOverflow", "TokenBucket"]


class OutboxOverflow(RuntimeError):
    """Too many unsent JSON events: the reader is too slow (or gone for too long)."""


@dataclass(slots=True)
class _Item:
    seq: int
    event: dict[str, Any] | None = None  # JSON event (serialized when sent)
    frame: bytes | None = None  # encoded audio frame
    turn: int = -1
    samples: int = 0


@dataclass(slots=True)
class TokenBucket:
    """Classic token bucket: ``rate`` tokens per second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float = -1.0
    t: float | None = None

    def take(self, n: float, now: float) -> bool:
        self._refill(now)
        if n > self.tokens:
            return False
        self.tokens -= n
        return True

    def wait_s(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens are available (0 when they are now)."""
        self._refill(now)
        return max(0.0, (min(n, self.burst) - self.tokens) / self.rate) if self.rate > 0 else 0.0

    def _refill(self, now: float) -> None:
        if self.tokens < 0:
            self.tokens = self.burst
        if self.t is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now


@dataclass(slots=True)
class _DropStats:
    frames: int = 0
    samples: int = 0
    bytes: int = 0
    turns: set[int] = field(default_factory=set)


class Outbox:
    """FIFO of JSON events and audio frames with separate bounds; one consumer at a time."""

    def __init__(self, max_events: int = 4096, max_audio_bytes: int = 2 << 20, replay_events: int = 512) -> None:
        self.max_events = max_events
        self.max_audio_bytes = max_audio_bytes
        self._items: collections.deque[_Item] = collections.deque()
        self._n_events = 0
        self._audio_bytes = 0
        self._seq = 0
        self._ready = asyncio.Event()
        self._notice: dict[str, Any] | None = None  # a queued, not yet sent audio.dropped notice
        self._sent: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(1, replay_events))
        self._evicted_seq = 0  # highest seq that fell out of the replay ring
        self._empty = asyncio.Event()
        self._empty.set()
        self.dropped = _DropStats()
        self.overflowed = False

    # ---- producer side -------------------------------------------------------------------
    @property
    def pending_events(self) -> int:
        return self._n_events

    @property
    def pending_audio_bytes(self) -> int:
        return self._audio_bytes

    @property
    def last_seq(self) -> int:
        return self._seq

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def put_event(self, event: dict[str, Any]) -> int:
        """Queue a JSON event (gets ``seq``); raises :class:`OutboxOverflow` past the hard cap."""
        if self._n_events >= self.max_events:
            self.overflowed = True
            raise OutboxOverflow(f"{self._n_events} unsent events (cap {self.max_events})")
        seq = self._next_seq()
        event = {**event, "seq": seq}
        self._items.append(_Item(seq, event=event))
        self._n_events += 1
        self._wake()
        return seq

    def put_audio(self, header: dict[str, Any], pcm16: bytes, turn: int, samples: int) -> None:
        """Queue an audio frame; drops the oldest queued audio first when over the byte bound."""
        seq = self._next_seq()
        frame = encode_audio_frame({**header, "seq": seq}, pcm16)
        while self._audio_bytes + len(frame) > self.max_audio_bytes and self._drop_oldest_audio():
            pass
        if len(frame) > self.max_audio_bytes:
            self._count_drop(turn, samples, len(frame))
            return
        self._items.append(_Item(seq, frame=frame, turn=turn, samples=samples))
        self._audio_bytes += len(frame)
        self._wake()

    def purge_audio(self, turn: int) -> int:
        """Forget queued audio of ``turn`` (it was interrupted: nobody will play it)."""
        keep = collections.deque(i for i in self._items if i.frame is None or i.turn != turn)
        removed = len(self._items) - len(keep)
        self._audio_bytes = sum(len(i.frame) for i in keep if i.frame is not None)
        self._items = keep
        return removed

    def _wake(self) -> None:
        self._ready.set()
        self._empty.clear()

    def _drop_oldest_audio(self) -> bool:
        for i, item in enumerate(self._items):
            if item.frame is not None:
                del self._items[i]
                self._audio_bytes -= len(item.frame)
                self._count_drop(item.turn, item.samples, len(item.frame))
                return True
        return False

    def _count_drop(self, turn: int, samples: int, n_bytes: int) -> None:
        self.dropped.frames += 1
        self.dropped.samples += samples
        self.dropped.bytes += n_bytes
        self.dropped.turns.add(turn)
        if self._notice is None:
            seq = self._next_seq()
            self._notice = {"type": "audio.dropped", "turn": turn, "frames": 0, "samples": 0, "seq": seq}
            self._items.append(_Item(seq, event=self._notice))
            self._n_events += 1
            self._wake()
        self._notice["frames"] += 1
        self._notice["samples"] += samples
        self._notice["turn"] = turn

    # ---- consumer side -------------------------------------------------------------------
    def get_nowait(self) -> str | bytes | None:
        if not self._items:
            self._ready.clear()
            self._empty.set()
            return None
        item = self._items.popleft()
        if item.frame is not None:
            self._audio_bytes -= len(item.frame)
            return item.frame
        assert item.event is not None
        self._n_events -= 1
        if item.event is self._notice:
            self._notice = None
        if len(self._sent) == self._sent.maxlen:
            self._evicted_seq = self._sent[0]["seq"]
        self._sent.append(item.event)
        return json.dumps(item.event, separators=(",", ":"), ensure_ascii=False)

    async def get(self) -> str | bytes:
        while True:
            out = self.get_nowait()
            if out is not None:
                return out
            await self._ready.wait()

    async def drained(self) -> None:
        """Wait until the consumer has taken everything queued so far."""
        while self._items:
            await self._empty.wait()

    def replay_after(self, last_seq: int) -> tuple[list[str], bool]:
        """Sent events with ``seq > last_seq`` still in the ring; False if some fell out of it."""
        events = [e for e in self._sent if e["seq"] > last_seq]
        complete = self._evicted_seq <= last_seq
        return [json.dumps(e, separators=(",", ":"), ensure_ascii=False) for e in events], complete
