"""Every bad input the server must survive: malformed messages, bad audio, oversized frames,
auth, rate limits, slow readers. A bad client gets an error (or its connection closed) while
the server and the other clients carry on."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from duplex.audio.fakes import EnergyVad, FakeWhisper
from duplex.audio.tts import Speech
from duplex.serving.client import DuplexClient, DuplexClientError
from duplex.serving.server import ServerLimits

from test_server import GUARD_S, _config, _deltas, _eventually, _until, make_server  # noqa: F401 - fixture

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


async def _error(client: DuplexClient) -> dict[str, Any]:
    return (await _until(client, "error"))[-1]


async def test_bad_messages_get_error_events_and_the_connection_survives(make_server) -> None:
    server = await make_server(asr=FakeWhisper(), vad_factory=EnergyVad)
    async with DuplexClient(server.ws_url()) as client:
        ws = client._ws  # noqa: SLF001 - raw frames on purpose
        cases: list[tuple[str | bytes, str]] = [
            ("{bad json", "invalid_json"),
            ("[1, 2, 3]", "invalid_event"),
            ('{"no": "type"}', "invalid_event"),
            ('{"type": "does.not.exist"}', "unknown_event_type"),
            ('{"type": "input_text"}', "missing_field"),
            ('{"type": "input_text", "text": 5}', "invalid_value"),
            ('{"type": "input_text", "text": "   "}', "empty_text"),
            (json.dumps({"type": "input_text", "text": "a" * 1_000_000}), "text_too_long"),
            (b"\x00\x01\x02", "invalid_audio"),  # odd byte count: not whole PCM16 samples
            (b"RIFF" + b"\x00" * 40, "invalid_audio"),  # a WAV container instead of raw PCM
            ('{"type": "input_audio_buffer.append", "audio": "not base64!"}', "invalid_audio"),
            ('{"type": "session.update", "session": {"input_audio_format": {"sample_rate_hz": 1000}}}',
             "invalid_audio_format"),
            ('{"type": "session.update", "session": {"output_modalities": ["smell"]}}', "invalid_value"),
            ('{"type": "session.update", "session": {"output_modalities": ["text", "audio"]}}',
             "audio_output_unavailable"),
            ('{"type": "session.update", "session": {"policy": "nonsense"}}', "invalid_policy"),
            ('{"type": "playback.mark", "turn": 1}', "missing_field"),
            ('{"type": "playback.mark", "turn": -4, "heard_tokens": 1}', "invalid_value"),
            ('{"type": "conversation.item.truncate", "item_id": "xyz", "audio_end_ms": 5}', "invalid_value"),
            ('{"type": "session.resume", "session_id": "nope", "resume_token": "x"}', "session_not_found"),
        ]
        for message, code in cases:
            assert ws is not None
            await ws.send(message)
            err = await _error(client)
            assert err["code"] == code, (message[:60], err)
            assert err["error"]["message"]
        # declared 48 kHz stereo: 6 bytes is one and a half frames
        await client.update_session(input_audio_format={"sample_rate_hz": 48000, "channels": 2})
        await _until(client, "session.updated")
        await client.send_audio(b"\x00" * 6)
        assert (await _error(client))["code"] == "invalid_audio"
        await client.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x00" * 8).decode()})
        reply = await client.reply("still there?", timeout=GUARD_S)
        assert isinstance(reply, str)


async def test_audio_without_asr_is_refused_with_an_error(make_server) -> None:
    server = await make_server()
    async with DuplexClient(server.ws_url()) as client:
        await client.send_audio(b"\x00\x00" * 320)
        assert (await _error(client))["code"] == "audio_input_unavailable"


async def test_oversized_message_closes_only_that_connection(make_server) -> None:
    server = await make_server(limits=ServerLimits(max_message_bytes=64 * 1024))
    async with DuplexClient(server.ws_url()) as good:
        async with connect(server.ws_url(), max_size=None) as bad:
            await bad.recv()
            await bad.send(b"\x00" * (128 * 1024))
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(bad.recv(), GUARD_S)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        assert await good.reply("are you fine?", timeout=GUARD_S) is not None


async def test_auth_token_required(make_server) -> None:
    server = await make_server(auth_token="s3cret")
    for url, headers in ((server.ws_url(), None), (server.ws_url() + "?token=wrong", None),
                         (server.ws_url(), {"Authorization": "Bearer nope"})):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers=headers):
                pass
        assert info.value.response.status_code == 401
    with pytest.raises(DuplexClientError):
        await DuplexClient(server.ws_url(), token="wrong").connect()
    async with DuplexClient(server.ws_url(), token="s3cret") as client:  # Authorization: Bearer
        assert client.session_id
    async with connect(server.ws_url() + "?token=s3cret") as ws:  # browsers: query parameter
        assert json.loads(await ws.recv())["type"] == "session.created"


async def test_rate_limit_paces_reads_and_drops_nothing(make_server) -> None:
    server = await make_server(limits=ServerLimits(messages_per_s=20.0, messages_burst=5.0))
    async with DuplexClient(server.ws_url()) as client:
        for i in range(12):
            await client.send({"type": "input_text", "text": f"word{i}", "final": False})
        err = await _error(client)
        assert err["code"] == "rate_limited" and err["error"]["paced"] >= 1
        assert await client.reply("hello again", timeout=GUARD_S) is not None
        hub = server.sessions[client.session_id]
        # every paced message still reached the session, in order
        transcript = hub.session.transcript
        positions = [transcript.find(f"word{i}") for i in range(12)]
        assert all(p >= 0 for p in positions) and positions == sorted(positions)


class BlockTts:
    """Fake TTS: a fixed, large block of audio per clause (500 kB), whatever the text."""

    name = "block"
    sample_rate_hz = 16000

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        return self.synthesize_speech(text).pcm, self.sample_rate_hz

    def synthesize_speech(self, text: str, should_stop: Any = None) -> Speech:
        return Speech((np.sin(np.arange(250_000) * 0.05) * 8000).astype(np.int16), self.sample_rate_hz)


def _small_socket(port: int) -> socket.socket:
    """A client socket with a tiny receive buffer, so an unread socket backs up fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_slow_reader_drops_audio_oldest_first_but_never_text(make_server) -> None:
    limit = 1 << 20
    server = await make_server(tts=BlockTts(), config=_config(max_tokens=160),
                               limits=ServerLimits(max_queued_audio_bytes=limit, send_buffer_bytes=32_768))
    async with connect(server.ws_url(), sock=_small_socket(server.port), max_queue=1, max_size=None) as ws:
        created = json.loads(await ws.recv())
        hub = server.sessions[created["session"]["id"]]
        await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text", "audio"]}}))
        await ws.send(json.dumps({"type": "input_text", "text": "talk for a long time please"}))
        peak = 0

        def dropped_enough() -> bool:
            nonlocal peak
            peak = max(peak, hub.outbox.pending_audio_bytes)
            return hub.outbox.dropped.frames >= 2

        await _eventually(dropped_enough)  # we read nothing meanwhile
        assert peak <= limit
        events: list[dict[str, Any]] = []
        audio_frames = 0

        async def read_all() -> None:
            nonlocal audio_frames
            async for message in ws:
                if isinstance(message, bytes):
                    audio_frames += 1
                    continue
                events.append(json.loads(message))
                if events[-1]["type"] == "response.done":
                    return

        await asyncio.wait_for(read_all(), GUARD_S)
        notices = [e for e in events if e["type"] == "audio.dropped"]
        assert notices and sum(n["frames"] for n in notices) >= 2
        done = events[-1]
        assert _deltas(events, done["turn"]) == done["text"]  # every text delta arrived
        ranges = [(e["token_start"], e["token_end"]) for e in events if e["type"] == "response.output_text.delta"]
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


async def test_text_queue_overflow_closes_the_connection_not_the_server(make_server) -> None:
    server = await make_server(tts=BlockTts(), config=_config(max_tokens=160),
                               limits=ServerLimits(max_queued_audio_bytes=1 << 20, max_queued_events=8,
                                                   send_buffer_bytes=32_768))
    async with connect(server.ws_url(), sock=_small_socket(server.port), max_queue=1, max_size=None) as ws:
        hub = server.sessions[json.loads(await ws.recv())["session"]["id"]]
        await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text", "audio"]}}))
        await ws.send(json.dumps({"type": "input_text", "text": "talk for a long time please"}))
        await _eventually(lambda: hub.closed)  # we read nothing meanwhile
        assert hub.close_reason == "send_queue_overflow" and hub.id not in server.sessions
        assert hub.outbox.pending_events <= 8 + 1  # bounded (+1: the final session.closed notice)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await asyncio.wait_for(ws.recv(), GUARD_S)
        # a reader this stuck may never see the close frame (1008), only the reset
        assert info.value.rcvd is None or info.value.rcvd.code == 1008
    async with DuplexClient(server.ws_url()) as client:
        assert await client.reply("hi", timeout=GUARD_S) is not None


async def test_outbox_drops_oldest_audio_and_never_events() -> None:
    from duplex.serving.outbox import Outbox, OutboxOverflow

    box = Outbox(max_events=3, max_audio_bytes=2500)
    box.put_event({"type": "a"})
    for turn in (1, 2, 3):
        box.put_audio({"turn": turn}, b"\x00" * 1000, turn, 500)
    assert box.pending_audio_bytes <= 2500 and box.dropped.frames == 1
    box.put_event({"type": "b"})
    with pytest.raises(OutboxOverflow):
        box.put_event({"type": "c"})  # a, the audio.dropped notice and b fill the event cap
    out = [box.get_nowait() for _ in range(5)]
    texts = [json.loads(o) for o in out if isinstance(o, str)]
    frames = [o for o in out if isinstance(o, bytes)]
    assert [t["type"] for t in texts] == ["a", "audio.dropped", "b"]
    assert texts[1]["frames"] == 1 and texts[1]["turn"] == 1
    from duplex.serving.protocol import decode_audio_frame

    assert [decode_audio_frame(f)[0]["turn"] for f in frames] == [2, 3]  # the oldest (turn 1) went
    assert box.get_nowait() is None
