"""Python client for a duplex server: asyncio :class:`DuplexClient`, a thread-backed
:class:`SyncDuplexClient` for robot control loops, and the ``duplex client`` command.
Both stream simultaneous translation with ``translate()`` (duplex/serving/client_translate.py).

Events come out as dicts (the JSON wire events). Agent audio frames come out as dicts too, of type
``response.output_audio.delta`` with the alignment header's fields plus ``audio`` (PCM16LE bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import queue
import secrets
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from duplex.serving.protocol import decode_audio_frame
from duplex.tasks import cancel_and_wait

__all__ = ["DuplexClient", "DuplexClientError", "ResumeError", "SyncDuplexClient", "new_session_id",
           "run_client_cli"]

log = logging.getLogger(__name__)

_CLOSED = {"type": "connection.closed"}


class DuplexClientError(RuntimeError):
    """Connecting or resuming failed (refused, wrong token, no such session)."""


class ResumeError(DuplexClientError):
    """``resume()`` failed. ``reason``: ``unreachable`` (no server answers: it died, or every
    replica behind the proxy is down), ``session_not_found`` (the server answering does not hold
    the session: it expired, was closed, or its process was restarted or killed), or ``closed``
    (the connection ended before ``session.resumed``). Either way the session is gone: its
    conversation and any events not yet received are lost; ``connect()`` starts a new one."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def new_session_id() -> str:
    """A fresh client-chosen session id for ``connect(session_id=...)`` (22 URL-safe characters)."""
    return secrets.token_urlsafe(16)


class DuplexClient:
    """``await connect()``, send with ``send_text``/``send_audio``, read ``events()``, ``close()``.

    Incoming events queue up to ``max_queue``; past that the client stops reading the socket, so
    a consumer that falls behind slows the server down (which then drops audio, never text).
    """

    def __init__(self, url: str, token: str | None = None, *, max_queue: int = 4096,
                 open_timeout_s: float = 30.0) -> None:
        self.url = url
        self.token = token
        self.session: dict[str, Any] | None = None
        self.last_seq = 0
        self.opened: dict[str, Any] | None = None
        self._open_timeout_s = open_timeout_s
        self._max_queue = max_queue
        self._ws: ClientConnection | None = None
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(max_queue)
        self._reader: asyncio.Task[None] | None = None

    # ---- connection -----------------------------------------------------------------------
    @property
    def session_id(self) -> str | None:
        return self.session["id"] if self.session else None

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._reader is not None and not self._reader.done()

    async def connect(self, session_id: str | None = None) -> dict[str, Any]:
        """Open the socket and wait for ``session.created``; returns the session description.

        ``session_id`` (8-64 of ``A-Z a-z 0-9 _ -``, e.g. :func:`new_session_id`) names the new
        session: behind a proxy that hashes on ``session_id`` (``deploy/nginx``) the first
        connection and every resume then reach the same replica."""
        if session_id is None:
            return await self._open(self.url, "session.created")
        sep = "&" if "?" in self.url else "?"
        session = await self._open(f"{self.url}{sep}{urllib.parse.urlencode({'session_id': session_id})}",
                                   "session.created")
        if session["id"] != session_id:
            await self._drop()
            raise DuplexClientError(f"the server did not take session_id {session_id!r} (in use, malformed, "
                                    f"or an older server); it chose {session['id']!r}")
        return session

    async def resume(self) -> dict[str, Any]:
        """Reconnect to the same session (after a dropped connection); missed events are replayed."""
        if self.session is None:
            raise DuplexClientError("nothing to resume: connect() first")
        await self._drop()
        sid = self.session["id"]
        query = urllib.parse.urlencode({"session_id": sid, "resume_token": self.session["resume_token"],
                                        "last_seq": self.last_seq})
        sep = "&" if "?" in self.url else "?"
        lost = ("the session is lost (its conversation and the events after seq "
                f"{self.last_seq} that were not received); connect() starts a new one")
        try:
            return await self._open(f"{self.url}{sep}{query}", "session.resumed")
        except ResumeError:
            raise
        except DuplexClientError as exc:
            if isinstance(exc.__cause__, ConnectionClosed):
                raise ResumeError(f"cannot resume session {sid}: the connection closed before session.resumed "
                                  f"({exc.__cause__}); {lost}", "closed") from exc
            raise ResumeError(f"cannot resume session {sid}: no server answers at {self.url} ({exc.__cause__ or exc}). "
                              f"If the server process died (crash, kill -9, restart) {lost}",
                              "unreachable") from exc

    async def _open(self, url: str, expect: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            ws = await connect(url, additional_headers=headers, max_size=None, compression=None,
                               open_timeout=self._open_timeout_s, max_queue=64)
        except Exception as exc:  # InvalidStatus (401), OSError (refused), timeouts
            raise DuplexClientError(f"cannot connect to {self.url}: {exc}") from exc
        self._ws = ws
        while True:
            try:
                first = self._parse(await ws.recv())
            except ConnectionClosed as exc:
                self._ws = None
                raise DuplexClientError(f"connection to {self.url} closed before {expect}: {exc}") from exc
            if first.get("type") == "error" and first.get("code") == "session_not_found":
                await ws.close()
                self._ws = None
                raise ResumeError(f"cannot resume: the server has no such session ({first.get('message', '')}). "
                                  "It expired, was closed, or the server process was restarted or killed (a "
                                  "restart loses every session; behind a proxy, its replica may be down): the "
                                  "session is lost; connect() starts a new one", "session_not_found")
            if first.get("type") == expect:
                break
            if first.get("type") == "session.created" and expect == "session.resumed":
                await ws.close()
                self._ws = None
                raise ResumeError("server started a new session instead of resuming", "session_not_found")
        self.session = first["session"]
        self.opened = first  # session.created / session.resumed (replayed, replay_complete)
        self._events = asyncio.Queue(self._max_queue)
        self._reader = asyncio.create_task(self._read(ws), name="duplex-client-read")
        return self.session

    def _parse(self, message: str | bytes) -> dict[str, Any]:
        if isinstance(message, bytes):
            header, pcm = decode_audio_frame(message)
            event = {**header, "audio": pcm}
        else:
            event = json.loads(message)
        seq = event.get("seq")
        if isinstance(seq, int) and seq > self.last_seq:
            self.last_seq = seq
        return event

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                await self._events.put(self._parse(message))
        except ConnectionClosed:
            pass
        finally:
            code = ws.close_code
            await self._events.put({**_CLOSED, "code": code, "reason": ws.close_reason})

    async def _drop(self) -> None:
        reader, self._reader = self._reader, None
        await cancel_and_wait(reader, what="client reader")
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    def abort(self) -> None:
        """Drop the connection without a close frame, as a network loss does: the server keeps the
        session, detached, for ``resume()``. ``events()`` then ends with ``connection.closed``."""
        if self._ws is not None and self._ws.transport is not None:
            self._ws.transport.abort()

    async def close(self) -> None:
        """Close normally: the server ends the session (a dropped connection would keep it)."""
        await self._drop()

    async def __aenter__(self) -> DuplexClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- sending --------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        if self._ws is None:
            raise DuplexClientError("not connected")
        await self._ws.send(json.dumps(event))

    async def send_text(self, text: str, final: bool = True) -> None:
        await self.send({"type": "input_text", "text": text, "final": final})

    async def send_audio(self, pcm16: bytes) -> None:
        """PCM16LE mono at the session's input rate (16 kHz unless changed by ``update_session``)."""
        if self._ws is None:
            raise DuplexClientError("not connected")
        await self._ws.send(pcm16)

    async def stream_audio(self, chunks: AsyncIterable[bytes]) -> None:
        async for chunk in chunks:
            await self.send_audio(chunk)

    async def commit_audio(self) -> None:
        """End of the user's speech (push-to-talk): the server finalizes the transcript."""
        await self.send({"type": "input_audio_buffer.commit"})

    async def interrupt(self) -> None:
        """Stop the agent now (``response.cancel``)."""
        await self.send({"type": "response.cancel"})

    async def mark_playback(self, turn: int, heard_tokens: int | None = None, audio_end_ms: float | None = None,
                            done: bool = False) -> None:
        event: dict[str, Any] = {"type": "playback.mark", "turn": turn, "done": done}
        if heard_tokens is not None:
            event["heard_tokens"] = heard_tokens
        if audio_end_ms is not None:
            event["audio_end_ms"] = audio_end_ms
        await self.send(event)

    async def truncate(self, turn: int, audio_end_ms: float) -> None:
        await self.send({"type": "conversation.item.truncate", "turn": turn, "audio_end_ms": audio_end_ms})

    async def update_session(self, **session: Any) -> None:
        await self.send({"type": "session.update", "session": session})

    # ---- receiving ------------------------------------------------------------------------
    async def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        return await asyncio.wait_for(self._events.get(), timeout)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events until the connection closes (the last one is ``connection.closed``)."""
        while True:
            event = await self._events.get()
            yield event
            if event.get("type") == "connection.closed":
                return

    async def wait_for(self, *types: str, timeout: float | None = None) -> dict[str, Any]:
        """Skip events until one of ``types`` arrives."""
        async def _wait() -> dict[str, Any]:
            async for event in self.events():
                if event.get("type") in types:
                    return event
            raise DuplexClientError(f"connection closed while waiting for {types}")

        return await asyncio.wait_for(_wait(), timeout)

    async def reply(self, text: str, timeout: float | None = None) -> str:
        """Send ``text`` and return the agent's whole reply (its ``response.done`` text)."""
        await self.send_text(text)
        return str((await self.wait_for("response.done", timeout=timeout)).get("text", ""))

    def translate(self, source: str | Iterable[str] | AsyncIterable[str], *, source_language: str = "en",
                  target_language: str = "es", policy: str = "wait-k", k: int = 3,
                  policy_params: dict[str, Any] | None = None, layout: str | None = None,
                  timeout_s: float | None = None) -> AsyncIterator[str]:
        """Switch to translate mode and stream ``source`` (a text, or words/chunks as they come)
        word by word; yields the target text deltas. Raises
        :class:`~duplex.serving.client_translate.TranslateError` when the server refuses.
        Events that arrive meanwhile are consumed. ``async for delta in client.translate("...")``."""
        from duplex.serving.client_translate import stream_translation

        return stream_translation(self, source, timeout_s=timeout_s, source_language=source_language,
                                  target_language=target_language, policy=policy, k=k, policy_params=policy_params,
                                  layout=layout)


class SyncDuplexClient:
    """Blocking wrapper for control loops: a background thread runs the asyncio client.

    Up to ``max_queue`` unread events wait here; past that the thread stops taking events from the
    socket (backpressure, as in :class:`DuplexClient`): nothing is dropped on this side.
    """

    _FULL_POLL_S = 0.02

    def __init__(self, url: str, token: str | None = None, connect_timeout_s: float = 30.0,
                 max_queue: int = 4096) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="duplex-client", daemon=True)
        self._thread.start()
        self._events: queue.Queue[dict[str, Any]] = queue.Queue(max_queue)
        self._client = DuplexClient(url, token, max_queue=max_queue)
        self._pump: Future[None] | None = None
        try:
            self.session = self._call(self._client.connect(), connect_timeout_s)
        except BaseException:
            self._stop_loop()
            raise
        self._pump = asyncio.run_coroutine_threadsafe(self._forward(), self._loop)

    def _call(self, coro: Any, timeout: float | None = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _forward(self) -> None:
        async for event in self._client.events():
            while True:
                try:
                    self._events.put_nowait(event)
                    break
                except queue.Full:
                    await asyncio.sleep(self._FULL_POLL_S)  # the caller is behind: wait, never drop

    def say(self, text: str) -> None:
        self._call(self._client.send_text(text))

    def send_text(self, text: str, final: bool = True) -> None:
        self._call(self._client.send_text(text, final))

    def update_session(self, **session: Any) -> None:
        self._call(self._client.update_session(**session))

    def translate(self, source: str | Iterable[str], *, source_language: str = "en", target_language: str = "es",
                  policy: str = "wait-k", k: int = 3, policy_params: dict[str, Any] | None = None,
                  layout: str | None = None, timeout_s: float | None = None) -> Iterator[str]:
        """Blocking :meth:`DuplexClient.translate`: ``for delta in client.translate("...")``."""
        from duplex.serving.client_translate import stream_translation_sync

        return stream_translation_sync(self, self._events, source, timeout_s=timeout_s,
                                       source_language=source_language, target_language=target_language,
                                       policy=policy, k=k, policy_params=policy_params, layout=layout)

    def interrupt(self) -> None:
        self._call(self._client.interrupt())

    def send_audio(self, pcm16: bytes) -> None:
        self._call(self._client.send_audio(pcm16))

    def poll_events(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Everything received so far, waiting up to ``timeout`` s for the first event."""
        out: list[dict[str, Any]] = []
        try:
            out.append(self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait())
            while True:
                out.append(self._events.get_nowait())
        except queue.Empty:
            pass
        return out

    def wait_reply(self, timeout: float = 60.0) -> str:
        """Block until the next ``response.done``; return its text (what the user got)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._events.get(timeout=left)
            except queue.Empty:
                break
            if event.get("type") == "response.done":
                return str(event.get("text", ""))
            if event.get("type") == "connection.closed":
                raise DuplexClientError("connection closed while waiting for a reply")
        raise TimeoutError(f"no reply within {timeout} s")

    def close(self) -> None:
        try:
            self._call(self._client.close(), 10)
        finally:
            if self._pump is not None:
                self._pump.cancel()
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> SyncDuplexClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- CLI -----------------------------------------------------------------------------------
async def _print_events(client: DuplexClient, out: Any, once: bool) -> int:
    mid_line = False
    async for event in client.events():
        kind = event.get("type")
        if kind == "response.output_text.delta":
            out.write(event["delta"])
            out.flush()
            mid_line = True
        elif kind == "response.done":
            if mid_line:
                out.write("\n")
                mid_line = False
            if event.get("reason") not in ("completed", "max_tokens", "stop_sequence"):
                out.write(f"  ({event.get('reason')})\n")
            out.flush()
            if once:
                return 0
        elif kind == "response.interrupted":
            out.write(f"\n  (interrupted; kept: {event.get('kept_text', '')!r})\n")
            mid_line = False
        elif kind == "response.output_audio.paused":
            out.write(" (paused…)")
            out.flush()
        elif kind == "response.output_audio.resumed":
            out.write(" (…resumed) ")
            out.flush()
        elif kind == "error":
            print(f"duplex: error [{event.get('code')}]: {event.get('message')}", file=sys.stderr)
            if once and event.get("code") in ("empty_text", "text_too_long"):
                return 1
        elif kind == "connection.closed":
            if once:
                print(f"duplex: connection closed ({event.get('code')})", file=sys.stderr)
                return 1
            return 0
    return 0


async def run_client_cli(args: argparse.Namespace) -> int:
    """``duplex client``: with ``--text`` send one message, print the streamed reply, exit;
    otherwise send each stdin line (a line while the agent talks interrupts it; ``/stop`` cancels)."""
    import os

    token = getattr(args, "auth_token", None) or os.environ.get("DUPLEX_AUTH_TOKEN") or None
    client = DuplexClient(args.url, token)
    try:
        await client.connect()
    except DuplexClientError as exc:
        print(f"duplex: {exc}", file=sys.stderr)
        return 1
    try:
        if args.text is not None:
            await client.send_text(args.text)
            return await _print_events(client, sys.stdout, once=True)
        printer = asyncio.create_task(_print_events(client, sys.stdout, once=False), name="client-print")
        loop = asyncio.get_running_loop()
        try:
            while not printer.done():
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    break
                line = line.strip()
                if line in ("/quit", "/exit"):
                    break
                if line in ("/stop", "stop"):
                    await client.interrupt()
                elif line:
                    await client.send_text(line)
        finally:
            await cancel_and_wait(printer, what="printer")
        return 0
    finally:
        await client.close()
