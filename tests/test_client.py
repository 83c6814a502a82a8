"""The Python client over a real socket: async + sync APIs and the ``duplex client`` CLI."""

from __future__ import annotations

import argparse
import asyncio

from duplex.serving.client import DuplexClient, SyncDuplexClient, run_client_cli

from test_server import GUARD_S, _config, _until, make_server  # noqa: F401 - fixture


async def test_sync_client_say_wait_reply_and_interrupt(make_server) -> None:
    server = await make_server(config=_config(max_tokens=160))

    def robot() -> tuple[str, list[str]]:
        with SyncDuplexClient(server.ws_url()) as client:
            client.say("hello robot")
            reply = client.wait_reply(timeout=GUARD_S)
            client.say("tell me a long story")
            while not any(e["type"] == "response.output_text.delta" for e in client.poll_events(timeout=GUARD_S)):
                pass
            client.interrupt()
            kinds: list[str] = []
            while "response.done" not in kinds:
                kinds += [e["type"] for e in client.poll_events(timeout=GUARD_S)]
            return reply, kinds

    reply, kinds = await asyncio.to_thread(robot)
    assert reply
    assert "response.interrupted" in kinds


async def test_client_cli_text_prints_the_reply(make_server, capsys) -> None:
    server = await make_server()
    args = argparse.Namespace(url=server.ws_url(), auth_token=None, text="hi there")
    assert await asyncio.wait_for(run_client_cli(args), GUARD_S) == 0
    out = capsys.readouterr().out
    assert out.strip()


async def test_client_cli_refused_without_token(make_server, capsys) -> None:
    server = await make_server(auth_token="tok")
    args = argparse.Namespace(url=server.ws_url(), auth_token=None, text="hi")
    assert await run_client_cli(args) == 1
    assert "401" in capsys.readouterr().err


async def test_async_client_marks_and_interrupt(make_server) -> None:
    server = await make_server(config=_config(max_tokens=160))
    async with DuplexClient(server.ws_url()) as client:
        await client.send_text("tell me a long story")
        turn = (await _until(client, "response.output_text.delta"))[-1]["turn"]
        await client.mark_playback(turn, heard_tokens=1)
        await client.interrupt()
        events = await _until(client, "response.done", turn=turn)
        assert any(e["type"] == "response.interrupted" and e["reason"] == "cancelled" for e in events)
        assert events[-1]["reason"] == "interrupted"
