"""A browser-like client for one scenario: the served path measured from outside the server.

It does what ``web/app.js`` does, over the native WebSocket protocol (``docs/protocol.md``):

- configures the session (``input_audio_format``, ``output_modalities`` with audio) and sends
  microphone audio only after ``session.updated``;
- streams the scenario's user audio as 20 ms PCM16 16 kHz binary frames, each sent when it has
  fully "arrived" on the monotonic clock (never faster than real time), and typed chunks on time;
- plays agent audio on a :class:`~.speaker.VirtualSpeaker` (back to back from arrival), sends
  ``playback.mark`` ~4/s with ``audio_end_ms`` + ``heard_tokens`` and ``done: true`` once a
  turn's audio has played out; holds playback on ``response.output_audio.paused`` and plays on
  from the same sample on ``response.output_audio.resumed`` (the server decides both); on
  ``response.interrupted`` it stops at once and answers with ``conversation.item.truncate`` at the
  played position.

Everything lands in a timeline on the scenario's clock (0 = the first microphone sample), in the
record format of :mod:`duplex.eval.timeline`, so :mod:`duplex.eval.metrics` scores it unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from duplex.eval.timeline import EpisodeResult, played_audio_records, scenario_records, sort_records
from duplex.eval.scenario import Cue, RenderedUser, Scenario
from duplex.serving.protocol import decode_audio_frame

from .speaker import PlayedFrame, VirtualSpeaker, heard_tokens

__all__ = ["LoopbackConfig", "LoopbackError", "run_episode"]

log = logging.getLogger(__name__)

_SR = 16_000


class LoopbackError(RuntimeError):
    """The server refused the session or cannot do what the scenario needs (no ASR, an error)."""


@dataclass(frozen=True, slots=True)
class LoopbackConfig:
    """How the virtual browser behaves. ``policy``/``policy_params``/``max_reply_tokens``/
    ``temperature``/``instructions``: sent with ``session.update`` when set (None = the server's)."""

    frame_ms: int = 20
    mark_interval_s: float = 0.25  # the page throttles marks to one per 250 ms
    tick_s: float = 0.01  # how often the virtual speaker checks its timers
    audio_output: bool = True
    policy: str | None = None
    policy_params: dict[str, Any] | None = None
    max_reply_tokens: int | None = None
    temperature: float | None = None
    instructions: str | None = None
    token: str | None = None  # --auth-token of the server
    open_timeout_s: float = 30.0
    type: str = "loopback_config"


@dataclass(slots=True)
class _Turn:
    """The page's book-keeping of one agent turn (``newTurn()`` in app.js)."""

    headers: list[dict[str, Any]] = field(default_factory=list)
    pushed: int = 0
    done: bool = False
    total: int = 0
    rate: int = 0
    interrupted: bool = False
    done_sent: bool = False

    def ms(self, samples: int) -> int:
        return round(1000 * samples / self.rate) if self.rate else 0


class _Driver:
    def __init__(self, url: str, scenario: Scenario, user: RenderedUser, cues: tuple[Cue, ...],
                 config: LoopbackConfig, label: str | None) -> None:
        self.url, self.scenario, self.user, self.cues, self.config = url, scenario, user, cues, config
        self.label = label or config.policy or "server-default"
        self.speaker = VirtualSpeaker()
        self.turns: dict[int, _Turn] = {}
        self.interrupted: set[int] = set()
        self.records: list[dict[str, Any]] = []
        self.session: dict[str, Any] = {}
        self.t0 = 0.0
        self._setup_t0 = 0.0
        self.ws: ClientConnection | None = None
        self._last_mark = -1e9
        self.closed_early: str | None = None
        self._stats = {"mic_frames": 0, "mic_max_lag_s": 0.0, "marks": 0, "truncates": 0, "audio_frames": 0,
                       "audio_frames_dropped": 0, "server_events": 0}

    # ---- clock + records ------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def _record(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)

    async def _send(self, event: dict[str, Any]) -> None:
        assert self.ws is not None
        self._record({"type": "client_event", "t": self.now(), "event": event})
        try:
            await self.ws.send(json.dumps(event, separators=(",", ":")))
        except ConnectionClosed:
            self.closed_early = self.closed_early or "connection closed while sending"

    # ---- main -----------------------------------------------------------------------------
    async def run(self) -> EpisodeResult:
        cfg = self.config
        headers = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else None
        self.t0 = self._setup_t0 = time.monotonic()  # provisional: setup events end up at negative times
        async with connect(self.url, additional_headers=headers, max_size=None, compression=None,
                           open_timeout=cfg.open_timeout_s, max_queue=None) as ws:
            self.ws = ws
            await self._configure(ws)
            self.t0 = time.monotonic()
            for r in self.records:  # re-base the setup events on the scenario clock
                r["t"] = r["t"] - (self.t0 - self._setup_t0)
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(self._read(ws), name="loopback-read")
                ticker = tg.create_task(self._tick(), name="loopback-speaker")
                try:
                    await self._stream(ws)
                finally:
                    reader.cancel()
                    ticker.cancel()
        return self._result()

    async def _configure(self, ws: ClientConnection) -> None:
        """``session.created`` -> ``session.update`` -> ``session.updated`` (mic waits for it)."""
        created = await self._expect(ws, "session.created")
        self.session = created.get("session", {})
        if self.user.spans and not self.session.get("audio_input_available", False):
            raise LoopbackError("the server has no speech recognition (audio_input_available is false)")
        cfg = self.config
        update: dict[str, Any] = {"input_audio_format": {"encoding": "pcm16", "sample_rate_hz": _SR, "channels": 1}}
        if cfg.audio_output and self.session.get("audio_output_available"):
            update["output_modalities"] = ["text", "audio"]
        elif cfg.audio_output:
            log.warning("the server has no TTS: agent replies are text only, so no audio is played or scored")
        if cfg.policy is not None:
            update["policy"] = cfg.policy
            update["policy_params"] = dict(cfg.policy_params or {})
        elif cfg.policy_params is not None:
            update["policy_params"] = dict(cfg.policy_params)
        if cfg.max_reply_tokens is not None:
            update["max_output_tokens"] = cfg.max_reply_tokens
        if cfg.temperature is not None:
            update["temperature"] = cfg.temperature
        if cfg.instructions:
            update["instructions"] = cfg.instructions
        await self._send({"type": "session.update", "session": update})
        updated = await self._expect(ws, "session.updated")
        self.session = updated.get("session", self.session)

    async def _expect(self, ws: ClientConnection, kind: str) -> dict[str, Any]:
        while True:
            message = await asyncio.wait_for(ws.recv(), self.config.open_timeout_s)
            if isinstance(message, bytes):
                continue
            ev = json.loads(message)
            self._record({"type": "server_event", "t": self.now(), "event": ev})
            if ev.get("type") == kind:
                return ev
            if ev.get("type") == "error":
                raise LoopbackError(f"server error during setup: {ev.get('code')}: {ev.get('message')}")

    # ---- microphone -----------------------------------------------------------------------
    async def _stream(self, ws: ClientConnection) -> None:
        """User audio in 20 ms frames at real time, typed chunks at their times, until the end."""
        from duplex.audio.convert import to_pcm16

        step = _SR * self.config.frame_ms // 1000
        pcm = to_pcm16(np.asarray(self.user.audio, dtype=np.float32))
        typed = list(self.user.typed)
        n_frames = -(-len(pcm) // step)
        for k in range(n_frames):
            due = (k + 1) * step / _SR
            while typed and typed[0][0] <= due:
                t, text, final = typed.pop(0)
                await self._sleep_until(t)
                await self._send({"type": "input_text", "text": text, "final": final})
            await self._sleep_until(due)
            self._stats["mic_max_lag_s"] = max(self._stats["mic_max_lag_s"], self.now() - due)
            if self.closed_early:
                break
            try:
                await ws.send(pcm[k * step:(k + 1) * step].tobytes())
            except ConnectionClosed:
                self.closed_early = self.closed_early or "connection closed while streaming"
                break
            self._stats["mic_frames"] += 1
        for t, text, final in typed:
            await self._sleep_until(t)
            await self._send({"type": "input_text", "text": text, "final": final})
        await self._sleep_until(self.scenario.duration_s)

    async def _sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    # ---- server -> client -----------------------------------------------------------------
    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                now = self.now()
                if isinstance(message, bytes):
                    header, pcm = decode_audio_frame(message)
                    await self._on_audio(header, pcm, now)
                else:
                    await self._on_event(json.loads(message), now)
        except ConnectionClosed:
            pass
        self.closed_early = self.closed_early or f"server closed the connection ({ws.close_code})"

    async def _on_event(self, ev: dict[str, Any], now: float) -> None:
        self._stats["server_events"] += 1
        self._record({"type": "server_event", "t": now, "event": ev})
        kind = ev.get("type")
        turn = ev.get("turn")
        if kind == "response.output_audio.paused" and isinstance(turn, int):
            if not self.speaker.paused and turn not in self.interrupted:
                self.speaker.pause(now)
                self._record({"type": "playback_paused", "t": now, "turn": turn})
        elif kind == "response.output_audio.resumed" and isinstance(turn, int):
            if self.speaker.paused and turn not in self.interrupted:
                self.speaker.resume(now)
                self._record({"type": "playback_resumed", "t": now, "turn": turn})
        elif kind == "response.created" and isinstance(turn, int):
            self.turns.setdefault(turn, _Turn())
            self._record({"type": "turn_started", "t": now, "speaker": "agent", "turn": turn})
        elif kind == "response.output_audio.done" and isinstance(turn, int):
            t = self.turns.setdefault(turn, _Turn())
            t.done = True
            t.total = int(ev.get("samples", 0))
            t.rate = int(ev.get("sample_rate_hz") or t.rate)
            await self._maybe_finish(turn, now)
        elif kind == "response.interrupted" and isinstance(turn, int):
            self._record({"type": "interrupted", "t": now, "turn": turn, "reason": ev.get("reason"),
                          "kept_tokens": ev.get("kept_tokens"), "dropped_tokens": ev.get("dropped_tokens")})
            await self._on_interrupted(ev, turn, now)
        elif kind == "session.closed":
            self.closed_early = self.closed_early or f"session closed ({ev.get('reason')})"
        elif kind == "error":
            log.warning("server error: %s: %s", ev.get("code"), ev.get("message"))

    async def _on_audio(self, header: dict[str, Any], pcm: bytes, now: float) -> None:
        self._stats["audio_frames"] += 1
        self._record({"type": "server_event", "t": now, "event": {**header, "bytes": len(pcm)}})
        if header.get("type") == "response.backchannel.audio":
            return  # the agent's own "mm-hm": no turn, nothing to mark or truncate
        turn = int(header["turn"])
        if turn in self.interrupted:
            self._stats["audio_frames_dropped"] += 1
            return
        t = self.turns.setdefault(turn, _Turn())
        t.headers.append(header)
        t.rate = int(header.get("sample_rate_hz") or t.rate)
        t.pushed = int(header.get("sample_offset", 0)) + int(header.get("samples", 0))
        self.speaker.push(PlayedFrame.from_header(header, pcm, now), now)

    async def _on_interrupted(self, ev: dict[str, Any], turn: int, now: float) -> None:
        """Stop playback now; tell the server exactly how far this turn was played."""
        self.interrupted.add(turn)
        t = self.turns.get(turn)
        item = ev.get("item_id", f"item_{turn}")
        if t is None:
            await self._truncate(item, turn, 0)
            return
        if t.done_sent:
            return
        t.interrupted = True
        pos, halted, had_audio = self.speaker.halt(turn, now)
        self._record({"type": "agent_audio_halted", "t": halted, "turn": turn, "cut": had_audio,
                      "interrupted_t": now})
        await self._truncate(item, turn, t.ms(pos))

    async def _truncate(self, item: str, turn: int, audio_end_ms: int) -> None:
        self._stats["truncates"] += 1
        await self._send({"type": "conversation.item.truncate", "item_id": item, "turn": turn, "content_index": 0,
                          "audio_end_ms": audio_end_ms})

    # ---- playback timers ------------------------------------------------------------------
    async def _tick(self) -> None:
        """Marks while playing, ``done`` marks when a finished turn has played out."""
        while True:
            now = self.now()
            turn = self.speaker.playing_turn(now)
            if turn is not None and now - self._last_mark > self.config.mark_interval_s:
                t = self.turns.get(turn)
                if t is not None and not t.interrupted and not t.done_sent:
                    self._last_mark = now
                    pos = self.speaker.position(turn, now)
                    self._stats["marks"] += 1
                    await self._send({"type": "playback.mark", "turn": turn, "audio_end_ms": t.ms(pos),
                                      "heard_tokens": heard_tokens(t.headers, pos)})
            for k in [k for k, t in self.turns.items() if t.done and not t.done_sent and not t.interrupted]:
                await self._maybe_finish(k, now)
            await asyncio.sleep(self.config.tick_s)

    async def _maybe_finish(self, turn: int, now: float) -> None:
        """``maybeFinishTurn``: all audio received and played -> the ``done`` mark."""
        t = self.turns[turn]
        if t.done_sent or t.interrupted or not t.done:
            return
        if self.speaker.position(turn, now) < t.pushed:
            return
        t.done_sent = True
        last = int(t.headers[-1]["token_end"]) if t.headers else 0
        self._stats["marks"] += 1
        await self._send({"type": "playback.mark", "turn": turn, "audio_end_ms": t.ms(t.total), "heard_tokens": last,
                          "done": True})

    # ---- timeline -------------------------------------------------------------------------
    def _result(self) -> EpisodeResult:
        s = self.scenario
        end = s.duration_s
        head = {"type": "episode", "t": 0.0, "scenario": s.id, "category": s.category, "policy": self.label,
                "policy_params": self.config.policy_params or {}, "clock": "measured", "seed": None,
                "duration_s": s.duration_s, "max_reply_tokens": self.config.max_reply_tokens, "url": self.url,
                "voice": s.meta.get("voice"),
                "session": {k: self.session.get(k) for k in ("id", "policy", "output_modalities",
                                                             "output_audio_format")},
                "client": {"frame_ms": self.config.frame_ms, "mark_interval_s": self.config.mark_interval_s,
                           "pause": "server-driven (response.output_audio.paused / resumed)"}}
        out = sort_records([*scenario_records(self.user, self.cues), *self.records,
                            *played_audio_records(self.speaker, end)])
        stats = {**self._stats, "closed_early": self.closed_early}
        # the session set-up happens before the first microphone sample: negative times
        records = [head, *out, {"type": "episode_end", "t": max(end, out[-1]["t"] if out else end),
                                "client_stats": stats}]
        numeric = {k: float(v) for k, v in self._stats.items() if isinstance(v, (int, float))}
        return EpisodeResult(s.id, s.category, self.label, tuple(records), numeric)


async def run_episode(url: str, scenario: Scenario, user: RenderedUser, cues: tuple[Cue, ...],
                      config: LoopbackConfig | None = None, label: str | None = None) -> EpisodeResult:
    """Play one scenario against the server at ``url`` (``ws://host:port/ws``) in real time, as the
    browser page would; returns the timeline in the eval's record format."""
    driver = _Driver(url, scenario, user, cues, config or LoopbackConfig(), label)
    result = await driver.run()
    if driver.closed_early:
        log.warning("%s: %s before the end of the scenario", scenario.id, driver.closed_early)
    return result
