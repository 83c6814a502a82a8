"""The session's speaking half: the agent's turn from hand-over to its end, one token at a time.

Each token is one engine job (``SharedSequence.append_and_sample``: append the last token, sample
the next), and the first one comes with the job that opened the turn, so under load a reply pays
one tick's wait per token and no more. Each step queues the next one itself once the session has
taken its token (:mod:`duplex.engine.decode_ahead`), so a batched tick never waits for the
sessions' loops to come round; a token appended ahead and never taken is rolled back. While a step runs the loop still takes inputs: a barge-in
that arrives mid-step is decided and announced at once. Text leaves as whole words
(``WordBuffer``), so a rollback always lands on what was shown or played.

A mixin of :class:`duplex.session.core.Session`: it shares the session's state and runs on its
loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from duplex.engine import decode_ahead
from duplex.engine.decode_ahead import settle
from duplex.engine.sequence import Speaker
from duplex.policies import Pause, Resume, Yield
from duplex.session.config import AgentTurnState
from duplex.session.detok import WordBuffer
from duplex.session.events import AgentTextDelta, TurnEnded, TurnStarted

__all__ = ["Speaking"]

# A reply's steps are urgent (express ticks) until its first words are out, and at most this many:
# a reply whose tokens show no text for that long (special tokens, one unbroken run of symbols)
# would otherwise keep its priority over every other session for its whole length
URGENT_STEPS_MAX = 6


class Speaking:
    """Decoding, word emission and the end of the agent's turn (mixed into ``Session``)."""

    # state and helpers owned by Session (declared for readers and type checkers)
    engine: Any
    seq: Any
    clock: Any
    config: Any
    _agent: AgentTurnState | None

    async def _wait_decode_release(self, limit_s: float = 0.5) -> None:
        """Until released, or a barge-in/cancel arrives, or ``limit_s`` (a guard: a slow or lost
        synthesis must never stall the reply)."""
        held = self._decode_held
        deadline = self.clock.now() + limit_s  # the session's clock: a virtual one in the evaluation
        while held is not None and self._decode_held is held and not held.is_set() and not self._urgent:
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                self.release_decoding()
                return
            self._wake.clear()  # the main loop re-checks its queues before sleeping: nothing is lost
            tasks = {asyncio.ensure_future(held.wait()), asyncio.ensure_future(self._wake.wait()),
                     asyncio.ensure_future(self.clock.sleep(remaining))}
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()

    # ---- speaking ------------------------------------------------------------------------------
    async def _speak(self, n_tokens: int) -> None:
        assert self.seq is not None
        if self._agent is None:
            await self._take_turn()
            if self._agent is not None and self._agent.tokens and await self._stop_after_token():
                return  # the turn's first token came with the job that took the turn
        agent = self._agent
        assert agent is not None
        for _ in range(max(1, n_tokens)):
            if self._urgent:
                return  # a barge-in or cancel is waiting: let the loop handle it first
            if self._decode_held is not None:
                await self._wait_decode_release()
                if self._urgent:
                    return
            ahead, agent.ahead = agent.ahead, None
            if ahead is not None:
                token = ahead.token  # the engine is appending it already (decode ahead)
            elif agent.next_token is not None and agent.next_version == self.seq.logits_version:
                token = agent.next_token  # sampled by the last step's job
            else:
                token = await self.engine.run(self.seq.sample, self._sampler)
            agent.next_token = None
            if self._agent is not agent or not agent.generating:
                return
            if token in self.seq.template.end_of_agent_turn_ids:  # (never appended ahead)
                await self._complete_turn("completed")
                return
            self._take_token(agent, token)
            # the step queues the next one itself (decode ahead), unless this token is the reply's
            # last or user words may be interleaved into the turn (their position must be exact)
            chain = (decode_ahead.ENABLED and len(agent.tokens) < self._sampler.config.max_tokens
                     and self.config.overlap_layout != "interleave")
            if ahead is not None:
                link = ahead
                step = link.claim(chain)
            else:
                # until the reply's first words are out the user is waiting: urgent (express ticks)
                link = self.engine.decode_step(
                    self.seq, token, self._sampler, chain=chain,
                    urgent=lambda: agent.emitted_chars == 0 and len(agent.tokens) < URGENT_STEPS_MAX)
                step = asyncio.wrap_future(link.future)
            agent.stepping = link
            try:
                agent.next_token, agent.next_version, agent.ahead = await self._step_listening(step)
            finally:
                agent.stepping = None
            if not agent.generating:
                # interrupted while the step ran: the cut (truncate_turn) drops a token appended ahead
                agent.ahead = None
                return
            if await self._stop_after_token():
                return

    async def _settle_decoding_ahead(self, agent: AgentTurnState) -> None:
        """The turn ends here (not cut by a barge-in), between steps: a token the engine appended
        ahead and the session never took leaves the cache (an unclaimed step queues nothing)."""
        link, agent.ahead = agent.ahead, None
        if link is not None:
            await settle(lambda: self.engine.run_for(self.seq, self.seq.rollback, 1), link)

    def _take_token(self, agent: AgentTurnState, token: int) -> None:
        """A reply token is in the cache: its text, and the words it completes, go out."""
        agent.tokens.append(token)
        piece = self._detok.push(token)
        agent.text += piece
        agent.char_ends.append(len(agent.text))
        self._emit_words(self._words.push(piece))

    async def _stop_after_token(self) -> bool:
        """End the turn if the last token hit a stop sequence or the token limit."""
        agent = self._agent
        assert agent is not None
        stop = self._hit_stop()
        if stop or len(agent.tokens) >= self._sampler.config.max_tokens:
            await self._complete_turn("stop_sequence" if stop else "max_tokens")
            return True
        return False

    async def _step_listening(self, step: Any) -> Any:
        """Await a decode step while still reacting to inputs: a barge-in that arrives mid-step is
        decided and announced at once; the rollback then queues behind the step on the worker."""
        fut = asyncio.ensure_future(step)
        try:
            while not fut.done():
                self._wake.clear()
                if self._urgent or self._inputs:
                    await self._handle_inputs()
                    action = self._decide()
                    if isinstance(action, Yield) and self._truncate_deadline is None:
                        await self._yield(action.reason)
                    elif isinstance(action, (Pause, Resume)):
                        self._apply_overlap_action(action)  # pausing must not wait for the step
                    continue
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({fut, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
            return fut.result()
        finally:
            if not fut.done():
                fut.cancel()

    async def _take_turn(self) -> None:
        assert self.seq is not None
        now = self.clock.now()
        if self._typed_pending.strip():
            text, self._typed_pending = self._typed_pending, ""
            prefix = " " if self._user_committed else ""
            self._user_committed.extend(text.split())
            await self._prefill_user(prefix + text.strip(), urgent=True)
        if self._held_ids:
            ids, self._held_ids = self._held_ids, []
            self._turn_end = await self.engine.run_urgent(self.seq, self._append_user_sync, ids)
        user_text = self._user_text_so_far()
        user_turn = self._user_turn
        if self._prepared is not None:
            turn, self._prepared = self._prepared, None
        else:
            turn, self._first_token = await self.engine.run_urgent(self.seq, self._hand_over_sync)
        first, self._first_token = self._first_token, None
        appended, self._first_appended = self._first_appended, None
        if user_turn is not None:
            self._emit(TurnEnded("user", user_turn, user_text, "completed", now))
        self._user_turn = None
        self._user_committed = []
        self._committed_probs = []
        self._interleaved_words = 0
        self._tentative = []
        self._user_final = False
        self._turn_end = None
        self._audio_turn = None
        self._speech_end_t = None
        self._overlap_start_t = self._overlap_end_t = None
        self._barged_in = False
        # a logical position (evicted tokens included), so that eviction mid-turn cannot move it
        content_start = len(self.seq) + self.seq.evicted_tokens - (appended is not None)
        self._paused = False
        self._agent = AgentTurnState(turn=turn, content_start=content_start)
        if first is not None and first[2] is self._sampler:  # not if the sampling settings changed since
            self._agent.next_token, self._agent.next_version = first[0], first[1]
        self._detok.reset()
        self._words = WordBuffer()
        self._emit(TurnStarted("agent", turn, now))
        self._set_state("speaking")
        if appended is not None:
            # taken with the turn (sampled under the settings of that moment, even if they changed)
            self._take_token(self._agent, appended)

    def _emit_words(self, text: str) -> None:
        agent = self._agent
        if not text or agent is None:
            return
        start = agent.emitted_tokens
        agent.emitted_chars += len(text)
        end = start
        while end < len(agent.char_ends) and agent.char_ends[end] <= agent.emitted_chars:
            end += 1
        end = max(end, start + 1) if agent.tokens else end
        end = min(end, len(agent.tokens))
        agent.emitted_tokens = end
        self._emit(AgentTextDelta(agent.turn, text, start, end, self.clock.now()))
        if not self.config.audio_output:
            agent.delivered_tokens = end
            self._mark_spoken(agent, start, end)

    def _hit_stop(self) -> bool:
        agent = self._agent
        stops = self._sampler.config.stop
        return bool(agent and stops and any(s in agent.text for s in stops))

    async def _complete_turn(self, reason: str) -> None:
        assert self.seq is not None and self._agent is not None
        agent = self._agent
        tail = self._detok.flush()
        agent.text += tail
        if agent.char_ends:
            agent.char_ends[-1] = len(agent.text)
        self._emit_words(self._words.push(tail) + self._words.flush())
        agent.emitted_tokens = len(agent.tokens)
        if not self.config.audio_output:
            agent.delivered_tokens = len(agent.tokens)
        agent.generating = False
        self._overlap_start_t = self._overlap_end_t = None
        await self._settle_decoding_ahead(agent)
        await self.engine.run(self.seq.end_turn, Speaker.AGENT)
        self._emit(TurnEnded("agent", agent.turn, agent.text, reason, self.clock.now()))
        if self.config.audio_output and not agent.playback_done:
            return  # still "speaking" until the client reports playback done
        self._agent = None
        self._set_state("listening")
        await self._apply_pending_instructions()
        await self._release_held()
