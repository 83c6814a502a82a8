"""The server a loopback benchmark talks to: ``duplex serve`` as a subprocess (its own process and
cores, as in production), or an in-process :class:`~duplex.serving.server.DuplexServer` for the
test fakes. Either way the client only sees a ``ws://`` URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ServeOptions", "ServedProcess", "ServerStartError", "die_with_parent", "free_port", "in_process_server", "read_rss_kib",
           "serve_process", "serve_subprocess", "server_health", "wait_healthy"]

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """``duplex serve`` exited or did not become healthy; the message has the tail of its log."""


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """``duplex serve`` options (None = the server's default)."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    policy: str | None = None
    tts: str | None = None
    asr_model: str | None = None
    auth_token: str | None = None
    startup_timeout_s: float = 900.0  # the first start converts the packaged GGUF (minutes when busy)
    extra_args: tuple[str, ...] = ()  # more ``duplex serve`` flags, e.g. ("--max-sessions", "16")
    type: str = "serve_options"

    def argv(self, port: int) -> list[str]:
        # -P (Python 3.11+): the working directory does not go first on the server's path, so a
        # checkout there cannot replace the code this bench runs (see serve_env)
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        args = [sys.executable, *safe_path, "-m", "duplex.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
        for flag, value in (("--model", self.model), ("--device", self.device), ("--dtype", self.dtype),
                            ("--quantize", self.quantize), ("--policy", self.policy), ("--tts", self.tts),
                            ("--asr-model", self.asr_model), ("--auth-token", self.auth_token)):
            if value is not None:
                args += [flag, value]
        return args + list(self.extra_args)


def serve_env() -> dict[str, str]:
    """The environment of a ``duplex serve`` this bench starts: its ``duplex`` package first on the
    path, so that the server runs the code the bench runs. (``python -m`` put the working directory
    first: an A/B run of a clone with ``PYTHONPATH=clone`` from the main checkout served the main
    checkout's code, and only its own JSON named the clone's commit.)"""
    import duplex

    root = str(Path(duplex.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": root + (os.pathsep + path if path else "")}


def read_rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def server_health(url: str) -> dict[str, Any] | None:
    """A server's ``GET /healthz`` (sessions, the scheduler's counters) from its ``ws://`` or
    ``wss://`` URL; None when it does not answer."""
    parts = urllib.parse.urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    try:
        with urllib.request.urlopen(f"{scheme}://{parts.netloc}/healthz", timeout=5) as r:
            return dict(json.loads(r.read()))
    except (OSError, ValueError):
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


async def wait_healthy(http_base: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
                       log_path: Path | None = None) -> None:
    """Poll ``GET /healthz`` until it answers 200 (or the process dies / the time runs out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(f"duplex serve exited with code {proc.returncode}{_tail(log_path)}")
        if await asyncio.to_thread(_healthy, http_base.rstrip("/") + "/healthz"):
            return
        await asyncio.sleep(0.5)
    raise ServerStartError(f"no answer from {http_base}/healthz within {timeout_s:.0f} s{_tail(log_path)}")


def _tail(path: Path | None, n: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()[-n:]
    return "; server log tail:\n" + "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ServedProcess:
    """A running ``duplex serve``: its URL, port and pid (soak samples its RSS; fault tests kill it)."""

    url: str
    port: int
    pid: int
    log_path: Path
    type: str = "served_process"


@contextlib.asynccontextmanager
async def serve_subprocess(options: ServeOptions, log_dir: str | Path | None = None) -> AsyncIterator[str]:
    """Start ``duplex serve`` on a free port, wait for ``/healthz``, yield its ``ws://`` URL, and
    stop it (SIGINT: a graceful shutdown; SIGKILL if it hangs) on exit."""
    async with serve_process(options, log_dir) as served:
        yield served.url


@contextlib.asynccontextmanager
async def serve_process(options: ServeOptions, log_dir: str | Path | None = None,
                        port: int | None = None) -> AsyncIterator[ServedProcess]:
    """:func:`serve_subprocess` yielding the process too; a process already gone on exit (killed
    by a fault test) is fine."""
    port = port or free_port()
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"duplex-serve-{port}.log"
    argv = options.argv(port)
    log.info("starting %s (log: %s)", " ".join(argv), log_path)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=serve_env(),
                                preexec_fn=die_with_parent())  # noqa: PLW1509 - one prctl call, resolved before the fork
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", options.startup_timeout_s, proc, log_path)
        yield ServedProcess(f"ws://127.0.0.1:{port}/ws", port, proc.pid, log_path)
    finally:
        await asyncio.to_thread(_stop, proc)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the thread that started it dies
    (Linux ``PR_SET_PDEATHSIG``): a bench killed by a signal, which runs no ``finally``, leaves no
    ``duplex serve`` behind holding a port and gigabytes. None where the platform has no prctl."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return preexec


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("duplex serve (pid %d) did not stop within %.0f s; killing it", proc.pid, grace_s)
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def in_process_server(engine: Any, **server_kwargs: Any) -> AsyncIterator[str]:
    """A :class:`DuplexServer` on a free port in this event loop (test fakes: ``tts``, ``asr``,
    ``vad_factory``, ``config``); yields its ``ws://`` URL."""
    from duplex.serving.server import DuplexServer

    server = DuplexServer(engine, **server_kwargs)
    await server.start("127.0.0.1", 0)
    try:
        yield server.ws_url()
    finally:
        await server.close()
