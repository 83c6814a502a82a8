"""Map playback progress (samples the listener actually heard) back to agent token indices."""

from __future__ import annotations

import bisect

from .events import TtsChunk

__all__ = ["PlaybackLedger"]


class PlaybackLedger:
    """Queued TtsChunks laid end to end; ``heard_token(played)`` answers barge-in rollback.

    Pure bookkeeping: the transport reports ``played_samples`` (device counter or client mark).
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._chunks: list[TtsChunk] = []
        self._starts: list[int] = []  # cumulative sample where each chunk begins
        self._total = 0

    @property
    def queued_samples(self) -> int:
        return self._total

    def append(self, chunk: TtsChunk) -> None:
        if self._chunks and chunk.sample_rate_hz != self._chunks[0].sample_rate_hz:
            raise ValueError("all chunks in one ledger must share a sample rate")
        self._chunks.append(chunk)
        self._starts.append(self._total)
        self._total += len(chunk.pcm)

    def heard_token(self, played_samples: int) -> int | None:
        """First agent token not fully heard; None when nothing was queued."""
        if not self._chunks:
            return None
        i = max(0, bisect.bisect_right(self._starts, played_samples) - 1)
        # Skip zero-length chunks that start exactly here: they are heard once reached.
        while i + 1 < len(self._chunks) and self._starts[i + 1] <= played_samples:
            i += 1
        return self._chunks[i].token_at(played_samples - self._starts[i])
