"""Property-based protocol tests (hypothesis): random event sequences, random JSON types in every
field, random text and binary frames. Invariants: the parser only ever raises ProtocolError with a
documented code and a message; over a real socket no ``internal_error``, no crash, every error
names its problem, and the session still answers a good ``input_text`` afterwards.

Kept fast: modest example counts, the tiny model, 4-token replies, no shrinking across the
socket (examples are drawn once, deterministically, then played). Nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from duplex.audio.fakes import EnergyVad, FakeWhisper
from duplex.engine.sampling import SamplingConfig
from duplex.serving.protocol import ProtocolError, parse_client_message
from duplex.session.config import SessionConfig
from duplex.session.events import TextInput, UpdateSession
from duplex.session.validation import validate_input

from test_server import GUARD_S, make_server  # noqa: F401 - fixture

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# every code docs/protocol.md lists (a fuzzed client may see any of these, never internal_error)
DOCUMENTED_CODES = {
    "invalid_json", "invalid_event", "unknown_event_type", "missing_field", "invalid_value", "invalid_audio",
    "invalid_audio_format", "audio_input_unavailable", "audio_output_unavailable", "empty_text", "text_too_long",
    "instructions_too_long", "invalid_policy", "invalid_state", "item_not_found", "session_not_found",
    "session_closed", "rate_limited", "input_queue_full", "server_busy", "tts_failed", "asr_failed",
}

TYPES = ["session.update", "input_text", "conversation.item.create", "input_audio_buffer.append",
         "input_audio_buffer.commit", "response.cancel", "conversation.item.truncate", "playback.mark",
         "session.resume"]
SESSION_FIELDS = ["instructions", "policy", "policy_params", "temperature", "max_output_tokens", "max_reply_tokens",
                  "output_modalities", "modalities", "input_audio_format"]
FIELDS = {
    "session.update": ["session", *SESSION_FIELDS],
    "input_text": ["text", "final"],
    "conversation.item.create": ["item"],
    "input_audio_buffer.append": ["audio"],
    "input_audio_buffer.commit": [],
    "response.cancel": [],
    "conversation.item.truncate": ["item_id", "turn", "audio_end_ms", "content_index"],
    "playback.mark": ["turn", "item_id", "heard_tokens", "audio_end_ms", "done"],
    "session.resume": ["session_id", "resume_token", "last_seq"],
}

scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["\ud800", "item_1", "item_-1", "silence", "eou", "audio", "pcm16"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
plausible = {
    "text": st.text(max_size=30) | st.just("\ud800"), "final": st.booleans(),
    "turn": st.integers(-2, 6), "item_id": st.sampled_from(["item_1", "item_2", "item_9", "bogus"]),
    "audio_end_ms": st.floats(-10, 1e7) | st.just(math.nan) | st.integers(0, 10**6),
    "heard_tokens": st.integers(-1, 50), "done": st.booleans(),
    "temperature": st.floats(-2, 3) | st.just(math.nan), "max_output_tokens": st.integers(-1, 10**9),
    "policy": st.sampled_from(["silence", "eou", "half-duplex", "nope"]),
    "output_modalities": st.sampled_from([["text"], ["text", "audio"], ["smell"], "text"]),
    "input_audio_format": st.fixed_dictionaries({}, optional={"sample_rate_hz": st.sampled_from([8000, 16000, 48000, 0, -5, 10**9]),
                                                              "channels": st.integers(-1, 3),
                                                              "encoding": st.sampled_from(["pcm16", "mp3"])}),
    "instructions": st.text(max_size=40) | st.just("x" * 9000),
}


def _field(name: str) -> st.SearchStrategy[Any]:
    return (plausible[name] | json_values) if name in plausible else json_values


def _message(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    optional = {f: _field(f) for f in FIELDS[kind]}
    if kind == "session.update":
        optional["session"] = st.fixed_dictionaries({}, optional={f: _field(f) for f in SESSION_FIELDS}) | json_values
    return st.fixed_dictionaries({"type": st.just(kind)}, optional=optional)


messages = st.sampled_from(TYPES).flatmap(_message)
frames = (messages.map(json.dumps) | st.text(max_size=40) | st.binary(max_size=2000)
          | json_values.map(json.dumps) | st.binary(max_size=600).filter(lambda b: len(b) % 2 == 0))


# ---- parser: no server ------------------------------------------------------------------------
@settings(max_examples=400, deadline=None, database=None)
@given(st.one_of(messages.map(json.dumps), st.text(max_size=60), json_values.map(json.dumps)))
def test_parser_raises_only_documented_protocol_errors(text: str) -> None:
    try:
        msg = parse_client_message(text)
    except ProtocolError as exc:
        assert exc.code in DOCUMENTED_CODES and exc.message, (text[:80], exc.code)
        return
    assert msg.type in TYPES or msg.type == "input_text"
    for name in ("audio_end_ms", "temperature"):
        value = getattr(msg, name, None)
        assert value is None or math.isfinite(value)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.builds(UpdateSession, instructions=st.none() | st.text(max_size=20), policy=st.none() | st.text(max_size=8),
                 policy_params=st.none() | st.dictionaries(st.text(max_size=6), scalars, max_size=3),
                 temperature=st.none() | st.floats(allow_nan=True, allow_infinity=True),
                 max_reply_tokens=st.none() | st.integers(-5, 10**6)) | st.builds(TextInput, st.text(max_size=30),
                                                                                   st.booleans()))
def test_session_validation_never_raises(ev: Any) -> None:
    result = validate_input(ev, SessionConfig(), user_text_pending=False, count_tokens=len)
    assert result is None or (result[0] and result[1])


# ---- over a real socket ----------------------------------------------------------------------
def _draw(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` examples drawn deterministically (played over the socket afterwards)."""
    out: list[Any] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Any) -> None:
        out.append(example)

    collect()
    return out[:n]


async def _answers(ws: Any, marker: str) -> list[dict[str, Any]]:
    """Send a good input_text; read until the reply to it is done. Returns every JSON event read."""
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))  # random audio may have opened speech
    await ws.send(json.dumps({"type": "input_text", "text": marker}))
    seen: list[dict[str, Any]] = []
    user_turn = None

    async def run() -> None:
        nonlocal user_turn
        async for message in ws:
            if isinstance(message, bytes):
                continue
            ev = json.loads(message)
            seen.append(ev)
            if ev["type"] == "conversation.item.input_audio_transcription.completed" and marker in ev["transcript"]:
                user_turn = ev["turn"]
            if ev["type"] == "response.done" and user_turn is not None and ev["turn"] > user_turn:
                return

    await asyncio.wait_for(run(), GUARD_S)
    return seen


async def test_random_event_sequences_never_break_a_session(make_server) -> None:
    config = SessionConfig(policy="silence", sampling=SamplingConfig(temperature=1.0, max_tokens=4))
    server = await make_server(config=config, asr=FakeWhisper(), vad_factory=EnergyVad)
    sequences = _draw(st.lists(frames, min_size=1, max_size=8), 14)
    codes: set[str] = set()
    for i, sequence in enumerate(sequences):
        async with connect(server.ws_url(), max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            for frame in sequence:
                await ws.send(frame)
            seen = await _answers(ws, f"zebra{i} hello")
        errors = [e for e in seen if e["type"] == "error"]
        for err in errors:
            assert err["code"] != "internal_error", (sequence, err)
            assert err["code"] in DOCUMENTED_CODES and err["message"], err
            codes.add(err["code"])
    assert len(codes) >= 4, codes  # the sequences did reach the error paths
    assert await _still_serves(server)


async def _still_serves(server: Any) -> bool:
    async with connect(server.ws_url()) as ws:
        await ws.recv()
        seen = await _answers(ws, "final check")
    return any(e["type"] == "response.done" for e in seen)
