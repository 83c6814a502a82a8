"""``/v1/realtime``: the OpenAI Realtime API (GA event names) as an adapter on a ServerSession.

Each connection owns one :class:`~duplex.serving.ws_session.ServerSession`, the same object a
``/ws`` connection gets (same VoicePipeline, Session, engine, ASR and TTS). This module only
translates. Client events become the session's ``handle_*`` calls, and the session's native
events (``docs/protocol.md``), read from its outbox, become Realtime server events. Conversation
items, response lifecycles and 24 kHz audio are bookkeeping on top; no speech or text stage is
redone. What the API has and duplex has not is refused with an ``error`` event naming it
(``docs/openai.md``). This module is the inbound half (client events); the outbound half (session
events -> Realtime events) is :mod:`duplex.serving.openai_realtime_out`.

Realtime WebSocket clients do not report playback, but duplex's barge-in rolls the cache back to
what was heard. So the adapter assumes that audio plays in real time from its first delta: a turn
counts as heard when that time has passed. ``conversation.item.truncate`` sent before then rolls
back to the exact position the client names.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from duplex.audio import SpeechInput
from duplex.audio.vad import VadSegmenter
from duplex.serving.admission import CLOSE_TRY_AGAIN_LATER, ServerBusy
from duplex.serving.openai_realtime_events import (MAX_OUTPUT_TOKENS, GaError, RealtimeSettings,
                                                   parse_response_create, parse_session)
from duplex.serving.openai_realtime_out import OUTPUT_RATE_HZ, RealtimeOutbound, _Response
from duplex.serving.openai_turns import ThresholdVad
from duplex.serving.outbox import TokenBucket
from duplex.serving.protocol import (InputText, ProtocolError, SessionUpdate, Truncate,
                                     decode_audio_frame)

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from duplex.serving.server import DuplexServer
    from duplex.serving.ws_session import ServerSession

__all__ = ["REALTIME_PATH", "RealtimeConnection"]

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
_PASS = "openai.passthrough"  # wraps the adapter's own events so they share the session's outbox order


class RealtimeConnection(RealtimeOutbound):
    """One ``/v1/realtime`` WebSocket. ``await run()`` until the socket closes."""

    def __init__(self, server: DuplexServer, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.hub: ServerSession | None = None
        session = server.config.session
        self.settings = RealtimeSettings(audio_output=server.tts is not None, instructions=session.instructions,
                                         max_output_tokens=session.sampling.max_tokens)
        self._ids = itertools.count(1)
        self._events = itertools.count(1)
        self.items: dict[str, dict[str, Any]] = {}  # the conversation as the client sees it
        self._held: list[tuple[str, str]] = []  # user text items not yet in the session: (item_id, text)
        self._user_item: str | None = None  # the open audio item (speech not yet answered)
        self._user_committed = False
        self._user_text_sent = ""
        self._responses: dict[int, _Response] = {}
        self._active: _Response | None = None
        self._pending: dict[str, Any] | None = None  # response.create parameters waiting for the turn
        self._armed = False
        self._segmenter: VadSegmenter | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        limits = server.limits
        self._bucket = TokenBucket(limits.messages_per_s, limits.messages_burst)

    @property
    def threshold(self) -> float:  # read by ThresholdVad on the ASR thread
        return self.settings.turn_detection.threshold

    # ---- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        factory = self._speech_factory if self.server.speech_factory is not None else None
        try:
            hub = self.hub = self.server.open_session(speech_factory=factory)
        except ServerBusy as exc:
            await self._refuse_busy(exc)
            return
        hub.owner = self
        sender = asyncio.create_task(self._send_loop(hub), name=f"realtime-send-{hub.id}")
        try:
            await hub.start()
            await hub.handle_update(SessionUpdate(
                input_sample_rate_hz=OUTPUT_RATE_HZ, input_channels=1, policy="realtime",
                policy_params=self.settings.turn_detection.policy_params(),
                output_modalities=("text", "audio") if self.settings.audio_output else ("text",)))
            self._emit({"type": "session.created", "session": self.settings.describe(hub.id, self.server)})
            async for message in self.ws:
                await self._pace()
                await self._receive(message)
        except Exception:  # noqa: BLE001 - a bad connection never takes the server down
            log.exception("realtime connection failed")
        finally:
            for task in (*self._tasks, sender):
                task.cancel()
            await asyncio.gather(sender, *self._tasks, return_exceptions=True)
            hub.owner = None
            await self.server.close_session(hub, "connection_closed")

    async def _refuse_busy(self, exc: ServerBusy) -> None:
        """Over ``--max-sessions``: one ``error`` event (code ``server_busy``), then close 1013."""
        log.warning("refusing a realtime connection: %s", exc)
        event = self._error("server_busy", str(exc), kind="server_error")
        event["error"]["max_sessions"] = exc.max_sessions
        event["event_id"] = f"event_{next(self._events)}"
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(json.dumps(event, separators=(",", ":")))
        with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed, OSError):
            await asyncio.wait_for(self.ws.close(CLOSE_TRY_AGAIN_LATER, "server_busy"),
                                   self.server.limits.close_timeout_s)

    async def _pace(self) -> None:
        """Over the message rate, stop reading until the budget refills (TCP pushes back)."""
        while (wait := self._bucket.wait_s(1, time.monotonic())) > 0:
            await asyncio.sleep(wait)
        self._bucket.take(1, time.monotonic())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _speech_factory(self) -> SpeechInput:
        """The server's VAD + shared whisper, with this session's threshold and prefix padding."""
        speech = self.server.speech_factory()
        seg = speech.segmenter
        speech.segmenter = self._segmenter = VadSegmenter(
            ThresholdVad(seg.vad, self), prefix_padding_ms=self.settings.turn_detection.prefix_padding_ms,
            min_silence_ms=seg.min_silence_ms, min_speech_ms=seg.min_speech_ms)
        return speech

    # ---- outgoing -------------------------------------------------------------------------
    def _emit(self, event: dict[str, Any]) -> None:
        """Queue a Realtime event behind everything the session has queued so far."""
        assert self.hub is not None
        self.hub.send({"type": _PASS, "event": event})

    def _error(self, code: str, message: str, param: str | None = None, client_event: str | None = None,
               kind: str = "invalid_request_error") -> dict[str, Any]:
        return {"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                           "event_id": client_event}}

    async def _send_loop(self, hub: ServerSession) -> None:
        while True:
            item = await hub.outbox.get()
            if isinstance(item, bytes):
                out = self._on_audio(*decode_audio_frame(item))
            else:
                native = json.loads(item)
                if native["type"] == "session.closed":
                    await self.ws.close(1008 if native.get("reason") == "send_queue_overflow" else 1001,
                                        str(native.get("reason", "")))
                    return
                out = [native["event"]] if native["type"] == _PASS else self._translate(native)
            for event in out:
                event.setdefault("event_id", f"event_{next(self._events)}")
                await self.ws.send(json.dumps(event, separators=(",", ":"), ensure_ascii=False))

    # ---- incoming -------------------------------------------------------------------------
    async def _receive(self, message: str | bytes) -> None:
        client_event: str | None = None
        try:
            if isinstance(message, bytes):
                raise GaError("invalid_event", "binary frames are not part of the Realtime API; send "
                              "input_audio_buffer.append with base64 audio")
            try:
                msg = json.loads(message)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise GaError("invalid_json", f"message is not valid JSON: {exc}") from exc
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise GaError("invalid_event", "a client event is a JSON object with a string 'type'")
            client_event = msg.get("event_id") if isinstance(msg.get("event_id"), str) else None
            await self._dispatch(msg["type"], msg)
        except GaError as exc:
            self._emit(self._error(exc.code, exc.message, exc.param, client_event))
        except ProtocolError as exc:
            self._emit(self._error(exc.code, exc.message, None, client_event))
        except Exception as exc:  # noqa: BLE001 - a bug in one event must not end the conversation
            log.exception("realtime: handling a client event failed")
            self._emit(self._error("internal_error", f"{type(exc).__name__}: {exc}", None, client_event,
                                   kind="server_error"))

    async def _dispatch(self, kind: str, msg: dict[str, Any]) -> None:
        assert self.hub is not None
        hub = self.hub
        if kind == "session.update":
            await self._session_update(msg)
        elif kind == "input_audio_buffer.append":
            audio = msg.get("audio")
            if not isinstance(audio, str):
                raise GaError("missing_field", "input_audio_buffer.append needs base64 'audio'", "audio")
            try:
                pcm = base64.b64decode(audio, validate=True)
            except ValueError as exc:
                raise GaError("invalid_audio", f"'audio' is not base64 ({exc})", "audio") from exc
            await hub.handle_audio(pcm)
        elif kind == "input_audio_buffer.commit":
            await self._commit()
        elif kind == "input_audio_buffer.clear":
            self._emit({"type": "input_audio_buffer.cleared"})
        elif kind == "conversation.item.create":
            await self._item_create(msg)
        elif kind == "conversation.item.delete":
            self._item_delete(self._item_id(msg))
        elif kind == "conversation.item.retrieve":
            item_id = self._item_id(msg)
            self._emit({"type": "conversation.item.retrieved", "item": self._known(item_id)})
        elif kind == "conversation.item.truncate":
            self._truncate(msg)
        elif kind == "response.create":
            await self._response_create(msg)
        elif kind == "response.cancel":
            if self._active is None or self._active.native_done is not None:
                raise GaError("response_cancel_not_active", "there is no response in progress to cancel")
            self._active.cancel_reason = "client_cancelled"
            hub.handle_cancel()
        elif kind == "output_audio_buffer.clear":  # stop what is playing now, keep what was heard
            resp = max(self._responses.values(), key=lambda r: r.turn, default=None)
            if resp is not None and resp.audio and (not resp.finished or self._still_playing(resp)):
                hub.handle_truncate(Truncate(resp.turn, self._played_ms(resp)))
            self._emit({"type": "output_audio_buffer.cleared", "response_id": resp.id if resp else None})
        else:
            raise GaError("unknown_event_type", f"unknown or unsupported client event {kind!r} (see docs/openai.md)")

    async def _session_update(self, msg: dict[str, Any]) -> None:
        assert self.hub is not None
        new = parse_session(msg.get("session"), self.settings, audio_available=self.server.tts is not None)
        old = self.settings
        if new.audio_output != old.audio_output:
            await self.hub.handle_update(SessionUpdate(output_modalities=("text", "audio") if new.audio_output
                                                       else ("text",)))
        changes: dict[str, Any] = {}
        if new.instructions != old.instructions:
            changes["instructions"] = new.instructions
        if new.max_output_tokens != old.max_output_tokens:
            changes["max_reply_tokens"] = new.max_output_tokens or MAX_OUTPUT_TOKENS
        if new.turn_detection != old.turn_detection:
            changes.update(policy="realtime", policy_params=new.turn_detection.policy_params(self._armed))
        if changes:
            await self.hub.handle_update(SessionUpdate(**changes))
        self.settings = new
        if self._segmenter is not None:
            self._segmenter.prefix_padding_ms = new.turn_detection.prefix_padding_ms
        self._emit({"type": "session.updated", "session": new.describe(self.hub.id, self.server)})

    async def _commit(self) -> None:
        assert self.hub is not None
        if self._user_item is None:
            raise GaError("input_audio_buffer_commit_empty", "no speech in the input audio buffer to commit")
        await self.hub.handle_commit()
        for event in self._commit_user_item():
            self._emit(event)

    def _commit_user_item(self) -> list[dict[str, Any]]:
        """The open audio item is committed: announce it (once)."""
        if self._user_item is None or self._user_committed:
            return []
        self._user_committed = True
        item = {"id": self._user_item, "object": "realtime.item", "type": "message", "role": "user",
                "status": "completed", "content": [{"type": "input_audio", "transcript": None}]}
        previous = self._last_item_id()
        self.items[self._user_item] = item
        return [{"type": "input_audio_buffer.committed", "item_id": self._user_item, "previous_item_id": previous},
                {"type": "conversation.item.added", "previous_item_id": previous, "item": item}]

    async def _item_create(self, msg: dict[str, Any]) -> None:
        assert self.hub is not None
        item = msg.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise GaError("unsupported_item", "only message items can be created (no function calls)", "item.type")
        role = item.get("role")
        parts = item.get("content")
        if not isinstance(parts, list) or not parts:
            raise GaError("invalid_value", "item.content must be a non-empty list", "item.content")
        texts = []
        for part in parts:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "text") \
                    or not isinstance(part.get("text"), str):
                raise GaError("unsupported_content", "only input_text content can be created; send audio with "
                              "input_audio_buffer.append", "item.content")
            texts.append(part["text"])
        text = " ".join(texts).strip()
        if not text:
            raise GaError("empty_text", "the item has no text", "item.content")
        item_id = item.get("id") if isinstance(item.get("id"), str) and item["id"] not in self.items \
            else f"item_{next(self._ids):04d}"
        if role == "user":
            self._held.append((item_id, text))  # enters the session with the next response (or speech)
        elif role == "system":
            await self.hub.handle_update(SessionUpdate(instructions=text))
        else:
            raise GaError("unsupported_role", f"items with role {role!r} cannot be created: duplex writes the "
                          "assistant's turns itself", "item.role")
        stored = {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed",
                  "content": [{"type": "input_text", "text": text}]}
        previous = self._last_item_id()
        self.items[item_id] = stored
        self._emit({"type": "conversation.item.added", "previous_item_id": previous, "item": stored})
        self._emit({"type": "conversation.item.done", "previous_item_id": previous, "item": stored})

    def _item_delete(self, item_id: str) -> None:
        self._known(item_id)
        held = [h for h in self._held if h[0] == item_id]
        if not held:
            raise GaError("item_delete_unsupported", f"item {item_id!r} is already in the model's context (its KV "
                          "cache); only user text items not yet answered can be deleted", "item_id")
        self._held.remove(held[0])
        del self.items[item_id]
        self._emit({"type": "conversation.item.deleted", "item_id": item_id})

    def _truncate(self, msg: dict[str, Any]) -> None:
        assert self.hub is not None
        item_id = self._item_id(msg)
        self._known(item_id)
        end_ms = msg.get("audio_end_ms")
        if isinstance(end_ms, bool) or not isinstance(end_ms, (int, float)) or end_ms < 0:
            raise GaError("invalid_value", "audio_end_ms must be a number >= 0", "audio_end_ms")
        resp = next((r for r in self._responses.values() if r.item_id == item_id), None)
        if resp is None or not resp.audio:
            raise GaError("invalid_value", f"item {item_id!r} is not an assistant item with audio", "item_id")
        if not resp.finished or self._still_playing(resp):
            if resp.cancel_reason is None:
                resp.cancel_reason = "turn_detected" if self.settings.turn_detection.interrupt_response \
                    else "client_cancelled"
            self.hub.handle_truncate(Truncate(resp.turn, float(end_ms)))
        self._emit({"type": "conversation.item.truncated", "item_id": item_id,
                    "content_index": int(msg.get("content_index") or 0), "audio_end_ms": int(end_ms)})

    async def _response_create(self, msg: dict[str, Any]) -> None:
        assert self.hub is not None
        params = parse_response_create(msg.get("response"), self.settings)
        if self._active is not None and not self._active.finished or self._pending is not None:
            raise GaError("conversation_already_has_active_response",
                          "a response is in progress; wait for response.done or send response.cancel")
        if not self._held and self._user_item is None:
            raise GaError("no_user_input", "response.create needs new user input (a conversation.item.create or "
                          "speech) since the last response: duplex answers user turns")
        restore: dict[str, Any] = {}
        changes: dict[str, Any] = {}
        if params.instructions is not None and params.instructions != self.settings.instructions:
            changes["instructions"], restore["instructions"] = params.instructions, self.settings.instructions
        if params.max_output_tokens is not None and params.max_output_tokens != self.settings.max_output_tokens:
            changes["max_reply_tokens"] = params.max_output_tokens
            restore["max_reply_tokens"] = self.settings.max_output_tokens or MAX_OUTPUT_TOKENS
        if changes:
            await self.hub.handle_update(SessionUpdate(**changes))
        if self._held:
            self.hub.handle_text(InputText(" ".join(text for _, text in self._held), final=True))
            self._held.clear()
        self._pending = {"metadata": params.metadata, "restore": restore}
        self._armed = True
        await self._set_policy()

    async def _set_policy(self) -> None:
        assert self.hub is not None
        await self.hub.handle_update(SessionUpdate(
            policy="realtime", policy_params=self.settings.turn_detection.policy_params(self._armed)))

    def _item_id(self, msg: dict[str, Any]) -> str:
        item_id = msg.get("item_id")
        if not isinstance(item_id, str):
            raise GaError("missing_field", f"{msg.get('type')} needs 'item_id'", "item_id")
        return item_id

    def _known(self, item_id: str) -> dict[str, Any]:
        if item_id not in self.items:
            raise GaError("item_not_found", f"no item {item_id!r} in this conversation", "item_id")
        return self.items[item_id]

    def _last_item_id(self) -> str | None:
        return next(reversed(self.items), None)
