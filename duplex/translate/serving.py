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
from duplex.translate.fitness import UnfitTranslationModel, check_can_translate
from duplex.translate.prompt import (
    LANGUAGES,
    UnsupportedLanguagePair,
    make_prompt,
    supported_pairs,
)
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
                 translator_factory: Any | None = None, probe: bool = False) -> None:
        self.model = model
        self.probe = probe  # probe each pair's translation quality once (duplex.translate.fitness)
        self._fitness: dict[tuple[str, str], UnfitTranslationModel | None] = {}
        self._fitness_lock = asyncio.Lock()
        self.translator_factory = translator_factory  # (lm, prompt) -> TranslationModel; None = SimulTranslator
        self.device, self.dtype, self.quantize = device, dtype, quantize
        self._engine = engine
        self._load_error: Exception | None = None
        self._lock = asyncio.Lock()
        self.speech = speech and shutil.which("espeak-ng") is not None

    async def engine(self) -> Engine:
        """The loaded model's engine; a load that failed fails again at once (no reload per update)."""
        async with self._lock:
            if self._load_error is not None:
                raise self._load_error
            if self._engine is None:
                from duplex.translate.models import load_translate_model

                loop = asyncio.get_running_loop()
                try:
                    lm = await loop.run_in_executor(None, lambda: load_translate_model(
                        self.model, device=self.device, dtype=self.dtype, quantize=self.quantize))
                except Exception as exc:
                    log.error("translation model %s failed to load: %s", self.model or "gemma3-270m", exc)
                    self._load_error = exc
                    raise
                self._engine = Engine(lm)
            return self._engine

    async def check_pair(self, engine: Engine, source_language: str, target_language: str) -> None:
        """Raise :class:`UnfitTranslationModel` when the model cannot translate the pair; checked
        once per pair (the probe runs on the engine worker, a few seconds), then remembered."""
        pair = (source_language, target_language)
        async with self._fitness_lock:
            if pair not in self._fitness:
                try:
                    await engine.run(check_can_translate, engine.lm, make_prompt(*pair), probe=self.probe,
                                     translator_factory=self.translator_factory)
                    self._fitness[pair] = None
                except UnfitTranslationModel as exc:
                    log.warning("translation model cannot translate %s->%s: %s", *pair, exc)
                    self._fitness[pair] = exc
        unfit = self._fitness[pair]
        if unfit is not None:
            raise UnfitTranslationModel(str(unfit), unfit.field)

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
    for name in ("source_language", "target_language", "policy", "k", "layout"):
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
        raise ProtocolError("invalid_value", f"session.update: mode must be one of {', '.join(MODES)}, got {mode!r}",
                            "session.mode")
    if mode == "chat" and hub.mode == "chat":
        return False
    service: TranslateService | None = hub.translate
    if mode == "translate" and service is None:
        raise ProtocolError("translation_unavailable", "session.update: mode 'translate' needs a translation model, "
                            f"and this server runs without one; the session stays in {hub.mode} mode", "session.mode")
    config: TranslateConfig | None = None
    if mode == "translate":
        try:
            config = _config_from(msg, hub.translate_config if hub.mode == "translate" else None)
            config.validate()
        except UnsupportedLanguagePair as exc:
            raise _pair_error(config or _config_from(msg, None), hub.mode) from exc
        except ValueError as exc:
            field = "policy_params" if msg.policy_params is not None and msg.policy is None else "policy"
            raise ProtocolError("invalid_policy", f"session.update: {field}: {exc}; the session stays in "
                                f"{hub.mode} mode", f"session.{field}") from exc
    if hub.busy:
        raise ProtocolError("invalid_state", f"session.update: mode and translation settings can only change between "
                            f"turns, and a turn is open (wait for response.done); the session stays in {hub.mode} "
                            "mode", "session.mode")
    if msg.output_modalities is not None and "audio" in msg.output_modalities and mode == "translate" \
            and (service is None or not service.speech):
        raise ProtocolError("audio_output_unavailable", "target-language speech needs espeak-ng on the server",
                            "session.output_modalities")
    if mode == "translate":
        assert service is not None and config is not None
        engine = await _translation_engine(service, config, hub.mode)
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


def _pair_error(config: TranslateConfig, mode: str) -> ProtocolError:
    """Name the language field at fault: an unknown source language, else the target."""
    pairs = ", ".join(f"{a}->{b}" for a, b in supported_pairs())
    if config.source_language not in LANGUAGES:
        field, detail = "source_language", f"source_language {config.source_language!r} is not supported"
    else:
        field, detail = "target_language", (f"target_language {config.target_language!r} is not supported "
                                            f"with source_language {config.source_language!r}")
    return ProtocolError("unsupported_language_pair", f"session.update: {detail} (supported language pairs: "
                         f"{pairs}); the session stays in {mode} mode", f"session.{field}")


async def _translation_engine(service: TranslateService, config: TranslateConfig, mode: str) -> Engine:
    """The server's translation engine, if its model loads and can translate this pair."""
    name = service.model or "gemma3-270m"
    try:
        engine = await service.engine()
    except Exception as exc:
        raise ProtocolError("translation_model_unavailable", f"session.update: mode 'translate': the translation "
                            f"model {name!r} cannot be loaded ({exc}); the session stays in {mode} mode",
                            "session.mode") from exc
    try:
        await service.check_pair(engine, config.source_language, config.target_language)
    except UnfitTranslationModel as exc:
        raise ProtocolError("translation_model_unsupported", f"session.update: {exc}; the session stays in {mode} "
                            "mode", f"session.{exc.field}") from exc
    return engine


def describe_translate(config: TranslateConfig | None) -> dict[str, Any] | None:
    if config is None:
        return None
    return {"source_language": config.source_language, "target_language": config.target_language,
            "policy": config.policy, "k": config.k, "policy_params": dict(config.policy_params),
            "layout": config.layout, "languages": dict(LANGUAGES)}
