"""Language pairs and the few-shot prompt layout ("English: ...\\nSpanish: ...") for a causal LM."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LANGUAGES", "LAYOUTS", "TranslationPrompt", "UnsupportedLanguagePair", "make_prompt", "supported_pairs"]

LANGUAGES = {"en": "English", "es": "Spanish"}
# how source and target share the cache (see duplex.translate.translator)
LAYOUTS = ("reencode", "interleaved")

# Three short conversational pairs; the test set in eval/data/ shares none of them.
_SHOTS_EN_ES: tuple[tuple[str, str], ...] = (
    ("Where is the train station?", "¿Dónde está la estación de tren?"),
    ("I would like a cup of coffee, please.", "Quisiera una taza de café, por favor."),
    ("My sister lives in a small town near the sea.", "Mi hermana vive en un pueblo pequeño cerca del mar."),
)
_SHOTS = {("en", "es"): _SHOTS_EN_ES, ("es", "en"): tuple((b, a) for a, b in _SHOTS_EN_ES)}

# The same three pairs cut into word-aligned (source chunk, target chunk) steps, for the interleaved
# layout: a first chunk of a few words, then about one word each, the way a wait-k schedule
# alternates; a target chunk waits for the source word it needs ("train station" -> "estación de
# tren"). The joined chunks are the pairs above, word for word.
_CHUNKS_EN_ES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("Where is the", "¿Dónde está"), ("train", "la"), ("station?", "estación de tren?")),
    (("I would like", "Quisiera"), ("a", "una"), ("cup", "taza"), ("of", "de"), ("coffee,", "café,"),
     ("please.", "por favor.")),
    (("My sister lives", "Mi hermana"), ("in", "vive en"), ("a", "un"), ("small town", "pueblo pequeño"),
     ("near the", "cerca"), ("sea.", "del mar.")),
)
_CHUNKS = {("en", "es"): _CHUNKS_EN_ES,
           ("es", "en"): tuple(tuple((b, a) for a, b in shot) for shot in _CHUNKS_EN_ES)}


class UnsupportedLanguagePair(ValueError):
    """No prompt for this pair; the message lists the supported ones."""


def supported_pairs() -> list[tuple[str, str]]:
    return sorted(_SHOTS)


@dataclass(frozen=True, slots=True)
class TranslationPrompt:
    """``prefix`` ends with "<Source>:"; the source words follow it, then ``target_header``
    ("\\n<Target>:"), then the target words; a newline ends the translation."""

    source_language: str
    target_language: str
    shots: tuple[tuple[str, str], ...]
    chunked_shots: tuple[tuple[tuple[str, str], ...], ...] = ()
    type: str = "translation_prompt"

    @property
    def source_name(self) -> str:
        return LANGUAGES[self.source_language]

    @property
    def target_name(self) -> str:
        return LANGUAGES[self.target_language]

    @property
    def prefix(self) -> str:
        blocks = [f"{self.source_name}: {s}\n{self.target_name}: {t}" for s, t in self.shots]
        return "\n\n".join(blocks) + f"\n\n{self.source_name}:"

    @property
    def target_header(self) -> str:
        return f"\n{self.target_name}:"

    @property
    def source_header(self) -> str:
        """Opens the next source chunk after a target chunk (interleaved layout)."""
        return f"\n{self.source_name}:"

    @property
    def interleaved_prefix(self) -> str:
        """The few-shot prompt in the interleaved layout ("English: w1 w2\nSpanish: t1\nEnglish:
        w3\nSpanish: t2 t3"), so the model has seen chunks alternate before it has to."""
        blocks = ["\n".join(f"{self.source_name}: {s}\n{self.target_name}: {t}" for s, t in shot)
                  for shot in self.chunked_shots]
        return "\n\n".join(blocks) + f"\n\n{self.source_name}:"

    def full(self, source: str) -> str:
        """The whole prompt for an offline, full-sentence translation of ``source``."""
        return f"{self.prefix} {source}{self.target_header}"


def make_prompt(source_language: str = "en", target_language: str = "es") -> TranslationPrompt:
    pair = (source_language, target_language)
    if pair not in _SHOTS:
        names = ", ".join(f"{a}->{b}" for a, b in supported_pairs())
        raise UnsupportedLanguagePair(f"no translation prompt for {source_language}->{target_language}; "
                                      f"supported language pairs: {names}")
    return TranslationPrompt(source_language, target_language, _SHOTS[pair], _CHUNKS[pair])
