"""Translate mode for the WebSocket server: ``session.update {mode: "translate", ...}``.

The server keeps one :class:`TranslateService` (the translation model, loaded on first use off the
event loop; target-language speech through espeak-ng). A mode change swaps the connection's voice
pipeline for one that carries a :class:`~duplex.translate.session.TranslateSession` (same VAD/ASR
input and TTS output path); ``mode: "chat"`` swaps a chat pipeline back. Changes are refused
mid-turn, and a bad pair or policy leaves the session as it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from typing import TYPE_CHECKING, Any

from duplex.engine.worker import Engine
from duplex.serving.protocol import ProtocolError
from duplex.translate.prompt import LANGUAGES, UnsupportedLanguagePair
from duplex.translate.session import TranslateConfig, TranslateSession

if TYPE_CHECKING:
    from duplex.serving.protocol import SessionUpdate
    from duplex.serving.ws_session import ServerSession

__all__ = ["TranslateService", "update_mode"]

log = logging.getLogger(__name__)

MODES = ("chat", "translate")


class TranslateService:
    """The server's translation model (loaded once, on first use) and target-language TTS."""

    def __init__(self, model: str | None = None, *, device: str = "auto", dtype: str = "auto",
                 quantize: str | None = "auto", engine: Engine | None = None, speech: bool = True,
                 translator_factory: Any | None = None) -> None:
        self.model = model
        self.translator_factory = translator_factory  # (lm, prompt) -> TranslationModel; None = SimulTranslator
        self.device, self.dtype, self.quantize = device, dtype, quantize
        self._engine = engine
        self._lock = asyncio.Lock()
        self.speech = speech and shutil.which("espeak-ng") is not None

    async def engine(self) -> Engine:
        async with self._lock:
            if self._engine is None:
                from duplex.translate.models import load_translate_model

                loop = asyncio.get_running_loop()
                lm = await loop.run_in_executor(None, lambda: load_translate_model(
                    self.model, device=self.device, dtype=self.dtype, quantize=self.quantize))
                self._engine = Engine(lm)
            return self._engine

    def tts_for(self, language: str) -> Any | None:
        """espeak-ng speaking ``language`` (it speaks Spanish as ``-v es``), or None without it."""
        if not self.speech:
            return None
        from duplex.audio.tts import EspeakTts

        return EspeakTts(voice=language)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def _config_from(msg: SessionUpdate, current: TranslateConfig | None) -> TranslateConfig:
    base = current or TranslateConfig()
    changes: dict[str, Any] = {}
    for name in ("source_language", "target_language", "policy", "k"):
        value = getattr(msg, name, None)
        if value is not None:
            changes[name] = value
    if msg.policy_params is not None:
        changes["policy_params"] = msg.policy_params
    elif "policy" in changes and changes["policy"] != base.policy:
        changes["policy_params"] = {}
    return dataclasses.replace(base, **changes)


async def update_mode(hub: ServerSession, msg: SessionUpdate) -> bool:
    """Apply a mode change, or a translate-mode update. Returns False when the update is an
    ordinary chat update the caller handles; raises ProtocolError (nothing changed) when refused."""
    mode = msg.mode or hub.mode
    if mode not in MODES:
        raise ProtocolError("invalid_value", f"session.update: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "chat" and hub.mode == "chat":
        return False
    service: TranslateService | None = hub.translate
    if mode == "translate" and service is None:
        raise ProtocolError("translation_unavailable", "this server runs without a translation model")
    config: TranslateConfig | None = None
    if mode == "translate":
        try:
            config = _config_from(msg, hub.translate_config if hub.mode == "translate" else None)
            config.validate()
        except UnsupportedLanguagePair as exc:
            raise ProtocolError("unsupported_language_pair", str(exc)) from exc
        except ValueError as exc:
            raise ProtocolError("invalid_policy", str(exc)) from exc
    if hub.busy:
        raise ProtocolError("invalid_state", "the mode and translation settings can only change between turns "
                            "(wait for response.done)")
    if msg.output_modalities is not None and "audio" in msg.output_modalities and mode == "translate" \
            and (service is None or not service.speech):
        raise ProtocolError("audio_output_unavailable", "target-language speech needs espeak-ng on the server")
    if mode == "translate":
        assert service is not None and config is not None
        engine = await service.engine()
        audio = hub.audio_output if msg.output_modalities is None else "audio" in msg.output_modalities
        tts = service.tts_for(config.target_language) if (audio or hub.tts_available) else None
        session = TranslateSession(engine, config, session_id=hub.id, translator_factory=service.translator_factory)
        await hub.replace_pipeline(session=session, tts=tts, audio_output=audio and tts is not None)
        hub.mode, hub.translate_config = "translate", config
        log.info("session %s: translate %s->%s, %s", hub.id, config.source_language, config.target_language,
                 config.policy)
    else:
        audio = hub.audio_output if msg.output_modalities is None else "audio" in msg.output_modalities
        await hub.replace_pipeline(session=None, tts=None, audio_output=audio)
        hub.mode, hub.translate_config = "chat", None
    hub.send({"type": "session.updated", "session": hub.describe()})
    return True


def describe_translate(config: TranslateConfig | None) -> dict[str, Any] | None:
    if config is None:
        return None
    return {"source_language": config.source_language, "target_language": config.target_language,
            "policy": config.policy, "k": config.k, "policy_params": dict(config.policy_params),
            "languages": dict(LANGUAGES)}
