"""Where the user's words heard while the agent generates go in the shared sequence.

Two layouts (``SessionConfig.overlap_layout``):

- ``hold`` (default): the words wait outside the cache and enter as the user's next turn once
  the agent's turn closes. The model does not read them until it has stopped.
- ``interleave``: they enter at once, where they happened: the agent's open turn is closed, the
  words go in as a closed user turn, and a new agent turn is opened in which generation goes on
  (``SharedSequence.interject``, one forward pass). The model reads what it hears while it
  speaks, and a backchannel sits in the history at the moment it was said.

ChatML-style templates render the second layout natively; an overlap span *inside* the
assistant's text would have the model read the user's words as its own.

Rollback stays exact: an :class:`Interjection` remembers where it sits among the agent's tokens,
so the agent's k-th token maps to its sequence position (:func:`agent_position`). When a
barge-in keeps only what was heard, interjections before the cut stay where they were said, and
those after it are cut with the unheard tokens and re-appended after the truncated turn.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OVERLAP_LAYOUTS", "Interjection", "agent_position", "agent_spans", "kept_interjections"]

OVERLAP_LAYOUTS = ("hold", "interleave")


@dataclass(frozen=True, slots=True)
class Interjection:
    """User words inserted into the agent's turn after its first ``at`` tokens."""

    at: int  # agent tokens generated before it
    length: int  # sequence positions it took (footer, user turn, header of the reopened agent turn)
    ids: tuple[int, ...]  # the user's word ids (re-appended if the rollback cuts it)
    agent_turn: int  # the sequence turn id of the agent turn reopened after it


def agent_position(start: int, interjections: list[Interjection], k: int) -> int:
    """Sequence position of the agent's ``k``-th content token (``k`` = count: the cut point
    after ``k`` tokens; interjections made after exactly ``k`` tokens lie beyond it)."""
    return start + k + sum(i.length for i in interjections if i.at < k)


def agent_spans(start: int, interjections: list[Interjection], lo: int, hi: int) -> list[tuple[int, int]]:
    """Sequence ranges of agent tokens ``lo..hi`` (skipping the interjections between them)."""
    spans: list[tuple[int, int]] = []
    cuts = sorted({i.at for i in interjections if lo < i.at < hi})
    for a, b in zip([lo, *cuts], [*cuts, hi]):
        if b > a:
            first = agent_position(start, interjections, a + 1) - 1  # token a itself
            spans.append((first, first + (b - a)))
    return spans


def kept_interjections(interjections: list[Interjection], kept: int) -> tuple[list[Interjection], list[Interjection]]:
    """Split at a rollback that keeps ``kept`` agent tokens: (stay in place, cut and re-appended)."""
    return [i for i in interjections if i.at < kept], [i for i in interjections if i.at >= kept]
