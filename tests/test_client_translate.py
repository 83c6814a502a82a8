"""``translate()`` in the Python clients, end to end over a real WebSocket with the tiny random
model; and the word-counting end of a translation on hand-made events. Timeouts are hang guards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_translate_server import GUARD_S, server  # noqa: F401, F811 - the fixture: a server with translate mode

from duplex.serving.client import DuplexClient, SyncDuplexClient
from duplex.serving.client_translate import TranslateError, TranslationProgress
from duplex.serving.server import DuplexServer


async def _words(*words: str) -> AsyncIterator[str]:
    for word in words:
        await asyncio.sleep(0.01)  # a live source: words arrive over time
        yield word


class RecordingClient(DuplexClient):
    """Keeps every event ``translate()`` reads, to compare its deltas with the server's record."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.seen: list[dict[str, Any]] = []

    async def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        event = await super().next_event(timeout)
        self.seen.append(event)
        return event


async def test_async_translate_streams_every_sentence_and_ends_after_the_last(server: DuplexServer) -> None:
    async with RecordingClient(server.ws_url()) as client:
        deltas = [d async for d in client.translate("Where is the station? I am lost", policy="wait-k", k=2,
                                                    timeout_s=GUARD_S)]
        seen, client.seen = client.seen, []
        # the same session translates again, from a live (async) source, with another policy
        again = [d async for d in client.translate(_words("good", "morning"), policy="offline", timeout_s=GUARD_S)]
        seen_again = client.seen
    updated = next(e for e in seen if e["type"] == "session.updated")
    assert updated["session"]["mode"] == "translate" and updated["session"]["translate"]["k"] == 2
    # the server split the source at "?": two sentences, each translated, both done before the call ended
    sources = [e["transcript"] for e in seen if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert sources == ["Where is the station?", "I am lost"]
    done = [e for e in seen if e["type"] == "response.done"]
    assert len(done) == 2 and seen[-1] is done[-1]
    assert "".join(deltas) == "".join(e["text"] for e in done)
    assert [e["transcript"] for e in seen_again
            if e["type"] == "conversation.item.input_audio_transcription.completed"] == ["good morning"]
    assert "".join(again) == next(e for e in seen_again if e["type"] == "response.done")["text"]
    assert next(e for e in seen_again if e["type"] == "session.updated")["session"]["translate"]["policy"] == "offline"


async def test_translate_refusal_raises_with_the_code(server: DuplexServer) -> None:
    async with DuplexClient(server.ws_url()) as client:
        with pytest.raises(TranslateError) as info:
            async for _ in client.translate("hola", source_language="en", target_language="xx", timeout_s=GUARD_S):
                pass
        assert info.value.code == "unsupported_language_pair"
        assert client.session is not None
        with pytest.raises(TranslateError) as info:
            async for _ in client.translate("hola", layout="zigzag", timeout_s=GUARD_S):
                pass
        assert info.value.code == "invalid_value" and info.value.param == "session.layout"


async def test_sync_translate_yields_deltas(server: DuplexServer) -> None:
    def robot() -> list[str]:
        with SyncDuplexClient(server.ws_url()) as client:
            return list(client.translate(iter(["see", "you", "tomorrow"]), policy="local-agreement",
                                         layout="interleaved", timeout_s=GUARD_S))

    deltas = await asyncio.wait_for(asyncio.to_thread(robot), GUARD_S * 2)
    assert deltas


def test_progress_ends_when_every_sent_word_is_in_a_done_sentence() -> None:
    progress = TranslationProgress()
    for word in ["Hello.", "Where", "is", "it"]:
        progress.sent(word)
    assert progress.on_event({"type": "response.created", "turn": 2}) is None
    assert progress.on_event({"type": "response.output_text.delta", "turn": 2, "delta": " Hola."}) == " Hola."
    progress.on_event({"type": "conversation.item.input_audio_transcription.completed", "transcript": "Hello."})
    progress.on_event({"type": "response.done", "turn": 2})
    progress.sending = False
    assert not progress.finished  # 3 of the 4 words are not translated yet
    progress.on_event({"type": "response.created", "turn": 4})
    progress.on_event({"type": "conversation.item.input_audio_transcription.completed",
                       "transcript": "Where is it"})
    assert not progress.finished  # the second sentence's translation is still open
    progress.on_event({"type": "error", "code": "rate_limited", "message": "paced"})  # a notice, not a refusal
    progress.on_event({"type": "response.done", "turn": 4})
    assert progress.finished
    with pytest.raises(TranslateError, match="invalid_state"):
        progress.on_event({"type": "error", "code": "invalid_state", "message": "mid-turn"})
