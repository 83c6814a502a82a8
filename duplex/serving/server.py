"""``duplex serve``: one process serves the browser page at ``/`` and the WebSocket at ``/ws``.

Every connection gets a :class:`~duplex.serving.ws_session.ServerSession` (its own Session, speech
input and TTS stream) and all of them share one :class:`~duplex.engine.worker.Engine`, one whisper model
and one TTS voice. Wire format: ``docs/protocol.md``; parsing lives in :mod:`duplex.serving.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import http
import importlib.resources
import json
import logging
import mimetypes
import os
import re
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from duplex.audio import SpeechInput, WebRtcVad
from duplex.engine.kv import kv_bytes_per_token
from duplex.engine.worker import Engine
from duplex.serving.admission import CLOSE_TRY_AGAIN_LATER, Admission, ServerBusy
from duplex.serving.http_front import HttpFront
from duplex.serving.openai_chat import make_openai_http
from duplex.serving.openai_realtime import REALTIME_PATH, RealtimeConnection
from duplex.serving.origin import OriginPolicy
from duplex.serving.outbox import TokenBucket
from duplex.serving.protocol import (
    AudioAppend,
    AudioCommit,
    ClientMessage,
    InputText,
    PlaybackMarkMsg,
    ProtocolError,
    ResponseCancel,
    SessionResume,
    SessionUpdate,
    Truncate,
    error_event,
    parse_client_message,
)
from duplex.serving.ws_session import ServerLimits, ServerSession
from duplex.session.config import SessionConfig
from duplex.tasks import cancel_and_wait
from duplex.voice.config import VoiceConfig, default_voice_config, make_speech_input

__all__ = ["DuplexServer", "ServerLimits"]

log = logging.getLogger(__name__)
_KV_GROWTH_HEADROOM = 1.25  # a growable KV layer keeps up to a quarter of spare room (duplex.engine.kv)

WS_PATH = "/ws"
CLOSE_NORMAL = frozenset({1000, 1001})
CLOSE_SEND_OVERFLOW = 1008  # policy violation: the client reads too slowly
CLOSE_TAKEN_OVER = 4001  # the session was resumed on another connection
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")  # a client-chosen id for a new session (?session_id=)
_STATIC_SUFFIXES = frozenset({".html", ".js", ".css", ".svg", ".ico", ".png", ".json", ".wav"})


@functools.lru_cache(maxsize=1)
def served_code() -> dict[str, str | None]:
    """This server's ``duplex`` version and the git commit checked out where its package lies
    (None outside a checkout), for ``/healthz``: not the directory itself, which would tell any
    client that can reach the port where the server is installed."""
    import duplex
    from duplex.eval.runner import git_commit

    return {"version": duplex.__version__, "git_commit": git_commit(Path(duplex.__file__).resolve().parent)}


def _web_dir() -> Path:
    return Path(str(importlib.resources.files("duplex.web")))


class _Connection:
    """One WebSocket: reads client messages into its session, drains the session's outbox."""

    def __init__(self, server: DuplexServer, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.hub: ServerSession | None = None
        self._sender: asyncio.Task[None] | None = None
        limits = server.limits
        self._messages = TokenBucket(limits.messages_per_s, limits.messages_burst)
        self._bytes = TokenBucket(limits.bytes_per_s, max(limits.bytes_burst, float(limits.max_message_bytes)))
        self._limited = 0
        self._last_limit_notice = -1e9
        self._closing_reason: str | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        size = self.server.limits.send_buffer_bytes
        sock = self.ws.transport.get_extra_info("socket") if size else None
        if sock is not None:
            # small kernel buffers make a slow reader visible early (and bound memory for real)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.ws.request.path).query if self.ws.request else "")
        resume_id = (query.get("session_id") or [None])[0]
        hub = None
        proposed: str | None = None
        if resume_id and "resume_token" not in query:
            # a new session under an id the client chose: a proxy hashing on session_id
            # (deploy/nginx) then sends the first connection and every resume to one replica
            proposed, resume_id = resume_id, None
        if resume_id:
            hub = await self.server._take_over(self, resume_id, (query.get("resume_token") or [""])[0])
        if hub is not None:
            last = (query.get("last_seq") or [None])[0]
            await self._attach_existing(hub, int(last) if last and last.isdigit() else None)
        elif not self.server.admission.admits(len(self.server.sessions)):
            await self._refuse_busy()
            return
        else:
            if resume_id:
                await self._send_direct(error_event("session_not_found", "no session to resume with that id/token; "
                                                    "started a new one"))
            if proposed is not None and not self.server.session_id_free(proposed):
                await self._send_direct(error_event(
                    "invalid_value", "session_id: a new session's id must be 8-64 characters of A-Z a-z 0-9 _ - "
                    "and not in use on this server; started one with a server-chosen id"))
                proposed = None
            await self._attach_new(proposed)
        try:
            async for message in self.ws:
                await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            await self._stop_sender()
            await self.server._connection_ended(self)

    async def _refuse_busy(self) -> None:
        """Over capacity: say so in an ``error`` event, then close (1013, try again later)."""
        admission, held = self.server.admission, len(self.server.sessions)
        message = admission.busy_message(held)
        log.warning("refusing a connection: %s", message)
        with contextlib.suppress(ConnectionClosed):
            await self._send_direct({**error_event("server_busy", message, limit=admission.limit_hit(held),
                                                   max_sessions=admission.max_sessions), "seq": 0})
        await self.close(CLOSE_TRY_AGAIN_LATER, "server_busy")

    async def _attach_new(self, session_id: str | None = None) -> None:
        hub = self.server._new_session(session_id=session_id)
        hub.owner = self
        self.hub = hub
        hub.send({"type": "session.created", "session": hub.describe(), "protocol": 1})
        await hub.start()
        self._start_sender()

    async def _attach_existing(self, hub: ServerSession, last_seq: int | None) -> None:
        hub.owner = self
        hub.detached_at = None
        self.hub = hub
        replay, complete = hub.outbox.replay_after(last_seq) if last_seq is not None else ([], True)
        await self._send_direct({"type": "session.resumed", "session": hub.describe(), "replayed": len(replay),
                                 "replay_complete": complete, "seq": 0})
        for text in replay:
            await self.ws.send(text)
        self._start_sender()

    async def _send_direct(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event, separators=(",", ":")))

    def _start_sender(self) -> None:
        assert self.hub is not None
        self._sender = asyncio.create_task(self._send_loop(self.hub), name=f"send-{self.hub.id}")

    async def _stop_sender(self) -> None:
        sender, self._sender = self._sender, None
        await cancel_and_wait(sender, what="send loop")  # a closed socket or error: nothing to salvage

    async def _send_loop(self, hub: ServerSession) -> None:
        try:
            while True:
                await self.ws.send(await hub.outbox.get())
        except ConnectionClosed:
            pass

    async def shutdown(self, code: int, reason: str, flush_s: float) -> None:
        """Flush what is queued (bounded wait), then close the socket."""
        if self.hub is not None and self._sender is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.hub.outbox.drained(), flush_s)
        await self.close(code, reason)

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``; a reader too stuck to take the close frame gets the TCP reset."""
        self._closing_reason = reason
        try:
            await asyncio.wait_for(self.ws.close(code, reason), self.server.limits.close_timeout_s)
        except (asyncio.TimeoutError, ConnectionClosed, OSError):
            pass
        finally:
            if self.ws.transport is not None and not self.ws.transport.is_closing():
                self.ws.transport.abort()

    def abort(self, code: int, reason: str) -> None:
        """Close from a synchronous context (overflow callback): the reader loop ends the rest."""
        self._closing_reason = reason
        self.server._spawn(self.close(code, reason), f"close-{reason}")

    def ended_by_client(self) -> bool:
        """True when the connection ended on purpose (normal close by the client, or closed by
        us for cause); False for a network drop or keepalive timeout, which keep the session."""
        protocol = self.ws.protocol
        sent, rcvd = protocol.close_sent, protocol.close_rcvd
        if self._closing_reason is not None:
            return True
        if rcvd is not None and protocol.close_rcvd_then_sent is not False:
            return rcvd.code in CLOSE_NORMAL
        if sent is not None:
            return "keepalive" not in sent.reason
        return False

    # ---- incoming -------------------------------------------------------------------------
    async def _on_message(self, message: str | bytes) -> None:
        hub = self.hub
        assert hub is not None
        await self._pace(hub, len(message))
        await hub.wait_for_room()  # the session is behind: stop reading (TCP pushes back), drop nothing
        try:
            if isinstance(message, bytes):
                await hub.handle_audio(message)
            else:
                await self._dispatch(hub, parse_client_message(message))
        except ProtocolError as exc:
            hub.send_error(exc.code, exc.message, exc.param)
        except Exception as exc:  # noqa: BLE001 - contain per connection
            log.exception("connection %s: handling a message failed", hub.id)
            hub.send_error("internal_error", f"{type(exc).__name__}: {exc}")

    async def _pace(self, hub: ServerSession, n_bytes: int) -> None:
        """Over the rate limit, stop reading until the budget refills: TCP pushes back on the
        client, and nothing it sent is dropped. The client is told (at most once a second)."""
        while True:
            now = time.monotonic()
            wait = max(self._messages.wait_s(1, now), self._bytes.wait_s(n_bytes, now))
            if wait <= 0:
                self._messages.take(1, now)
                self._bytes.take(min(n_bytes, self._bytes.burst), now)
                return
            self._limited += 1
            if now - self._last_limit_notice >= 1.0:
                self._last_limit_notice = now
                hub.send(error_event("rate_limited", "messages or bytes arrive faster than the limit "
                                     f"({self.server.limits.messages_per_s:g} messages/s, "
                                     f"{self.server.limits.bytes_per_s:g} bytes/s); reading is paced, nothing "
                                     "is dropped", paced=self._limited))
            await asyncio.sleep(wait)

    async def _dispatch(self, hub: ServerSession, msg: ClientMessage) -> None:
        if isinstance(msg, InputText):
            hub.handle_text(msg)
        elif isinstance(msg, AudioAppend):
            await hub.handle_audio(msg.pcm)
        elif isinstance(msg, PlaybackMarkMsg):
            hub.handle_mark(msg)
        elif isinstance(msg, Truncate):
            hub.handle_truncate(msg)
        elif isinstance(msg, ResponseCancel):
            hub.handle_cancel()
        elif isinstance(msg, AudioCommit):
            await hub.handle_commit()
        elif isinstance(msg, SessionUpdate):
            await hub.handle_update(msg)
        elif isinstance(msg, SessionResume):
            await self._resume(msg)

    async def _resume(self, msg: SessionResume) -> None:
        target = await self.server._take_over(self, msg.session_id, msg.resume_token)
        if target is None:
            raise ProtocolError("session_not_found", f"no resumable session {msg.session_id!r} "
                                "(wrong token, expired, or closed)")
        if target is self.hub:
            raise ProtocolError("invalid_state", "this connection already holds that session")
        await self._stop_sender()
        old = self.hub
        if old is not None:
            old.owner = None
            await self.server._discard(old)
        await self._attach_existing(target, msg.last_seq)


class DuplexServer:
    """WebSocket + static-file server. ``await start(host, port)``; ``await close()``.

    ``tts``: a TTS engine (``duplex.audio.load_tts()``, a fake) or None for text-only output.
    ``asr``: a whisper-like model with ``transcribe`` (or None: no audio input); ``vad_factory``
    makes one frame VAD per session (default WebRTC).
    """

    def __init__(self, engine: Engine, *, config: VoiceConfig | SessionConfig | None = None, tts: Any | None = None,
                 asr: Any | None = None, vad_factory: Callable[[], Any] | None = None,
                 speech_factory: Callable[[], SpeechInput] | None = None, limits: ServerLimits | None = None,
                 auth_token: str | None = None, web_dir: str | Path | None = None,
                 allowed_origins: Iterable[str] = (), translate: Any | None = None) -> None:
        self.engine = engine
        self.translate = translate  # duplex.translate.serving.TranslateService: session.update {mode: translate}
        if isinstance(config, SessionConfig):
            config = VoiceConfig(session=config)
        self.config = config or default_voice_config()
        self.limits = limits or ServerLimits()
        self.auth_token = auth_token or None
        self.origins = OriginPolicy(allowed_origins)
        self.admission = Admission.from_limits(self.limits.max_sessions, self.limits.max_detached_sessions,
                                               _kv_budget_bytes(self.limits.max_kv_mb),
                                               _kv_bytes_per_session(engine, self.config.session))
        self.tts = tts
        self.web_dir = Path(web_dir) if web_dir is not None else _web_dir()
        if speech_factory is None and asr is not None:
            make_vad = vad_factory or WebRtcVad
            voice = self.config
            lock = threading.Lock()  # one whisper model for all sessions: one pass at a time
            speech_factory = lambda: make_speech_input(asr, voice, vad=make_vad(), whisper_lock=lock)  # noqa: E731
        self.speech_factory = speech_factory
        self.sessions: dict[str, ServerSession] = {}
        self._connections: set[_Connection] = set()
        self._tts_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-tts") if tts else None
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self._http: HttpFront | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/"

    def ws_url(self, host: str = "127.0.0.1") -> str:
        return f"ws://{host}:{self.port}{WS_PATH}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        lim = self.limits
        # /v1/chat/completions and /v1/models: plain HTTP (SSE) on the same port (http_front.py)
        self._http = HttpFront(*make_openai_http(self.engine, self.config, self._authorized),
                               max_body_bytes=lim.max_message_bytes)
        self._server = await serve(
            self._handle, host, port, process_request=self._process_request, max_size=lim.max_message_bytes,
            ping_interval=lim.ping_interval_s, ping_timeout=lim.ping_timeout_s, close_timeout=lim.close_timeout_s,
            compression=None, max_queue=64, create_connection=self._http.create_connection)
        self._reaper = asyncio.create_task(self._reap_detached(), name="duplex-reaper")
        log.info("duplex server listening on %s", self.url(host))

    async def close(self) -> None:
        """Stop accepting, close every session, flush what is queued, close the sockets."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close(close_connections=False)
        await cancel_and_wait(self._reaper, what="session reaper")
        for hub in list(self.sessions.values()):
            await hub.close("server_shutdown")
        if self._http is not None:
            await self._http.close()
        await asyncio.gather(*(c.shutdown(1001, "server shutting down", self.limits.close_timeout_s)
                               for c in list(self._connections)), return_exceptions=True)
        if self._server is not None:
            # Bounded: a handler stuck on a half-dead socket must not keep shutdown waiting forever.
            try:
                await asyncio.wait_for(asyncio.shield(self._server.wait_closed()), self.limits.close_timeout_s + 1.0)
            except asyncio.TimeoutError:
                log.warning("connection handlers still running after shutdown: closing them")
                self._server.close(close_connections=True)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._server.wait_closed()), self.limits.close_timeout_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sessions.clear()
        if self._tts_executor is not None:
            self._tts_executor.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any, name: str) -> None:
        """Owned fire-and-forget (closing a socket from a sync callback); cancelled on close."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- HTTP: auth + static files --------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        if not self.auth_token:
            return True
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        given = (query.get("token") or [""])[0]
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        return secrets.compare_digest(given.encode(), self.auth_token.encode())

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urllib.parse.urlsplit(request.path).path
        if path in (WS_PATH, REALTIME_PATH):
            if self._closing:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down\n")
            origins = request.headers.get_all("Origin")
            if len(origins) > 1 or not self.origins.allows(origins[0] if origins else None,
                                                           request.headers.get("Host")):
                log.warning("refused a WebSocket from origin %r (allow it with --allowed-origin)", origins)
                return connection.respond(http.HTTPStatus.FORBIDDEN, "origin not allowed (see --allowed-origin)\n")
            if not self._authorized(request):
                resp = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong auth token\n")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="duplex"'
                return resp
            return None
        if path == "/healthz":
            return self._response(200, json.dumps(self.health()).encode(), "application/json")
        return self._static(path)

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: sessions held, the cap, the engine scheduler's counters (ticks,
        express ticks, rows, prefill tokens since start), so a load run can see how the engine
        spent its ticks without a debugger, what runs the forwards (``kernels``:
        :meth:`~duplex.engine.worker.Engine.describe`) and which code serves (``code``: its version and
        git commit, so a benchmark can tell which side of an A/B it measured)."""
        stats = getattr(self.engine, "stats", None)
        engine = {k: v for k, v in dataclasses.asdict(stats).items() if k != "type"} if dataclasses.is_dataclass(stats) else {}
        describe = getattr(self.engine, "describe", None)
        return {"status": "ok", "sessions": len(self.sessions), "max_sessions": self.admission.max_sessions,
                "engine": engine, "kernels": describe() if callable(describe) else {}, "code": served_code()}

    def _static(self, path: str) -> Response:
        name = "index.html" if path in ("/", "/index.html") else path.lstrip("/")
        target = (self.web_dir / name).resolve()
        root = self.web_dir.resolve()
        if root not in target.parents or target.suffix not in _STATIC_SUFFIXES or not target.is_file():
            return self._response(404, b"not found\n", "text/plain; charset=utf-8")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or target.suffix == ".js":
            ctype = ("text/javascript" if target.suffix == ".js" else ctype) + "; charset=utf-8"
        return self._response(200, target.read_bytes(), ctype)

    @staticmethod
    def _response(status: int, body: bytes, ctype: str) -> Response:
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-cache"),
                           ("Connection", "close")])
        return Response(status, http.HTTPStatus(status).phrase, headers, body)

    # ---- sessions -------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        if ws.request is not None and urllib.parse.urlsplit(ws.request.path).path == REALTIME_PATH:
            await RealtimeConnection(self, ws).run()  # the OpenAI Realtime adapter (openai_realtime.py)
            return
        conn = _Connection(self, ws)
        self._connections.add(conn)
        try:
            await conn.run()
        except Exception:  # noqa: BLE001 - one bad client never takes the server down
            log.exception("connection failed")
        finally:
            self._connections.discard(conn)

    def _new_session(self, speech_factory: Callable[[], SpeechInput] | None = None,
                     session_id: str | None = None) -> ServerSession:
        hub = ServerSession(self.engine, self.config, limits=self.limits, tts=self.tts,
                            tts_executor=self._tts_executor, speech_factory=speech_factory or self.speech_factory,
                            on_overflow=self._overflowed, translate=self.translate, session_id=session_id)
        self.sessions[hub.id] = hub
        return hub

    def session_id_free(self, session_id: str) -> bool:
        """May a new session take this client-chosen id? (well-formed and not held here)"""
        return _SESSION_ID.fullmatch(session_id) is not None and session_id not in self.sessions

    def open_session(self, speech_factory: Callable[[], SpeechInput] | None = None) -> ServerSession:
        """A registered session for a protocol adapter (``/v1/realtime``), closed with the server;
        ``speech_factory`` replaces the server's for this session (per-session VAD settings).
        Over ``max_sessions`` it raises :class:`ServerBusy`, the same admission check as ``/ws``."""
        held = len(self.sessions)
        if not self.admission.admits(held):
            raise ServerBusy(self.admission.busy_message(held), self.admission.max_sessions)
        return self._new_session(speech_factory)

    async def close_session(self, hub: ServerSession, reason: str = "closed") -> None:
        await self._discard(hub, reason)

    def _overflowed(self, hub: ServerSession) -> None:
        owner = hub.owner
        if isinstance(owner, _Connection):
            owner.abort(CLOSE_SEND_OVERFLOW, "send_queue_overflow")
        else:
            self._spawn(self._discard(hub, "send_queue_overflow"), f"discard-{hub.id}")

    async def _take_over(self, conn: _Connection, session_id: str, token: str) -> ServerSession | None:
        hub = self.sessions.get(session_id)
        if hub is None or hub.closed or not secrets.compare_digest(token.encode(), hub.resume_token.encode()):
            return None
        old = hub.owner
        if isinstance(old, _Connection) and old is not conn:
            hub.owner = None
            await old._stop_sender()
            old.hub = None
            old._closing_reason = "taken_over"
            self._spawn(old.close(CLOSE_TAKEN_OVER, "session resumed on another connection"), "close-taken-over")
        return hub

    async def _discard(self, hub: ServerSession, reason: str = "closed") -> None:
        self.sessions.pop(hub.id, None)
        await hub.close(reason)

    async def _connection_ended(self, conn: _Connection) -> None:
        hub = conn.hub
        if hub is None or hub.owner is not conn:
            return
        code = conn.ws.close_code
        if self._closing or conn.ended_by_client() or hub.outbox.overflowed:
            await self._discard(hub, conn._closing_reason or ("send_queue_overflow" if hub.outbox.overflowed
                                                              else f"connection_closed_{code}"))
        else:
            log.info("session %s detached (close code %s); resumable for %.0f s", hub.id, code,
                     self.limits.resume_ttl_s)
            hub.detach()
            await self._cap_detached()

    async def _cap_detached(self) -> None:
        """Past ``max_detached_sessions``, the longest-detached sessions are closed first."""
        detached = [(h.id, h.detached_at) for h in self.sessions.values()
                    if h.owner is None and h.detached_at is not None]
        for sid in self.admission.over_detached(detached):
            hub = self.sessions.get(sid)
            if hub is not None:
                log.info("session %s closed: too many detached sessions (max %d)", sid, self.admission.max_detached)
                await self._discard(hub, "detached_limit")

    async def _reap_detached(self) -> None:
        """Close sessions whose client has not come back within the resume TTL."""
        ttl = self.limits.resume_ttl_s
        # close() cancels this task, but a cancel that lands while a session is being closed here
        # is swallowed by that session's own task clean-up (``except CancelledError: pass`` around
        # awaiting its cancelled tasks): the loop must also end on its own, or close() waits forever
        while not self._closing:
            await asyncio.sleep(min(5.0, max(0.05, ttl / 4)))
            now = time.monotonic()
            for hub in list(self.sessions.values()):
                if hub.owner is None and hub.detached_at is not None and now - hub.detached_at > ttl:
                    log.info("session %s expired", hub.id)
                    await self._discard(hub, "expired")


def _kv_bytes_per_session(engine: Engine, session: SessionConfig) -> int:
    """One session's worst-case KV cache: its context window, plus the cache's growth headroom."""
    try:
        per_token = kv_bytes_per_token(engine.lm.model.config, engine.lm.dtype)
    except (AttributeError, TypeError, ValueError):
        return 0  # an engine double without a model config (tests): no KV budget applies
    return int(session.sequence.max_tokens * per_token * _KV_GROWTH_HEADROOM)


def _kv_budget_bytes(max_kv_mb: float | None) -> int | None:
    """``--max-kv-mb``, or half the machine's memory when not given (0: no budget)."""
    if max_kv_mb is None:
        try:
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES")) // 2
        except (AttributeError, ValueError, OSError):
            return None
    return None if max_kv_mb == 0 else int(max_kv_mb * 2**20)
