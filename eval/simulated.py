"""``duplex eval run --clock ideal`` (and ``replay-measured``): one episode through the served
:class:`~duplex.voice.pipeline.VoicePipeline` and its Session on a virtual clock.

Only the transport and the clock differ from ``duplex serve``:

- a simulated microphone pushes the scenario's audio in 20 ms frames, and its typed chunks, each
  at its time on the virtual timeline;
- a simulated speaker plays agent audio on a :class:`~duplex.bench.speaker.VirtualSpeaker` (the
  one the measured clock's browser-like client plays on), holds it on ``AudioPaused``, plays on
  from the same sample on ``AudioResumed``, reports how far it played, and on ``AudioCleared``
  stops and truncates at the played position, as the page does;
- every model call (LM, whisper, turn features, TTS) runs inline on a
  :class:`~.virtual.StageExecutor`, so compute is free (ideal) or costs its measured time
  (replay-measured). The driver lets the loop run until it is quiet, then moves the clock to the
  next timer.

Everything runs on one thread, so an ideal-clock episode is repeatable for the same inputs and
seed. The timeline has the measured clock's record format, and the same :mod:`.metrics` score it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from duplex.audio.events import AsrWord, SpeechStarted, SpeechStopped
from duplex.bench.speaker import PlayedFrame, VirtualSpeaker
from duplex.engine.models import LoadedModel
from duplex.engine.sampling import SamplingConfig
from duplex.engine.template import TurnTemplate
from duplex.engine.worker import Engine
from duplex.session.config import DEFAULT_INSTRUCTIONS
from duplex.session.events import to_dict
from duplex.voice.config import default_voice_config, make_speech_input, voice_policy_params
from duplex.voice.outputs import (AudioCleared, AudioDone, AudioOut, AudioPaused, AudioResumed, BackchannelAudio,
                                  SpeechFinalized, VoiceOutput)
from duplex.voice.pipeline import VoicePipeline

from .scenario import Cue, RenderedUser, Scenario
from .timeline import EpisodeResult, played_audio_records, scenario_records, sort_records
from .virtual import StageExecutor, VirtualClock, VirtualEngine

__all__ = ["SimConfig", "SimModels", "simulate_episode"]

_SR = 16_000
_SPEECH = (SpeechStarted, SpeechStopped, AsrWord, SpeechFinalized)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """``clock``: ideal (compute is free) | replay-measured (each model call costs its measured
    wall time). ``tick_s``: how often the simulated speaker reports playback."""

    clock: str = "ideal"
    seed: int = 0
    max_reply_tokens: int = 48
    temperature: float = 0.0  # 0 = greedy; otherwise sampled with ``seed``
    instructions: str | None = None
    frame_ms: int = 20
    tick_s: float = 0.02
    type: str = "sim_config"


@dataclass(frozen=True, slots=True)
class SimModels:
    """The models an episode runs with (loaded once per worker). ``whisper``/``vad_factory``: as
    ``duplex serve`` gets them (None: no audio input); ``tts``: None for text-only replies."""

    lm: LoadedModel
    template: TurnTemplate | None
    tts: Any
    whisper: Any
    vad_factory: Callable[[], Any] | None
    type: str = "sim_models"


class _FeatureLog:
    """A ``SpeechInput`` that also reports the turn features it computes (the timeline keeps
    every input the session got; the pipeline hands features to the session only)."""

    def __init__(self, inner: Any, on_features: Callable[[list[Any]], None]) -> None:
        self._inner = inner
        self._on_features = on_features

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def analyze_turn(self) -> list[Any]:
        features = list(self._inner.analyze_turn())
        self._on_features(features)
        return features


class _Episode:
    def __init__(self, scenario: Scenario, user: RenderedUser, cues: tuple[Cue, ...], label: str, policy: str,
                 policy_params: dict[str, Any], models: SimModels, config: SimConfig) -> None:
        self.scenario, self.user, self.cues, self.label, self.config = scenario, user, cues, label, config
        self.clock = VirtualClock()
        measured = config.clock == "replay-measured"
        self.stages = {k: StageExecutor(self.clock, measured) for k in ("engine", "asr", "turn", "tts")}
        engine = VirtualEngine(models.lm, self.stages["engine"], models.template)
        voice = default_voice_config(
            policy, policy_params=dict(policy_params) or voice_policy_params(policy), log_decisions=True,
            instructions=config.instructions or scenario.instructions or DEFAULT_INSTRUCTIONS,
            sampling=SamplingConfig(temperature=config.temperature, seed=config.seed, max_tokens=config.max_reply_tokens))
        voice = dataclasses.replace(voice, turn_features_always=True)  # the decision log has them for every policy
        speech_factory = None
        if models.whisper is not None:
            vad_factory = models.vad_factory
            speech_factory = lambda: cast(Any, _FeatureLog(  # noqa: E731
                make_speech_input(models.whisper, voice, vad=vad_factory() if vad_factory else None),
                self._on_features))
        self.pipeline = VoicePipeline(cast(Engine, engine), voice, speech_factory=speech_factory, tts=models.tts,
                                      tts_executor=self.stages["tts"], clock=self.clock, session_id=scenario.id,
                                      asr_executor=self.stages["asr"], turn_executor=self.stages["turn"])
        self.speaker = VirtualSpeaker()
        self.done: dict[int, int] = {}  # agent turn -> its total samples, once all of it was produced
        self.records: list[dict[str, Any]] = []
        self.n_outputs = 0

    def _record(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)

    def _on_features(self, features: list[Any]) -> None:
        now = self.clock.now()
        for f in features:
            event = to_dict(f)
            if self.config.clock == "ideal":
                event.pop("compute_ms", None)  # a wall time: an ideal timeline stays repeatable
            self.records.append({"type": "input", "t": now, "event": event})

    # ---- transport: microphone -----------------------------------------------------------------
    async def _microphone(self) -> None:
        """The scenario's audio in frames, each when it has fully arrived; typed chunks on time."""
        step = _SR * self.config.frame_ms // 1000
        audio = self.user.audio
        n_frames = -(-len(audio) // step) if len(audio) and np.any(audio) else 0
        due: list[tuple[float, int, Any]] = [(min(len(audio), (k + 1) * step) / _SR, 1, k) for k in range(n_frames)]
        due += [(t, 0, (text, final)) for t, text, final in self.user.typed]
        for t, kind, what in sorted(due, key=lambda x: (x[0], x[1])):
            await self.clock.sleep_until(t)
            if kind == 1:
                await self.pipeline.push_audio(audio[what * step:(what + 1) * step])
            else:
                self._record({"type": "input", "t": self.clock.now(),
                              "event": {"type": "text_input", "text": what[0], "final": what[1]}})
                self.pipeline.send_text(*what)

    # ---- transport: speaker --------------------------------------------------------------------
    async def _listen(self) -> None:
        async for out in self.pipeline.outputs():
            self.n_outputs += 1
            self._on_output(out, self.clock.now())

    def _on_output(self, out: VoiceOutput, now: float) -> None:
        if isinstance(out, AudioOut):
            c = out.chunk
            self.speaker.push(PlayedFrame(out.turn, out.offset_samples, len(c.pcm), c.sample_rate_hz, c.token_start,
                                          c.token_end, c.text, now, c.pcm), now)
            self._record({"type": "audio_out", "t": now, "turn": out.turn, "offset_samples": out.offset_samples,
                          "samples": len(c.pcm), "token_start": c.token_start, "token_end": c.token_end,
                          "text": c.text})
        elif isinstance(out, AudioPaused):
            self.speaker.pause(now)
            self._record({"type": "playback_paused", "t": now, "turn": out.turn, "reason": out.reason})
        elif isinstance(out, AudioResumed):
            self.speaker.resume(now)
            self._record({"type": "playback_resumed", "t": now, "turn": out.turn, "reason": out.reason})
        elif isinstance(out, AudioCleared):
            self.done.pop(out.turn, None)
            pos, halted, cut = self.speaker.halt(out.turn, now)
            self._record({"type": "agent_audio_halted", "t": halted, "turn": out.turn, "cut": cut,
                          "interrupted_t": now})
            self.pipeline.truncate(out.turn, pos)
        elif isinstance(out, AudioDone):
            if out.total_samples:  # a silent turn is "played" already (the pipeline says so itself)
                self.done[out.turn] = out.total_samples
            self._record({"type": "audio_done", "t": now, "turn": out.turn, "samples": out.total_samples})
        elif isinstance(out, BackchannelAudio):
            self._record({"type": "backchannel_audio", "t": now, "text": out.text, "samples": len(out.pcm),
                          "sample_rate_hz": out.sample_rate_hz})
        elif isinstance(out, _SPEECH):
            self._record({"type": "input", "t": now, "event": to_dict(out)})
        else:
            self._record(to_dict(out))

    async def _playback(self) -> None:
        """Playback reports while a turn plays; the turn's last report once it has played out."""
        while True:
            now = self.clock.now()
            turn = self.speaker.playing_turn(now)
            if turn is not None:
                self.pipeline.report_played(turn, self.speaker.position(turn, now))
            for turn, total in list(self.done.items()):
                if self.speaker.position(turn, now) >= total:
                    del self.done[turn]
                    self.pipeline.playback_done(turn)
            await self.clock.sleep(self.config.tick_s)

    # ---- driver --------------------------------------------------------------------------------
    def _signature(self) -> tuple[Any, ...]:
        return (sum(s.calls for s in self.stages.values()), self.clock.pending, self.clock.next_deadline(),
                self.n_outputs)

    async def _settle(self) -> None:
        """Let every task run until nothing changes at the current virtual time."""
        quiet, last = 0, None
        while quiet < 2:
            for _ in range(8):
                await asyncio.sleep(0)
            sig = self._signature()
            quiet = quiet + 1 if sig == last else 0
            last = sig

    async def run(self) -> EpisodeResult:
        s, end = self.scenario, self.scenario.duration_s
        async with asyncio.TaskGroup() as tg:
            # the session starts at t = 0 with the first microphone frame on its way (on the
            # replay-measured clock the system prompt's prefill takes virtual time meanwhile)
            tasks = [tg.create_task(self.pipeline.start(), name="sim-start"),
                     tg.create_task(self._listen(), name="sim-speaker"),
                     tg.create_task(self._playback(), name="sim-playback"),
                     tg.create_task(self._microphone(), name="sim-microphone")]
            try:
                while True:
                    await self._settle()
                    nxt = self.clock.next_deadline()
                    if nxt is None or nxt > end:
                        break
                    self.clock.advance_to(nxt)
            finally:
                for task in tasks:
                    task.cancel()
        await self.pipeline.close()
        compute = {k: st.compute_s for k, st in self.stages.items()}
        head = {"type": "episode", "t": 0.0, "scenario": s.id, "category": s.category, "policy": self.label,
                "policy_params": self.pipeline.session.policy.params(), "clock": self.config.clock,
                "seed": self.config.seed, "duration_s": s.duration_s, "voice": s.meta.get("voice"),
                "max_reply_tokens": self.config.max_reply_tokens}
        body = sort_records([*scenario_records(self.user, self.cues), *self.records,
                             *played_audio_records(self.speaker, end)])
        tail: dict[str, Any] = {"type": "episode_end", "t": end}
        if self.config.clock == "replay-measured":  # wall times: an ideal timeline stays repeatable
            tail["compute_s"] = {"engine": compute["engine"], "tts": compute["tts"],
                                 "asr": compute["asr"] + compute["turn"]}
        stats = {"engine_compute_s": compute["engine"], "tts_compute_s": compute["tts"],
                 "asr_compute_s": compute["asr"] + compute["turn"], "engine_calls": float(self.stages["engine"].calls)}
        return EpisodeResult(s.id, s.category, self.label, (head, *body, tail), stats)


async def simulate_episode(scenario: Scenario, user: RenderedUser, cues: tuple[Cue, ...], policy: str,
                           policy_params: dict[str, Any], models: SimModels, config: SimConfig,
                           label: str | None = None) -> EpisodeResult:
    """Play one scenario to the served pipeline on the virtual clock. A bare policy name runs with
    the parameters ``duplex serve`` gives it, as on the measured clock."""
    return await _Episode(scenario, user, cues, label or policy, policy, policy_params, models, config).run()
