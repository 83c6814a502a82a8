"""The session's listening half: the user's words into the shared cache, and the reply prepared.

Committed ASR words and typed text are prefilled as they come (whole words only), so that the end
of the user's turn costs little: while the user is silent after words, the user-turn footer and
the agent header are prefilled speculatively (:meth:`Listening._maybe_prepare_reply`), and a final
typed message's job takes the reply's first token and its first decode step too. Either is undone
by one cache rollback if the user goes on. What the user heard of a backchannel goes in marked,
not as a turn.

A mixin of :class:`duplex.session.core.Session`: it shares the session's state and runs on its
loop (the ``*_sync`` methods run in engine jobs, on the worker thread).
"""

from __future__ import annotations

from typing import Any

from duplex.engine.sampling import Sampler
from duplex.engine.sequence import Speaker, Status, TurnEnd
from duplex.policies import is_stop_phrase
from duplex.session.config import AgentTurnState
from duplex.session.events import AsrWord, SpeechStopped, TextInput, UserTranscript

__all__ = ["Listening"]

# how far one ASR pass may move a word's boundaries against another (whisper's word timestamps)
_RETIME_S = 0.1


class Listening:
    """User words and typed text into the cache; the speculative hand-over (mixed into ``Session``)."""

    # state and helpers owned by Session (declared for readers and type checkers)
    engine: Any
    seq: Any
    clock: Any
    config: Any
    _agent: AgentTurnState | None

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
