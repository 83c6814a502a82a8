"""Translate-mode streaming for the Python clients (``DuplexClient.translate``, ``SyncDuplexClient.translate``).

One call switches the session to translate mode (``session.update {mode: "translate", ...}``),
streams the source word by word as ``input_text {final: false}`` (then an empty ``final: true``)
and yields the target text deltas as the server confirms them. The call ends once every source
word it sent is in a completed source sentence whose translation is done: the server splits the
source into sentences (at ``.``/``?``/``!``) and the client cannot know where, so it counts words.
The session stays in translate mode afterwards (``update_session(mode="chat")`` turns it back).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from duplex.serving.client import DuplexClientError

if TYPE_CHECKING:
    from duplex.serving.client import DuplexClient, SyncDuplexClient

__all__ = ["TranslateError", "TranslationProgress", "stream_translation", "stream_translation_sync",
           "translate_settings"]

Source = str | Iterable[str] | AsyncIterable[str]
_NOTICES = ("rate_limited",)  # error events that report, not refuse


class TranslateError(DuplexClientError):
    """The server refused the translation (``code``: e.g. ``unsupported_language_pair``,
    ``invalid_policy``, ``invalid_state``, ``translation_unavailable``) or the connection ended."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code, self.message, self.param = code, message, param


def translate_settings(source_language: str = "en", target_language: str = "es", policy: str = "wait-k",
                       k: int = 3, policy_params: dict[str, Any] | None = None,
                       layout: str | None = None) -> dict[str, Any]:
    """The ``session.update`` fields of translate mode (docs/protocol.md, "Translate mode")."""
    settings: dict[str, Any] = {"mode": "translate", "source_language": source_language,
                                "target_language": target_language, "policy": policy, "k": k}
    if policy_params is not None:
        settings["policy_params"] = policy_params
    if layout is not None:  # None: the server's (or the session's current) layout
        settings["layout"] = layout
    return settings


def _error(event: dict[str, Any]) -> TranslateError:
    detail = event.get("error") if isinstance(event.get("error"), dict) else {}
    return TranslateError(str(event.get("code", "error")), str(event.get("message", "")), detail.get("param"))


class TranslationProgress:
    """Follows one translation's events (pure, no I/O): ``on_event`` returns a target delta or
    None, raises :class:`TranslateError` on a refusal; ``finished`` once all sent words are done."""

    def __init__(self) -> None:
        self.words_sent = 0
        self.sending = True
        self.words_done = 0
        self._open_turns: set[int] = set()

    def sent(self, chunk: str) -> None:
        self.words_sent += len(chunk.split())

    @property
    def finished(self) -> bool:
        return not self.sending and self.words_done >= self.words_sent and not self._open_turns

    def on_event(self, event: dict[str, Any]) -> str | None:
        kind = event.get("type")
        if kind == "response.created":
            self._open_turns.add(event.get("turn", -1))
        elif kind == "response.output_text.delta":
            return str(event.get("delta", ""))
        elif kind == "conversation.item.input_audio_transcription.completed":
            self.words_done += len(str(event.get("transcript", "")).split())
        elif kind == "response.done":
            self._open_turns.discard(event.get("turn", -1))
        elif kind == "error" and event.get("code") not in _NOTICES:
            raise _error(event)
        elif kind == "connection.closed":
            raise TranslateError("connection_closed", f"the connection closed (code {event.get('code')}) "
                                 "before the translation was done")
        return None


def _updated(event: dict[str, Any]) -> bool:
    """True at ``session.updated``; raises at the refusal of the update."""
    if event.get("type") == "session.updated":
        return True
    if event.get("type") == "error" and event.get("code") not in _NOTICES:
        raise _error(event)
    if event.get("type") == "connection.closed":
        raise TranslateError("connection_closed", "the connection closed before session.updated")
    return False


async def stream_translation(client: DuplexClient, source: Source, *, timeout_s: float | None = None,
                             **settings: Any) -> AsyncIterator[str]:
    """``DuplexClient.translate``: ``timeout_s`` bounds the wait for any one event (the first
    translate update loads the server's model: allow for that)."""
    await client.update_session(**translate_settings(**settings))
    while not _updated(await client.next_event(timeout_s)):
        pass
    progress = TranslationProgress()
    feeder = asyncio.create_task(_feed(client, source, progress), name="duplex-client-translate-feed")
    get: asyncio.Task[dict[str, Any]] | None = None
    try:
        while not progress.finished:
            get = get or asyncio.ensure_future(client.next_event())
            waiting: set[asyncio.Future[Any]] = {get} if feeder.done() else {get, feeder}
            done, _ = await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise TimeoutError(f"no translation event within {timeout_s} s")
            if feeder in done:
                feeder.result()  # a send that failed raises here
            if get in done:
                event, get = get.result(), None
                delta = progress.on_event(event)
                if delta:
                    yield delta
    finally:
        for task in (feeder, get):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def _feed(client: DuplexClient, source: Source, progress: TranslationProgress) -> None:
    async def send(chunk: str) -> None:
        if chunk.strip():
            progress.sent(chunk)  # counted before the server can answer it
            await client.send_text(chunk.strip() + " ", final=False)

    if isinstance(source, str):
        for word in source.split():
            await send(word)
    elif isinstance(source, AsyncIterable):
        async for chunk in source:
            await send(chunk)
    else:
        for chunk in source:
            await send(chunk)
    await client.send_text("", final=True)  # ends the last sentence
    progress.sending = False


def stream_translation_sync(client: SyncDuplexClient, events: queue.Queue[dict[str, Any]],
                            source: str | Iterable[str], *, timeout_s: float | None = None,
                            **settings: Any) -> Iterator[str]:
    """``SyncDuplexClient.translate`` (``events``: that client's received-event queue): a sync
    iterable source is read on a helper thread (it may block between words, as a live source
    does) while the caller iterates the target deltas."""
    client.update_session(**translate_settings(**settings))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not _updated(_get(events, deadline)):
        pass
    progress = TranslationProgress()
    failure: list[BaseException] = []
    stop = threading.Event()

    def feed() -> None:
        try:
            for chunk in source.split() if isinstance(source, str) else source:
                if stop.is_set():
                    return
                if chunk.strip():
                    progress.sent(chunk)
                    client.send_text(chunk.strip() + " ", final=False)
            client.send_text("", final=True)
            progress.sending = False
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            failure.append(exc)

    feeder = threading.Thread(target=feed, name="duplex-client-translate-feed", daemon=True)
    feeder.start()
    try:
        while not progress.finished:
            if failure:
                raise failure[0]
            try:
                event = events.get(timeout=0.05)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"no translation event within {timeout_s} s") from None
                continue
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            delta = progress.on_event(event)
            if delta:
                yield delta
    finally:
        stop.set()
        feeder.join(timeout=10)


def _get(events: queue.Queue[dict[str, Any]], deadline: float | None) -> dict[str, Any]:
    try:
        return events.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0))
    except queue.Empty:
        raise TimeoutError("no session.updated before the timeout") from None
