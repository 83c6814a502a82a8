"""The user's side of a replay: scenario audio through VAD + streaming whisper on virtual time.

Audio arrives in ``frame_ms`` frames at scenario time. Like :class:`duplex.audio.AsyncSpeechInput`,
one worker runs the VAD and then the whisper pass on everything that arrived while it was busy
(coalescing), so in ``measured`` mode a slow pass delays the next speech onset too. Like
:class:`duplex.voice.pipeline.VoiceSession`, the words of one pass form one phrase and ``SpeechStopped`` is
held until the utterance's final pass has delivered its words (a resumed utterance hides the stop).

The user never hears the agent in a replay (no echo), so this schedule does not depend on the
agent: it is computed once per scenario and shared by every policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from duplex.audio import SpeechInput
from duplex.audio.events import AsrWord, SpeechStarted, SpeechStopped
from duplex.audio.speech_input import merge_words
from duplex.audio.turn_features import TurnAudioFeatures
from duplex.session.events import TextInput

from .scenario import RenderedUser
from .virtual import StageTimer

__all__ = ["TimedInput", "UserSchedule", "schedule_user_input"]

_SR = 16_000


@dataclass(frozen=True, slots=True)
class TimedInput:
    """A session input and the virtual time it reaches the session."""

    t: float
    event: SpeechStarted | SpeechStopped | AsrWord | TextInput | TurnAudioFeatures
    type: str = "timed_input"


@dataclass(frozen=True, slots=True)
class UserSchedule:
    inputs: tuple[TimedInput, ...]
    asr_compute_s: float
    asr_calls: int
    type: str = "user_schedule"


def schedule_user_input(user: RenderedUser, speech: SpeechInput | None, measured: bool,
                        frame_ms: int = 20, hold_stop: bool = True) -> UserSchedule:
    """When each VAD event, ASR phrase and typed chunk reaches the session."""
    out: list[TimedInput] = [TimedInput(t, TextInput(text, final=final)) for t, text, final in user.typed]
    if speech is None or not len(user.audio) or not np.any(user.audio):
        return UserSchedule(tuple(sorted(out, key=lambda x: x.t)), 0.0, 0)
    speech.reset()
    worker = StageTimer(measured)
    turn_worker = StageTimer(measured)
    step = _SR * frame_ms // 1000
    pending: list[np.ndarray] = []
    held: SpeechStopped | None = None
    n_frames = -(-len(user.audio) // step)

    def deliver(events: list[Any], t: float, after_pass: bool) -> None:
        nonlocal held
        for ev in events:
            if hold_stop and isinstance(ev, SpeechStopped):
                held = ev
                continue
            if hold_stop and isinstance(ev, SpeechStarted) and held is not None:
                held = None  # the user went on before the final pass: the session never sees the pause
                continue
            out.append(TimedInput(t, ev))
        if after_pass and held is not None:
            out.append(TimedInput(t, held))
            held = None

    for k in range(n_frames):
        pending.append(user.audio[k * step:(k + 1) * step])
        t = min(len(user.audio), (k + 1) * step) / _SR  # the frame has fully arrived
        if t < worker.busy_until and k + 1 < n_frames:
            continue  # the worker is busy: this audio waits and is coalesced with the next batch
        batch = np.concatenate(pending)
        pending = []
        t = max(t, worker.busy_until)
        events, t_seg = worker.run(t, speech.segment, batch)
        deliver(list(events), t_seg, after_pass=False)
        if speech.turn_analysis_due():  # a pause started: Smart Turn + prosody (served: its own thread)
            features, t_ready = turn_worker.run(t_seg, speech.analyze_turn)
            out.extend(TimedInput(t_ready, f) for f in features)
        words, t_rec = worker.run(t_seg, speech.recognize)
        deliver(merge_words(list(words)), t_rec, after_pass=True)
    events, t_end = worker.run(max(len(user.audio) / _SR, worker.busy_until), speech.flush)
    deliver(merge_words(list(events)), t_end, after_pass=True)
    return UserSchedule(tuple(sorted(out, key=lambda x: x.t)), worker.compute_s, worker.calls)
