"""The session's overlap and barge-in half: what happens when the user is heard over the agent.

Pause first, decide after (``policies.base.BargeInRules`` decides; this module acts): the agent's
audio pauses at the user's onset; a backchannel resumes it, and its words are kept only as a
``[backchannel: …]`` note for the user's next turn; anything else yields, and once the client says
what it really played the sequence is rolled back to exactly that, closed with a visible marker.
With ``overlap_layout="interleave"`` the user's words are already inside the agent's turn
(``duplex.session.interleave``) and the rollback keeps or re-appends them.

A mixin of :class:`duplex.session.core.Session`: it shares the session's state and runs on its
loop; model calls go to the engine worker like every other sequence operation.
"""

from __future__ import annotations

from typing import Any

from duplex.engine.sequence import Speaker, Status
from duplex.policies import Continue, Pause, Resume
from duplex.session.config import TRUNCATION_MARKER, AgentTurnState
from duplex.session.detok import WordBuffer
from duplex.session.events import (
    AgentBackchannel,
    AgentPaused,
    AgentResumed,
    Interrupted,
    PlaybackMark,
    TurnEnded,
)
from duplex.session.interleave import Interjection, agent_spans, kept_interjections

__all__ = ["BACKCHANNEL_MARKER", "BargeIn"]

BACKCHANNEL_MARKER = "[backchannel: {}]"  # how a user backchannel appears in the conversation
_MAX_BACKCHANNEL_NOTE_TOKENS = 64


class BargeIn:
    """Overlap, pause/resume, backchannel notes, yield and rollback (mixed into ``Session``)."""

    # state and helpers owned by Session (declared for readers and type checkers)
    engine: Any
    seq: Any
    clock: Any
    config: Any
    _agent: AgentTurnState | None

    def _playback(self, ev: PlaybackMark) -> None:
        agent = self._agent
        if agent is None or ev.turn != agent.turn:
            return
        heard = min(ev.heard_tokens, len(agent.tokens))
        if heard > agent.delivered_tokens and self._truncate_deadline is None:
            self._mark_spoken(agent, agent.delivered_tokens, heard)
        if self._truncate_deadline is not None:
            if ev.final:
                agent.delivered_tokens = heard  # the client's final word on what was heard
                self._truncate_deadline = self.clock.now()  # finish now
            else:
                agent.delivered_tokens = max(agent.delivered_tokens, heard)
            return
        agent.delivered_tokens = max(agent.delivered_tokens, heard)
        if ev.done and not agent.generating:
            agent.playback_done = True
            self._agent = None
            self._set_state("listening")

    def _interleave_sync(self, agent: AgentTurnState, ids: list[int]) -> bool:
        """Worker thread: the user's words go in where they were heard, inside the agent's turn
        (``overlap_layout="interleave"``); False if the agent's turn closed meanwhile."""
        assert self.seq is not None
        open_turn = self.seq.open_turn
        if not agent.generating or open_turn is None or open_turn[0] is not Speaker.AGENT:
            return False
        length, _, reopened = self.seq.interject(ids, Speaker.USER)
        agent.interjections.append(Interjection(len(agent.tokens), length, tuple(ids), reopened))
        return True

    def _apply_overlap_action(self, action: Continue | Pause | Resume) -> None:
        """Pause the agent's audio while an overlap is judged; resume it when the overlap ends as a
        backchannel (whose words are then forgotten). Text-only output has nothing to pause."""
        agent = self._agent
        if isinstance(action, Pause):
            if agent is not None and self.config.audio_output and not self._paused and self._truncate_deadline is None:
                self._paused = True
                self._emit(AgentPaused(agent.turn, self.clock.now(), action.reason))
            return
        if action.reason == "backchannel" and not self._user_speaking:
            self._end_overlap_as_backchannel()  # late words of a resolved backchannel go the same way
        if isinstance(action, Resume) or action.reason == "backchannel":
            self._resume(action.reason)

    def _backchannel(self, text: str) -> None:
        """The policy acknowledges the talking user: say it (the voice pipeline speaks it), but
        open no agent turn and leave the conversation as it is: the user keeps the floor."""
        if self._agent is not None or not self._user_speaking:
            return
        self._backchannel_t = self.clock.now()
        self._emit(AgentBackchannel(text, self._backchannel_t))

    def _resume(self, reason: str) -> None:
        if self._paused:
            self._paused = False
            if self._agent is not None:
                self._emit(AgentResumed(self._agent.turn, self.clock.now(), reason))

    def _end_overlap_as_backchannel(self) -> None:
        """The overlap was a backchannel: it is not a turn, so the agent does not answer "yeah"; its
        words are kept as a marked note that opens the user's next turn."""
        # committed words only (tentative ones may be garbled); interleaved ones are in the cache already
        self._note_backchannel(" ".join(self._user_committed[self._interleaved_words:]))
        self._interleaved_words = 0
        self._backchannel_tail = self._transcript_pending  # its final words may still be on the way
        self._overlap_start_t = self._overlap_end_t = None
        self._user_committed.clear()
        self._committed_probs = []
        self._tentative = []
        self._held_ids.clear()
        self._user_final = False

    def _note_backchannel(self, heard: str) -> None:
        heard = heard.strip()
        if not heard:
            return
        note = self.engine.tokenizer.encode(f"{BACKCHANNEL_MARKER.format(heard)} ", add_special_tokens=False)
        kept = self._backchannel_ids if len(self._backchannel_ids) + len(note) <= _MAX_BACKCHANNEL_NOTE_TOKENS else []
        self._backchannel_ids = kept + note  # bounded: only the latest notes are kept

    async def _yield(self, reason: str) -> None:
        """Stop now and tell the client; roll back once we know what the user heard."""
        agent = self._agent
        if agent is None or self._truncate_deadline is not None:
            return
        agent.generating = False
        if agent.stepping is not None:
            agent.stepping.revoke()  # a step in flight queues nothing more: the cut below comes after it
        self._paused = False  # Interrupted supersedes the pause: the audio is dropped, not resumed
        now = self.clock.now()
        kept = agent.delivered_tokens
        self._emit(Interrupted(agent.turn, self._text_of(agent, kept), kept, len(agent.tokens) - kept, now,
                               reason="cancelled" if reason == "cancelled" else "barge_in"))
        self._set_state("interrupted")
        self._barged_in = reason != "cancelled"
        wait = self.config.truncate_wait_ms / 1000 if self.config.audio_output else 0.0
        self._truncate_deadline = now + wait
        self._overlap_start_t = self._overlap_end_t = None
        await self._finish_truncate_if_due()

    def _text_of(self, agent: AgentTurnState, n_tokens: int) -> str:
        return self.engine.tokenizer.decode(agent.tokens[:n_tokens], skip_special_tokens=True)

    async def _finish_truncate_if_due(self) -> None:
        if self._truncate_deadline is None or self.clock.now() < self._truncate_deadline:
            return
        agent = self._agent
        assert agent is not None and self.seq is not None
        kept = min(agent.delivered_tokens, len(agent.tokens))
        self._held_ids = await self.engine.run_for(self.seq, self._truncate_sync, agent, kept) + self._held_ids
        self._emit(TurnEnded("agent", agent.turn, self._text_of(agent, kept), "interrupted", self.clock.now()))
        self._truncate_deadline = None
        self._agent = None
        self._detok.reset()
        self._words = WordBuffer()
        self._set_state("listening")
        await self._apply_pending_instructions()
        await self._release_held()

    def _truncate_sync(self, agent: AgentTurnState, kept: int) -> list[int]:
        """Worker thread: keep the first ``kept`` agent tokens, mark the cut. User words that were
        interleaved after the cut come back (returned) to be re-appended after the agent's turn."""
        assert self.seq is not None
        marker = self.engine.tokenizer.encode(TRUNCATION_MARKER, add_special_tokens=False)
        stay, cut = kept_interjections(agent.interjections, kept)
        first = stay[-1].at if stay else 0  # the cut lies in the agent span after the last kept interjection
        start = self._content_start(agent) + first + sum(i.length for i in stay)
        in_span = max(0, min(kept - first, len(self.seq) - start))  # never past the ledger's end
        reopened = self.seq.truncate_turn(stay[-1].agent_turn if stay else agent.turn, start, in_span, marker)
        agent.interjections = stay
        if reopened is not None:
            self._user_turn = reopened
        return [t for i in cut for t in i.ids]

    def _mark_spoken(self, agent: AgentTurnState, start: int, end: int) -> None:
        assert self.seq is not None
        for a, b in agent_spans(self._content_start(agent), agent.interjections, start, end):
            self.seq.set_status(a, b, Status.SPOKEN)

    def _content_start(self, agent: AgentTurnState) -> int:
        """Sequence position of the agent turn's first content token now (after any eviction)."""
        assert self.seq is not None
        return agent.content_start - self.seq.evicted_tokens
