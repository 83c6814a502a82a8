"""``/v1/chat/completions`` and ``/v1/models`` driven by the official ``openai`` SDK over loopback,
on the same port as the WebSocket, against the tiny random model. No timing assertions."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from websockets.asyncio.client import connect

from duplex.engine.sampling import SamplingConfig
from duplex.serving.openai_chat import _StopMatcher, parse_chat_request
from duplex.serving.server import DuplexServer
from duplex.session.config import SessionConfig


@pytest.fixture()
async def server(tiny_engine):
    srv = DuplexServer(tiny_engine, config=SessionConfig(sampling=SamplingConfig(temperature=1.0, max_tokens=40)))
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.close()


def _client(server: DuplexServer, **kw: Any) -> openai.AsyncOpenAI:
    kw.setdefault("api_key", "unused")
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", max_retries=0, **kw)


async def test_stream_chunks_and_usage(server: DuplexServer) -> None:
    client = _client(server)
    stream = await client.chat.completions.create(
        model="anything", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        stream=True, max_tokens=12, temperature=0.8, top_p=0.9, seed=7, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] or finish == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.completion_tokens <= 12 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    # the same seed gives the same reply without streaming
    reply = await client.chat.completions.create(
        model="anything", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_completion_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    assert reply.choices[0].message.content == text
    assert reply.usage.completion_tokens == usage.completion_tokens
    assert reply.model == server.engine.lm.name
    await client.close()


async def test_models_and_a_websocket_on_the_same_port(server: DuplexServer) -> None:
    client = _client(server)
    models = await client.models.list()
    assert [m.id for m in models.data] == [server.engine.lm.name]
    assert (await client.models.retrieve(server.engine.lm.name)).id == server.engine.lm.name
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-nonexistent")
    async with connect(server.ws_url()) as ws:  # the native socket still works beside the HTTP front
        assert json.loads(await ws.recv())["type"] == "session.created"
    await client.close()


async def test_unsupported_fields_get_openai_400s(server: DuplexServer) -> None:
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             tools=[{"type": "function", "function": {"name": "f"}}])
    assert err.value.status_code == 400
    body = err.value.body
    assert body["param"] == "tools" and body["code"] == "unsupported_parameter"
    assert body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[{"role": "tool", "content": "x"}])
    assert err.value.body["param"] == "messages[0].role"
    await client.close()


async def test_auth_token_is_the_api_key(tiny_engine) -> None:
    srv = DuplexServer(tiny_engine, auth_token="sekrit")
    await srv.start("127.0.0.1", 0)
    try:
        with pytest.raises(openai.AuthenticationError):
            await _client(srv, api_key="wrong").models.list()
        assert (await _client(srv, api_key="sekrit").models.list()).data
    finally:
        await srv.close()


def test_stop_strings_are_held_back_and_cut() -> None:
    m = _StopMatcher(("END",))
    assert m.push("hello E") == ("hello ", False)
    assert m.push("N") == ("", False)
    assert m.push("D and more") == ("", True)
    m = _StopMatcher(("\n\n",))
    assert m.push("a\n") == ("a", False)
    assert m.push("b") == ("\nb", False)


def test_request_validation() -> None:
    req = parse_chat_request(b'{"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", '
                             b'"text": "x"}]}], "stop": "Q:", "seed": 3, "max_tokens": 9}')
    assert req.messages[0].role == "system" and req.sampling.stop == ("Q:",) and req.sampling.max_tokens == 9
    for body, param in ((b'[]', None), (b'{"model": "m"}', "messages"),
                        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {}}',
                         "stream_options"),
                        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}',
                         "temperature")):
        with pytest.raises(Exception) as err:
            parse_chat_request(body)
        assert getattr(err.value, "status", None) == 400 and err.value.param == param


async def test_prompt_render_matches_one_message_at_a_time(tiny_engine) -> None:
    """The merged forwards give the same tokens (and next-token logits) as add_message per turn."""
    from duplex.engine.sequence import Speaker
    from duplex.serving.openai_chat import ChatCompletions

    req = parse_chat_request(b'{"model": "m", "messages": [{"role": "system", "content": "Be brief."}, '
                             b'{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, '
                             b'{"role": "user", "content": "Bye"}]}')
    seq, n = await ChatCompletions(tiny_engine, "m")._prefill(req)
    ref = tiny_engine.new_sequence()
    for role, text in (("system", "Be brief."), ("user", "Hi"), ("agent", "Hello!"), ("user", "Bye")):
        ref.add_message(Speaker(role), text)
    ref.hand_over(Speaker.AGENT)
    assert seq.ids == ref.ids and n == len(ref)
    assert int(seq.logits.argmax()) == int(ref.logits.argmax())
