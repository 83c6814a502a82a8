"""A translation session: source words in (typed or ASR), target words out, one task per session.

It speaks the chat :class:`~duplex.session.core.Session`'s language, so the one
:class:`~duplex.voice.pipeline.VoicePipeline` and the WebSocket server carry it unchanged: inputs
are ``TextInput`` / ``AsrWord`` / ``SpeechStopped``; outputs are ``TurnStarted``/``TurnEnded``
(one agent turn per source sentence), ``AgentTextDelta`` for each confirmed target word (what the
TTS speaks when audio output is on), ``UserTranscript`` for the source, plus
:class:`TranslationUpdated` with the unconfirmed hypothesis (re-translation, LocalAgreement).

A sentence ends at ``final`` typed text, at the end of an utterance (speech stopped), at
sentence-final punctuation, or after ``max_source_words``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from duplex.engine.worker import Engine
from duplex.session.clock import Clock, MonotonicClock
from duplex.session.events import (
    AgentTextDelta,
    AsrWord,
    Cancel,
    ErrorEvent,
    PlaybackMark,
    SpeechStarted,
    SpeechStopped,
    StateChanged,
    TextInput,
    TurnEnded,
    TurnStarted,
    UpdateSession,
    UserTranscript,
)
from duplex.session.lifecycle import SessionLifecycle
from duplex.translate.policies import SimulPolicy, make_simul_policy
from duplex.translate.prompt import LAYOUTS, TranslationPrompt, make_prompt
from duplex.translate.translator import SimulTranslator, TranslationModel

__all__ = ["TranslateConfig", "TranslateSession", "TranslationUpdated"]

log = logging.getLogger(__name__)

_SENTENCE_END = (".", "?", "!", "…", "。")


@dataclass(frozen=True, slots=True)
class TranslateConfig:
    """``policy``: wait-k | local-agreement | retranslate | offline; ``k`` for wait-k; ``layout``:
    reencode | interleaved (how source and target share the cache)."""

    source_language: str = "en"
    target_language: str = "es"
    policy: str = "wait-k"
    k: int = 3
    policy_params: dict[str, Any] = field(default_factory=dict)
    layout: str = "reencode"
    max_source_words: int = 40
    max_text_chars: int = 16_000
    max_queued_inputs: int = 1_024
    max_decode_hold_s: float = 0.5  # longest a translation step waits for the first audio (hold_decoding)
    type: str = "translate_config"

    def make_policy(self) -> SimulPolicy:
        params = dict(self.policy_params)
        if self.policy in ("wait-k", "waitk"):
            params.setdefault("k", self.k)
        return make_simul_policy(self.policy, **params)

    def validate(self) -> None:
        """Raise ValueError (unknown pair, policy or parameter) before a session is built."""
        make_prompt(self.source_language, self.target_language)
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown translation layout {self.layout!r}; available: {', '.join(LAYOUTS)}")
        self.make_policy()


@dataclass(frozen=True, slots=True)
class TranslationUpdated:
    """The source so far, the confirmed target and the unconfirmed hypothesis after it."""

    turn: int
    source: str
    target: str
    hypothesis: str
    t: float
    type: str = "translation_updated"


class TranslateSession(SessionLifecycle):
    """Drive with :meth:`start`, feed with :meth:`submit`, read :meth:`events`, end with :meth:`close`
    (the chat Session's interface, so the voice pipeline can carry it)."""

    # A translation's latency is counted per source word (StreamLAAL), so it wants each word as
    # soon as two whisper passes agree on it: passes every 500 ms of speech, where a chat turn,
    # which needs the words only by the end of the turn, takes them every second (fewer, better
    # agreed words: the voice default). The voice pipeline reads this when it opens its ASR.
    asr_interval_ms: int = 500
    # A translation has no turn to decide: the voice pipeline's acoustic turn features (Smart Turn,
    # prosody; computed while a chat Session is undecided after the user's words) never run for it.
    awaiting_turn_decision: bool = False
    on_turn_undecided: Callable[[], None] | None = None

    def __init__(self, engine: Engine, config: TranslateConfig | None = None, clock: Clock | None = None,
                 session_id: str | None = None,
                 translator_factory: Callable[[Any, TranslationPrompt], TranslationModel] | None = None) -> None:
        self.engine = engine
        self.config = config or TranslateConfig()
        self.config.validate()
        self.clock = clock or MonotonicClock()
        self.id = session_id or uuid.uuid4().hex[:12]
        self.prompt = make_prompt(self.config.source_language, self.config.target_language)
        self.policy = self.config.make_policy()
        self.state = "listening"
        self.translator: TranslationModel | None = None
        # (lm, prompt) -> model; tests pass a fake
        # the real translator's forwards go through the engine's scheduler: on its tick thread (with
        # its threads; a job thread runs torch on one) and batched with other sessions' rows. Before,
        # they ran on the job's own thread, one session after another in the engine's shared lane
        self._translator_factory = translator_factory or functools.partial(
            SimulTranslator, layout=self.config.layout, runner=engine.scheduler)
        self._inputs: collections.deque[Any] = collections.deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._typed = ""
        self._turn_counter = 0
        self._user_turn: int | None = None
        self._agent_turn: int | None = None
        self._source: list[str] = []
        self._target: list[str] = []
        self._target_tokens = 0
        self._decode_held: asyncio.Event | None = None  # set = released (see hold_decoding)
        self.lines: list[tuple[str, str]] = []  # finished (source, target) sentences

    # ---- public API (as Session) -----------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"translate-{self.id}")
        await self._ready.wait()

    def submit(self, event: Any) -> bool:
        if isinstance(event, TextInput) and len(self._typed) + len(event.text) > self.config.max_text_chars:
            self._emit(ErrorEvent("text_too_long", f"typed source text over {self.config.max_text_chars} "
                                  "characters without a space or final", self.clock.now()))
            return False
        if isinstance(event, UpdateSession) and (event.policy is not None or event.instructions is not None):
            self._emit(ErrorEvent("invalid_state", "this session translates: change policy or languages with "
                                  "session.update {mode: 'translate', ...}, or switch back with {mode: 'chat'}",
                                  self.clock.now()))
            return False
        if len(self._inputs) >= self.config.max_queued_inputs:
            self._emit(ErrorEvent("input_queue_full", "too many inputs wait for this session", self.clock.now()))
            return False
        self._inputs.append(event)
        if len(self._inputs) >= self.config.max_queued_inputs:
            self._room.clear()
        self._wake.set()
        return True

    @property
    def has_room(self) -> bool:
        return len(self._inputs) < self.config.max_queued_inputs

    async def wait_for_room(self) -> None:
        while not self.has_room:
            self._room.clear()
            await self._room.wait()

    @property
    def idle(self) -> bool:
        """Nothing queued and no sentence open."""
        return not self._inputs and self.state == "listening"

    @property
    def transcript(self) -> str:
        return "\n".join(f"{s}\n{t}" for s, t in self.lines)

    # ---- loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            self.translator = await self.engine.run(self._translator_factory, self.engine.lm, self.prompt)
        finally:
            self._ready.set()
        self._emit(StateChanged("listening", self.clock.now()))
        while True:
            try:
                while self._inputs:
                    ev = self._inputs.popleft()
                    if self.has_room:
                        self._room.set()
                    await self._handle(ev)
                self._wake.clear()
                if not self._inputs:
                    await self._wake.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("translate session %s step failed", self.id)
                self._emit(ErrorEvent("internal_error", f"{type(exc).__name__}: {exc}", self.clock.now()))

    async def _handle(self, ev: Any) -> None:
        if isinstance(ev, TextInput):
            self._typed += ev.text
            if ev.final:
                words, self._typed = self._typed.split(), ""
                await self._read(words)
                await self._finish()
            else:
                cut = self._typed.rfind(" ")
                if cut > 0:  # whole words only: a partial word may still grow
                    text, self._typed = self._typed[:cut], self._typed[cut:]
                    await self._read(text.split())
        elif isinstance(ev, AsrWord):
            if ev.committed:
                await self._read(ev.text.split())
            elif ev.text.strip() and self._user_turn is not None:
                self._emit(UserTranscript(self._user_turn, " ".join(self._source + [ev.text.strip()]), False,
                                          self.clock.now()))
        elif isinstance(ev, SpeechStopped):
            await self._finish()
        elif isinstance(ev, Cancel):
            self.release_decoding()
        elif isinstance(ev, (SpeechStarted, PlaybackMark, UpdateSession)):
            pass  # translation runs on regardless; audio output changes need no action here

    async def _wait_decode_release(self) -> None:
        held = self._decode_held
        if held is None:
            return
        try:
            await asyncio.wait_for(held.wait(), self.config.max_decode_hold_s)
        except asyncio.TimeoutError:
            self.release_decoding()  # a slow or lost synthesis never stalls the translation

    async def _read(self, words: list[str]) -> None:
        for word in words:
            if self._agent_turn is None:
                self._begin()
            assert self._user_turn is not None and self._agent_turn is not None
            self._source.append(word)
            self._emit(UserTranscript(self._user_turn, " ".join(self._source), True, self.clock.now()))
            await self._wait_decode_release()
            out, hypothesis = await self.engine.run_for(self._lane(), self._step_sync, word, len(self._source))
            self._write(out, hypothesis)
            if word.endswith(_SENTENCE_END) or len(self._source) >= self.config.max_source_words:
                await self._finish()

    async def _finish(self) -> None:
        if self._agent_turn is None:
            return
        await self._wait_decode_release()
        out, _ = await self.engine.run_for(self._lane(), self._step_sync, None, len(self._source))
        self._write(out, [])
        now = self.clock.now()
        source, target = " ".join(self._source), " ".join(self._target)
        assert self._user_turn is not None
        self._emit(TurnEnded("user", self._user_turn, source, "completed", now))
        self._emit(TurnEnded("agent", self._agent_turn, target, "completed", now))
        self.lines.append((source, target))
        self._agent_turn = self._user_turn = None
        self._source, self._target, self._target_tokens = [], [], 0
        self._set_state("listening")

    def _begin(self) -> None:
        assert self.translator is not None
        self._turn_counter += 2
        self._user_turn, self._agent_turn = self._turn_counter - 1, self._turn_counter
        now = self.clock.now()
        self._emit(TurnStarted("user", self._user_turn, now))
        self._emit(TurnStarted("agent", self._agent_turn, now))
        self._set_state("speaking")

    def _lane(self) -> Any:
        """The engine lane of this session's steps: its translator's sequence (sessions' steps then
        interleave at forwards, and their rows share ticks), or the shared lane for a translator
        without one (test fakes)."""
        return getattr(self.translator, "seq", None)

    def _step_sync(self, word: str | None, n_read: int) -> tuple[list[tuple[str, int]], list[str]]:
        """Worker thread: read one word (None: the source ended) and let the policy write."""
        assert self.translator is not None
        if n_read == 1 and word is not None:
            self.translator.reset()
            self.policy.reset()
        if word is not None:
            self.translator.read([word])
        out = self.policy.on_source(self.translator, n_read, finished=word is None)
        if word is None:
            self.translator.reset()
        return [(w.text, len(w.ids)) for w in out], list(self.policy.hypothesis)

    def _write(self, out: list[tuple[str, int]], hypothesis: list[str]) -> None:
        assert self._agent_turn is not None
        now = self.clock.now()
        for text, n_ids in out:
            start = self._target_tokens
            self._target_tokens += n_ids
            self._emit(AgentTextDelta(self._agent_turn, (" " if self._target else "") + text, start,
                                      self._target_tokens, now))
            self._target.append(text)
        self._emit(TranslationUpdated(self._agent_turn, " ".join(self._source), " ".join(self._target),
                                      " ".join(hypothesis), now))

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._emit(StateChanged(state, self.clock.now()))

    def _emit(self, ev: Any) -> None:
        self._out.put_nowait(ev)

