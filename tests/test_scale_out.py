"""Fault injection and the scale-out recipe (issue 14), against real ``duplex serve`` processes.

- kill -9 a server during a session: the client's resume fails with a clear ``ResumeError``.
- two replicas behind nginx (``deploy/scale_out.sh``, skipped without nginx): sessions that name
  their id resume through the proxy on the replica holding them; when that replica is killed, the
  resume reaches the other one and says the session is lost, and a new session works there.

Every server runs the tiny random model, text-only, started once per module: the two replicas
behind nginx, whose survivor the kill -9 test (last) then uses directly; without nginx, one server.
Timeouts are hang guards only; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from duplex.bench.servers import ServeOptions, free_port
from duplex.serving.client import DuplexClient, ResumeError, new_session_id

GUARD_S = 60.0
START_S = 300.0
ROOT = Path(__file__).resolve().parent.parent
SERVE_ARGS = ("--model", "tiny", "--tts", "none", "--asr-model", "none")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
# slow: real `duplex serve` processes (and nginx) start once per module, ~15-40 s on the 2-core machine
pytestmark = pytest.mark.integration
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install -y nginx)")


@dataclass
class _Procs:
    single: subprocess.Popen[bytes] | None = None  # without nginx
    proxy: subprocess.Popen[str] | None = None
    proxy_port: int = 0
    replica_ports: tuple[int, ...] = ()
    run_dir: Path | None = None


def _healthz(port: int) -> dict[str, object] | None:
    """None when the server is down. A live one answers in milliseconds, but on a loaded 2-core
    machine (two replicas, nginx, this process) a 2 s timeout could read a slow answer as "down"
    and, where sessions are counted, as none held."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=20) as r:
            return dict(json.loads(r.read()))
    except (OSError, ValueError):
        return None


def _wait_healthy(port: int, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + START_S
    while _healthz(port) is None:
        assert proc is None or proc.poll() is None, "duplex serve exited"
        assert time.monotonic() < deadline, "duplex serve did not come up"
        time.sleep(0.2)


def _wait_ready(proxy: subprocess.Popen[str]) -> None:
    """Block until scale_out.sh prints its ready line."""
    box: list[str] = []

    def read() -> None:
        assert proxy.stdout is not None
        for line in proxy.stdout:
            if line.startswith("ready:"):
                box.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(START_S)
    assert box, f"deploy/scale_out.sh did not get ready (exit {proxy.poll()})"


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Procs]:
    tmp = tmp_path_factory.mktemp("scale-out")
    out = _Procs()
    if NGINX is None:
        out.replica_ports = (free_port(),)
        with open(tmp / "single.log", "wb") as log:
            argv = ServeOptions(quantize="none").argv(out.replica_ports[0]) + list(SERVE_ARGS)
            out.single = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    else:
        out.proxy_port, out.replica_ports, out.run_dir = free_port(), (free_port(), free_port()), tmp / "run"
        env = {**os.environ, "DUPLEX_PROXY_PORT": str(out.proxy_port), "DUPLEX_RUN_DIR": str(out.run_dir),
               "DUPLEX_REPLICA_PORTS": " ".join(map(str, out.replica_ports))}
        out.proxy = subprocess.Popen(["bash", str(ROOT / "deploy" / "scale_out.sh"), "--", "--quantize", "none",
                                      *SERVE_ARGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
    try:
        if out.proxy is not None:
            _wait_ready(out.proxy)
        else:
            _wait_healthy(out.replica_ports[0], out.single)
        yield out
    finally:
        if out.single is not None:
            if out.single.poll() is None:
                out.single.kill()
            out.single.wait()
        if out.proxy is not None and out.proxy.poll() is None:
            os.killpg(out.proxy.pid, signal.SIGTERM)  # its trap stops nginx and the replicas
            try:
                out.proxy.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(out.proxy.pid, signal.SIGKILL)
                out.proxy.wait()


async def _mid_reply(client: DuplexClient) -> None:
    """Ask, and return once the reply has started streaming."""
    await client.send_text("Tell me a long story about the sea.")
    await client.wait_for("response.output_text.delta", "response.done", timeout=GUARD_S)


async def _closed(client: DuplexClient) -> list[str]:
    """The types of the events read up to ``connection.closed``."""
    seen: list[str] = []

    async def run() -> list[str]:
        async for event in client.events():
            seen.append(event["type"])
        return seen

    return await asyncio.wait_for(run(), GUARD_S)


# ---- scale-out behind nginx ----------------------------------------------------------------
def _holder(procs: _Procs) -> int:
    """The replica port that holds sessions (exactly one must)."""
    held = [p for p in procs.replica_ports if ((_healthz(p) or {}).get("sessions") or 0) > 0]
    assert len(held) == 1, held
    return held[0]


@needs_nginx
async def test_sessions_resume_through_the_proxy_on_their_replica(procs: _Procs) -> None:
    url = f"ws://127.0.0.1:{procs.proxy_port}/ws"
    clients = [DuplexClient(url) for _ in range(3)]
    for client in clients:
        await client.connect(session_id=new_session_id())
        await client.update_session(max_output_tokens=12)
        assert await client.reply("hello", timeout=GUARD_S) is not None
    held = [(_healthz(p) or {}).get("sessions") for p in procs.replica_ports]
    assert sum(int(n or 0) for n in held) == 3
    for client in clients:  # a network drop mid-reply, then the resume through the proxy
        await _mid_reply(client)
        client.abort()
        finished = "response.done" in await _closed(client)
        seen = client.last_seq
        session = await client.resume()  # a resume on the wrong replica would raise session_not_found
        assert session["id"] == client.session_id and client.opened is not None
        assert client.opened["replay_complete"] is True
        if not finished:  # the rest of the reply arrives on the resumed connection
            done = await client.wait_for("response.done", timeout=GUARD_S)
            assert done["seq"] > seen
        assert await client.reply("and now?", timeout=GUARD_S) is not None
        await client.close()


@needs_nginx
async def test_killing_the_replica_loses_its_session_and_the_other_serves(procs: _Procs) -> None:
    assert procs.run_dir is not None
    for port in procs.replica_ports:  # the previous test's sessions are closed
        while ((_healthz(port) or {}).get("sessions") or 0) > 0:
            await asyncio.sleep(0.05)
    url = f"ws://127.0.0.1:{procs.proxy_port}/ws"
    client = DuplexClient(url)
    await client.connect(session_id=new_session_id())
    await _mid_reply(client)
    victim = _holder(procs)
    os.kill(int((procs.run_dir / f"replica-{victim}.pid").read_text()), signal.SIGKILL)
    await _closed(client)
    with pytest.raises(ResumeError) as info:  # nginx passes the resume to the surviving replica
        await client.resume()
    assert info.value.reason == "session_not_found" and "lost" in str(info.value)
    fresh = DuplexClient(url)
    await fresh.connect(session_id=new_session_id())
    assert await fresh.reply("are you there?", timeout=GUARD_S) is not None
    survivor = next(p for p in procs.replica_ports if p != victim)
    assert ((_healthz(survivor) or {}).get("sessions") or 0) >= 1
    await fresh.close()


# ---- fault injection: kill -9 --------------------------------------------------------------
async def test_kill9_during_a_session_the_resume_fails_clearly(procs: _Procs) -> None:
    port = next(p for p in procs.replica_ports if _healthz(p) is not None)  # the survivor, behind nginx
    client = DuplexClient(f"ws://127.0.0.1:{port}/ws")  # straight to the server: no proxy to fail over
    await client.connect()
    await _mid_reply(client)
    if procs.single is not None:
        procs.single.send_signal(signal.SIGKILL)
        await asyncio.to_thread(procs.single.wait)
    else:
        assert procs.run_dir is not None
        os.kill(int((procs.run_dir / f"replica-{port}.pid").read_text()), signal.SIGKILL)
    await _closed(client)
    with pytest.raises(ResumeError) as info:
        await client.resume()
    err = info.value
    assert err.reason == "unreachable"
    message = str(err)
    assert client.session_id in message and "lost" in message and "connect()" in message
