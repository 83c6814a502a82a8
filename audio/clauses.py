"""Group streamed agent text deltas into clauses: the unit TTS speaks with natural prosody.

Cuts only between deltas, so every clause covers a whole span of agent tokens and the audio
of each clause maps back to exact token indices.
"""

from __future__ import annotations

import re

from .events import Clause

__all__ = ["ClauseChunker"]

_SPEAKABLE = re.compile(r"\w")
# Always a boundary: nothing numeric uses them mid-word.
_HARD = frozenset("?!;\n")
# Boundary only when followed by whitespace ("3.5", "1,000" and "10:30" are not cut).
_SOFT = frozenset(".,:")


class ClauseChunker:
    """Buffers ``(text_delta, token_start, token_end)`` and releases complete clauses.

    A clause ends at . , ; : ? ! or a newline, or after ``max_words`` words
    (``first_max_words`` for the first clause of a reply, so audio starts sooner).

    ``word_deltas``: every delta ends on a word boundary (the session's ``AgentTextDelta`` do,
    see ``duplex.session.detok.WordBuffer``), so a clause is cut the moment it has its word quota;
    otherwise the chunker must see the next word start before it knows the last one is whole,
    which costs one more decoded word before the first audio.
    """

    def __init__(self, max_words: int = 14, first_max_words: int | None = 8,
                 word_deltas: bool = False) -> None:
        if max_words < 1:
            raise ValueError("max_words must be >= 1")
        self.max_words = max_words
        self.first_max_words = first_max_words
        self.word_deltas = word_deltas
        self.clear()

    def clear(self) -> None:
        """Drop pending text (cancel / barge-in); the next clause counts as a first one."""
        self._pieces: list[tuple[str, int, int]] = []
        self._first = True

    @property
    def pending_text(self) -> str:
        return "".join(p[0] for p in self._pieces)

    def push(self, text_delta: str, token_start: int, token_end: int) -> list[Clause]:
        """Add the text of agent tokens [token_start, token_end); return finished clauses."""
        if token_end < token_start:
            raise ValueError(f"token_end {token_end} < token_start {token_start}")
        if self._pieces and token_start != self._pieces[-1][2]:
            raise ValueError(
                f"non-contiguous tokens: got {token_start}, expected {self._pieces[-1][2]} "
                "(call clear() after a rollback)"
            )
        if token_end == token_start and not text_delta:
            return []
        self._pieces.append((text_delta, token_start, token_end))
        clauses: list[Clause] = []
        while (cut := self._find_cut()) is not None:
            clauses.append(self._emit(cut))
        return clauses

    def flush(self) -> list[Clause]:
        """End of the agent turn: release whatever is pending as one last clause."""
        if not self._pieces:
            return []
        clause = self._emit(len(self._pieces))
        self._first = True
        return [clause]

    def _find_cut(self) -> int | None:
        """Number of pending pieces that form a complete clause, or None."""
        text = self.pending_text
        ends = []  # char offset where each piece ends
        n = 0
        for piece in self._pieces:
            n += len(piece[0])
            ends.append(n)
        for k, ch in enumerate(text):
            boundary = ch in _HARD or (ch in _SOFT and k + 1 < len(text) and text[k + 1].isspace())
            if boundary and _SPEAKABLE.search(text, 0, k + 1):
                cut = next(i for i, end in enumerate(ends) if end >= k + 1) + 1
                return cut
        limit = self.first_max_words if self._first and self.first_max_words else self.max_words
        n_words = len(text.split())
        if self.word_deltas and n_words == limit and _SPEAKABLE.search(text):
            return len(self._pieces)  # the last delta ended a word: the quota is complete
        if n_words <= limit:
            return None
        # Too long without punctuation: cut at the last piece boundary that is a word boundary.
        for i in range(len(self._pieces) - 1, 0, -1):
            nxt = self._pieces[i][0]
            if nxt[:1].isspace() and _SPEAKABLE.search(text, 0, ends[i - 1]):
                return i
        return None

    def _emit(self, n_pieces: int) -> Clause:
        pieces, self._pieces = self._pieces[:n_pieces], self._pieces[n_pieces:]
        offsets: list[int] = []
        pos = 0
        for text, start, end in pieces:
            n_tokens = end - start
            # Several tokens in one delta (e.g. a multi-byte character): spread evenly.
            offsets.extend(pos + (len(text) * j) // n_tokens for j in range(n_tokens))
            pos += len(text)
        self._first = False
        return Clause(
            text="".join(p[0] for p in pieces),
            token_start=pieces[0][1],
            token_end=pieces[-1][2],
            token_char_offsets=tuple(offsets),
        )
