"""Incremental detokenization: never emit half a UTF-8 character, and buffer to word boundaries.

Byte-level BPE splits emoji and CJK characters across several tokens; decoding a prefix gives
U+FFFD. We decode a small window (prefix offset / read offset, as in text-generation-inference)
and hold text back until it no longer ends in a replacement character.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalDetokenizer", "WordBuffer"]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of complete-character text pieces."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD; drop it)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):].rstrip(_REPLACEMENT)

    def reset(self) -> None:
        self._ids.clear()
        self._prefix_offset = self._read_offset = 0


class WordBuffer:
    """Releases text only up to the last whitespace, so each delta ends on a word boundary.

    CJK text has no spaces; a character count limit releases it anyway so it is never stuck.
    """

    def __init__(self, max_pending_chars: int = 24) -> None:
        self._pending = ""
        self._max_pending_chars = max_pending_chars

    @property
    def pending(self) -> str:
        return self._pending

    def push(self, text: str) -> str:
        self._pending += text
        cut = max(self._pending.rfind(" "), self._pending.rfind("\n"))
        if cut <= 0:
            if len(self._pending) >= self._max_pending_chars:
                out, self._pending = self._pending, ""
                return out
            return ""
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
