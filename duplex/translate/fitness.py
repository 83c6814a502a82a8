"""Can this model translate this language pair? Checked once per pair when a session asks for it.

Two checks, so a session is refused at ``session.update`` rather than streaming garbage:

- the tokenizer writes both languages (no unknown-token ids; the few-shot text decodes back, "¿"
  and accents included): cheap, no forward;
- a probe: three short everyday sentences, not in the prompt, translated offline and greedily,
  must reach corpus chrF >= ``MIN_PROBE_CHRF``. Measured (offline, greedy): the packaged Gemma 3
  270M 67 en->es / 71 es->en; SmolLM2-135M-Instruct 21 en->es (it answers questions instead of
  translating) / 53 es->en; the tiny random test model 0. A few seconds on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from duplex.engine.models import LoadedModel
from duplex.translate.prompt import TranslationPrompt

__all__ = ["MIN_PROBE_CHRF", "UnfitTranslationModel", "check_can_translate", "check_tokenizer", "probe_chrf"]

MIN_PROBE_CHRF = 40.0
_PROBES_EN_ES: tuple[tuple[str, str], ...] = (
    ("Thank you very much.", "Muchas gracias."),
    ("The water is cold.", "El agua está fría."),
    ("I have two brothers.", "Tengo dos hermanos."),
)
_PROBES = {("en", "es"): _PROBES_EN_ES, ("es", "en"): tuple((b, a) for a, b in _PROBES_EN_ES)}


class UnfitTranslationModel(ValueError):
    """The model cannot translate a pair; ``field`` names the session field at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def check_tokenizer(lm: LoadedModel, prompt: TranslationPrompt) -> None:
    """Raise :class:`UnfitTranslationModel` when the tokenizer cannot write one of the languages."""
    tok = lm.tokenizer
    if not callable(getattr(tok, "encode", None)) or not callable(getattr(tok, "decode", None)):
        raise UnfitTranslationModel(f"the translation model {lm.name!r} has no text tokenizer", "mode")
    unk = getattr(tok, "unk_token_id", None)
    for source, target in prompt.shots:
        for text, field, language in ((source, "source_language", prompt.source_name),
                                      (target, "target_language", prompt.target_name)):
            ids = tok.encode(text, add_special_tokens=False)
            back = tok.decode(ids)
            if (unk is not None and unk in ids) or back.strip() != text.strip():
                raise UnfitTranslationModel(
                    f"the translation model {lm.name!r} cannot write {language}: its tokenizer turns "
                    f"{text!r} into {back!r}", field)


def probe_chrf(lm: LoadedModel, prompt: TranslationPrompt,
               translator_factory: Callable[[Any, TranslationPrompt], Any] | None = None) -> tuple[float, list[str]]:
    """Offline greedy translations of the pair's probe sentences -> (corpus chrF, translations).
    Synchronous torch code: run it on the engine worker."""
    from duplex.translate.evaluate import translate_sentence
    from duplex.translate.metrics import corpus_quality
    from duplex.translate.policies import make_simul_policy
    from duplex.translate.translator import SimulTranslator

    probes = _PROBES[(prompt.source_language, prompt.target_language)]
    model = (translator_factory or SimulTranslator)(lm, prompt)
    hyps = [translate_sentence(model, make_simul_policy("offline"), src).prediction for src, _ in probes]
    return float(corpus_quality(hyps, [ref for _, ref in probes])["chrF"]), hyps


def check_can_translate(lm: LoadedModel, prompt: TranslationPrompt, *, probe: bool = True,
                        translator_factory: Callable[[Any, TranslationPrompt], Any] | None = None) -> None:
    """Both checks (the probe only with ``probe``); raises :class:`UnfitTranslationModel`."""
    check_tokenizer(lm, prompt)
    if not probe:
        return
    chrf, hyps = probe_chrf(lm, prompt, translator_factory)
    if chrf < MIN_PROBE_CHRF:
        first = _PROBES[(prompt.source_language, prompt.target_language)][0][0]
        raise UnfitTranslationModel(
            f"the translation model {lm.name!r} does not translate {prompt.source_name} to {prompt.target_name}: "
            f"probe chrF {chrf:.1f} < {MIN_PROBE_CHRF:g} (it wrote {hyps[0]!r} for {first!r})", "target_language")
