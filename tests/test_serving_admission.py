"""Admission across both endpoints and client-chosen session ids, over a real socket (issue 14).

``/v1/realtime`` sessions count toward ``--max-sessions`` exactly like ``/ws`` ones, and a new
``/ws`` session may take the id the client names (what a proxy hashing on ``session_id`` needs).
Tiny random model; timeouts are hang guards only, nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from duplex.engine.sampling import SamplingConfig
from duplex.serving.client import (
    DuplexClient,
    DuplexClientError,
    ResumeError,
    new_session_id,
)
from duplex.serving.server import DuplexServer, ServerLimits
from duplex.session.config import SessionConfig

GUARD_S = 60.0


@pytest.fixture()
async def make_server(tiny_engine):
    servers: list[DuplexServer] = []

    async def factory(**kw: Any) -> DuplexServer:
        kw.setdefault("config", SessionConfig(policy="silence", sampling=SamplingConfig(temperature=1.0, max_tokens=12)))
        server = DuplexServer(tiny_engine, **kw)
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


async def _recv_json(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), GUARD_S))


async def test_realtime_respects_max_sessions(make_server) -> None:
    server = await make_server(limits=ServerLimits(max_sessions=1))
    realtime_url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    async with DuplexClient(server.ws_url()):  # the one slot is taken over /ws
        async with connect(realtime_url) as ws:
            first = await _recv_json(ws)
            assert first["type"] == "error", first
            assert first["error"]["code"] == "server_busy" and first["error"]["max_sessions"] == 1
            assert "max_sessions" in first["error"]["message"]
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), GUARD_S)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013
        assert len(server.sessions) == 1
    # the slot is free again: a realtime session opens, and then holds the slot against /ws
    await asyncio.wait_for(_until_empty(server), GUARD_S)
    async with connect(realtime_url) as ws:
        assert (await _recv_json(ws))["type"] == "session.created"
        async with connect(server.ws_url()) as native:
            refused = await _recv_json(native)
            assert refused["type"] == "error" and refused["code"] == "server_busy"


async def _until_empty(server: DuplexServer) -> None:
    while server.sessions:
        await asyncio.sleep(0.02)


async def test_a_new_session_takes_the_client_chosen_id_and_resumes(make_server) -> None:
    server = await make_server()
    sid = new_session_id()
    client = DuplexClient(server.ws_url())
    assert (await client.connect(session_id=sid))["id"] == sid
    assert await client.reply("hello", timeout=GUARD_S) is not None
    client._ws.transport.abort()
    while server.sessions[sid].owner is not None:
        await asyncio.sleep(0.02)
    assert (await client.resume())["id"] == sid
    # the id is now taken: a second client naming it gets a server-chosen id and a clear error
    other = DuplexClient(server.ws_url())
    with pytest.raises(DuplexClientError, match="did not take session_id"):
        await other.connect(session_id=sid)
    await client.close()


async def test_resume_of_an_unknown_session_says_it_is_lost(make_server) -> None:
    server = await make_server()
    client = DuplexClient(server.ws_url())
    await client.connect()
    client.session = {**client.session, "id": "nosuchsession"}
    with pytest.raises(ResumeError) as info:
        await client.resume()
    assert info.value.reason == "session_not_found" and "lost" in str(info.value)
