"""Hostile and unlucky clients over a real socket (issue 14): capacity and detached-session caps,
the Origin allow-list, validation errors that name the field and the limit, instructions updates
that wait for a turn boundary, and input audio beyond the rate limit paced rather than dropped.
Timeouts are hang guards only; nothing asserts on time."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from duplex.audio.fakes import EnergyVad, FakeWhisper
from duplex.serving.admission import Admission, default_max_sessions
from duplex.serving.client import DuplexClient
from duplex.serving.origin import OriginPolicy
from duplex.serving.server import ServerLimits

from test_server import GUARD_S, _eventually, _until, make_server  # noqa: F401 - fixture

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


async def _error(client: DuplexClient) -> dict[str, Any]:
    return (await _until(client, "error"))[-1]


# ---- capacity --------------------------------------------------------------------------------
def test_admission_defaults_and_detached_order() -> None:
    assert default_max_sessions(cpu_count=2, memory_bytes=64 << 30) == 8
    assert default_max_sessions(cpu_count=64, memory_bytes=1 << 30) == 4  # memory-bound
    assert default_max_sessions(cpu_count=1, memory_bytes=1 << 20) == 1
    adm = Admission.from_limits(4, None)
    assert adm.max_detached == 2 and adm.admits(3) and not adm.admits(4)
    assert adm.over_detached([("c", 3.0), ("a", 1.0), ("b", 2.0)]) == ["a"]
    with pytest.raises(ValueError):
        Admission.from_limits(0, None)


async def test_over_capacity_a_new_connection_gets_server_busy_and_a_close(make_server) -> None:
    server = await make_server(limits=ServerLimits(max_sessions=2, max_detached_sessions=2))
    live = DuplexClient(server.ws_url())
    await live.connect()
    gone = DuplexClient(server.ws_url())
    await gone.connect()
    gone._ws.transport.abort()  # noqa: SLF001 - a network drop: the session stays, detached
    await _eventually(lambda: server.sessions[gone.session_id].owner is None)
    async with connect(server.ws_url()) as ws:  # detached sessions count toward the limit
        first = json.loads(await asyncio.wait_for(ws.recv(), GUARD_S))
        assert first["type"] == "error" and first["code"] == "server_busy"
        assert "max_sessions" in first["message"] and "2" in first["message"]
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), GUARD_S)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1013
    assert len(server.sessions) == 2
    assert await live.reply("still fine?", timeout=GUARD_S) is not None  # the others carry on
    await gone.resume()  # a resume needs no new slot
    await gone.close()
    await _eventually(lambda: len(server.sessions) == 1)
    async with DuplexClient(server.ws_url()) as third:  # room again
        assert third.session_id
    await live.close()


def test_the_kv_budget_caps_sessions_at_their_context_window() -> None:
    from duplex.engine.kv import kv_bytes_per_token
    from duplex.engine.models import load_model

    config = load_model("tiny", device="cpu", dtype="float32").model.config
    # 2 layers x (keys + values) x 2 KV heads x 16 dims x 4 bytes
    assert kv_bytes_per_token(config, __import__("torch").float32) == 2 * 2 * 2 * 16 * 4
    adm = Admission.from_limits(8, None, max_kv_bytes=300 << 20, kv_bytes_per_session=100 << 20)
    assert adm.admits(2) and not adm.admits(3)  # the 4th session would need 400 MiB
    assert adm.limit_hit(3) == "max_kv_mb" and adm.limit_hit(8) == "max_sessions"
    assert "max_kv_mb" in adm.busy_message(3) and "300 MiB" in adm.busy_message(3)
    with pytest.raises(ValueError, match="max_kv_mb"):  # not even one session fits
        Admission.from_limits(8, None, max_kv_bytes=50 << 20, kv_bytes_per_session=100 << 20)


async def test_a_session_over_the_kv_budget_is_refused_naming_max_kv_mb(make_server) -> None:
    probe = await make_server()
    per_session = probe.admission.kv_bytes_per_session
    assert per_session > 0
    server = await make_server(limits=ServerLimits(max_kv_mb=1.5 * per_session / 2**20))
    async with DuplexClient(server.ws_url()) as first:
        async with connect(server.ws_url()) as ws:
            refused = json.loads(await asyncio.wait_for(ws.recv(), GUARD_S))
            assert refused["type"] == "error" and refused["code"] == "server_busy"
            assert refused["error"]["limit"] == "max_kv_mb" and "max_kv_mb" in refused["message"]
        assert await first.reply("still fine?", timeout=GUARD_S) is not None


async def test_detached_sessions_are_capped_oldest_first(make_server) -> None:
    server = await make_server(limits=ServerLimits(max_sessions=8, max_detached_sessions=1))
    ids = []
    for _ in range(2):
        client = DuplexClient(server.ws_url())
        await client.connect()
        ids.append(client.session_id)
        client._ws.transport.abort()  # noqa: SLF001
        await _eventually(lambda: client.session_id not in server.sessions
                          or server.sessions[client.session_id].owner is None)
    await _eventually(lambda: ids[0] not in server.sessions)
    assert ids[1] in server.sessions and server.sessions[ids[1]].owner is None


# ---- origin ----------------------------------------------------------------------------------
def test_origin_policy() -> None:
    policy = OriginPolicy(["https://app.example.com"])
    assert policy.allows(None, "127.0.0.1:8765")  # not a browser
    assert policy.allows("https://app.example.com", "duplex.internal:8765")
    assert policy.allows("http://localhost:5173", "127.0.0.1:8765")
    assert policy.allows("http://[::1]:8000", None)
    assert policy.allows("https://chat.example.org", "chat.example.org")  # same origin behind a TLS proxy
    assert policy.allows("http://10.0.0.5:8765", "10.0.0.5:8765")
    assert not policy.allows("http://10.0.0.5:9999", "10.0.0.5:8765")
    assert not policy.allows("https://evil.example", "127.0.0.1:8765")
    assert not policy.allows("null", "127.0.0.1:8765")
    assert OriginPolicy(["*"]).allows("https://evil.example", None)
    with pytest.raises(ValueError):
        OriginPolicy(["not an origin"])


async def test_origin_allow_list_on_the_upgrade(make_server) -> None:
    server = await make_server(allowed_origins=["https://app.example.com"])
    with pytest.raises(InvalidStatus) as info:
        async with connect(server.ws_url(), origin="https://evil.example"):
            pass
    assert info.value.response.status_code == 403
    for origin in ("https://app.example.com", f"http://127.0.0.1:{server.port}", "http://localhost:3000", None):
        async with connect(server.ws_url(), origin=origin) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"


# ---- validation over the wire ------------------------------------------------------------------
async def test_bad_values_get_errors_that_name_the_field(make_server) -> None:
    server = await make_server()
    async with DuplexClient(server.ws_url()) as client:
        ws = client._ws  # noqa: SLF001 - raw frames on purpose
        assert ws is not None
        cases = [
            ('{"type": "session.update", "session": {"temperature": -1}}', "invalid_value", "temperature"),
            ('{"type": "session.update", "session": {"temperature": 1e400}}', "invalid_value", "temperature"),
            ('{"type": "input_text", "text": "\\ud800"}', "invalid_value", "text"),
            ('{"type": "session.update", "session": {"instructions": "\\udfff x"}}', "invalid_value", "instructions"),
            (json.dumps({"type": "session.update", "session": {"instructions": "x" * 900_000}}),
             "instructions_too_long", "8000"),
            ('{"type": "session.update", "session": {"max_output_tokens": 100000000}}', "invalid_value",
             "max_reply_tokens"),
            ('{"type": "conversation.item.truncate", "item_id": "item_77", "audio_end_ms": 5}', "item_not_found",
             "item_77"),
            ('{"type": "playback.mark", "turn": 1, "audio_end_ms": NaN}', "invalid_value", "audio_end_ms"),
            ('{"type": "playback.mark", "turn": 1, "audio_end_ms": Infinity}', "invalid_value", "audio_end_ms"),
            ('{"type": "playback.mark", "turn": 1, "audio_end_ms": 1e300}', "invalid_value", "audio_end_ms"),
            ('{"type": "playback.mark", "turn": 55, "heard_tokens": 1}', "item_not_found", "item_55"),
        ]
        for message, code, named in cases:
            await ws.send(message)
            err = await _error(client)
            assert err["code"] == code and named in err["message"], (message[:70], err)
        assert await client.reply("still there?", timeout=GUARD_S) is not None


async def test_instructions_while_speaking_are_acknowledged_as_pending_then_applied(make_server) -> None:
    server = await make_server()
    async with DuplexClient(server.ws_url()) as client:
        await client.send_text("tell me something")
        await _until(client, "response.created")
        await client.update_session(instructions="Answer like a pirate.")
        seen = await _until(client, "session.instructions_updated")
        assert seen[-1]["status"] == "pending"
        seen = await _until(client, "session.instructions_updated")
        assert seen[-1]["status"] == "applied"
        assert "response.done" in [e["type"] for e in seen]  # applied at the turn boundary
        assert "Answer like a pirate." in server.sessions[client.session_id].session.transcript


# ---- backpressure ----------------------------------------------------------------------------
async def test_audio_beyond_the_rate_limit_is_paced_and_never_dropped(make_server) -> None:
    # 50 kB/s: the 60 kB beyond the burst outrun it unless they take > 1.2 s (unpaced, the 120
    # frames take ~25 ms here, ~90 ms on a loaded 2-core box: 200 kB/s left only a 3x margin)
    limits = ServerLimits(bytes_per_s=50_000.0, bytes_burst=0.0, max_message_bytes=16 * 1024)
    server = await make_server(asr=FakeWhisper(), vad_factory=EnergyVad, limits=limits)
    async with DuplexClient(server.ws_url()) as client:
        hub = server.sessions[client.session_id]
        received = 0
        original = hub.handle_audio

        async def counting(pcm: bytes) -> None:
            nonlocal received
            received += len(pcm)
            await original(pcm)

        hub.handle_audio = counting  # type: ignore[method-assign]
        frame = b"\x00\x00" * 320  # 20 ms of silence
        sent = 0
        for _ in range(120):  # 77 kB, far beyond the 16 kB burst
            await client.send_audio(frame)
            sent += len(frame)
        err = await _error(client)
        assert err["code"] == "rate_limited" and err["error"]["paced"] >= 1 and "nothing is dropped" in err["message"]
        await _eventually(lambda: received == sent)
        assert await client.reply("hello", timeout=GUARD_S) is not None
