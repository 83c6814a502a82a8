"""Source words in, target words out, on one :class:`~duplex.engine.sequence.SharedSequence`.

Two layouts of the one cached sequence (the prompt is the attention sink, prefilled once per
session). Re-encode (the default)::

    <few-shot prompt> "English:" | " w1 w2 w3" | "\\nSpanish:" " t1 t2" | " t3 t4" (unconfirmed)
      system turn (sink)         | source turn | target turn: confirmed  | hypothesis tokens

Reading a source word rolls the target turn back (header, confirmed and unconfirmed tokens) and
appends the word to the source turn (one forward, as it arrives). Only when the policy writes does
the target turn come back: the header and the confirmed target in ONE forward, then greedy decoding.
The model always sees the layout it was prompted with (full source so far, then the target), and a
confirmed target prefix is forced, never re-generated. Rollback crops the cache; with sliding-window
layers (Gemma 3) the sequence re-encodes instead when a layer already dropped positions.

Cost (Gemma 3 270M, CPU): every forward reads all weights, and the 262k-row output layer alone is
over half of a one-token forward, so the number of forwards is what counts. The target header is
the agent turn's first content tokens rather than a template header, so that the header and the
confirmed target share one forward (a template header would cost a forward of its own).

Interleaved layout (``layout="interleaved"``): source and target chunks alternate in the one cache
and nothing is re-encoded; a confirmed target word stays where it was written::

    <interleaved few-shot prompt> "English:" " w1 w2 w3" "\\nSpanish:" " t1" "\\nEnglish:" " w4" "\\nSpanish:" " t2"

A read appends the word(s) together with the target header in ONE forward (after a target chunk the
source header goes first, in the same forward), so a write decodes at once: no target re-open. When
the next event is another read instead, the header is cropped (no forward) and the chunk grows.
Unconfirmed hypothesis tokens are cropped as in the re-encode layout. The few-shot examples are
written in the same interleaved form (see :mod:`duplex.translate.prompt`).

Why re-encode stays the default (bench/results/translate-layouts.json, wait-k k=3, 30 sentences):
interleaved needs 1.8 forwards per source word instead of 2.9 and a third less compute, but Gemma 3
270M reads the chunked target poorly: it glosses each new chunk and drops lagged words (BLEU 7
against 44; no marker or few-shot variant tried came near).

Synchronous torch code: a session runs it on the engine worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from duplex.engine.models import LoadedModel
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import ForwardRunner, SequenceConfig, SharedSequence, Speaker, Status
from duplex.engine.template import RoleMarkers, TurnTemplate
from duplex.translate.prompt import LAYOUTS, TranslationPrompt

__all__ = ["SimulTranslator", "TargetWord", "TranslationModel"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TargetWord:
    """One target word with the token ids that wrote it (so it can be forced back exactly)."""

    text: str
    ids: tuple[int, ...]
    type: str = "target_word"


class TranslationModel:
    """What a simultaneous policy needs from a model (the real translator, or a fake in tests)."""

    def read(self, words: Sequence[str]) -> None:
        """Append source words."""
        raise NotImplementedError

    def next_word(self) -> TargetWord | None:
        """Greedy next target word after the confirmed prefix, confirmed at once; ``None`` when
        the model ends the translation here."""
        raise NotImplementedError

    def hypothesis(self) -> list[TargetWord]:
        """The greedy continuation of the confirmed prefix to the end of the translation
        (unconfirmed: the next :meth:`read` drops it)."""
        raise NotImplementedError

    def confirm(self, words: Sequence[TargetWord]) -> None:
        """Fix ``words`` (a prefix of the last hypothesis) as the next part of the target."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the sentence (source and target); keep the cached prompt."""
        raise NotImplementedError


def _template(lm: LoadedModel, prompt: TranslationPrompt) -> TurnTemplate:
    tok = lm.tokenizer
    bos = tok.bos_token_id
    eos = tok.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    none = RoleMarkers((), ())
    # no agent header: the target header is written as the agent turn's first content (see the
    # module docstring), so it shares a forward with the confirmed target
    return TurnTemplate(system=RoleMarkers((bos,) if bos is not None else (), ()), user=none,
                        agent=none, eos_ids=eos_ids)


@dataclass(slots=True)
class _Stats:
    forwards_s: float = 0.0
    forwards: int = 0  # model calls: source reads, target (re)opens, decode steps
    decoded_tokens: int = 0
    reencoded_tokens: int = 0


class SimulTranslator(TranslationModel):
    """The real model behind the policies: one shared sequence per translation session."""

    def __init__(self, lm: LoadedModel, prompt: TranslationPrompt, max_word_tokens: int = 12,
                 max_target_ratio: float = 3.0, layout: str = "reencode", runner: ForwardRunner | None = None) -> None:
        """``runner``: where the sequence's forwards run, the engine's scheduler in a server (then every
        call of this translator must run as a job of that engine, in the sequence's lane: its
        forwards join the ticks, batched with other sessions' on the engine's tick thread); None:
        on the calling thread (the offline evaluation, the CLI)."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown translation layout {layout!r}; available: {', '.join(LAYOUTS)}")
        self.layout = layout
        self.lm = lm
        self.prompt = prompt
        self.template = _template(lm, prompt)
        self._interleaved = layout == "interleaved"
        self._header = tuple(lm.tokenizer.encode(prompt.target_header, add_special_tokens=False))
        self._source_header = tuple(lm.tokenizer.encode(prompt.source_header, add_special_tokens=False))
        self.seq = SharedSequence(lm, self.template, SequenceConfig(max_tokens=8192, keep_recent_tokens=4096),
                                  runner=runner)
        self._sampler = Sampler(SamplingConfig(temperature=0.0))
        self.max_word_tokens = max_word_tokens
        self.max_target_ratio = max_target_ratio
        self._eos = set(self.template.eos_ids)
        self.stats = _Stats()
        # prompt = system turn: the sink, never rolled back
        self.seq.begin_turn(Speaker.SYSTEM)
        prefix = prompt.interleaved_prefix if self._interleaved else prompt.prefix
        self.seq.append(lm.tokenizer.encode(prefix, add_special_tokens=False))
        self.seq.end_turn(Speaker.SYSTEM)
        self._prompt_len = len(self.seq)
        self.source: list[str] = []
        self._source_ids = 0
        self.confirmed: list[TargetWord] = []
        self._source_turn: int | None = None
        self._source_end = self._prompt_len  # position after the last source token
        self._target_ready = False  # the sequence ends with header + confirmed target (+ hypothesis)
        self._last_hypothesis: list[TargetWord] = []
        # interleaved: the cache ends with the target header, then the open chunk's target tokens
        self._chunk_start = self._prompt_len  # first target token of the open chunk
        self._confirmed_end = self._prompt_len  # position after the last confirmed target token
        self._header_open = False  # the last source chunk ends with the target header

    # ---- TranslationModel ------------------------------------------------------------------
    def reset(self) -> None:
        self.seq.truncate_to(self._prompt_len)
        self.source, self.confirmed, self._last_hypothesis = [], [], []
        self._source_ids = 0
        self._source_turn = None
        self._source_end = self._prompt_len
        self._target_ready = False
        self._chunk_start = self._confirmed_end = self._prompt_len
        self._header_open = False

    def read(self, words: Sequence[str]) -> None:
        words = [w for w in (w.strip() for w in words) if w]
        if not words:
            return
        ids = self.lm.tokenizer.encode(" " + " ".join(words), add_special_tokens=False)
        self._last_hypothesis = []  # its tokens are rolled back below: nothing left to confirm
        if self._interleaved:
            self._read_interleaved(words, ids)
            return
        self._drop_target()
        self._open_source()
        self.source.extend(words)
        self._source_ids += len(ids)
        # the words alone, as they arrive (incremental prefill); the target waits for a write, and
        # the next write re-opens the target first, so no logits here: the 262k-row output layer
        # of Gemma 3 is most of a one-word forward
        self.seq.append(ids, logits=False)
        self.stats.forwards += 1
        self._source_end = len(self.seq)

    def next_word(self) -> TargetWord | None:
        self._open_target()
        word = self._decode_word()
        if word is not None:
            self.confirmed.append(word)
            self.seq.set_status(len(self.seq) - len(word.ids), len(self.seq), Status.SPOKEN)
            self._confirmed_end = len(self.seq)
        return word

    def hypothesis(self) -> list[TargetWord]:
        self._open_target()
        out: list[TargetWord] = []
        while True:
            word = self._decode_word()
            if word is None:
                break
            out.append(word)
        # the decoded tokens stay in the cache: confirming a prefix of them costs nothing now, and
        # the next read() rolls them back with the rest of the target
        self._rollback_to_confirmed(extra=[w for w in out])
        self._last_hypothesis = out
        return out

    def confirm(self, words: Sequence[TargetWord]) -> None:
        words = list(words)
        if not words:
            return
        if [w.ids for w in words] != [w.ids for w in self._last_hypothesis[:len(words)]]:
            raise ValueError("confirm() takes a prefix of the last hypothesis")
        self.confirmed.extend(words)
        self._last_hypothesis = self._last_hypothesis[len(words):]
        if self._interleaved:
            # the confirmed words are the hypothesis tokens right after the confirmed target
            end = self._confirmed_end + sum(len(w.ids) for w in words)
            self.seq.set_status(self._confirmed_end, end, Status.SPOKEN)
            self._confirmed_end = end

    # ---- helpers ---------------------------------------------------------------------------
    @property
    def target_text(self) -> str:
        return " ".join(w.text for w in self.confirmed)

    def _drop_target(self) -> None:
        """Roll the target turn back (header and tokens): the next source word goes before it."""
        if len(self.seq) > self._source_end:
            self.seq.truncate_to(self._source_end)
        self._target_ready = False

    def _open_source(self) -> None:
        if self._source_turn is None:
            self._source_turn = self.seq.begin_turn(Speaker.USER)
            self._source_end = len(self.seq)
        elif self.seq.open_turn != (Speaker.USER, self._source_turn):
            self.seq.reopen(Speaker.USER, self._source_turn)  # the target turn was rolled back

    def _open_target(self) -> None:
        if self._interleaved:
            self._open_target_interleaved()
            return
        if self._target_ready:
            # drop unconfirmed hypothesis tokens beyond the confirmed target
            want = self._source_end + len(self._header) + sum(len(w.ids) for w in self.confirmed)
            if len(self.seq) > want:
                self.seq.truncate_to(want)
            return
        self._open_source()
        self.seq.hand_over(Speaker.AGENT)  # no footer, no header: no forward
        # the header and the confirmed target (forced, re-encoded after the new source) in one forward
        confirmed = [i for w in self.confirmed for i in w.ids]
        self.seq.append([*self._header, *confirmed], Status.SPOKEN if confirmed else Status.COMMITTED)
        self.seq.set_status(self._source_end, self._source_end + len(self._header), Status.COMMITTED)
        self.stats.forwards += 1
        self.stats.reencoded_tokens += len(confirmed)
        self._target_ready = True

    def _rollback_to_confirmed(self, extra: list[TargetWord]) -> None:
        """Keep the cache at confirmed + ``extra`` tokens (drops a sampled-but-unused tail)."""
        if self._interleaved:
            want = self._confirmed_end + sum(len(w.ids) for w in extra)
        else:
            want = (self._source_end + len(self._header) + sum(len(w.ids) for w in self.confirmed)
                    + sum(len(w.ids) for w in extra))
        if len(self.seq) > want:
            self.seq.truncate_to(want)

    def _target_budget_left(self) -> int:
        if self._interleaved:  # confirmed words (in earlier chunks too) + the open chunk's hypothesis
            written = sum(len(w.ids) for w in self.confirmed) + len(self.seq) - self._confirmed_end
        else:
            written = len(self.seq) - self._source_end - len(self._header)
        return int(self.max_target_ratio * max(1, self._source_ids) + 8) - written

    # ---- interleaved layout ----------------------------------------------------------------
    def _turn(self, speaker: Speaker) -> None:
        """Open a ``speaker`` turn for the next chunk (empty role markers: no forward)."""
        open_turn = self.seq.open_turn
        if open_turn is None:
            self.seq.begin_turn(speaker)
        elif open_turn[0] is not speaker:
            self.seq.hand_over(speaker)

    def _read_interleaved(self, words: list[str], ids: list[int]) -> None:
        """Append the source chunk and the target header in one forward; nothing before it moves
        except unconfirmed hypothesis tokens (and the header of a chunk that had no target)."""
        if len(self.seq) > self._confirmed_end:
            self.seq.truncate_to(self._confirmed_end)  # the unconfirmed hypothesis
        if self._header_open and self._confirmed_end == self._chunk_start:
            # no target since the last read: drop the header, this word extends the same chunk
            self.seq.truncate_to(self._source_end)
            chunk = [*ids, *self._header]
        elif not self.source and not self.confirmed:
            chunk = [*ids, *self._header]  # the prompt ends with the source header
        else:
            chunk = [*self._source_header, *ids, *self._header]
        self._turn(Speaker.USER)
        self.seq.append(chunk)
        self.stats.forwards += 1
        self.source.extend(words)
        self._source_ids += len(ids)
        self._source_end = len(self.seq) - len(self._header)
        self._chunk_start = self._confirmed_end = len(self.seq)
        self._header_open = True

    def _open_target_interleaved(self) -> None:
        if len(self.seq) > self._confirmed_end:
            self.seq.truncate_to(self._confirmed_end)  # drop unconfirmed hypothesis tokens
        if not self._header_open:  # a write before any read (empty source): the header alone
            self._turn(Speaker.USER)
            self.seq.append(self._header)
            self.stats.forwards += 1
            self._chunk_start = self._confirmed_end = len(self.seq)
            self._header_open = True
        self._turn(Speaker.AGENT)

    def _is_end(self, token: int, piece: str) -> bool:
        # interleaved: a newline may also be the model asking for the next source chunk
        return token in self._eos or "\n" in piece

    def _decode_word(self) -> TargetWord | None:
        """Decode one whole word (until the next token starts a new word, or the end). The token
        that starts the next word is sampled but not appended: it was predicted from this source."""
        tok = self.lm.tokenizer
        start = self._chunk_start if self._interleaved else self._source_end + len(self._header)
        before_ids = self.seq.ids[start:]
        version = self.seq.logits_version
        _ = self.seq.logits  # recomputed (one forward) when a crop dropped them
        if self.seq.logits_version != version:
            self.stats.forwards += 1
        before = tok.decode(before_ids, skip_special_tokens=True)
        ids: list[int] = []
        text = before
        while True:
            if self._target_budget_left() <= 0:
                return self._word(before, text, ids) if ids else None
            t0 = time.perf_counter()
            token = self.seq.sample(self._sampler)
            new_text = tok.decode(before_ids + ids + [token], skip_special_tokens=True)
            piece = new_text.removeprefix(text)
            if self._is_end(token, piece) or (ids and piece[:1].isspace()):
                self.stats.forwards_s += time.perf_counter() - t0
                return self._word(before, text, ids) if ids else None
            self.seq.append([token], Status.UNSPOKEN)
            self.stats.forwards += 1
            self.stats.decoded_tokens += 1
            self.stats.forwards_s += time.perf_counter() - t0
            ids.append(token)
            text = new_text
            if len(ids) >= self.max_word_tokens:
                return self._word(before, text, ids)  # a runaway "word" (no space in sight): cut it

    @staticmethod
    def _word(before: str, text: str, ids: list[int]) -> TargetWord | None:
        word = text[len(before):].strip() if text.startswith(before) else text.strip()
        return TargetWord(word, tuple(ids)) if ids else None
