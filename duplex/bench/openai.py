"""``duplex bench openai``: time to first token over ``/v1/chat/completions`` (SSE) against the
native ``/ws`` text path, in the same run, on the same ``duplex serve`` process.

Both paths ask the same questions with greedy decoding; trials alternate between them so load
drifts hit both alike. Timers start when the request leaves the client:

- SSE: a fresh HTTP request (a connection per completion, as clients make them); times to the
  first SSE chunk (the role chunk, sent once the prompt is prefilled) and to the first content chunk.
- ``/ws``: a fresh session, connected and ready (``session.created``) before the timer starts;
  ``input_text`` -> first ``response.output_text.delta``. Session deltas end on word boundaries
  (the SSE stream sends every decoded piece), and a session prefills its system prompt at
  connect, where a completion prefills it in every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from duplex.bench.servers import ServeOptions, serve_subprocess
from duplex.serving.client import DuplexClient
from duplex.session.config import DEFAULT_INSTRUCTIONS

__all__ = ["bench_openai"]

QUESTIONS = ["What is the capital of France?", "Name three colors of the rainbow.", "How many legs does a spider have?",
             "What do bees make?", "Why is the sky blue?", "Who wrote Hamlet?"]


def _progress(msg: str) -> None:
    print(f"[bench openai] {msg}", file=sys.stderr, flush=True)


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(values), "p50": round(statistics.median(ordered), 1), "mean": round(statistics.fmean(ordered), 1),
            "min": round(ordered[0], 1), "max": round(ordered[-1], 1), "all": [round(v, 1) for v in values]}


async def _sse_lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while line := await reader.readline():
        if line.startswith(b"data: "):
            yield line[6:].strip()


async def sse_first_token(http_base: str, question: str, max_tokens: int, token: str | None = None
                          ) -> dict[str, float]:
    """One streamed completion: ms to the first SSE chunk and to the first content chunk."""
    url = urllib.parse.urlsplit(http_base)
    body = json.dumps({"model": "duplex", "stream": True, "temperature": 0, "max_tokens": max_tokens,
                       "messages": [{"role": "system", "content": DEFAULT_INSTRUCTIONS},
                                    {"role": "user", "content": question}]}).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"{auth}Content-Length: {len(body)}\r\n\r\n").encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(head + body)
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"chat completions answered {status!r}")
        first = content = None
        async for data in _sse_lines(reader):
            now = time.perf_counter()
            if data == b"[DONE]":
                break
            first = first if first is not None else now
            choices = json.loads(data).get("choices") or [{}]
            if content is None and choices[0].get("delta", {}).get("content"):
                content = now
                break
        if first is None or content is None:
            raise RuntimeError("the stream ended without content")
        return {"first_chunk_ms": 1000 * (first - t0), "first_content_ms": 1000 * (content - t0)}
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def ws_first_delta(ws_url: str, question: str, token: str | None = None) -> float:
    """One typed question on a fresh native session: ms to the first text delta."""
    async with DuplexClient(ws_url, token) as client:
        await client.update_session(max_reply_tokens=16)  # typed text ends the turn: any policy answers at once
        t0 = time.perf_counter()
        await client.send_text(question)
        async for ev in client.events():
            if ev["type"] == "response.output_text.delta":
                return 1000 * (time.perf_counter() - t0)
            if ev["type"] == "error":
                raise RuntimeError(f"/ws error: {ev}")
    raise RuntimeError("the /ws session closed before any text")


async def bench_openai(n: int = 6, model: str | None = None, url: str | None = None,
                       auth_token: str | None = None) -> dict[str, Any]:
    """``n`` trials per path (after one warm-up each) against ``url`` or a fresh ``duplex serve``."""
    machine = {"cpu_count": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
               "platform": platform.platform(), "python": platform.python_version()}
    with contextlib.suppress(Exception):
        from duplex.eval.runner import git_commit

        machine["git_commit"] = git_commit(Path(__file__).parent)
    async with contextlib.AsyncExitStack() as stack:
        if url is None:
            _progress("starting duplex serve (text only: --tts none --asr-model none)")
            options = ServeOptions(model=model, tts="none", asr_model="none", auth_token=auth_token)
            url = await stack.enter_async_context(serve_subprocess(options))
        http_base = url.replace("ws://", "http://").replace("wss://", "https://").rsplit("/ws", 1)[0]
        sse: list[dict[str, float]] = []
        ws: list[float] = []
        for i in range(n + 1):
            question = QUESTIONS[i % len(QUESTIONS)]
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    result = await sse_first_token(http_base, question, 16, auth_token)
                    if i:
                        sse.append(result)
                else:
                    ms = await ws_first_delta(url, question, auth_token)
                    if i:
                        ws.append(ms)
            if i:
                _progress(f"trial {i}/{n}: SSE first content {sse[-1]['first_content_ms']:.0f} ms, "
                          f"/ws first delta {ws[-1]:.0f} ms")
    first_content = _stats([r["first_content_ms"] for r in sse])
    ws_stats = _stats(ws)
    return {
        "benchmark": "openai", "command": "duplex bench openai",
        "model": model or "default (packaged SmolLM2-135M-Instruct)",
        "n": n, "max_tokens": 16, "temperature": 0,
        "sse_chat_completions": {"first_chunk_ms": _stats([r["first_chunk_ms"] for r in sse]),
                                 "first_content_ms": first_content},
        "native_ws": {"first_text_delta_ms": ws_stats},
        "ratio_p50_sse_first_content_over_ws_first_delta":
            round(first_content["p50"] / ws_stats["p50"], 3) if ws_stats.get("p50") else None,
        "notes": __doc__.split("\n\n", 1)[1].strip(),
        "machine": {**machine, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
    }
