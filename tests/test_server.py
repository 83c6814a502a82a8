"""The server over a real socket: chat, concurrency, barge-in round trips, resume, shutdown.

Tiny random model (temperature 1 so replies are word-like) and fake TTS/ASR: fast and exact.
Timeouts are hang guards only; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from duplex.audio.fakes import EnergyVad, FakeTts, FakeWhisper
from duplex.serving.client import DuplexClient, DuplexClientError
from duplex.serving.protocol import decode_audio_frame
from duplex.engine.sampling import SamplingConfig
from duplex.engine.sequence import Status
from duplex.serving.server import DuplexServer
from duplex.session.core import TRUNCATION_MARKER, SessionConfig

GUARD_S = 60.0


def _config(max_tokens: int = 60, **kw: Any) -> SessionConfig:
    kw.setdefault("policy", "silence")
    kw.setdefault("sampling", SamplingConfig(temperature=1.0, max_tokens=max_tokens))
    return SessionConfig(**kw)


@pytest.fixture()
async def make_server(tiny_engine):
    servers: list[DuplexServer] = []

    async def factory(**kw: Any) -> DuplexServer:
        kw.setdefault("config", _config())
        server = DuplexServer(tiny_engine, **kw)
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


async def _until(client: DuplexClient, *types: str, turn: int | None = None) -> list[dict[str, Any]]:
    """All events up to and including the first of ``types`` (for ``turn`` if given)."""
    seen: list[dict[str, Any]] = []

    async def run() -> list[dict[str, Any]]:
        async for ev in client.events():
            seen.append(ev)
            if ev["type"] in types and (turn is None or ev.get("turn") == turn):
                return seen
        raise AssertionError(f"closed before {types}: {[e['type'] for e in seen]}")

    return await asyncio.wait_for(run(), GUARD_S)


def _deltas(events: list[dict[str, Any]], turn: int) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta" and e["turn"] == turn)


async def _eventually(pred: Any) -> None:
    async def run() -> None:
        while not pred():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(run(), GUARD_S)


# ---- basics --------------------------------------------------------------------------------
async def test_static_page_and_health(make_server) -> None:
    server = await make_server()

    def get(path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(server.url() + path.lstrip("/"), timeout=10) as r:
                return r.status, r.headers["Content-Type"], r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, "", b""

    status, ctype, body = await asyncio.to_thread(get, "/")
    assert status == 200 and ctype.startswith("text/html") and b"app.js" in body
    for asset in ("app.js", "mic-worklet.js", "player-worklet.js", "style.css"):
        status, ctype, _ = await asyncio.to_thread(get, asset)
        assert status == 200, asset
    assert (await asyncio.to_thread(get, "/app.js"))[1].startswith("text/javascript")
    assert (await asyncio.to_thread(get, "/nope.js"))[0] == 404
    assert (await asyncio.to_thread(get, "/%2e%2e/server.py"))[0] == 404
    status, _, body = await asyncio.to_thread(get, "/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["sessions"] == 0
    assert {"ticks", "express_ticks", "prefill_tokens"} <= set(health["engine"])
    kernels = health["kernels"]  # what runs the forwards: the model, its format, threads, the C kernels' code
    assert kernels["model"] and kernels["device"] == "cpu" and kernels["scheduler"] in ("batched", "chunked", "fifo")
    assert kernels["threads"] >= 1 and kernels["threads_while_no_speech_stage"] >= kernels["threads"]
    assert "attention_isa" in kernels and kernels["first_words_tokens"] >= 1


async def test_text_reply_streams_and_matches_done(make_server) -> None:
    server = await make_server()
    async with DuplexClient(server.ws_url()) as client:
        assert client.session_id in server.sessions
        assert client.session["output_modalities"] == ["text"]
        await client.send_text("hello there, how are you?")
        events = await _until(client, "response.done")
        kinds = [e["type"] for e in events]
        assert "response.created" in kinds and "conversation.item.input_audio_transcription.completed" in kinds
        done = events[-1]
        assert done["reason"] in ("completed", "max_tokens", "stop_sequence")
        assert _deltas(events, done["turn"]) == done["text"] and done["text"]
        ranges = [(e["token_start"], e["token_end"]) for e in events if e["type"] == "response.output_text.delta"]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous token coverage
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_conversation_item_create_and_session_update(make_server) -> None:
    server = await make_server()
    async with DuplexClient(server.ws_url()) as client:
        await client.update_session(instructions="Be terse.", max_output_tokens=12, policy="eou")
        updated = await _until(client, "session.updated")
        assert updated[-1]["session"]["policy"] == "eou"
        await client.send({"type": "conversation.item.create",
                           "item": {"type": "message", "role": "user",
                                    "content": [{"type": "input_text", "text": "hi there"}]}})
        events = await _until(client, "response.done")
        n_tokens = max(e["token_end"] for e in events if e["type"] == "response.output_text.delta")
        assert n_tokens <= 12


async def test_concurrent_sessions_are_isolated(make_server) -> None:
    server = await make_server()
    clients = [DuplexClient(server.ws_url()) for _ in range(4)]
    await asyncio.gather(*(c.connect() for c in clients))
    assert len({c.session_id for c in clients}) == 4

    async def chat(i: int, client: DuplexClient) -> tuple[str, bool]:
        await client.send_text(f"client number {i} says hello")
        events = await _until(client, "response.done")
        user = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
        return user[0]["transcript"], _deltas(events, events[-1]["turn"]) == events[-1]["text"]

    results = await asyncio.gather(*(chat(i, c) for i, c in enumerate(clients)))
    for i, (transcript, consistent) in enumerate(results):
        assert transcript == f"client number {i} says hello"  # each saw only its own user turn
        assert consistent
    for i, c in enumerate(clients):
        assert f"client number {i} says hello" in server.sessions[c.session_id].session.transcript
        assert all(f"client number {j} " not in server.sessions[c.session_id].session.transcript
                   for j in range(4) if j != i)
    await asyncio.gather(*(c.close() for c in clients))
    await _eventually(lambda: not server.sessions)  # a normal close ends the session


# ---- barge-in ------------------------------------------------------------------------------
def _agent_turn_tokens(server: DuplexServer, session_id: str, turn: int) -> tuple[int, int]:
    seq = server.sessions[session_id].session.seq
    return len(seq.positions(turn, Status.SPOKEN)), len(seq.positions(turn, Status.UNSPOKEN))


async def test_text_barge_in_rolls_back_to_kept_tokens(make_server) -> None:
    server = await make_server(config=_config(max_tokens=160))
    async with DuplexClient(server.ws_url()) as client:
        await client.send_text("tell me a long story please")
        first = await _until(client, "response.output_text.delta")
        turn = first[-1]["turn"]
        await client.send_text("stop, different question")
        events = await _until(client, "response.interrupted")
        interrupted = events[-1]
        assert interrupted["turn"] == turn and interrupted["dropped_tokens"] >= 0
        events += await _until(client, "response.done", turn=turn)
        done = events[-1]
        assert done["reason"] == "interrupted" and done["text"] == interrupted["kept_text"]
        spoken, unspoken = _agent_turn_tokens(server, client.session_id, turn)
        assert spoken == interrupted["kept_tokens"] and unspoken == 0
        assert interrupted["kept_text"] + TRUNCATION_MARKER in server.sessions[client.session_id].session.transcript
        # the barge-in text is the next user turn and gets its own reply
        events = await _until(client, "response.done")
        assert any(e["type"] == "conversation.item.input_audio_transcription.completed"
                   and e["transcript"] == "stop, different question" for e in events)


async def _audio_session(server: DuplexServer) -> DuplexClient:
    client = DuplexClient(server.ws_url())
    session = await client.connect()
    assert session["audio_output_available"]
    await client.update_session(output_modalities=["text", "audio"])
    assert (await _until(client, "session.updated"))[-1]["session"]["output_modalities"] == ["text", "audio"]
    return client


def _heard(headers: list[dict[str, Any]], pos: int) -> int:
    """First token not fully heard at turn sample ``pos`` (TtsChunk.token_at over the frames)."""
    heard = 0
    for h in headers:
        if pos >= h["sample_offset"] + h["samples"]:
            heard = h["token_end"]
            continue
        rel = pos - h["sample_offset"]
        ends = h["token_offsets_samples"][1:]
        heard = h["token_start"] + sum(1 for e in ends if e <= rel)
        break
    return heard


async def test_audio_truncate_rolls_back_to_played_position(make_server) -> None:
    server = await make_server(tts=FakeTts(chars_per_s=40.0), config=_config(max_tokens=160))
    client = await _audio_session(server)
    try:
        await client.send_text("tell me a long story please")
        events = await _until(client, "response.output_audio.delta")
        frame = events[-1]
        turn, rate = frame["turn"], frame["sample_rate_hz"]
        assert len(frame["audio"]) == 2 * frame["samples"]
        assert len(frame["token_offsets_samples"]) == frame["token_end"] - frame["token_start"]
        pos = frame["sample_offset"] + frame["samples"] // 2  # played half of the first frame
        expected = _heard([frame], pos)
        await client.truncate(turn, audio_end_ms=1000.0 * pos / rate)
        events = await _until(client, "response.done", turn=turn)
        assert any(e["type"] == "response.interrupted" for e in events)
        assert events[-1]["reason"] in ("interrupted", "cancelled")
        spoken, unspoken = _agent_turn_tokens(server, client.session_id, turn)
        assert (spoken, unspoken) == (expected, 0)
    finally:
        await client.close()


async def test_barge_in_waits_for_the_clients_played_position(make_server) -> None:
    """Server yields on a typed barge-in, says so at once, rolls back to the client's mark."""
    server = await make_server(tts=FakeTts(chars_per_s=40.0), config=_config(max_tokens=160, truncate_wait_ms=60_000))
    client = await _audio_session(server)
    try:
        await client.send_text("tell me a long story please")
        frames = [e for e in await _until(client, "response.output_audio.delta")]
        frame = frames[-1]
        turn = frame["turn"]
        await client.mark_playback(turn, audio_end_ms=0.0)
        await client.send_text("no wait, something else")
        events = await _until(client, "response.interrupted")
        frames += [e for e in events if e["type"] == "response.output_audio.delta" and e["turn"] == turn]
        headers = [e for e in frames if e["type"] == "response.output_audio.delta"]
        pos = headers[-1]["sample_offset"] + headers[-1]["samples"] * 3 // 4
        expected = _heard(headers, pos)
        await client.send({"type": "conversation.item.truncate", "item_id": f"item_{turn}", "content_index": 0,
                           "audio_end_ms": 1000.0 * pos / frame["sample_rate_hz"]})
        done = (await _until(client, "response.done", turn=turn))[-1]
        assert done["reason"] == "interrupted"
        spoken, unspoken = _agent_turn_tokens(server, client.session_id, turn)
        assert (spoken, unspoken) == (expected, 0)
    finally:
        await client.close()


async def test_playback_done_mark_ends_the_agent_turn(make_server) -> None:
    server = await make_server(tts=FakeTts(chars_per_s=200.0))
    client = await _audio_session(server)
    try:
        await client.update_session(max_reply_tokens=20)
        await client.send_text("hello")
        events = await _until(client, "response.output_audio.done")
        done_audio = events[-1]
        turn = done_audio["turn"]
        assert any(e["type"] == "response.done" for e in events)
        states = [e["state"] for e in events if e["type"] == "state.changed"]
        assert states[-1] == "speaking"  # still speaking until the audio has been played
        last_token = max(e["token_end"] for e in events if e["type"] == "response.output_text.delta")
        await client.mark_playback(turn, heard_tokens=last_token, audio_end_ms=done_audio["audio_end_ms"], done=True)
        events = await _until(client, "state.changed")
        assert events[-1]["state"] == "listening"
        spoken, unspoken = _agent_turn_tokens(server, client.session_id, turn)
        assert unspoken == 0 and spoken == last_token
    finally:
        await client.close()


def _tone(seconds: float, loud: bool) -> bytes:
    n = int(16000 * seconds)
    x = np.sin(np.arange(n) * 2 * np.pi * 220 / 16000) * (12000 if loud else 0)
    return x.astype("<i2").tobytes()


async def test_audio_input_transcribed_and_answered(make_server) -> None:
    server = await make_server(asr=FakeWhisper(), vad_factory=EnergyVad)
    async with DuplexClient(server.ws_url()) as client:
        pcm = _tone(0.3, False) + _tone(1.6, True) + _tone(1.0, False)
        for i in range(0, len(pcm), 640):  # 20 ms binary frames
            await client.send_audio(pcm[i:i + 640])
        events = await _until(client, "response.done")
        kinds = [e["type"] for e in events]
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped")
        completed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
        assert completed and completed[0]["transcript"].startswith("w0 w1")
        deltas = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.delta"]
        assert any(e["committed"] for e in deltas)


async def test_audio_barge_in_with_fake_speech(make_server) -> None:
    server = await make_server(tts=FakeTts(chars_per_s=40.0), asr=FakeWhisper(), vad_factory=EnergyVad,
                               config=_config(max_tokens=160, truncate_wait_ms=60_000))
    client = await _audio_session(server)
    try:
        await client.send_text("tell me a long story please")
        events = await _until(client, "response.output_audio.delta")
        turn = events[-1]["turn"]
        pcm = _tone(1.5, True)  # the user talks over the agent and keeps talking, at real time
        for i in range(0, len(pcm), 640):
            await client.send_audio(pcm[i:i + 640])
            await asyncio.sleep(0.02)
        events = await _until(client, "response.interrupted")
        kinds = [e["type"] for e in events]
        assert "input_audio_buffer.speech_started" in kinds
        # pause first (at the onset, audio held), decide after (the words make it a turn)
        assert kinds.index("response.output_audio.paused") < kinds.index("response.interrupted")
        held = kinds[kinds.index("response.output_audio.paused"):]
        assert "response.output_audio.delta" not in held and "response.output_audio.resumed" not in held
        await client.truncate(turn, audio_end_ms=0.0)  # nothing was played yet
        done = (await _until(client, "response.done", turn=turn))[-1]
        assert done["reason"] == "interrupted" and done["text"] == ""
        assert _agent_turn_tokens(server, client.session_id, turn) == (0, 0)
    finally:
        await client.close()


async def test_backchannel_pauses_then_resumes_and_opens_no_turn(make_server) -> None:
    whisper = FakeWhisper(word_s=0.3, word_namer=lambda i: "yeah")
    server = await make_server(tts=FakeTts(chars_per_s=40.0), asr=whisper, vad_factory=EnergyVad,
                               config=_config(max_tokens=60, truncate_wait_ms=60_000))
    client = await _audio_session(server)
    try:
        await client.send_text("tell me a long story please")
        turn = (await _until(client, "response.output_audio.delta"))[-1]["turn"]
        pcm = _tone(0.35, True) + _tone(1.0, False)  # "yeah" over the agent, at real time
        for i in range(0, len(pcm), 640):
            await client.send_audio(pcm[i:i + 640])
            await asyncio.sleep(0.02)
        events = await _until(client, "response.output_audio.resumed", "response.interrupted")
        kinds = [e["type"] for e in events]
        assert kinds[-1] == "response.output_audio.resumed", kinds
        paused = next(e for e in events if e["type"] == "response.output_audio.paused")
        assert paused["turn"] == turn and paused["audio_end_ms"] >= 0
        assert "response.output_audio.delta" not in kinds[kinds.index("response.output_audio.paused"):]
        # the turn goes on to its end; the backchannel is not answered and leaves no user words
        later = list(events)  # generation (and its audio) may have finished during the pause
        for kind in ("response.output_audio.done", "response.done"):
            if not any(e["type"] == kind and e.get("turn") == turn for e in later):
                later += await _until(client, kind, turn=turn)
        assert next(e for e in later if e["type"] == "response.done")["reason"] != "interrupted"
        assert not any(e["type"] == "response.interrupted" for e in later)
        await client.mark_playback(turn, audio_end_ms=1e7, done=True)
        hub = server.sessions[client.session_id]
        await _eventually(lambda: hub.session.state == "listening")
        await asyncio.sleep(0.3)  # time enough for a phantom reply to start, were there one
        assert hub.session._agent is None
        # (Known gap: words of a backchannel that arrive after the agent finished generating but
        # while its audio still plays can still open a user turn; see the README's known gaps.)
    finally:
        await client.close()


async def test_slow_recognition_does_not_turn_a_backchannel_into_a_barge_in(make_server) -> None:
    # each whisper pass takes 1.4 s: the final words of "yeah" arrive long after the sound ended
    whisper = FakeWhisper(word_s=0.3, word_namer=lambda i: "yeah", delay_s=1.4)
    server = await make_server(tts=FakeTts(chars_per_s=40.0), asr=whisper, vad_factory=EnergyVad,
                               config=_config(max_tokens=60, truncate_wait_ms=60_000))
    client = await _audio_session(server)
    try:
        await client.send_text("tell me a long story please")
        turn = (await _until(client, "response.output_audio.delta"))[-1]["turn"]
        pcm = _tone(0.35, True) + _tone(2.0, False)
        for i in range(0, len(pcm), 640):
            await client.send_audio(pcm[i:i + 640])
            await asyncio.sleep(0.02)
        events = await _until(client, "response.output_audio.resumed", "response.interrupted")
        assert events[-1]["type"] == "response.output_audio.resumed" and events[-1]["turn"] == turn
    finally:
        await client.close()


async def test_agent_backchannel_audio_while_the_user_talks(make_server) -> None:
    server = await make_server(tts=FakeTts(chars_per_s=40.0), asr=FakeWhisper(), vad_factory=EnergyVad)
    client = await _audio_session(server)
    try:
        await client.update_session(policy="eou", policy_params={"backchannel_every_s": 0.4})
        await _until(client, "session.updated")
        pcm = _tone(1.2, True)
        for i in range(0, len(pcm), 640):  # 20 ms frames at real time: the user talks on
            await client.send_audio(pcm[i:i + 640])
            await asyncio.sleep(0.02)
        events = await _until(client, "response.backchannel.audio")
        kinds = [e["type"] for e in events]
        assert "response.backchannel" in kinds and "response.created" not in kinds  # no agent turn
        audio = events[-1]
        assert audio["text"] == "mm-hm" and audio["samples"] > 0 and audio["turn"] == -1
    finally:
        await client.close()


# ---- resume and shutdown ---------------------------------------------------------------------
async def test_resume_after_dropped_connection(make_server) -> None:
    server = await make_server()
    client = DuplexClient(server.ws_url())
    await client.connect()
    sid = client.session_id
    await client.send_text("tell me a long story please")
    before = await _until(client, "response.output_text.delta")
    client._ws.transport.abort()  # noqa: SLF001 - simulate a network drop (no close frame)
    await _eventually(lambda: server.sessions[sid].owner is None)
    hub = server.sessions[sid]
    await _eventually(lambda: hub.session.state == "listening")  # the reply finished while detached
    await client.resume()
    after = await _until(client, "response.done")
    assert client.session_id == sid
    by_seq = {e["seq"]: e for e in before + after}
    events = [by_seq[k] for k in sorted(by_seq)]
    done = events[-1]
    assert _deltas(events, done["turn"]) == done["text"]
    await client.close()


async def test_resume_with_wrong_token_is_refused(make_server) -> None:
    server = await make_server()
    client = DuplexClient(server.ws_url())
    await client.connect()
    sid = client.session_id
    client._ws.transport.abort()  # noqa: SLF001
    await _eventually(lambda: server.sessions[sid].owner is None)
    client.session = {**client.session, "resume_token": "wrong"}
    with pytest.raises(DuplexClientError):
        await client.resume()
    other = DuplexClient(server.ws_url())
    await other.connect()
    await other.send({"type": "session.resume", "session_id": sid, "resume_token": "wrong"})
    err = (await _until(other, "error"))[-1]
    assert err["code"] == "session_not_found"
    assert await other.reply("still works?", timeout=GUARD_S) is not None
    await other.close()


async def test_detached_session_expires_after_ttl(make_server) -> None:
    from duplex.serving.server import ServerLimits

    server = await make_server(limits=ServerLimits(resume_ttl_s=0.2))
    client = DuplexClient(server.ws_url())
    await client.connect()
    sid = client.session_id
    client._ws.transport.abort()  # noqa: SLF001
    await _eventually(lambda: sid not in server.sessions)


async def test_shutdown_during_a_reap_does_not_hang(make_server, monkeypatch) -> None:
    """close() cancels the reaper; a session close under way swallows that cancel (it awaits its
    own cancelled tasks with ``except CancelledError: pass``): the reaper must still end."""
    from duplex.serving import ws_session
    from duplex.serving.server import ServerLimits

    original = ws_session.ServerSession.close
    reaping = asyncio.Event()

    async def slow_close(self, reason: str = "closed") -> None:
        if reason == "expired":
            reaping.set()
            task = asyncio.ensure_future(asyncio.sleep(0.5))  # a task that takes a moment to end
            try:
                await task
            except asyncio.CancelledError:
                pass
        await original(self, reason)

    monkeypatch.setattr(ws_session.ServerSession, "close", slow_close)
    server = await make_server(limits=ServerLimits(resume_ttl_s=0.2))
    client = DuplexClient(server.ws_url())
    await client.connect()
    client._ws.transport.abort()  # noqa: SLF001
    await asyncio.wait_for(reaping.wait(), GUARD_S)
    closing = asyncio.ensure_future(server.close())
    done, _ = await asyncio.wait({closing}, timeout=GUARD_S)  # (wait_for's cancel would be swallowed too)
    if not done:
        closing.cancel()
    assert done, "server.close() hung: the reaper swallowed its cancel and ran on"


async def test_graceful_shutdown_tells_clients(tiny_engine) -> None:
    server = DuplexServer(tiny_engine, config=_config())
    await server.start("127.0.0.1", 0)
    async with connect(server.ws_url()) as ws:
        json.loads(await ws.recv())  # session.created
        await server.close()
        seen = []
        async for message in ws:
            seen.append(json.loads(message)["type"])
        assert "session.closed" in seen
        assert ws.close_code == 1001
    assert not server.sessions


async def test_audio_frame_codec_roundtrip() -> None:
    from duplex.serving.protocol import encode_audio_frame

    header = {"turn": 3, "token_start": 0, "token_end": 2, "token_offsets_samples": [0, 5], "sample_rate_hz": 16000}
    frame = encode_audio_frame(header, b"\x01\x00\x02\x00")
    assert decode_audio_frame(frame) == (header, b"\x01\x00\x02\x00")
