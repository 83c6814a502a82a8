"""Translate mode over a real WebSocket with the tiny random model: typed source streamed word by
word, target text deltas, the turn/item fields, bad input refused with the session left as it was.
Timeouts are hang guards only."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from duplex.engine.sampling import SamplingConfig
from duplex.serving.client import DuplexClient
from duplex.serving.server import DuplexServer
from duplex.session.core import SessionConfig
from duplex.translate.serving import TranslateService

GUARD_S = 60.0


@pytest.fixture()
async def server(tiny_engine):
    srv = DuplexServer(tiny_engine, config=SessionConfig(policy="silence",
                                                         sampling=SamplingConfig(temperature=1.0, max_tokens=20)),
                       translate=TranslateService(engine=tiny_engine, speech=False))
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.close()


async def _until(client: DuplexClient, *types: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    async def run() -> list[dict[str, Any]]:
        async for ev in client.events():
            seen.append(ev)
            if ev["type"] in types:
                return seen
        raise AssertionError(f"closed before {types}: {[e['type'] for e in seen]}")

    return await asyncio.wait_for(run(), GUARD_S)


async def test_translate_typed_source_over_the_websocket(server: DuplexServer) -> None:
    async with DuplexClient(server.ws_url()) as client:
        await client.update_session(mode="translate", source_language="en", target_language="es",
                                    policy="wait-k", k=2)
        updated = (await _until(client, "session.updated", "error"))[-1]
        assert updated["type"] == "session.updated", updated
        assert updated["session"]["mode"] == "translate"
        assert updated["session"]["translate"]["policy"] == "wait-k" and updated["session"]["translate"]["k"] == 2
        for word in ["where", "is", "the", "train"]:
            await client.send_text(word + " ", final=False)
        await client.send_text("station", final=True)
        events = await _until(client, "response.done")
        created = next(e for e in events if e["type"] == "response.created")
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        done = events[-1]
        assert all(d["turn"] == created["turn"] == done["turn"] and d["item_id"] == created["item_id"] for d in deltas)
        assert "".join(d["delta"] for d in deltas) == done["text"]
        # token ranges tile the target, as in chat turns
        assert [d["token_start"] for d in deltas] == [0] + [d["token_end"] for d in deltas[:-1]]
        source = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
        assert source and source[-1]["transcript"] == "where is the train station"
        updates = [e for e in events if e["type"] == "translation.updated"]
        assert updates and updates[-1]["target"] == done["text"].strip()
        # wait-k (k=2) cannot write before the second source word was read
        first_delta = events.index(deltas[0]) if deltas else len(events)
        sources_before = [e["text"] for e in events[:first_delta]
                          if e["type"] == "conversation.item.input_audio_transcription.delta"]
        assert not deltas or len(sources_before[-1].split()) >= 2


async def test_translate_layout_is_a_session_setting(server: DuplexServer) -> None:
    async with DuplexClient(server.ws_url()) as client:
        await client.update_session(mode="translate", policy="wait-k", k=1, layout="interleaved")
        updated = (await _until(client, "session.updated", "error"))[-1]
        assert updated["type"] == "session.updated", updated
        assert updated["session"]["translate"]["layout"] == "interleaved"
        await client.send_text("good ", final=False)
        await client.send_text("morning", final=True)
        events = await _until(client, "response.done")
        deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
        assert "".join(deltas) == events[-1]["text"]
        # a later update that leaves the layout out keeps it; a new value replaces it
        await client.update_session(mode="translate", k=2)
        assert (await _until(client, "session.updated"))[-1]["session"]["translate"]["layout"] == "interleaved"
        await client.update_session(mode="translate", layout="reencode")
        assert (await _until(client, "session.updated"))[-1]["session"]["translate"]["layout"] == "reencode"


async def test_bad_translate_updates_leave_the_session_unchanged(server: DuplexServer) -> None:
    async with DuplexClient(server.ws_url()) as client:
        await client.update_session(mode="translate", source_language="en", target_language="xx")
        err = (await _until(client, "error"))[-1]
        assert err["code"] == "unsupported_language_pair" and "en->es" in err["message"]
        await client.update_session(mode="translate", policy="nope")
        err = (await _until(client, "error"))[-1]
        assert err["code"] == "invalid_policy"
        # still chat: a typed message gets a chat reply
        await client.send_text("hello there", final=True)
        events = await _until(client, "response.done")
        assert not any(e["type"] == "translation.updated" for e in events)
        # translate, then a switch while a sentence is open is refused
        await client.update_session(mode="translate", policy="local-agreement")
        assert (await _until(client, "session.updated"))[-1]["session"]["mode"] == "translate"
        await client.send_text("one two ", final=False)
        await _until(client, "response.created")
        await client.update_session(mode="chat")
        err = (await _until(client, "error"))[-1]
        assert err["code"] == "invalid_state"
        await client.send_text("three", final=True)
        await _until(client, "response.done")
        await client.update_session(mode="chat")
        assert (await _until(client, "session.updated"))[-1]["session"]["mode"] == "chat"


@pytest.mark.skipif(__import__("shutil").which("espeak-ng") is None, reason="needs espeak-ng (scripts/setup.sh)")
async def test_translate_with_audio_output_speaks_the_target_with_espeak(tiny_engine) -> None:
    from duplex.audio.fakes import FakeTts

    from tests.test_translate import FakeTranslation

    class WordForWord(FakeTranslation):
        """word -> WORD, and no guess beyond the source: there are words to speak."""

        def hypothesis(self):  # type: ignore[no-untyped-def]
            self.last = super().hypothesis()[:-1]
            return self.last

    srv = DuplexServer(tiny_engine, config=SessionConfig(policy="silence"), tts=FakeTts(),
                       translate=TranslateService(engine=tiny_engine,
                                                  translator_factory=lambda lm, prompt: WordForWord()))
    await srv.start("127.0.0.1", 0)
    try:
        async with DuplexClient(srv.ws_url()) as client:
            await client.update_session(mode="translate", policy="offline", output_modalities=["text", "audio"])
            updated = (await _until(client, "session.updated", "error"))[-1]
            assert updated["type"] == "session.updated" and updated["session"]["output_modalities"] == ["text", "audio"]
            await client.send_text("where is the station", final=True)
            events = await _until(client, "response.output_audio.done")
            text = next(e for e in events if e["type"] == "response.done")["text"]
            audio = [e for e in events if e["type"] == "response.output_audio.delta"]
            assert text == "WHERE IS THE STATION"
            assert audio and audio[0]["sample_rate_hz"] == 22050  # espeak-ng, not the server's FakeTts
    finally:
        await srv.close()
