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
from typing import Any

from duplex.audio.turn_features import TurnAudioFeatures
from duplex.engine.sampling import Sampler
from duplex.engine.sequence import SharedSequence, Speaker, Status, TurnEnd
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
    is_stop_phrase,
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
    UserTranscript,
)
from duplex.session.lifecycle import SessionLifecycle
from duplex.session.speaking import Speaking
from duplex.session.validation import validate_input

__all__ = ["BACKCHANNEL_MARKER", "DEFAULT_INSTRUCTIONS", "Session", "SessionConfig", "TRUNCATION_MARKER"]

log = logging.getLogger(__name__)
# how far one ASR pass may move a word's boundaries against another (whisper's word timestamps)
_RETIME_S = 0.1

_URGENT = (SpeechStarted, Cancel)


class Session(SessionLifecycle, Speaking, BargeIn):
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

    async def _committed_words(self, first: AsrWord) -> None:
        """Committed words queued together are prefilled in one forward; when the end of speech
        is queued right behind them (the voice pipeline sends it once the final pass is in), the
        stop is taken first so that forward also carries the speculative hand-over."""
        words = [first]
        while self._inputs and isinstance(self._inputs[0], AsrWord) and self._inputs[0].committed:
            words.append(self._inputs.popleft())
        if self._backchannel_tail:
            late = " ".join(w.text.strip() for w in words if w.text.strip())
            if not is_stop_phrase(late):
                self._note_backchannel(late)  # "uh-huh" heard as "Sir Sir": still no turn
                self._emit(UserTranscript(-1, late, True, self.clock.now()))  # heard, but not a turn
                return
            self._backchannel_tail = False  # "wait": the user did mean to stop the agent
        if self._inputs and isinstance(self._inputs[0], SpeechStopped):
            await self._handle(self._inputs.popleft())
        texts: list[str] = []
        for word in words:
            text = word.text.strip()
            if not text:
                continue
            # a tentative word that starts before this committed one ends is this word (or one
            # it replaced): passes re-time words by tens of ms, so comparing starts alone kept the
            # older copy, and the live transcript read "remind me to call? call?"
            self._tentative = [t for t in self._tentative if t[0] > word.start_s and t[0] >= word.end_s - _RETIME_S]
            self._user_committed.append(text)
            self._committed_probs += [word.probability] * len(text.split())
            texts.append(text)
        if not texts:
            return
        prefix = " " if len(self._user_committed) > len(texts) else ""
        await self._prefill_user(prefix + " ".join(texts))
        self._emit(UserTranscript(self._current_user_turn_id(), self._user_text_so_far(), True, self.clock.now()))

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

    def _user_text_so_far(self) -> str:
        return " ".join(self._user_committed)

    def _tentative_word(self, word: AsrWord) -> None:
        """Tentative words only go into the observation (committed ones go into the cache). A new
        ASR pass re-sends its whole tentative tail, recognisable by a start time that does not advance."""
        text = word.text.strip()
        if not text or self._backchannel_tail:
            return
        if self._tentative and word.start_s <= self._tentative[-1][0]:
            self._tentative = []
        self._tentative.append((word.start_s, text, word.probability))
        self._emit(UserTranscript(self._current_user_turn_id(), self._partial_text(), False, self.clock.now()))

    async def _user_text(self, ev: TextInput) -> None:
        now = self.clock.now()
        self._typed_pending += ev.text
        if ev.final:
            text, self._typed_pending = self._typed_pending, ""
            self._user_final = True
            self._speech_end_t = now
        else:
            cut = self._typed_pending.rfind(" ")
            if cut <= 0:
                return  # prefill whole words only: token boundaries of partial words are unstable
            text, self._typed_pending = self._typed_pending[:cut], self._typed_pending[cut:]
            self._speech_end_t = now
        words = text.split()
        if not words:
            return
        had_words = bool(self._user_committed)
        self._user_committed.extend(words)
        await self._prefill_user((" " if had_words else "") + " ".join(words), urgent=ev.final)
        if self._agent_speaking() and self._overlap_start_t is None:
            self._overlap_start_t = now  # typing over the agent counts as overlap
        self._emit(UserTranscript(self._current_user_turn_id(), self._user_text_so_far(), ev.final, now))

    async def _prefill_user(self, text: str, urgent: bool = False) -> None:
        """Committed user text goes into the cache now, unless the agent's turn is still open.
        ``urgent``: the reply waits for it (a final typed message, or the agent taking its turn):
        an express tick, and a prepared hand-over takes the reply's first step too."""
        assert self.seq is not None
        ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        agent = self._agent
        if agent is not None and (agent.generating or self._truncate_deadline is not None):
            if (self.config.overlap_layout == "interleave" and agent.generating and self._truncate_deadline is None
                    and not self._held_ids and await self.engine.run_for(self.seq, self._interleave_sync, agent, ids)):
                self._interleaved_words = len(self._user_committed)
                return
            self._held_ids.extend(ids)
            return
        if self._can_prepare_reply(after_append=True):
            # the reply's first token comes out of this forward: urgent (an express tick); taking
            # the turn now, the same job takes the reply's first step too
            self._turn_end, self._prepared, self._first_token, self._first_appended = await self.engine.run_urgent(
                self.seq, self._append_and_prepare_sync, ids, urgent)
            return
        run = self.engine.run_urgent if urgent else self.engine.run_for
        self._turn_end = await run(self.seq, self._append_user_sync, ids)

    async def _maybe_prepare_reply(self) -> bool:
        """While the user is silent after committed words, prefill the user-turn footer and the
        agent header now, so that when the policy says Speak only sampling is left (TTFT no longer
        pays a forward pass). Undone by one cache crop if the user goes on."""
        if not self._can_prepare_reply():
            return False
        assert self.seq is not None
        self._prepared, self._first_token = await self.engine.run_urgent(self.seq, self._hand_over_sync)
        return True

    def _can_prepare_reply(self, after_append: bool = False) -> bool:
        """The user is silent after committed words and nothing else is pending: the hand-over
        may be prefilled now (``after_append``: together with words about to be appended)."""
        seq = self.seq
        if (not self.config.speculative_handover or seq is None or self._user_speaking or not self._user_committed
                or self._held_ids or self._agent is not None or self._truncate_deadline is not None
                or self._typed_pending.strip()):
            return False
        if after_append:
            return True  # _append_and_prepare_sync undoes an earlier hand-over and opens the user turn
        return self._prepared is None and seq.open_turn is not None and seq.open_turn[0] is Speaker.USER

    def _unprepare_sync(self) -> None:
        """Roll back a speculative hand-over, with the reply's first token if it was taken too
        (worker thread)."""
        if self._prepared is None or self.seq is None or self._user_turn is None:
            self._prepared = None
            self._first_appended = None
            return
        template = self.seq.template
        taken = self._first_appended is not None
        self.seq.rollback(len(template.user.footer) + len(template.agent.header) + taken)
        self.seq.reopen(Speaker.USER, self._user_turn)
        self._prepared = None
        self._first_token = None
        self._first_appended = None

    def _append_and_prepare_sync(self, ids: list[int], first_step: bool = False
                                 ) -> tuple[TurnEnd, int, tuple[int, int, Sampler], int | None]:
        """Worker thread: the user's words plus the speculative hand-over in one forward, and the
        reply's first token sampled from it. ``first_step`` (a typed message is final: the reply
        is all but certain): that token is appended too and the next one sampled, as the reply's
        first decode step would (returned as the last item; None when not taken: an end-of-turn
        token, a one-token reply). All of it is undone by :meth:`_unprepare_sync` if the user goes
        on instead."""
        assert self.seq is not None
        self._unprepare_sync()
        if self.seq.open_turn is None:  # header, words and hand-over in one forward
            turn, eou = self.seq.append_and_hand_over(self._with_backchannel_note(ids), Speaker.AGENT,
                                                      open_as=Speaker.USER)
            self._user_turn = turn - 1
        else:
            ids = self._open_user_turn_sync(ids)
            turn, eou = self.seq.append_and_hand_over(ids, Speaker.AGENT)
        first = self._sample_first_sync()
        token, _, sampler = first
        if (not first_step or token in self.seq.template.end_of_agent_turn_ids
                or sampler.config.max_tokens <= 1):
            return eou, turn, first, None
        self.seq.append([token], Status.UNSPOKEN)
        return eou, turn, self._sample_first_sync(), token

    def _hand_over_sync(self) -> tuple[int, tuple[int, int, Sampler]]:
        """Worker thread: open the agent turn and sample its first token in the same job."""
        assert self.seq is not None
        turn = self.seq.hand_over(Speaker.AGENT)
        return turn, self._sample_first_sync()

    def _sample_first_sync(self) -> tuple[int, int, Sampler]:
        assert self.seq is not None
        sampler = self._sampler
        return self.seq.sample(sampler), self.seq.logits_version, sampler

    def _append_user_sync(self, ids: list[int]) -> TurnEnd:
        assert self.seq is not None
        self._unprepare_sync()
        ids = self._open_user_turn_sync(ids)
        self.seq.append(ids)
        return self.seq.turn_end()

    def _open_user_turn_sync(self, ids: list[int]) -> list[int]:
        """Open the user's turn if it is not open; a backchannel heard since the last user turn
        goes first, marked, so the model knows what it heard without it having been a turn."""
        assert self.seq is not None
        if self.seq.open_turn is None or self.seq.open_turn[0] is not Speaker.USER:
            self._user_turn = self.seq.begin_turn(Speaker.USER)
            ids = self._with_backchannel_note(ids)
        return ids

    def _with_backchannel_note(self, ids: list[int]) -> list[int]:
        """``ids`` of a user turn being opened, after the backchannel note heard since the last one."""
        ids, self._backchannel_ids = self._backchannel_ids + ids, []
        return ids

    def _current_user_turn_id(self) -> int:
        return self._user_turn if self._user_turn is not None else -1

    @property
    def _user_tentative(self) -> str:
        return " ".join(w for _, w, _ in self._tentative)

    def _word_confidence(self) -> float | None:
        """Mean whisper probability of this user turn's heard words (None without any)."""
        probs = self._committed_probs + [p for _, w, p in self._tentative for _ in w.split()]
        return sum(probs) / len(probs) if probs else None

    def _partial_text(self) -> str:
        parts = [self._user_text_so_far(), self._user_tentative, self._typed_pending.strip()]
        return " ".join(p for p in parts if p)

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

    def _decide(self) -> Action:
        obs = self.observe()
        action = self.policy.decide(obs)
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
