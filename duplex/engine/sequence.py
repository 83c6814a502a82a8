"""The shared sequence: one token ledger in exact 1:1 correspondence with KV-cache positions.

User words, agent words and the chat template's turn markers are interleaved in one sequence and
one cache. Because user words are prefilled as they arrive, the end of a user turn costs a single
forward step regardless of history length. Barge-in crops the cache to what the user heard;
an endless stream evicts the middle (keeping the system prompt as the attention sink).

This module is synchronous torch code; :mod:`duplex.engine.worker` runs it on the device worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import torch

from duplex.engine.fast_decode import DecodeRow, fast_decoder
from duplex.engine.kv import compact_rotated
from duplex.engine.models import LoadedModel
from duplex.engine.sampling import Sampler
from duplex.engine.template import TurnTemplate

__all__ = ["ForwardRunner", "SequenceConfig", "SharedSequence", "Span", "Speaker", "Status", "TurnEnd"]

log = logging.getLogger(__name__)


def _crop_cache(cache: Any, length: int) -> None:
    """Crop a transformers cache to ``length`` positions (v5 takes a negative count to remove,
    v4 the absolute length to keep)."""
    remove = int(cache.get_seq_length()) - length
    if remove <= 0:
        return
    if _TRANSFORMERS_MAJOR >= 5:
        cache.crop(-remove)
    else:
        cache.crop(length)


def _rotary_embedding(model: Any) -> Any:
    """The model's shared rotary embedding module (Llama-family layout), or None."""
    return getattr(getattr(model, "model", None), "rotary_emb", None)


def _can_crop(cache: Any) -> bool:
    """False once a sliding-window layer (Gemma 3) holds a full window: it has dropped its oldest
    positions, so a crop cannot restore the state before them (transformers raises)."""
    for layer in getattr(cache, "layers", ()):
        window = getattr(layer, "sliding_window", None)
        if window and int(layer.get_seq_length()) >= int(window) and not getattr(layer, "record_past", False):
            return False
    return True


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


_TRANSFORMERS_MAJOR = _transformers_major()
_DECODE_MAX_QUERY = 16
_DECODE_MIN_CONTEXT = 0  # the decode kernel beats SDPA for short queries at every context length


def _decode_attention_for(lm: LoadedModel) -> str | None:
    """Attention kernel for decode steps and hand-overs on CPU, from ``$DUPLEX_DECODE_ATTN``:
    gqa (default: :mod:`duplex.engine.attention`; TTFT at 4k history 62 ms vs 108 ms sdpa, 110 ms eager),
    eager, or sdpa (keep the loaded kernel)."""
    choice = os.environ.get("DUPLEX_DECODE_ATTN", "gqa")
    if choice == "sdpa":
        return None
    if choice == "gqa":
        cfg = lm.model.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            return None
        from duplex.engine.attention import register

        return register()
    if choice != "eager":
        raise ValueError(f"DUPLEX_DECODE_ATTN must be eager, sdpa or gqa, not {choice!r}")
    return "eager"


class ForwardRunner(Protocol):
    """Where a sequence's model calls run when it belongs to an engine: the engine scheduler
    (:mod:`duplex.engine.scheduler`) batches them with other sequences' and chunks long ones."""

    def forward(self, owner: object, ids: list[int], start_pos: int, keep: int, cache: Any,
                direct: Callable[[list[int], int, int], torch.Tensor]) -> torch.Tensor: ...


class Speaker(str, Enum):
    SYSTEM = "system"
    USER = "user"
    AGENT = "agent"


class Status(str, Enum):
    COMMITTED = "committed"  # final user/system text, and turn markers
    TENTATIVE = "tentative"  # ASR words that may still be revised
    SPOKEN = "spoken"  # agent tokens the user has received
    UNSPOKEN = "unspoken"  # agent tokens generated but not (yet) delivered


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """What the model predicts after the user's words. ``eou``: P(the user-turn footer), the turn
    is over; ``sentence_break``: P(a line or paragraph break), the sentence is complete though
    more may follow (a chat model hedges between the two after a finished statement)."""

    eou: float
    sentence_break: float = 0.0
    type: str = "turn_end"


@dataclass(frozen=True, slots=True)
class Span:
    """A run of consecutive positions with the same speaker, status and turn."""

    speaker: Speaker
    status: Status
    turn: int
    start: int
    end: int
    type: str = "span"

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class SequenceConfig:
    """max_tokens: eviction threshold; keep_recent_tokens: the window kept after eviction."""

    max_tokens: int = 4096
    keep_recent_tokens: int = 2048
    prefill_chunk_tokens: int = 256
    type: str = "sequence_config"

    def __post_init__(self) -> None:
        if not 0 < self.keep_recent_tokens < self.max_tokens:
            raise ValueError("need 0 < keep_recent_tokens < max_tokens")


class SharedSequence:
    """Token ledger + KV cache for one session. Not thread-safe: only the engine worker touches it.
    With a ``runner`` (the engine's scheduler) its forwards run there; without one, in place."""

    def __init__(self, lm: LoadedModel, template: TurnTemplate, config: SequenceConfig | None = None,
                 runner: ForwardRunner | None = None) -> None:
        self.lm = lm
        self._runner = runner
        self.template = template
        self.config = config or SequenceConfig()
        self._ids: list[int] = []
        self._speaker: list[Speaker] = []
        self._status: list[Status] = []
        self._turn: list[int] = []
        self._cache: Any = self._new_cache()
        self._logits_value: torch.Tensor | None = None  # [vocab] prediction after the last position
        self._logits_version = 0  # bumped whenever that prediction is replaced or dropped
        self._sink_tokens = 0  # the first system turn; never evicted
        self._turn_counter = 0
        self._open: tuple[Speaker, int] | None = None  # (speaker, turn id) of the open turn
        self.evicted_tokens = 0
        self._prefill_attn = lm.attn_implementation
        self._decode_attn = _decode_attention_for(lm)

    # ---- read side -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    @property
    def cache_length(self) -> int:
        return int(self._cache.get_seq_length()) if self._ids else 0

    @property
    def open_turn(self) -> tuple[Speaker, int] | None:
        return self._open

    def spans(self) -> list[Span]:
        out: list[Span] = []
        start = 0
        for i in range(1, len(self._ids) + 1):
            if i == len(self._ids) or (self._speaker[i], self._status[i], self._turn[i]) != (
                self._speaker[start], self._status[start], self._turn[start]
            ):
                out.append(Span(self._speaker[start], self._status[start], self._turn[start], start, i))
                start = i
        return out

    def turn_start(self, turn: int) -> int:
        """First position of a turn (header included); -1 if the turn was evicted or never existed."""
        try:
            return self._turn.index(turn)
        except ValueError:
            return -1

    def positions(self, turn: int, status: Status | None = None) -> list[int]:
        return [i for i, t in enumerate(self._turn) if t == turn and (status is None or self._status[i] == status)]

    def text(self, start: int = 0, end: int | None = None) -> str:
        return self.lm.tokenizer.decode(self._ids[start:end], skip_special_tokens=False)

    @property
    def _logits(self) -> torch.Tensor | None:
        return self._logits_value

    @_logits.setter
    def _logits(self, value: torch.Tensor | None) -> None:
        self._logits_value = value
        self._logits_version += 1

    @property
    def logits_version(self) -> int:
        """Changes whenever the next-token prediction may have: a token sampled from
        :attr:`logits` is still the next token only while this value is unchanged."""
        return self._logits_version

    @property
    def logits(self) -> torch.Tensor:
        """Next-token logits after the last position (recomputed lazily after a rollback)."""
        if self._logits is None:
            if not self._ids:
                raise RuntimeError("empty sequence has no next-token logits")
            last = self._ids[-1]
            self._crop_to(len(self._ids) - 1)
            self._logits = self._forward([last], len(self._ids) - 1)
        return self._logits

    def turn_end(self) -> TurnEnd:
        """The model's end-of-turn belief after the current prefix (footer and sentence break)."""
        return self._turn_end(self.logits)

    def _turn_end(self, logits: torch.Tensor) -> TurnEnd:
        probs = torch.softmax(logits.float(), dim=-1)
        breaks = self.template.break_ids
        return TurnEnd(float(probs[self.template.end_of_user_turn_id]),
                       float(probs[list(breaks)].sum()) if breaks else 0.0)

    # ---- write side ------------------------------------------------------------------------
    def begin_turn(self, speaker: Speaker) -> int:
        """Append the role's header tokens; return the new turn id."""
        if self._open is not None:
            raise RuntimeError(f"turn {self._open} is still open")
        header = self._opening_header(speaker)
        self._turn_counter += 1
        turn = self._turn_counter
        self._open = (speaker, turn)
        self._append(header, speaker, Status.COMMITTED, turn)
        return turn

    def _opening_header(self, speaker: Speaker) -> list[int]:
        """The tokens that open ``speaker``'s turn here: none for a user turn that the system text
        already opened (Gemma style)."""
        if speaker is Speaker.USER and self.template.system_in_user_turn and self._speaker \
                and self._speaker[-1] is Speaker.SYSTEM:
            return []
        return list(self.template.role(speaker.value).header)

    def end_turn(self, speaker: Speaker, footer_already_generated: int = 0) -> None:
        """Append the footer (skipping the tokens the model itself already generated, e.g. EOS)."""
        if self._open is None or self._open[0] != speaker:
            raise RuntimeError(f"no open {speaker.value} turn to end (open: {self._open})")
        turn = self._open[1]
        footer = self.template.role(speaker.value).footer[footer_already_generated:]
        self._append(footer, speaker, Status.COMMITTED, turn)
        if speaker is Speaker.SYSTEM and self._sink_tokens == 0 and turn == 1:
            self._sink_tokens = len(self._ids)
        self._open = None
        self.maybe_evict()

    def hand_over(self, to: Speaker, footer_already_generated: int = 0) -> int:
        """Close the open turn and open one for ``to`` in a single forward pass (footer + header):
        the cheapest path from end of user turn to the first reply token."""
        if self._open is None:
            return self.begin_turn(to)
        speaker, turn = self._open
        footer = list(self.template.role(speaker.value).footer[footer_already_generated:])
        header = list(self.template.role(to.value).header)
        self._turn_counter += 1
        new_turn = self._turn_counter
        self._prefill(footer + header)
        for ids, spk, t in ((footer, speaker, turn), (header, to, new_turn)):
            self._ids.extend(ids)
            self._speaker.extend([spk] * len(ids))
            self._status.extend([Status.COMMITTED] * len(ids))
            self._turn.extend([t] * len(ids))
        if speaker is Speaker.SYSTEM and self._sink_tokens == 0 and turn == 1:
            self._sink_tokens = len(self._ids) - len(header)
        self._open = (to, new_turn)
        self.maybe_evict()
        return new_turn

    def append_and_hand_over(self, ids: Seq[int], to: Speaker, open_as: Speaker | None = None) -> tuple[int, TurnEnd]:
        """Append ``ids`` to the open turn, close it and open ``to``'s turn in ONE forward pass.

        Returns (new turn id, end-of-turn belief after ``ids``): the user's last words and
        the speculative hand-over cost one forward instead of two, and the belief the turn policy
        needs comes from the same pass (it keeps the logits of the last content position too).
        ``open_as``: where no turn is open, open one for that speaker first, in the same pass (a
        typed message is header, words, footer and the reply's header at once: under load every
        separate forward is one more scheduler tick before the first reply token). Its turn id is
        the returned one minus 1.
        """
        ids = [int(i) for i in ids]
        opens = open_as if self._open is None else None  # the turn this pass opens, if any
        head = self._opening_header(opens) if opens is not None else []
        if (self._open is None and opens is None) or not ids \
                or len(head) + len(ids) > self.config.prefill_chunk_tokens:
            if opens is not None:
                self.begin_turn(opens)
            self.append(ids)
            belief = self.turn_end()
            return self.hand_over(to), belief
        if opens is not None:
            self._turn_counter += 1
            self._open = (opens, self._turn_counter)
        assert self._open is not None
        speaker, turn = self._open
        footer = list(self.template.role(speaker.value).footer)
        header = list(self.template.role(to.value).header)
        tail = footer + header
        logits = self._forward(head + ids + tail, len(self._ids), keep=len(tail) + 1)
        self._logits = logits[-1]
        belief = self._turn_end(logits[0])
        self._turn_counter += 1
        new_turn = self._turn_counter
        for part, spk, t in ((head, speaker, turn), (ids, speaker, turn), (footer, speaker, turn),
                             (header, to, new_turn)):
            self._ids.extend(part)
            self._speaker.extend([spk] * len(part))
            self._status.extend([Status.COMMITTED] * len(part))
            self._turn.extend([t] * len(part))
        self._open = (to, new_turn)
        self.maybe_evict()
        return new_turn, belief

    def interject(self, ids: Seq[int], speaker: Speaker) -> tuple[int, int, int]:
        """Close the open turn, add ``ids`` as a closed turn of ``speaker`` and reopen a turn for
        the interrupted side, in ONE forward pass: the user's words heard while the agent speaks
        enter the sequence where they happened (see ``duplex.session.interleave``).

        Returns (tokens inserted before the reopened turn's content, the interjection's turn id,
        the reopened turn's id)."""
        if self._open is None:
            raise RuntimeError("interject() needs an open turn")
        ids = [int(i) for i in ids]
        was, turn = self._open
        parts = [
            (list(self.template.role(was.value).footer), was, turn),
            (list(self.template.role(speaker.value).header), speaker, self._turn_counter + 1),
            (ids, speaker, self._turn_counter + 1),
            (list(self.template.role(speaker.value).footer), speaker, self._turn_counter + 1),
            (list(self.template.role(was.value).header), was, self._turn_counter + 2),
        ]
        self._turn_counter += 2
        everything = [i for part, _, _ in parts for i in part]
        self._prefill(everything)
        for part, spk, t in parts:
            self._ids.extend(part)
            self._speaker.extend([spk] * len(part))
            self._status.extend([Status.COMMITTED] * len(part))
            self._turn.extend([t] * len(part))
        self._open = (was, self._turn_counter)
        self.maybe_evict()
        return len(everything), self._turn_counter - 1, self._turn_counter

    def append(self, ids: Seq[int], status: Status = Status.COMMITTED, *, logits: bool = True) -> None:
        """Append content ids to the open turn (incremental, chunked prefill). ``logits=False``:
        the caller will append more before it samples, so the output layer is skipped (for a
        262k-word vocabulary like Gemma 3's it is most of a short forward); :attr:`logits` is then
        recomputed only if it is read before the next append."""
        if self._open is None:
            raise RuntimeError("append() needs an open turn; call begin_turn() first")
        speaker, turn = self._open
        self._append(ids, speaker, status, turn, logits=logits)
        self.maybe_evict()

    def append_text(self, text: str, status: Status = Status.COMMITTED) -> list[int]:
        ids = self.lm.tokenizer.encode(text, add_special_tokens=False)
        self.append(ids, status)
        return ids

    def add_message(self, speaker: Speaker, text: str) -> int:
        turn = self.begin_turn(speaker)
        self.append_text(text)
        self.end_turn(speaker)
        return turn

    def sample(self, sampler: Sampler, recent: int = 64) -> int:
        """The next token from the current logits, without appending it (so a caller can emit it
        before paying for its forward pass)."""
        return sampler(self.logits, self._ids[-recent:])

    def append_and_sample(self, token: int, sampler: Sampler, status: Status = Status.UNSPOKEN) -> tuple[int, int]:
        """Append a sampled ``token`` and sample the one after it: a speaking session's decode step
        as ONE engine job, so each token costs one hand-off between the event loop and the engine
        (two made batched ticks miss the sessions whose loop had not yet queued their forward).
        Returns (the next token, :attr:`logits_version` it was sampled at); that token is not
        appended: the caller emits it first, then passes it back."""
        self.append([token], status)
        return self.sample(sampler), self._logits_version

    def decode_row(self, token: int, runner: object) -> tuple[object, list[int], int, int, Any, Any] | None:
        """A decode step (``token`` appended to the open turn) as one forward row for ``runner`` (the
        scheduler) to run inside its tick, :meth:`take_decode_row` after it: (owner, ids, start_pos,
        keep, cache, direct). None where the step must go through :meth:`append_and_sample` as a job:
        no open turn, an eviction due once the token is in, or another runner (or none)."""
        if self._open is None or self._runner is not runner or len(self._ids) + 1 > self.config.max_tokens:
            return None
        return self, [int(token)], len(self._ids), 1, self._cache, self.forward_direct

    def take_decode_row(self, token: int, logits: torch.Tensor | None, sampler: Sampler,
                        status: Status = Status.UNSPOKEN) -> tuple[int, int]:
        """:meth:`append_and_sample` after the scheduler ran :meth:`decode_row`'s row: the token joins
        the ledger, the row's logits are the sequence's, and the next token is sampled."""
        if self._open is None:
            raise RuntimeError("a decode row finished with no open turn")
        speaker, turn = self._open
        self._logits = logits
        self._record([int(token)], speaker, status, turn)
        return self.sample(sampler), self._logits_version

    def step(self, sampler: Sampler, status: Status = Status.UNSPOKEN) -> int:
        """Sample the next token and append it (one decode step)."""
        if self._open is None:
            raise RuntimeError("step() needs an open turn")
        token = self.sample(sampler)
        self.append([token], status)
        return token

    def set_status(self, start: int, end: int, status: Status) -> None:
        for i in range(max(0, start), min(end, len(self._ids))):
            self._status[i] = status

    def rollback(self, n: int) -> None:
        """Remove the last n positions from the ledger and the cache, exactly."""
        if n < 0 or n > len(self._ids) - self._sink_tokens:
            raise ValueError(f"cannot roll back {n} of {len(self._ids)} tokens ({self._sink_tokens} protected)")
        if n == 0:
            return
        keep = len(self._ids) - n
        del self._ids[keep:], self._speaker[keep:], self._status[keep:], self._turn[keep:]
        self._crop_to(keep)
        self._logits = None
        if self._open is not None and self.turn_start(self._open[1]) == -1:
            self._open = None  # the whole open turn was rolled back, header included

    def truncate_to(self, position: int) -> None:
        self.rollback(len(self._ids) - position)

    def reopen(self, speaker: Speaker, turn: int) -> None:
        """Mark an existing turn open again (after rolling back its footer)."""
        self._open = (speaker, turn)

    def truncate_turn(self, turn: int, content_start: int, kept: int, marker_ids: Seq[int]) -> int | None:
        """Crop agent ``turn`` to its first ``kept`` content tokens (marked spoken), append the
        truncation marker and close it. A user turn opened after it (the agent had finished
        generating while its audio still played) is re-appended; returns that turn's new id."""
        user_ids: list[int] = []
        if self._open is not None and self._open[0] is Speaker.USER and self._open[1] != turn:
            user_ids = [self._ids[p] for p in self.positions(self._open[1])][len(self.template.user.header):]
        self.truncate_to(content_start + kept)
        self.reopen(Speaker.AGENT, turn)
        self.set_status(content_start, content_start + kept, Status.SPOKEN)
        self.append(marker_ids)
        self.end_turn(Speaker.AGENT)
        if not user_ids:
            return None
        new_turn = self.begin_turn(Speaker.USER)
        self.append(user_ids)
        return new_turn

    def maybe_evict(self) -> bool:
        """Over the token budget: keep the system prompt + a recent window starting at a turn
        boundary, renumbered from the start so positions stay inside the model's trained range:
        their cached keys rotated to the new positions where the cache allows it
        (:func:`~duplex.engine.kv.compact_rotated`, milliseconds), else re-encoded (seconds)."""
        cfg = self.config
        if len(self._ids) <= cfg.max_tokens:
            return False
        want_start = max(self._sink_tokens, len(self._ids) - cfg.keep_recent_tokens)
        start = want_start
        while start < len(self._ids) and start > self._sink_tokens and self._turn[start] == self._turn[start - 1]:
            start += 1  # move forward to the next turn boundary
        if start >= len(self._ids) - 1:
            start = want_start  # one giant turn: cut inside it
        kept = list(range(self._sink_tokens)) + self._latest_system_turn(before=start) + list(range(start, len(self._ids)))
        removed = len(self._ids) - len(kept)
        ids = [self._ids[i] for i in kept]
        self._speaker = [self._speaker[i] for i in kept]
        self._status = [self._status[i] for i in kept]
        self._turn = [self._turn[i] for i in kept]
        self._logits = None  # recomputed from the kept context when next needed
        self.evicted_tokens += removed
        if compact_rotated(self._cache, kept, _rotary_embedding(self.lm.model)):
            log.debug("evicted %d tokens; %d kept in the cache, keys rotated to their new positions",
                      removed, len(ids))
            self._ids = ids
            return True
        self._ids = []
        self._cache = self._new_cache()
        log.debug("evicted %d tokens; re-encoding %d", removed, len(ids))
        self._prefill(ids)
        self._ids = ids
        return True

    def _latest_system_turn(self, before: int) -> list[int]:
        """Positions of the latest system turn after the sink and before ``before`` (instructions
        updated mid-conversation): eviction keeps them, so they stay in force."""
        for i in range(before - 1, self._sink_tokens - 1, -1):
            if self._speaker[i] is Speaker.SYSTEM:
                turn = self._turn[i]
                first = i
                while first > self._sink_tokens and self._turn[first - 1] == turn:
                    first -= 1
                return list(range(first, i + 1))
        return []

    # ---- model calls -----------------------------------------------------------------------
    def _crop_to(self, length: int) -> None:
        """Crop the cache to the first ``length`` ledger positions, or re-encode them when a
        sliding-window layer can no longer be cropped (see :func:`_can_crop`)."""
        if _can_crop(self._cache):
            _crop_cache(self._cache, length)
            return
        log.debug("sliding-window cache: re-encoding %d tokens instead of cropping", length)
        ids, saved = self._ids[:length], self._ids
        self._cache = self._new_cache()
        self._ids = []
        try:
            self._prefill(ids)
        finally:
            self._ids = saved

    def _new_cache(self) -> Any:
        from duplex.engine.kv import new_kv_cache

        return new_kv_cache(self.lm.model.config)  # appends in place, no per-step copy of the history

    def _append(self, ids: Seq[int], speaker: Speaker, status: Status, turn: int, logits: bool = True) -> None:
        ids = [int(i) for i in ids]
        if not ids:
            return
        self._prefill(ids, logits=logits)
        self._record(ids, speaker, status, turn)

    def _record(self, ids: list[int], speaker: Speaker, status: Status, turn: int) -> None:
        """The ledger takes ``ids`` (their forward has run: the cache holds them)."""
        self._ids.extend(ids)
        self._speaker.extend([speaker] * len(ids))
        self._status.extend([status] * len(ids))
        self._turn.extend([turn] * len(ids))

    def _prefill(self, ids: list[int], logits: bool = True) -> None:
        """Run ids through the model in chunks, continuing after the current ledger length. Only
        the last chunk computes logits (and only if ``logits``): the output layer runs once."""
        pos = len(self._ids)
        chunk = self.config.prefill_chunk_tokens
        for i in range(0, len(ids), chunk):
            piece = ids[i:i + chunk]
            last = i + chunk >= len(ids)
            out = self._forward(piece, pos + i, keep=1 if (last and logits) else 0)
            if last:
                self._logits = out  # None without logits: recomputed lazily if read

    def _forward(self, ids: list[int], start_pos: int, keep: int = 1) -> torch.Tensor | None:
        """Logits of the last position (``keep`` > 1: of the last ``keep`` positions, stacked;
        0: none, the output layer is skipped and None comes back)."""
        if self._runner is None:
            return self.forward_direct(ids, start_pos, keep)
        return self._runner.forward(self, ids, start_pos, keep, self._cache, self.forward_direct)

    @torch.inference_mode()
    def forward_direct(self, ids: list[int], start_pos: int, keep: int = 1) -> torch.Tensor | None:
        """:meth:`_forward` as one model call of this sequence alone (the scheduler's fallback)."""
        device = self.lm.device
        fast = fast_decoder(self.lm.model)
        if fast is not None and (len(ids) > fast.direct_max_query or not fast.accepts(self._cache)):
            fast = None
        if fast is not None:  # decode steps and hand-overs: the lean forward (same arithmetic)
            out = fast.forward([DecodeRow(self._cache, ids, start_pos, keep)])[0]
            assert out is not None or keep == 0
            return out
        want = self._prefill_attn  # as loaded (the engine scheduler may have left its own set)
        # PyTorch's CPU flash-attention kernel is slow for a few queries against a long cache
        # (110 ms vs 60 ms eager for one token at 4k context, bf16), and on CUDA bf16 SDPA picks
        # cuDNN, which rebuilds its graph for every new cache length (1.3 ms of CPU per layer per
        # token on an H100: 57 vs 17 ms/token in fp32): decode steps and turn hand-overs use the
        # GQA kernel of duplex.engine.attention; chunked prefill keeps sdpa.
        short = len(ids) <= _DECODE_MAX_QUERY and start_pos >= _DECODE_MIN_CONTEXT
        if short and self._decode_attn:
            want = self._decode_attn
        if self.lm.model.config._attn_implementation != want:
            self.lm.model.set_attn_implementation(want)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        position_ids = torch.arange(start_pos, start_pos + len(ids), device=device).unsqueeze(0)
        if keep == 0:  # the decoder stack alone (transformers reads logits_to_keep=0 as "all")
            out = self.lm.model.get_decoder()(
                input_ids=input_ids, position_ids=position_ids, past_key_values=self._cache, use_cache=True)
            self._cache = out.past_key_values
            return None
        out = self.lm.model(
            input_ids=input_ids, position_ids=position_ids, past_key_values=self._cache,
            use_cache=True, logits_to_keep=keep,
        )
        self._cache = out.past_key_values
        return out.logits[0, -1] if keep == 1 else out.logits[0, -keep:]
