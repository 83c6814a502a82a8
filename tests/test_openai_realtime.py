"""``/v1/realtime`` driven by the official ``openai`` SDK (``client.realtime.connect``) over loopback.

Tiny random model, fake whisper / VAD / TTS (as in test_server.py). The adapter runs on the same
ServerSession as ``/ws``, so the checks look at that session's sequence too. Timeouts are hang
guards only; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import base64
import wave
from pathlib import Path
from typing import Any

import openai
import pytest

from duplex.audio.fakes import EnergyVad, FakeTts, FakeWhisper
from duplex.engine.sampling import SamplingConfig
from duplex.engine.sequence import Speaker, Status
from duplex.serving.server import DuplexServer
from duplex.session.config import SessionConfig
from tests.fakes import tone_wav

GUARD_S = 60.0


@pytest.fixture()
async def make_server(tiny_engine):
    servers: list[DuplexServer] = []

    async def factory(**kw: Any) -> DuplexServer:
        kw.setdefault("config", SessionConfig(sampling=SamplingConfig(temperature=1.0, max_tokens=40)))
        server = DuplexServer(tiny_engine, **kw)
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


def _client(server: DuplexServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


async def _until(conn: Any, *types: str, seen: list[Any] | None = None) -> list[Any]:
    """Events up to and including the first of ``types`` (appended to ``seen`` if given)."""
    seen = [] if seen is None else seen

    async def run() -> list[Any]:
        while True:
            event = await conn.recv()
            seen.append(event)
            assert event.type != "error" or "error" in types, event.error
            if event.type in types:
                return seen

    return await asyncio.wait_for(run(), GUARD_S)


def _pcm24k(path: Path) -> bytes:
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == 24_000 and w.getnchannels() == 1
        return w.readframes(w.getnframes())


async def _append(conn: Any, pcm: bytes, chunk_ms: int = 40) -> None:
    step = 2 * 24 * chunk_ms
    for i in range(0, len(pcm), step):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())


def _sequence(server: DuplexServer) -> Any:
    (hub,) = server.sessions.values()
    return hub.session.seq


async def test_text_turn(make_server) -> None:
    server = await make_server(tts=FakeTts())
    async with _client(server).realtime.connect(model="gpt-realtime") as conn:
        created = await conn.recv()
        assert created.type == "session.created" and created.session.output_modalities == ["audio"]
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "instructions": "Be brief."})
        updated = (await _until(conn, "session.updated"))[-1]
        assert updated.session.output_modalities == ["text"] and updated.session.instructions == "Be brief."
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Hello there!"}]})
        events = await _until(conn, "conversation.item.done")
        user_item = events[-1].item.id
        await conn.response.create()
        events = await _until(conn, "response.done")
        kinds = [e.type for e in events]
        assert kinds[:4] == ["response.created", "response.output_item.added", "conversation.item.added",
                             "response.content_part.added"]
        assert events[2].previous_item_id == user_item
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert [e.text for e in events if e.type == "response.output_text.done"] == [text]
        done = events[-1].response
        assert done.status in ("completed", "incomplete") and done.output[0].content[0].text == text
        assert "Hello there!" in _sequence(server).text()


async def test_audio_turn_from_a_tone_file(make_server, tmp_path: Path) -> None:
    server = await make_server(tts=FakeTts(chars_per_s=400.0), asr=FakeWhisper(), vad_factory=EnergyVad)
    tone_wav(tmp_path / "tone.wav", 1.6, sample_rate_hz=24_000)
    async with _client(server).realtime.connect(model="gpt-realtime") as conn:
        await _until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "whisper-1"},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500,
                               "prefix_padding_ms": 300}}}})
        await _until(conn, "session.updated")
        await _append(conn, bytes(2 * 24 * 300) + _pcm24k(tmp_path / "tone.wav") + bytes(2 * 24 * 1200))
        events = await _until(conn, "response.done")
        kinds = [e.type for e in events]
        for earlier, later in (("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"),
                               ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed"),
                               ("conversation.item.input_audio_transcription.completed", "response.created"),
                               ("response.created", "response.output_audio.delta")):
            assert kinds.index(earlier) < kinds.index(later), (earlier, later, kinds)
        transcript = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed")
        assert transcript.transcript.startswith("w0 w1")
        audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
        assert audio and len(audio) % 2 == 0
        said = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert events[-1].response.output[0].content[0].transcript == said
        assert kinds.index("response.output_audio.done") < kinds.index("response.done")


async def test_barge_in_with_truncate(make_server, tmp_path: Path) -> None:
    config = SessionConfig(sampling=SamplingConfig(temperature=1.0, max_tokens=160), truncate_wait_ms=60_000)
    server = await make_server(tts=FakeTts(chars_per_s=40.0), asr=FakeWhisper(), vad_factory=EnergyVad, config=config)
    tone_wav(tmp_path / "tone.wav", 1.2, sample_rate_hz=24_000)
    async with _client(server).realtime.connect(model="gpt-realtime") as conn:
        await _until(conn, "session.created")
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Tell me a long story please."}]})
        await conn.response.create()
        events = await _until(conn, "response.output_audio.delta")
        item_id = events[-1].item_id
        await _append(conn, _pcm24k(tmp_path / "tone.wav"))  # the user talks over the agent
        await _until(conn, "input_audio_buffer.speech_started", seen=events)
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=0)
        await _until(conn, "conversation.item.truncated", seen=events)
        done = (await _until(conn, "response.done", seen=events))[-1].response
        assert done.status == "cancelled" and done.status_details.reason == "turn_detected"
        assert done.output[0].content[0].transcript == ""  # nothing had been played
        seq = _sequence(server)  # the cache was rolled back to what was heard: nothing of that reply
        turn = min(s.turn for s in seq.spans() if s.speaker is Speaker.AGENT)
        assert seq.positions(turn, Status.SPOKEN) == seq.positions(turn, Status.UNSPOKEN) == []


async def test_response_create_with_instructions_and_errors(make_server) -> None:
    server = await make_server()
    async with _client(server).realtime.connect(model="gpt-realtime") as conn:
        created = (await _until(conn, "session.created"))[-1]
        assert created.session.output_modalities == ["text"]  # no TTS on this server
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is the capital of France?"}]})
        await conn.response.create(response={"tools": [{"type": "function", "name": "f"}]})
        err = (await _until(conn, "error"))[-1].error
        assert err.param == "response.tools" and err.type == "invalid_request_error"
        await conn.response.create(response={"instructions": "Answer like a pirate.", "metadata": {"k": "v"}})
        done = (await _until(conn, "response.done"))[-1].response
        assert done.metadata == {"k": "v"}
        text = _sequence(server).text()
        assert text.index("Answer like a pirate.") < text.index("What is the capital of France?")
        await conn.send({"type": "no.such.event"})
        assert (await _until(conn, "error"))[-1].error.code == "unknown_event_type"
        await conn.response.create()
        assert (await _until(conn, "error"))[-1].error.code == "no_user_input"
