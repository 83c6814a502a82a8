"""Incremental detokenization never splits a character and buffers to words."""

from __future__ import annotations

import pytest

from duplex.session.detok import IncrementalDetokenizer, WordBuffer


@pytest.mark.parametrize("text", ["Hello 👋🏽 world 🎉!", "東京は日本の首都です。", "naïve café — ok", "mixed 漢字 and emoji 🤖 end"])
def test_detokenizer_streams_exact_text_without_broken_chars(tiny_lm, text):
    tok = tiny_lm.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert len(ids) > len(text.split())  # multi-token characters really were exercised


def test_word_buffer_releases_whole_words():
    buf = WordBuffer()
    out = [buf.push(p) for p in ["Hel", "lo", " wor", "ld", " and", " more"]]
    assert out == ["", "", "Hello", "", " world", " and"]
    assert buf.flush() == " more"


def test_word_buffer_releases_long_runs_without_spaces():
    buf = WordBuffer(max_pending_chars=4)
    assert buf.push("東京は") == ""
    assert buf.push("日本") == "東京は日本"
