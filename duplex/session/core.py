"""One conversation: an asyncio task that is the only writer of its shared sequence.

Inputs (text, ASR words, speech onsets, playback marks, cancel) are queued by :meth:`submit`;
speech onsets and cancel jump the queue (pipecat's "system frames") so a barge-in never waits
behind data. The loop asks the policy what to do, decodes one token at a time on the engine
worker, and on Yield rolls the sequence back to what the user actually received, closing the agent
turn with a visible truncation marker.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import uuid
from collections.abc import Callable
from typing import Any

from duplex.audio.turn_features import TurnAudioFeatures
from duplex.engine.sampling import Sampler
from duplex.engine.sequence import SharedSequence, Speaker, TurnEnd
from duplex.engine.worker import Engine
from duplex.policies import (
    Action,
    Backchannel,
    Continue,
    Listen,
    Observation,
    Pause,
    Policy,
    Resume,
    Speak,
    Yield,
    make_policy,
)
from duplex.session.bargein import BACKCHANNEL_MARKER, BargeIn
from duplex.session.clock import Clock, MonotonicClock
from duplex.session.config import (
    DEFAULT_INSTRUCTIONS,
    TRUNCATION_MARKER,
    AgentTurnState,
    SessionConfig,
)
from duplex.session.detok import IncrementalDetokenizer, WordBuffer
from duplex.session.events import (
    AsrWord,
    Cancel,
    ErrorEvent,
    InstructionsUpdated,
    PlaybackMark,
    PolicyDecided,
    SessionEvent,
    SpeechStarted,
    SpeechStopped,
    StateChanged,
    TextInput,
    TranscriptStatus,
    UpdateSession,
)
from duplex.session.lifecycle import SessionLifecycle
from duplex.session.listening import Listening
from duplex.session.speaking import Speaking
from duplex.session.validation import validate_input

__all__ = ["BACKCHANNEL_MARKER", "DEFAULT_INSTRUCTIONS", "Session", "SessionConfig", "TRUNCATION_MARKER"]

log = logging.getLogger(__name__)

_URGENT = (SpeechStarted, Cancel)


class Session(SessionLifecycle, Listening, Speaking, BargeIn):
    """Drive with :meth:`start`, feed with :meth:`submit`, read :meth:`events`, end with :meth:`close`."""

    def __init__(self, engine: Engine, config: SessionConfig | None = None, clock: Clock | None = None,
                 session_id: str | None = None) -> None:
        self.engine = engine
        self.config = config or SessionConfig()
        self.clock = clock or MonotonicClock()
        self.id = session_id or uuid.uuid4().hex[:12]
        self.policy: Policy = make_policy(self.config.policy, **self.config.policy_params)
        self._sampler = Sampler(self.config.sampling)
        self._urgent: collections.deque[Any] = collections.deque()
        self._inputs: collections.deque[Any] = collections.deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # set while the input queues have room
        self._room.set()
        self._pending_instructions: str | None = None  # waits for the next turn boundary
        self._out: asyncio.Queue[SessionEvent | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.seq: SharedSequence | None = None
        self.state = "listening"
        # user side
        self._user_turn: int | None = None
        self._user_committed: list[str] = []
        self._tentative: list[tuple[float, str, float]] = []  # (start_s, text, probability) of uncommitted ASR words
        self._committed_probs: list[float] = []  # whisper's probability of each committed ASR word this user turn
        self._typed_pending = ""
        self._user_final = False
        self._user_speaking = False
        self._speech_end_t: float | None = None
        self._turn_end: TurnEnd | None = None  # the model's end-of-turn belief after the committed words
        self._audio_turn: TurnAudioFeatures | None = None  # acoustic features of the latest pause
        # the user has stopped, their final words are in, and the policy chose to listen: the one
        # moment acoustic turn features can still change a decision (see awaiting_turn_decision)
        self._turn_undecided = False
        self.on_turn_undecided: Callable[[], None] | None = None  # called when that moment starts
        self._held_ids: list[int] = []  # user tokens waiting for the agent turn to close
        self._prepared: int | None = None  # agent turn opened speculatively during user silence
        # the reply's first token, sampled in the job that opened the agent turn: (token,
        # logits_version, sampler); saves the reply one engine job (a tick's wait under load)
        self._first_token: tuple[int, int, Sampler] | None = None
        # the reply's first token, already appended by that job (then _first_token is the one after
        # it): after a final typed message the job also takes the reply's first decode step, so the
        # first word (complete once the next token starts) costs no second hand-off and tick wait
        self._first_appended: int | None = None
        # agent side
        self._agent: AgentTurnState | None = None
        self._detok = IncrementalDetokenizer(engine.tokenizer)
        self._words = WordBuffer()
        self._overlap_start_t: float | None = None
        self._overlap_end_t: float | None = None
        self._truncate_deadline: float | None = None
        self._paused = False  # the agent's audio is paused while an overlap is judged
        self._speech_start_t: float | None = None  # the user's current utterance began (session clock)
        self._backchannel_t: float | None = None  # the agent's own last acknowledgement
        self._barged_in = False  # the user's current turn made the agent yield (until the reply starts)
        self._decode_held: asyncio.Event | None = None  # set = released (see hold_decoding)
        self._transcript_pending = False  # an overlap ended; its final words are still coming
        self._backchannel_ids: list[int] = []  # the user's backchannels, noted at their next turn
        # a sound was judged a backchannel before its final words came: they are its note, not a turn
        self._backchannel_tail = False
        self._interleaved_words = 0  # of _user_committed, already in the cache inside the agent's turn

    # ---- public API ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"session-{self.id}")
        await self._ready.wait()

    def submit(self, event: Any) -> bool:
        """Queue an input; returns False (and emits an error event) if it was rejected: invalid, or
        ``max_queued_inputs`` inputs already wait (a transport awaits :meth:`wait_for_room` first)."""
        pending = bool(self._typed_pending.strip() or self._user_committed)
        error = validate_input(event, self.config, user_text_pending=pending, pending_chars=len(self._typed_pending),
                               count_tokens=self._count_tokens)
        if error is not None:
            self._emit(ErrorEvent(error[0], error[1], self.clock.now()))
            return False
        urgent = isinstance(event, _URGENT)
        if isinstance(event, Cancel) and any(isinstance(e, Cancel) for e in self._urgent):
            return True  # one queued cancel is as good as many
        queue = self._urgent if urgent else self._inputs
        if len(queue) >= self.config.max_queued_inputs:
            self._emit(ErrorEvent("input_queue_full", f"{len(queue)} inputs already wait for this session (the limit, "
                                  f"max_queued_inputs, is {self.config.max_queued_inputs}); this "
                                  f"{getattr(event, 'type', 'input')} was refused", self.clock.now()))
            return False
        queue.append(event)
        if len(queue) >= self.config.max_queued_inputs:
            self._room.clear()
        self._wake.set()
        return True

    @property
    def has_room(self) -> bool:
        """True while :meth:`submit` would queue another input."""
        limit = self.config.max_queued_inputs
        return len(self._inputs) < limit and len(self._urgent) < limit

    async def wait_for_room(self) -> None:
        """Backpressure for transports: return once the input queues have room again."""
        while not self.has_room:
            self._room.clear()
            await self._room.wait()

    def _count_tokens(self, text: str) -> int:
        return len(self.engine.tokenizer.encode(text, add_special_tokens=False))

    @property
    def transcript(self) -> str:
        return self.seq.text() if self.seq is not None else ""

    # ---- main loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            self.seq = await self.engine.start_sequence(self.config.instructions, self.config.sequence)
        finally:
            self._ready.set()
        self._emit(StateChanged("listening", self.clock.now()))
        while True:
            try:
                if self._pending_instructions is not None:
                    await self._apply_pending_instructions()
                await self._handle_inputs()
                action = self._decide()
                if isinstance(action, Yield) and self._truncate_deadline is None:
                    await self._yield(action.reason)
                    continue
                if isinstance(action, (Continue, Pause, Resume)):
                    self._apply_overlap_action(action)
                    # While paused the agent waits with its decoding too: the text is far ahead of
                    # the audio, and on 2 cores the whisper pass that decides the overlap (and,
                    # for an interruption, starts the reply) is what needs the CPU.
                    if self._agent is not None and self._agent.generating and not self._paused:
                        await self._speak(1)
                        continue
                elif isinstance(action, Backchannel):
                    self._backchannel(action.text)
                elif isinstance(action, Speak) and self._agent_can_generate():
                    await self._speak(action.n_tokens)
                    continue
                await self._finish_truncate_if_due()
                if await self._maybe_prepare_reply():
                    continue  # time passed while preparing: decide again before sleeping
                await self._wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the session
                log.exception("session %s step failed", self.id)
                self._emit(ErrorEvent("internal_error", f"{type(exc).__name__}: {exc}", self.clock.now()))
                await self.clock.sleep(self.config.tick_ms / 1000)

    async def _wait(self) -> None:
        """Sleep until an input arrives, or a tick passes when a time-based decision is pending."""
        if self._urgent or self._inputs:
            return
        self._wake.clear()
        timed = self._time_matters()
        waiter = asyncio.ensure_future(self._wake.wait())
        tasks = {waiter}
        if timed:
            tasks.add(asyncio.ensure_future(self.clock.sleep(self.config.tick_ms / 1000)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()

    def _time_matters(self) -> bool:
        has_user = bool(self._user_committed or self._user_tentative or self._typed_pending.strip() or self._held_ids)
        # while the user talks, ticks let the policy act on time alone (its own backchannels)
        return (has_user and not self._user_speaking) or self._overlap_start_t is not None \
            or self._truncate_deadline is not None or self._agent is not None or self._user_speaking

    def _agent_can_generate(self) -> bool:
        if self._truncate_deadline is not None:
            return False
        if self._agent is None:
            return bool(self._user_committed or self._typed_pending.strip() or self._held_ids)
        return self._agent.generating

    # ---- inputs --------------------------------------------------------------------------------
    async def _handle_inputs(self) -> None:
        while self._urgent or self._inputs:
            ev = self._urgent.popleft() if self._urgent else self._inputs.popleft()
            if self.has_room:
                self._room.set()
            await self._handle(ev)

    async def _handle(self, ev: Any) -> None:
        now = self.clock.now()
        if isinstance(ev, SpeechStarted):
            if not self._user_speaking:
                self._speech_start_t = now
            self._user_speaking = True
            self._speech_end_t = None
            self._audio_turn = None  # the pause it described is over
            self._backchannel_tail = False  # a new sound: its words are its own
            if self._agent_speaking() and self._overlap_start_t is None:
                self._overlap_start_t = now
        elif isinstance(ev, TranscriptStatus):
            self._transcript_pending = ev.pending
            if not ev.pending:
                self._backchannel_tail = False  # the final words (if any) came before this
        elif isinstance(ev, SpeechStopped):
            self._user_speaking = False
            self._speech_end_t = now
            if self._overlap_start_t is not None:
                self._overlap_end_t = now
        elif isinstance(ev, TurnAudioFeatures):
            self._audio_turn = ev
        elif isinstance(ev, AsrWord):
            if ev.committed:
                await self._committed_words(ev)
            else:
                self._tentative_word(ev)
        elif isinstance(ev, TextInput):
            await self._user_text(ev)
        elif isinstance(ev, PlaybackMark):
            self._playback(ev)
        elif isinstance(ev, Cancel):
            if self._agent_speaking():
                await self._yield("cancelled")
        elif isinstance(ev, UpdateSession):
            await self._update(ev)

    async def _update(self, ev: UpdateSession) -> None:
        changes: dict[str, Any] = {}
        if ev.policy is not None or ev.policy_params is not None:
            name = ev.policy or self.config.policy
            same = ev.policy is None or ev.policy == self.config.policy
            # another policy without params gets its own defaults, never the old policy's params
            params = ev.policy_params if ev.policy_params is not None else (self.config.policy_params if same else {})
            self.policy = make_policy(name, **params)
            changes.update(policy=name, policy_params=params)
        if ev.temperature is not None or ev.max_reply_tokens is not None:
            sampling = dataclasses.replace(
                self.config.sampling,
                temperature=ev.temperature if ev.temperature is not None else self.config.sampling.temperature,
                max_tokens=ev.max_reply_tokens or self.config.sampling.max_tokens)
            self._sampler = Sampler(sampling)
            changes["sampling"] = sampling
        if ev.audio_output is not None:
            changes["audio_output"] = ev.audio_output
        if ev.instructions is not None:
            changes["instructions"] = ev.instructions
            self._pending_instructions = ev.instructions  # a newer update replaces a pending one
        self.config = dataclasses.replace(self.config, **changes)
        if ev.instructions is not None and not await self._apply_pending_instructions():
            self._emit(InstructionsUpdated("pending", self.clock.now()))

    async def _apply_pending_instructions(self) -> bool:
        """Write pending instructions as a system message, if no turn is open (a turn boundary).
        Eviction keeps the latest system message, so they stay in force."""
        text = self._pending_instructions
        if text is None:
            return True
        if self.seq is None or self.seq.open_turn is not None or self._agent is not None:
            return False
        self._pending_instructions = None
        await self.engine.run(self.seq.add_message, Speaker.SYSTEM, text)
        self._emit(InstructionsUpdated("applied", self.clock.now()))
        return True

    # ---- policy --------------------------------------------------------------------------------
    def _agent_speaking(self) -> bool:
        return self._agent is not None and (self._agent.generating or
                                            (self.config.audio_output and not self._agent.playback_done))

    def observe(self) -> Observation:
        now = self.clock.now()
        agent = self._agent
        overlap = 0.0
        if self._overlap_start_t is not None:
            overlap = (self._overlap_end_t or now) - self._overlap_start_t
        silence = None if self._user_speaking or self._speech_end_t is None else max(0.0, now - self._speech_end_t)
        partial = self._partial_text()
        return Observation(
            t=now, user_speaking=self._user_speaking, agent_speaking=self._agent_speaking(), silence_s=silence,
            overlap_s=overlap, user_turn_words=len(partial.split()), partial_text=partial,
            user_turn_final=self._user_final,
            agent_pending_tokens=(len(agent.tokens) - agent.delivered_tokens) if agent else 0,
            agent_spoken_tokens=agent.delivered_tokens if agent else 0,
            eou_prob=self._turn_end.eou if self._turn_end else None,
            sentence_break_prob=self._turn_end.sentence_break if self._turn_end else None,
            agent_paused=self._paused and agent is not None,
            transcript_pending=self._transcript_pending,
            overlap_ended=self._overlap_start_t is not None and self._overlap_end_t is not None,
            user_speech_s=(now - self._speech_start_t) if self._user_speaking and self._speech_start_t is not None
            else 0.0,
            since_agent_backchannel_s=None if self._backchannel_t is None else now - self._backchannel_t,
            committed_words=sum(len(w.split()) for w in self._user_committed),
            tentative_words=len(self._tentative), after_interruption=self._barged_in and agent is None,
            word_confidence=self._word_confidence(),
            **self._audio_observation(),
        )

    def _audio_observation(self) -> dict[str, Any]:
        a = self._audio_turn
        if a is None:
            return {}
        return dict(audio_eot_prob=a.eot_prob, pitch_slope_st_s=a.pitch_slope_st_s, pitch_end_st=a.pitch_end_st,
                    energy_slope_db_s=a.energy_slope_db_s, speech_s=a.speech_s, vad_mean_1s=a.vad_mean_1s,
                    vad_mean=a.vad_mean)

    @property
    def awaiting_turn_decision(self) -> bool:
        """The user's speech has ended (with its final words), the agent has not taken the turn, and
        the policy's last decision was to listen. Acoustic turn features (Smart Turn, ~60 ms of a
        core) are computed only then: when the words alone settle it, the reply starts without
        them, and they would only have taken the CPU from the reply's first audio."""
        return self._turn_undecided

    def _note_turn_decision(self, obs: Observation, action: Action) -> None:
        undecided = isinstance(action, Listen) and obs.turn_open
        started, self._turn_undecided = undecided and not self._turn_undecided, undecided
        if started and self.on_turn_undecided is not None:
            self.on_turn_undecided()

    def _decide(self) -> Action:
        obs = self.observe()
        action = self.policy.decide(obs)
        self._note_turn_decision(obs, action)
        if self.config.log_decisions:  # every decision (each tick), the training data of policies/learned
            self._emit(PolicyDecided(obs.to_dict(), dataclasses.asdict(action), obs.t))
        if isinstance(action, Yield) and not self._agent_speaking():
            return Listen()
        return action

    async def _release_held(self) -> None:
        if self._held_ids:
            ids, self._held_ids = self._held_ids, []
            self._turn_end = await self.engine.run_for(self.seq, self._append_user_sync, ids)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._emit(StateChanged(state, self.clock.now()))

    def _emit(self, ev: SessionEvent) -> None:
        self._out.put_nowait(ev)
