"""Plain HTTP on the WebSocket port: the routes websockets cannot serve (POST bodies, streamed SSE).

websockets answers every request itself and only with whole bodies; it refuses request bodies
outright. So :class:`HttpFront` looks at each new connection's request line before websockets
does. Connections for a claimed path (``/v1/...`` except ``/v1/realtime``) are taken over with
their transport: the front reads the request, and a handler answers with a whole body or a
stream of chunks (SSE). Every other connection is handed to websockets untouched, as if it had
read the bytes itself. The hook is websockets' documented ``create_connection`` escape hatch
(a wrapper around :class:`ServerConnection`); nothing of websockets is patched.

One request per connection (``Connection: close``); request bodies need ``Content-Length``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers

__all__ = ["HttpFront", "HttpRequest", "HttpResponse", "json_response"]

log = logging.getLogger(__name__)

_MAX_REQUEST_LINE = 8 * 1024
_MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str  # without the query string
    target: str  # as sent: path and query
    query: dict[str, list[str]]
    headers: Headers
    body: bytes = field(repr=False)
    type: str = "http_request"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A whole body (``bytes``) or a stream of chunks (SSE); streams end by closing."""

    status: int
    body: bytes | AsyncIterator[bytes] = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    type: str = "http_response"


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def json_response(status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return HttpResponse(status, json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(), headers=headers)


def _request_target(line: bytes) -> tuple[str, str] | None:
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return None
    try:
        return parts[0].decode("ascii"), urllib.parse.urlsplit(parts[1].decode("ascii")).path
    except (UnicodeDecodeError, ValueError):
        return None


class HttpFront:
    """Owns the claimed HTTP routes of one server.

    ``claims(method, path)``: whether the front answers this request; ``handler``: answers it;
    ``max_body_bytes``: larger bodies get 413; ``head_timeout_s``: a connection that has not sent
    its request line by then is dropped (websockets' own handshake timeout starts after that).
    """

    def __init__(self, claims: Callable[[str, str], bool], handler: Handler, *, max_body_bytes: int = 1 << 20,
                 head_timeout_s: float = 10.0) -> None:
        self.claims = claims
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.head_timeout_s = head_timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def create_connection(self, *args: Any, **kwargs: Any) -> ServerConnection:
        """Pass as ``serve(create_connection=front.create_connection)``."""
        return _SniffingConnection(self, *args, **kwargs)

    async def close(self) -> None:
        """Stop every request still being answered (streams end at once)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- taking a connection over ---------------------------------------------------------
    def take_over(self, transport: asyncio.Transport, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_MAX_HEAD_BYTES, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(head)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        task = loop.create_task(self._serve(reader, writer), name="http-front")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(self._read_request(reader), self.head_timeout_s)
            except _BadRequest as exc:
                response = json_response(exc.status, _error_body(exc.message, "invalid_request_error", None, None))
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            else:
                try:
                    response = await self.handler(request)
                except Exception:  # noqa: BLE001 - one bad request never takes the server down
                    log.exception("HTTP %s %s failed", request.method, request.path)
                    response = json_response(500, _error_body("internal server error", "server_error", None, None))
            await self._send(writer, response)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> HttpRequest:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise _BadRequest(431, "request head too large") from exc
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = Headers()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, f"malformed header line {line[:80]!r}")
            headers[name.strip()] = value.strip()
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            raise _BadRequest(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(headers.get("Content-Length", "0"))
        except ValueError as exc:
            raise _BadRequest(400, "bad Content-Length") from exc
        if length < 0:
            raise _BadRequest(400, "bad Content-Length")
        if length > self.max_body_bytes:
            raise _BadRequest(413, f"request body over {self.max_body_bytes} bytes")
        body = await reader.readexactly(length) if length else b""
        split = urllib.parse.urlsplit(target)
        return HttpRequest(method, split.path, target, urllib.parse.parse_qs(split.query), headers, body)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: HttpResponse) -> None:
        status = http.HTTPStatus(response.status)
        head = [f"HTTP/1.1 {status.value} {status.phrase}", f"Content-Type: {response.content_type}",
                "Cache-Control: no-cache", "Connection: close"]
        head += [f"{k}: {v}" for k, v in response.headers]
        body = response.body
        if isinstance(body, (bytes, bytearray)):
            head.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + bytes(body))
            await writer.drain()
            return
        # a stream: the body ends when the connection closes (HTTP/1.1 close-delimited)
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        try:
            async for chunk in body:
                if writer.is_closing():
                    break  # the client went away: stop producing (the generator is closed below)
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            log.debug("HTTP stream: client disconnected")
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _SniffingConnection(ServerConnection):
    """A websockets connection that first reads the request line: claimed requests go to the
    front with the transport, the rest to websockets (which then starts its handshake)."""

    def __init__(self, front: HttpFront, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._front = front
        self._head: bytearray | None = bytearray()  # None once routed
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._timer = asyncio.get_running_loop().call_later(self._front.head_timeout_s, transport.abort)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            super().data_received(data)
            return
        self._head += data
        end = self._head.find(b"\r\n")
        if end < 0 and len(self._head) < _MAX_REQUEST_LINE:
            return
        head, self._head = bytes(self._head), None
        transport, self._transport = self._transport, None
        assert transport is not None
        if self._timer is not None:
            self._timer.cancel()
        target = _request_target(head[:end]) if end >= 0 else None
        if target is not None and self._front.claims(*target):
            self._front.take_over(transport, head)
            return
        super().connection_made(transport)  # websockets takes it from here (handshake task starts)
        super().data_received(head)

    def eof_received(self) -> bool | None:
        if self._head is not None:
            return None  # closed before a request line: close our side too
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head is not None:  # never routed: websockets never saw this connection
            if self._timer is not None:
                self._timer.cancel()
            return
        super().connection_lost(exc)
