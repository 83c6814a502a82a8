"""A virtual loudspeaker: agent audio frames "played" back to back at real time from arrival.

It mirrors the browser's playback worklet (``web/player-worklet.js``): one queue for every turn,
``pause``/``resume`` hold the queue with the position kept, ``stop(turn)`` silences a turn at once
and says exactly how far it was played. Pure and synchronous: every call takes the current time,
so the loopback driver owns the clock and tests need no sleeping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PlayedFrame", "VirtualSpeaker", "heard_tokens"]


@dataclass(slots=True)
class PlayedFrame:
    """One agent audio frame as received (its wire header) and the pieces of it that were played:
    ``pieces`` = (wall start s, first sample, n samples); several when a pause split it."""

    turn: int
    sample_offset: int  # where the frame starts on the turn's audio timeline
    samples: int
    sample_rate_hz: int
    token_start: int
    token_end: int
    text: str
    arrived_t: float
    pcm: np.ndarray = field(repr=False)
    read: int = 0
    pieces: list[tuple[float, int, int]] = field(default_factory=list)

    @classmethod
    def from_header(cls, header: dict[str, Any], pcm16: bytes, t: float) -> PlayedFrame:
        pcm = np.frombuffer(pcm16, dtype="<i2")
        return cls(int(header["turn"]), int(header.get("sample_offset", 0)), len(pcm),
                   int(header.get("sample_rate_hz") or 1), int(header.get("token_start", 0)),
                   int(header.get("token_end", 0)), str(header.get("text", "")), t, pcm)


def heard_tokens(headers: list[dict[str, Any]], pos: int) -> int:
    """First token not yet fully heard at turn position ``pos`` (samples): the page's rule, which
    is the server's ``TtsChunk.token_at`` — token i is heard once playback reaches token i+1."""
    heard = 0
    for h in headers:
        start, n = int(h["sample_offset"]), int(h["samples"])
        if pos >= start + n:
            heard = int(h["token_end"])
            continue
        if pos < start:
            break
        rel = pos - start
        ends = list(h.get("token_offsets_samples") or [0])[1:]
        k = 0
        while k < len(ends) and ends[k] <= rel:
            k += 1
        heard = int(h["token_start"]) + k
        break
    return heard


class VirtualSpeaker:
    """Plays queued frames back to back. The head frame started (or resumed) playing at
    ``_head_t``; everything before it is done. Call :meth:`advance` (or any method) with the
    current time; nothing happens between calls, so results are exact to the sample."""

    def __init__(self) -> None:
        self.frames: list[PlayedFrame] = []  # every frame ever pushed, for the timeline
        self.paused = False
        self.paused_at: float | None = None
        self._queue: deque[PlayedFrame] = deque()
        self._head_t: float | None = None
        self._played: dict[int, int] = {}  # turn -> samples of its timeline played so far

    # ---- queries --------------------------------------------------------------------------
    def pending(self, now: float) -> bool:
        """Audio is queued (playing or held by a pause)."""
        self.advance(now)
        return bool(self._queue)

    def playing_turn(self, now: float) -> int | None:
        """The turn whose audio is audible right now (None when idle or paused)."""
        self.advance(now)
        return self._queue[0].turn if self._queue and self._head_t is not None else None

    def position(self, turn: int, now: float) -> int:
        """Samples of ``turn``'s audio timeline played by ``now``."""
        self.advance(now)
        if self._queue and self._head_t is not None and self._queue[0].turn == turn:
            f = self._queue[0]
            n = min(f.samples - f.read, max(0, round((now - self._head_t) * f.sample_rate_hz)))
            return f.sample_offset + f.read + n
        return self._played.get(turn, 0)

    def queued_end_t(self, now: float) -> float | None:
        """When the queued audio will have finished playing (None when idle or paused)."""
        self.advance(now)
        if not self._queue or self._head_t is None:
            return None
        t = self._head_t
        for f in self._queue:
            t += (f.samples - f.read) / f.sample_rate_hz
        return t

    # ---- commands -------------------------------------------------------------------------
    def advance(self, now: float) -> None:
        """Finish every frame whose end has passed; the next one starts right after it."""
        while self._queue and self._head_t is not None:
            f = self._queue[0]
            end = self._head_t + (f.samples - f.read) / f.sample_rate_hz
            if end > now:
                return
            self._piece(f, self._head_t, f.samples - f.read)
            self._queue.popleft()
            self._head_t = end if self._queue else None

    def push(self, frame: PlayedFrame, now: float) -> None:
        """A frame arrived: it plays after the queued audio, or at once when the speaker is idle."""
        self.advance(now)
        self.frames.append(frame)
        self._queue.append(frame)
        if len(self._queue) == 1 and not self.paused:
            self._head_t = now

    def pause(self, now: float) -> None:
        """Silence now, keep the position (the page does this at the VAD's speech onset)."""
        self.advance(now)
        if self.paused:
            return
        self._cut(now)
        self.paused = True
        self.paused_at = now

    def resume(self, now: float) -> None:
        if not self.paused:
            return
        self.paused = False
        self.paused_at = None
        if self._queue:
            self._head_t = now

    def stop(self, turn: int, now: float) -> int:
        """Drop ``turn``'s audio now (barge-in); returns how far it was played. Like the worklet's
        ``stop``, this also lifts a pause so later turns play."""
        self.advance(now)
        self._cut(now)
        pos = self._played.get(turn, 0)
        self._queue = deque(f for f in self._queue if f.turn != turn)
        self.paused = False
        self.paused_at = None
        self._head_t = now if self._queue else None
        return pos

    def halt(self, turn: int, now: float) -> tuple[int, float, bool]:
        """A barge-in as a listener hears it: :meth:`stop` ``turn`` now. Returns how far it was
        played, when it stopped being heard (audio a pause had silenced stopped back then) and
        whether any of it was still to play."""
        self.advance(now)
        cut = any(f.turn == turn for f in self._queue)
        halted = self.paused_at if self.paused and self.paused_at is not None and cut else now
        return self.stop(turn, now), halted, cut

    def finish(self, until: float) -> None:
        """The episode ends at ``until``: account for the part of the head frame played so far."""
        self.advance(until)
        self._cut(until)

    # ---- internals ------------------------------------------------------------------------
    def _cut(self, now: float) -> None:
        """Stop the head frame at ``now`` (its played part becomes a piece)."""
        if not self._queue or self._head_t is None:
            return
        f = self._queue[0]
        n = min(f.samples - f.read, max(0, round((now - self._head_t) * f.sample_rate_hz)))
        if n:
            self._piece(f, self._head_t, n)
        if f.read >= f.samples:
            self._queue.popleft()
        self._head_t = None

    def _piece(self, f: PlayedFrame, t: float, n: int) -> None:
        f.pieces.append((t, f.read, n))
        f.read += n
        self._played[f.turn] = f.sample_offset + f.read
