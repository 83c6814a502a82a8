"""Replay one episode (scenario × policy) through Session + engine + streaming TTS on virtual time.

A discrete-event driver: user inputs (from :mod:`.user_input`) and playback marks sit in a time
heap; the session's own sleeps sit on the :class:`~.virtual.VirtualClock`. The driver jumps to the
earliest of the two, delivers what is due, and lets the session run until it is quiescent. Agent
text goes to ``StreamingTts`` (a single worker on the virtual timeline); its audio is "played"
end to end from when each chunk is ready; playback marks tell the session what was heard, and a
barge-in halts playback at the moment the session emits ``Interrupted``. Everything runs on one
thread, so a replay on the ideal clock is bit-identical for the same inputs and seed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any, cast

from duplex.audio import ClauseChunker, PlaybackLedger, StreamingTts, TtsChunk
from duplex.engine.worker import Engine
from duplex.session.events import AgentTextDelta, Interrupted, PlaybackMark, TurnEnded, TurnStarted, to_dict
from duplex.engine.models import LoadedModel
from duplex.engine.sampling import SamplingConfig
from duplex.session.core import DEFAULT_INSTRUCTIONS, Session, SessionConfig
from duplex.engine.template import TurnTemplate

from .scenario import Cue, RenderedUser, Scenario, voiced_bounds_s
from .user_input import UserSchedule
from .virtual import VirtualClock, VirtualEngine

__all__ = ["EpisodeResult", "ReplayConfig", "agent_audio_records", "replay_episode", "voiced_bounds"]

_WORD = re.compile(r"\S*\w\S*")


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """``clock``: ideal (compute is free) | replay-measured (each model call costs its measured wall
    time on the virtual clock). ``max_reply_tokens`` bounds each agent reply."""

    clock: str = "ideal"
    seed: int = 0
    max_reply_tokens: int = 48
    temperature: float = 0.0  # 0 = greedy; otherwise sampled with ``seed``
    instructions: str | None = None
    first_clause_words: int = 2
    clause_words: int = 14
    type: str = "replay_config"


@dataclass(frozen=True, slots=True)
class EpisodeResult:
    """The episode's timeline (JSON-ready records in time order) and its compute statistics."""

    scenario_id: str
    category: str
    policy: str
    records: tuple[dict[str, Any], ...]
    stats: dict[str, float]
    type: str = "episode_result"


@dataclass(slots=True)
class _Segment:
    start: float
    end: float
    chunk: TtsChunk
    onset_s: float  # voiced bounds within the chunk
    offset_s: float


@dataclass(slots=True)
class _TurnPlay:
    cursor: float  # when the next chunk may start playing
    ledger: PlaybackLedger = field(default_factory=PlaybackLedger)
    segments: list[_Segment] = field(default_factory=list)
    n_tokens: int = 0
    interrupted: bool = False


class _Driver:
    def __init__(self, scenario: Scenario, user: RenderedUser, schedule: UserSchedule, cues: tuple[Cue, ...],
                 policy: str, policy_params: dict[str, Any], lm: LoadedModel, template: TurnTemplate | None,
                 tts: Any, config: ReplayConfig) -> None:
        self.scenario, self.user, self.schedule, self.cues = scenario, user, schedule, cues
        self.config = config
        self.measured = config.clock == "replay-measured"
        self.clock = VirtualClock()
        self.engine = VirtualEngine(lm, self.clock, self.measured, template)
        session_config = SessionConfig(
            instructions=config.instructions or scenario.instructions or DEFAULT_INSTRUCTIONS,
            policy=policy, policy_params=dict(policy_params), audio_output=True, log_decisions=True,
            sampling=SamplingConfig(temperature=config.temperature, seed=config.seed,
                                    max_tokens=config.max_reply_tokens))
        self.session = Session(cast(Engine, self.engine), session_config, clock=self.clock, session_id=scenario.id)
        self.tts = StreamingTts(tts, ClauseChunker(max_words=config.clause_words,
                                                   first_max_words=config.first_clause_words))
        self.tts_free = 0.0
        self.tts_compute_s = 0.0
        self.turns: dict[int, _TurnPlay] = {}
        self.heap: list[tuple[float, int, str, Any]] = []
        self._order = itertools.count()
        self.records: list[dict[str, Any]] = []

    # ---- event plumbing --------------------------------------------------------------------
    def _at(self, t: float, kind: str, payload: Any) -> None:
        heapq.heappush(self.heap, (t, next(self._order), kind, payload))

    def _record(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)

    def _apply(self, kind: str, payload: Any) -> None:
        now = self.clock.now()
        if kind == "input":
            self.session.submit(payload)
            self._record({"type": "input", "t": now, "event": to_dict(payload)})
        elif kind == "mark":
            turn, heard, done = payload
            state = self.turns.get(turn)
            if state is not None and not state.interrupted:
                self._mark(PlaybackMark(turn, heard, done=done))

    def _mark(self, mark: PlaybackMark) -> None:
        self.session.submit(mark)
        self._record({"type": "playback_mark", "t": self.clock.now(), "turn": mark.turn,
                      "heard_tokens": mark.heard_tokens, "done": mark.done, "final": mark.final})

    def _drain(self) -> int:
        n = 0
        while (ev := self.session.get_nowait()) is not None:
            n += 1
            self._record(to_dict(ev))
            self._on_session_event(ev)
        return n

    async def _settle(self) -> None:
        """Let the session run until nothing changes at the current virtual time."""
        quiet = 0
        last: Any = None
        while quiet < 2:
            for _ in range(8):
                await asyncio.sleep(0)
            n = self._drain()
            sig = (self.engine.calls, self.clock.pending, self.session.observe())
            quiet = quiet + 1 if n == 0 and sig == last else 0
            last = sig

    # ---- agent audio ---------------------------------------------------------------------------
    def _on_session_event(self, ev: Any) -> None:
        if isinstance(ev, TurnStarted) and ev.speaker == "agent":
            self.turns[ev.turn] = _TurnPlay(cursor=ev.t)
        elif isinstance(ev, AgentTextDelta):
            state = self.turns.get(ev.turn)
            if state is not None and not state.interrupted:
                state.n_tokens = max(state.n_tokens, ev.token_end)
                self._synthesize(ev.turn, ev.t, self.tts.push, ev.text, ev.token_start, ev.token_end)
        elif isinstance(ev, TurnEnded) and ev.speaker == "agent" and ev.reason != "interrupted":
            state = self.turns.get(ev.turn)
            if state is not None and not state.interrupted:
                ready = self._synthesize(ev.turn, ev.t, self.tts.flush)
                self._at(max(ready, state.cursor), "mark", (ev.turn, state.n_tokens, True))
        elif isinstance(ev, Interrupted):
            self._halt(ev.turn, ev.t)

    def _synthesize(self, turn: int, t: float, fn: Any, *args: Any) -> float:
        """Run a TTS step on the TTS worker's virtual timeline; lay its chunks out for playback."""
        t0 = time.perf_counter()
        chunks = fn(*args)
        dt = time.perf_counter() - t0
        self.tts_compute_s += dt
        start = max(t, self.tts_free)
        ready = start + (dt if self.measured else 0.0)
        self.tts_free = ready
        state = self.turns[turn]
        for chunk in chunks:
            begin = max(ready, state.cursor)
            end = begin + chunk.duration_s
            state.cursor = end
            state.ledger.append(chunk)
            pcm = chunk.pcm.astype("float32") / 32768.0
            on, off = voiced_bounds(pcm, chunk.sample_rate_hz)
            state.segments.append(_Segment(begin, end, chunk, on, off))
            self._at(end, "mark", (turn, chunk.token_end, False))
        return ready

    def _halt(self, turn: int, t: float) -> None:
        """Barge-in: playback stops now; tell the session exactly what was heard."""
        self.tts.cancel()
        state = self.turns.get(turn)
        if state is None or state.interrupted:
            return
        state.interrupted = True
        played = 0
        kept: list[_Segment] = []
        cut = False
        for seg in state.segments:
            if seg.start >= t:
                cut = True
                continue
            if seg.end > t:
                played += int((t - seg.start) * seg.chunk.sample_rate_hz)
                seg.end = t
                cut = True
            else:
                played += len(seg.chunk.pcm)
            kept.append(seg)
        state.segments = kept
        self._record({"type": "agent_audio_halted", "t": t, "turn": turn, "cut": cut})
        heard = (state.ledger.heard_token(played) or 0) if state.ledger.queued_samples else 0
        self._mark(PlaybackMark(turn, heard, final=True))

    def _audio_records(self, until: float) -> list[dict[str, Any]]:
        """Played audio per chunk; the episode ends at ``until``, and so does its audio."""
        out = []
        for turn, state in self.turns.items():
            for seg in state.segments:
                c = seg.chunk
                out += agent_audio_records(turn, c.text, c.token_start, c.token_end, seg.onset_s, seg.offset_s,
                                           [(seg.start, 0.0, seg.end - seg.start)], until=until)
        return out

    # ---- main loop -----------------------------------------------------------------------------
    async def run(self) -> list[dict[str, Any]]:
        s = self.scenario
        self._record({"type": "episode", "t": 0.0, "scenario": s.id, "category": s.category,
                      "policy": self.session.config.policy, "policy_params": self.session.policy.params(),
                      "clock": self.config.clock, "seed": self.config.seed, "duration_s": s.duration_s,
                      "voice": s.meta.get("voice"),
                      "max_reply_tokens": self.config.max_reply_tokens})
        for c in self.cues:
            self._record({"type": "cue", "t": c.t, "kind": c.kind, "end": c.end, "start": c.start})
        for i, on, off, text in self.user.spans:
            self._record({"type": "user_speech", "t": on, "end": off, "item": i, "text": text})
        for ti in self.schedule.inputs:
            self._at(ti.t, "input", ti.event)
        # Not awaited here: on the measured clock the system prompt's prefill finishes in virtual
        # time, which only this loop advances.
        starting = asyncio.ensure_future(self.session.start())
        try:
            while True:
                await self._settle()
                nexts = [x for x in (self.heap[0][0] if self.heap else None, self.clock.next_deadline())
                         if x is not None]
                if not nexts or min(nexts) > s.duration_s:
                    break
                self.clock.advance_to(min(nexts))
                while self.heap and self.heap[0][0] <= self.clock.now():
                    _, _, kind, payload = heapq.heappop(self.heap)
                    self._apply(kind, payload)
            await starting
        finally:
            if not starting.done():
                starting.cancel()
            await self.session.close()
            self._drain()
        self.records.extend(self._audio_records(s.duration_s))
        end: dict[str, Any] = {"type": "episode_end", "t": s.duration_s}
        if self.measured:
            end["compute_s"] = {"engine": self.engine.stage.compute_s, "tts": self.tts_compute_s,
                                "asr": self.schedule.asr_compute_s}
        self.records.append(end)
        order = {id(r): i for i, r in enumerate(self.records)}
        return sorted(self.records, key=lambda r: (r["t"] if r["t"] is not None else 0.0, order[id(r)]))


def voiced_bounds(pcm: Any, sample_rate_hz: int) -> tuple[float, float]:
    """Voiced onset and offset (seconds) of float agent audio at any rate."""
    if sample_rate_hz == 16_000:
        return voiced_bounds_s(pcm)
    from duplex.audio import to_mono_16k

    return voiced_bounds_s(to_mono_16k(pcm, sample_rate_hz))


def agent_audio_records(turn: int, text: str, token_start: int, token_end: int, onset_s: float, offset_s: float,
                        pieces: list[tuple[float, float, float]], until: float | None = None) -> list[dict[str, Any]]:
    """``agent_audio`` records of one audio chunk (what :mod:`.metrics` reads). ``pieces``: the
    played parts as (wall start, chunk start s, chunk end s), several when playback was paused
    inside the chunk; ``onset_s``/``offset_s``: the chunk's voiced span. Word onsets are estimated
    from character positions within the voiced span; nothing after ``until`` counts."""
    words = [m.start() for m in _WORD.finditer(text)]
    span = max(offset_s - onset_s, 0.0)
    n = max(len(text), 1)
    rel = [onset_s + span * (p / n) for p in words]
    out = []
    for start, a, b in pieces:
        if until is not None:
            if start >= until:
                continue
            b = min(b, a + until - start)
        end = start + (b - a)
        shift = start - a
        out.append({"type": "agent_audio", "t": start, "end": end, "turn": turn, "text": text,
                    "token_start": token_start, "token_end": token_end,
                    "voiced_start": min(max(onset_s, a), b) + shift, "voiced_end": min(max(offset_s, a), b) + shift,
                    "word_times": [x + shift for x in rel if a <= x < b]})
    return out


async def replay_episode(scenario: Scenario, user: RenderedUser, schedule: UserSchedule, cues: tuple[Cue, ...],
                         policy: str, policy_params: dict[str, Any], lm: LoadedModel, tts: Any,
                         config: ReplayConfig, template: TurnTemplate | None = None) -> EpisodeResult:
    """Replay one scenario with one policy; ``tts`` is the agent's synthesiser (``TtsEngine``)."""
    driver = _Driver(scenario, user, schedule, cues, policy, policy_params, lm, template, tts, config)
    records = await driver.run()
    stats = {"engine_compute_s": driver.engine.stage.compute_s, "tts_compute_s": driver.tts_compute_s,
             "asr_compute_s": schedule.asr_compute_s, "engine_calls": float(driver.engine.calls)}
    return EpisodeResult(scenario.id, scenario.category, policy, tuple(records), stats)
