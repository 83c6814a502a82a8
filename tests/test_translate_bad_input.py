"""Bad translate-mode input over a real WebSocket with the tiny model: each refusal is an ``error``
naming the field (``param``), and the session stays in chat mode. Timeouts are hang guards only."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from test_translate_server import _until

from duplex.engine.models import LoadedModel
from duplex.engine.sampling import SamplingConfig
from duplex.engine.worker import Engine
from duplex.serving.client import DuplexClient
from duplex.serving.server import DuplexServer
from duplex.session.core import SessionConfig
from duplex.translate.fitness import (
    UnfitTranslationModel,
    check_can_translate,
    check_tokenizer,
)
from duplex.translate.prompt import make_prompt
from duplex.translate.serving import TranslateService


async def _start(engine: Engine, service: TranslateService, max_tokens: int = 20) -> DuplexServer:
    srv = DuplexServer(engine, config=SessionConfig(policy="silence", sampling=SamplingConfig(
        temperature=1.0, max_tokens=max_tokens)), translate=service)
    await srv.start("127.0.0.1", 0)
    return srv




async def _refused(client: DuplexClient, **session: Any) -> dict[str, Any]:
    await client.update_session(**session)
    event = (await _until(client, "error", "session.updated"))[-1]
    assert event["type"] == "error", event
    assert event["param"] == event["error"]["param"]
    return event


async def _still_chat(client: DuplexClient) -> None:
    """A chat update answers with the session: still chat mode, no translate settings."""
    await client.update_session(instructions="Be brief.")
    session = (await _until(client, "session.updated"))[-1]["session"]
    assert session["mode"] == "chat" and "translate" not in session


class AsciiOnlyTokenizer:
    """A tokenizer that cannot write accents or "¿" (they come back as "?")."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return self._inner.encode(text.encode("ascii", "replace").decode("ascii"), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_unknown_language_pair_names_the_field(tiny_engine) -> None:
    srv = await _start(tiny_engine, TranslateService(engine=tiny_engine, speech=False))
    try:
        async with DuplexClient(srv.ws_url()) as client:
            err = await _refused(client, mode="translate", source_language="en", target_language="xx")
            assert err["code"] == "unsupported_language_pair" and err["param"] == "session.target_language"
            assert "target_language 'xx'" in err["message"] and "en->es" in err["message"]
            err = await _refused(client, mode="translate", source_language="fr", target_language="es")
            assert err["code"] == "unsupported_language_pair" and err["param"] == "session.source_language"
            err = await _refused(client, mode="translate", policy="nope")
            assert err["code"] == "invalid_policy" and err["param"] == "session.policy" and "nope" in err["message"]
            err = await _refused(client, mode="translate", k=0)
            assert err["code"] == "invalid_value" and err["param"] == "session.k"
            err = await _refused(client, mode="translate", layout="zigzag")
            assert err["code"] == "invalid_value" and err["param"] == "session.layout" and "interleaved" in err["message"]
            err = await _refused(client, mode="dictate")
            assert err["code"] == "invalid_value" and err["param"] == "session.mode"
            await _still_chat(client)
    finally:
        await srv.close()


async def test_a_model_that_does_not_load_is_refused_and_the_session_stays_chat(tiny_engine) -> None:
    srv = await _start(tiny_engine, TranslateService("/nonexistent/translation-model", speech=False))
    try:
        async with DuplexClient(srv.ws_url()) as client:
            for _ in range(2):  # the failed load is remembered: the second refusal is the same
                err = await _refused(client, mode="translate")
                assert err["code"] == "translation_model_unavailable" and err["param"] == "session.mode"
                assert "/nonexistent/translation-model" in err["message"] and "stays in chat" in err["message"]
            await _still_chat(client)
    finally:
        await srv.close()


async def test_a_model_that_cannot_write_the_target_language_is_refused(tiny_lm: LoadedModel, tiny_engine) -> None:
    check_tokenizer(tiny_lm, make_prompt("en", "es"))  # a byte-level tokenizer writes Spanish
    ascii_lm = dataclasses.replace(tiny_lm, tokenizer=AsciiOnlyTokenizer(tiny_lm.tokenizer), name="ascii-only")
    with pytest.raises(UnfitTranslationModel, match="cannot write Spanish"):
        check_tokenizer(ascii_lm, make_prompt("en", "es"))
    ascii_engine = Engine(ascii_lm)
    srv = await _start(tiny_engine, TranslateService(engine=ascii_engine, speech=False))
    try:
        async with DuplexClient(srv.ws_url()) as client:
            err = await _refused(client, mode="translate", source_language="en", target_language="es")
            assert err["code"] == "translation_model_unsupported" and err["param"] == "session.target_language"
            assert "'ascii-only' cannot write Spanish" in err["message"]
            # es->en: the source side is the one it cannot read
            err = await _refused(client, mode="translate", source_language="es", target_language="en")
            assert err["param"] == "session.source_language"
            await _still_chat(client)
    finally:
        await srv.close()
        ascii_engine.close()


async def test_a_model_whose_probe_translations_fail_is_refused(tiny_lm: LoadedModel, tiny_engine) -> None:
    # the random tiny model writes Spanish bytes but translates nothing: the probe catches it
    with pytest.raises(UnfitTranslationModel, match=r"does not translate English to Spanish: probe chrF 0\.0"):
        check_can_translate(tiny_lm, make_prompt("en", "es"))
    srv = await _start(tiny_engine, TranslateService(engine=tiny_engine, speech=False, probe=True))
    try:
        async with DuplexClient(srv.ws_url()) as client:
            for _ in range(2):  # probed once per pair, then remembered
                err = await _refused(client, mode="translate", source_language="en", target_language="es")
                assert err["code"] == "translation_model_unsupported" and err["param"] == "session.target_language"
                assert "'tiny' does not translate English to Spanish" in err["message"]
            await _still_chat(client)
    finally:
        await srv.close()


async def test_switching_to_translate_during_a_chat_reply_is_refused(tiny_engine) -> None:
    srv = await _start(tiny_engine, TranslateService(engine=tiny_engine, speech=False), max_tokens=400)
    try:
        async with DuplexClient(srv.ws_url()) as client:
            await client.send_text("tell me a long story", final=True)
            await _until(client, "response.output_text.delta")
            err = await _refused(client, mode="translate")
            assert err["code"] == "invalid_state" and err["param"] == "session.mode"
            assert "response.done" in err["message"] and "stays in chat" in err["message"]
            await client.interrupt()
            await _until(client, "response.done")
            await client.update_session(mode="translate")
            assert (await _until(client, "session.updated"))[-1]["session"]["mode"] == "translate"
    finally:
        await srv.close()
