"""The learned policy's input: one feature vector per tick, from the ``Observation`` alone.

Pure Python (no numpy, no torch) so that ``decide`` stays cheap and the same function builds the
training rows from logged observations and the live policy's input.
"""

from __future__ import annotations

import math

from ..base import Observation

__all__ = ["FEATURE_NAMES", "turn_features"]

FEATURE_NAMES = (
    "silence_s",  # since the end of speech (the VAD's stop, held for the final ASR words)
    "eou_logit",  # the LLM's own P(end of turn) after the committed words, as a logit
    "eou_missing",
    "audio_eot_logit",  # Smart Turn v3.2's P(complete), as a logit
    "audio_missing",
    "pitch_slope",  # st/s over the last voiced 0.5 s, / 10
    "pitch_end",  # final pitch vs the utterance median, st / 6
    "energy_slope",  # dB/s over the last voiced 0.5 s, / 50
    "speech_s",  # voiced duration of the utterance, log1p
    "vad_mean_1s",  # VAD speech probability over the last second of speech
    "vad_mean",  # ... over the analysed segment
    "committed_words",  # log1p
    "tentative_words",  # log1p
    "ends_question",  # the transcript ends with "?"
    "ends_stop",  # ... with "." or "!"
    "ends_open",  # ... with "," "-" "..." or no punctuation
    "typed_final",  # typed text submitted (an explicit end of turn)
    "after_interruption",  # the user's words cut the agent off (it yielded and has not replied yet)
    "ends_function_word",  # the last word is one an English turn rarely ends on ("to", "that", "the", ...)
)

# Words an English turn rarely ends on: articles, possessives, conjunctions and complementisers,
# auxiliaries, and the prepositions that need an object. whisper often closes an unfinished half
# with a full stop or a question mark ("...right now is that.", "...better to?"), and the 135M
# model's end-of-turn belief is weak there (0.3 after "...is that..."), so the word itself is a cue.
# A few can end a question ("What is it for?"); the model weighs this against the other cues.
_FUNCTION_WORDS = frozenset(
    "a an the my your his her its our their this these those "
    "and but or nor so because if whether that than which who whose when while although though "
    "is are was were am be been being will would can could should shall must may might do does did have has had "
    "to of for with at from into onto by about like as in on via".split())


def _logit(p: float | None) -> float:
    if p is None:
        return 0.0
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def turn_features(obs: Observation) -> list[float]:
    """The feature vector of ``obs`` in :data:`FEATURE_NAMES` order."""
    text = obs.partial_text.rstrip()
    last = text[-1:] if text else ""
    silence = min(obs.silence_s if obs.silence_s is not None else 0.0, 3.0)
    return [
        silence,
        _logit(obs.eou_prob), float(obs.eou_prob is None),
        _logit(obs.audio_eot_prob), float(obs.audio_eot_prob is None),
        (obs.pitch_slope_st_s or 0.0) / 10.0,
        (obs.pitch_end_st or 0.0) / 6.0,
        (obs.energy_slope_db_s or 0.0) / 50.0,
        math.log1p(obs.speech_s or 0.0),
        obs.vad_mean_1s if obs.vad_mean_1s is not None else 0.0,
        obs.vad_mean if obs.vad_mean is not None else 0.0,
        math.log1p(obs.committed_words),
        math.log1p(obs.tentative_words),
        float(last == "?"),
        float(last in (".", "!")),
        float(last not in ("?", ".", "!")),
        float(obs.user_turn_final),
        float(obs.after_interruption),
        float(_last_word(text) in _FUNCTION_WORDS),
    ]


def _last_word(text: str) -> str:
    words = text.split()
    return words[-1].strip(".,!?;:\"'()-\u2026").lower() if words else ""
