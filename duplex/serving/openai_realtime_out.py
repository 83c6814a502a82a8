"""``/v1/realtime``'s outbound half: the session's native events become Realtime server events.

Responses, their assistant items and content parts, 24 kHz audio deltas (resampled from the TTS
rate) and the end of each response are bookkeeping on the session's events; nothing is generated
here. Without playback reports from the client, a turn counts as heard once real-time playback from
its first delta would have reached that point (``_played_ms``).

A mixin of :class:`duplex.serving.openai_realtime.RealtimeConnection`, which owns the state and
the inbound half (client events -> the session's ``handle_*`` calls).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duplex.serving.protocol import InputText, PlaybackMarkMsg, ProtocolError, SessionUpdate

__all__ = ["OUTPUT_RATE_HZ", "RealtimeOutbound"]

OUTPUT_RATE_HZ = 24_000


@dataclass(slots=True)
class _Response:
    """One agent turn as a Realtime response with one assistant item."""

    turn: int
    id: str
    item_id: str
    audio: bool
    metadata: dict[str, Any] | None = None
    text: str = ""
    tokens: int = 0
    cancel_reason: str | None = None
    native_done: dict[str, Any] | None = None
    audio_done: bool = False
    finished: bool = False
    resampler: Any = None
    first_audio_t: float | None = None
    audio_end_ms: float = 0.0  # native end of the turn's audio (its own timeline)
    restore: dict[str, Any] = field(default_factory=dict)  # session settings to put back afterwards



class RealtimeOutbound:
    """Session events -> Realtime events (mixed into ``RealtimeConnection``)."""

    # state and helpers owned by RealtimeConnection (declared for readers and type checkers)
    server: Any
    hub: Any
    settings: Any
    items: dict[str, dict[str, Any]]

    # ---- session events -> Realtime events --------------------------------------------------
    def _translate(self, ev: dict[str, Any]) -> list[dict[str, Any]]:
        kind = ev["type"]
        td = self.settings.turn_detection
        if kind == "input_audio_buffer.speech_started":
            if self._user_item is None:
                self._user_item, self._user_committed, self._user_text_sent = f"item_{next(self._ids):04d}", False, ""
                if self._held:  # typed items before this speech enter the conversation first
                    assert self.hub is not None
                    self.hub.handle_text(InputText(" ".join(t for _, t in self._held) + " ", final=False))
                    self._held.clear()
            return [] if td.kind == "none" else [{"type": "input_audio_buffer.speech_started",
                                                  "audio_start_ms": ev["audio_start_ms"], "item_id": self._user_item}]
        if kind == "input_audio_buffer.speech_stopped":
            if td.kind == "none" or self._user_item is None:
                return []
            return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ev["audio_end_ms"],
                     "item_id": self._user_item}, *self._commit_user_item()]
        if kind == "conversation.item.input_audio_transcription.delta":
            committed = ev.get("committed_text") or ""
            if self._user_item is None or not self.settings.transcription \
                    or len(committed) <= len(self._user_text_sent):
                return []
            delta = committed[len(self._user_text_sent):] if committed.startswith(self._user_text_sent) else committed
            self._user_text_sent = committed
            return [{"type": "conversation.item.input_audio_transcription.delta", "item_id": self._user_item,
                     "content_index": 0, "delta": delta}]
        if kind == "conversation.item.input_audio_transcription.completed":
            return self._user_turn_done(ev.get("transcript") or "")
        if kind == "response.created":
            return self._response_started(int(ev["turn"]))
        resp = self._responses.get(int(ev.get("turn", -1)))
        if kind == "response.output_text.delta" and resp is not None:
            resp.text += ev["delta"]
            resp.tokens = max(resp.tokens, int(ev.get("token_end", 0)))
            return [self._part_event(resp, "response.output_audio_transcript.delta" if resp.audio
                                     else "response.output_text.delta", delta=ev["delta"])]
        if kind == "response.interrupted" and resp is not None:
            if resp.cancel_reason is None:
                resp.cancel_reason = "client_cancelled" if ev.get("reason") == "cancelled" else "turn_detected"
            if resp.audio:  # no truncate from the client yet: keep what real-time playback would have played
                assert self.hub is not None
                self.hub.handle_mark(PlaybackMarkMsg(resp.turn, audio_end_ms=self._played_ms(resp)))
            return []
        if kind == "response.done" and resp is not None:
            resp.native_done = ev
            resp.text = ev.get("text", resp.text)
            if resp.audio and ev.get("reason") != "interrupted" and not resp.audio_done:
                return []  # the rest of its audio is still being synthesised
            return self._finish(resp)
        if kind == "response.output_audio.done" and resp is not None:
            resp.audio_done = True
            resp.audio_end_ms = float(ev.get("audio_end_ms") or 0.0)
            out = self._audio_tail(resp)
            self._spawn(self._playback_done(resp))
            if resp.native_done is not None and not resp.finished:
                out += self._finish(resp)
            return out
        if kind == "error":
            err = ev.get("error") or {}
            return [self._error(str(err.get("code", "error")), str(err.get("message", "")),
                                kind="server_error" if err.get("code") in ("internal_error", "tts_failed", "asr_failed")
                                else "invalid_request_error")]
        return []  # state.changed, session.updated, audio paused/resumed, policy.decided: no Realtime twin

    def _user_turn_done(self, transcript: str) -> list[dict[str, Any]]:
        if self._user_item is None:
            return []  # typed text: its items were announced when created
        out = self._commit_user_item()
        item_id, self._user_item = self._user_item, None
        item = self.items[item_id]
        item["content"][0]["transcript"] = transcript
        if self.settings.transcription:
            out.append({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                        "content_index": 0, "transcript": transcript, "usage": {"type": "duration", "seconds": 0}})
        out.append({"type": "conversation.item.done", "item": item})
        return out

    def _response_started(self, turn: int) -> list[dict[str, Any]]:
        pending, self._pending = self._pending or {}, None
        resp = _Response(turn, f"resp_{next(self._ids):04d}", f"item_{next(self._ids):04d}", self.settings.audio_output,
                         metadata=pending.get("metadata"), restore=pending.get("restore", {}))
        self._responses[turn] = resp
        self._active = resp
        if self._armed:
            self._armed = False
            self._spawn(self._set_policy())
        item = self._assistant_item(resp, "in_progress")
        previous = self._last_item_id()
        self.items[resp.item_id] = item
        part = {"type": "audio", "transcript": ""} if resp.audio else {"type": "text", "text": ""}
        return [{"type": "response.created", "response": self._response_obj(resp, "in_progress", [])},
                {"type": "response.output_item.added", "response_id": resp.id, "output_index": 0, "item": item},
                {"type": "conversation.item.added", "previous_item_id": previous, "item": item},
                self._part_event(resp, "response.content_part.added", part=part)]

    def _on_audio(self, header: dict[str, Any], pcm16: bytes) -> list[dict[str, Any]]:
        resp = self._responses.get(int(header.get("turn", -1)))
        if resp is None or resp.finished:
            return []
        if resp.resampler is None:
            import soxr

            resp.resampler = soxr.ResampleStream(int(header["sample_rate_hz"]), OUTPUT_RATE_HZ, 1, dtype="int16")
            resp.first_audio_t = time.monotonic()
        out = resp.resampler.resample_chunk(np.frombuffer(pcm16, dtype="<i2"))
        return [self._audio_delta(resp, out)] if len(out) else []

    def _audio_tail(self, resp: _Response) -> list[dict[str, Any]]:
        if resp.resampler is None:
            return []
        out = resp.resampler.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        return [self._audio_delta(resp, out)] if len(out) else []

    def _audio_delta(self, resp: _Response, pcm: np.ndarray) -> dict[str, Any]:
        data = base64.b64encode(np.asarray(pcm, dtype="<i2").tobytes()).decode("ascii")
        return self._part_event(resp, "response.output_audio.delta", delta=data)

    def _finish(self, resp: _Response) -> list[dict[str, Any]]:
        if resp.finished:
            return []
        resp.finished = True
        reason = (resp.native_done or {}).get("reason", "completed")
        if reason == "interrupted":
            status, details = "cancelled", {"type": "cancelled", "reason": resp.cancel_reason or "turn_detected"}
        elif reason == "max_tokens":
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        else:
            status, details = "completed", {"type": "completed", "reason": None}
        item = self._assistant_item(resp, "completed" if status == "completed" else "incomplete")
        self.items[resp.item_id] = item
        out = []
        if resp.audio:
            out += [self._part_event(resp, "response.output_audio.done"),
                    self._part_event(resp, "response.output_audio_transcript.done", transcript=resp.text)]
            part = {"type": "audio", "transcript": resp.text}
        else:
            out.append(self._part_event(resp, "response.output_text.done", text=resp.text))
            part = {"type": "text", "text": resp.text}
        response = self._response_obj(resp, status, [item])
        response["status_details"] = details
        out += [self._part_event(resp, "response.content_part.done", part=part),
                {"type": "response.output_item.done", "response_id": resp.id, "output_index": 0, "item": item},
                {"type": "conversation.item.done", "item": item},
                {"type": "response.done", "response": response},
                {"type": "rate_limits.updated", "rate_limits": [
                    {"name": "requests", "limit": int(self.server.limits.messages_burst),
                     "remaining": int(self._bucket.tokens), "reset_seconds": 1.0}]}]
        if self._active is resp:
            self._active = None
        if not resp.audio or reason == "interrupted":
            self._spawn(self._restore(resp))
        return out

    async def _playback_done(self, resp: _Response) -> None:
        """Report the turn as heard once real-time playback of it would be over."""
        assert self.hub is not None
        if resp.first_audio_t is not None:
            await asyncio.sleep(max(0.0, resp.first_audio_t + resp.audio_end_ms / 1000 - time.monotonic()))
        with contextlib.suppress(ProtocolError):
            self.hub.handle_mark(PlaybackMarkMsg(resp.turn, audio_end_ms=resp.audio_end_ms, done=True))
        await self._restore(resp)

    async def _restore(self, resp: _Response) -> None:
        """Per-response instructions / token limits last one response: put the session's back."""
        restore, resp.restore = resp.restore, {}
        if restore and self.hub is not None:
            with contextlib.suppress(ProtocolError):
                await self.hub.handle_update(SessionUpdate(**restore))

    def _still_playing(self, resp: _Response) -> bool:
        return resp.audio and resp.first_audio_t is not None and self._played_ms(resp) < resp.audio_end_ms

    def _played_ms(self, resp: _Response) -> float:
        if resp.first_audio_t is None:
            return 0.0
        return max(0.0, 1000 * (time.monotonic() - resp.first_audio_t))

    # ---- event shapes ---------------------------------------------------------------------
    def _part_event(self, resp: _Response, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "response_id": resp.id, "item_id": resp.item_id, "output_index": 0,
                "content_index": 0, **fields}

    @staticmethod
    def _assistant_item(resp: _Response, status: str) -> dict[str, Any]:
        content = [{"type": "output_audio", "transcript": resp.text}] if resp.audio \
            else [{"type": "output_text", "text": resp.text}]
        return {"id": resp.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content if resp.text or status != "in_progress" else []}

    def _response_obj(self, resp: _Response, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": resp.id, "object": "realtime.response", "status": status, "status_details": None,
                "output": output, "conversation_id": None, "metadata": resp.metadata,
                "output_modalities": ["audio"] if resp.audio else ["text"],
                "max_output_tokens": self.settings.max_output_tokens_wire(),
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": OUTPUT_RATE_HZ},
                                     "voice": self.settings.voice}},
                "usage": {"total_tokens": resp.tokens, "input_tokens": 0, "output_tokens": resp.tokens}
                if status != "in_progress" else None}
