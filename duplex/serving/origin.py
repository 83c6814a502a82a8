"""The ``Origin`` check on the WebSocket upgrade (against cross-site WebSocket hijacking).

Browsers send ``Origin`` with every WebSocket handshake and let any page open a socket to any
host, local servers included; cookies or not, a page the user visits could otherwise start a
session on ``duplex serve``. Allowed: the page the server itself serves (same origin: the Origin's
host equals the ``Host`` header), loopback pages (``localhost``, ``127.0.0.1``, ``[::1]``, any port)
and the origins given with ``--allowed-origin`` (``*`` allows every origin). Requests without an
Origin (non-browser clients: the Python client, curl, robots) are allowed; token auth is separate.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

__all__ = ["OriginPolicy"]

_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _normalize(origin: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` -> (scheme, host, port), lower-cased; None if it is not one."""
    try:
        parts = urllib.parse.urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/"):
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def _host_port(host_header: str, scheme: str) -> tuple[str, int] | None:
    try:
        parts = urllib.parse.urlsplit(f"//{host_header.strip()}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme, 80)


class OriginPolicy:
    """``allows(origin, host)``: may a handshake with this ``Origin`` (None: absent) proceed?"""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allow_all = False
        self.allowed: set[tuple[str, str, int]] = set()
        for origin in allowed:
            if origin.strip() == "*":
                self.allow_all = True
                continue
            norm = _normalize(origin)
            if norm is None:
                raise ValueError(f"--allowed-origin {origin!r} is not an origin like https://example.com[:port]")
            self.allowed.add(norm)

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None:
            return True  # not a browser: nothing to hijack
        if self.allow_all:
            return True
        norm = _normalize(origin)
        if norm is None:
            return False  # "null" (sandboxed frames, file://) and garbage
        scheme, name, port = norm
        if name in _LOOPBACK or norm in self.allowed:
            return True
        if host:
            served = _host_port(host, scheme)
            if served is not None and served == (name, port):
                return True  # same origin: the page this server (or its proxy) served
        return False
