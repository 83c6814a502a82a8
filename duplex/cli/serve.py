"""``duplex serve``: the command-line options mapped onto the voice defaults, the models loaded, and
the server run until SIGINT/SIGTERM. The server itself (:mod:`duplex.serving.server`) takes
objects, not argparse namespaces."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import urllib.parse
from typing import Any

from duplex.cpu import llm_threads
from duplex.engine.sequence import SequenceConfig
from duplex.engine.worker import Engine
from duplex.serving.server import DuplexServer, ServerLimits
from duplex.session.config import DEFAULT_INSTRUCTIONS
from duplex.voice.config import VoiceConfig, default_voice_config

__all__ = ["run_server", "voice_config_from_args"]

log = logging.getLogger(__name__)


def _load_audio(args: argparse.Namespace) -> tuple[Any | None, Any | None]:
    tts = asr = None
    tts_name = getattr(args, "tts", None)
    if tts_name != "none":
        from duplex.audio import CachedTts, load_tts

        try:
            tts = CachedTts(load_tts(tts_name))  # one clause cache shared by every session
        except Exception as exc:  # noqa: BLE001 - serve text-only rather than not at all
            log.warning("no TTS (%s): agent replies will be text only", exc)
    asr_name = getattr(args, "asr_model", None)
    if asr_name != "none":
        from duplex.audio import load_whisper

        try:
            asr = load_whisper(asr_name)
        except Exception as exc:  # noqa: BLE001
            log.warning("no ASR (%s): audio input disabled", exc)
    return tts, asr


def _llm_threads(args: argparse.Namespace) -> int:
    """A text-only server (``--asr-model none --tts none``) gives its LLM every core (duplex.cpu)."""
    return llm_threads(getattr(args, "asr_model", None) == "none" and getattr(args, "tts", None) == "none")


def voice_config_from_args(args: argparse.Namespace) -> VoiceConfig:
    """The voice defaults with ``serve``'s overrides: policy, instructions, the two end-of-speech
    timings, and any ``--voice-option KEY=VALUE`` (a VoiceConfig field, converted to its type)."""
    config = default_voice_config(getattr(args, "policy", None),
                                  instructions=getattr(args, "instructions", None) or DEFAULT_INSTRUCTIONS)
    changes: dict[str, Any] = {k: v for k, v in (("vad_min_silence_ms", getattr(args, "vad_min_silence_ms", None)),
                                                 ("speculate_after_silence_ms",
                                                  getattr(args, "speculate_after_silence_ms", None)))
                               if v is not None}
    names = {f.name for f in dataclasses.fields(VoiceConfig)} - {"session", "type"}
    for item in getattr(args, "voice_option", None) or ():
        key, _, value = item.partition("=")
        if key not in names:
            raise SystemExit(f"duplex serve: unknown --voice-option {key!r}; choose from {', '.join(sorted(names))}")
        kind = type(getattr(config, key))
        try:
            changes[key] = value.strip().lower() in ("1", "true", "yes", "on") if kind is bool else kind(value)
        except ValueError as exc:
            raise SystemExit(f"duplex serve: --voice-option {key}: {exc}") from exc
    config = dataclasses.replace(config, **changes) if changes else config
    chars = getattr(args, "max_instructions_chars", None)
    if chars is not None:
        if chars < 1:
            raise SystemExit(f"duplex serve: --max-instructions-chars {chars}: at least 1")
        # a token is at least one character, so the character limit bounds the tokens too (the
        # context window's own bound, instructions_token_limit, still applies)
        config = config.with_session(max_instructions_chars=chars, max_instructions_tokens=chars)
    layout = getattr(args, "overlap_layout", None)
    if layout:
        config = config.with_session(overlap_layout=layout)
    if getattr(args, "log_decisions", False):
        config = dataclasses.replace(config.with_session(log_decisions=True), turn_features_always=True)
    window = getattr(args, "context_tokens", None)
    if window:
        if window < 256:
            raise SystemExit(f"duplex serve: --context-tokens {window}: at least 256")
        config = config.with_session(sequence=SequenceConfig(max_tokens=window, keep_recent_tokens=window // 2))
    return config


async def run_server(args: argparse.Namespace) -> int:
    """``duplex serve``: load the models, serve until SIGINT/SIGTERM, shut down gracefully."""
    print(f"loading model {args.model or 'default'} ...", file=sys.stderr)
    loop = asyncio.get_running_loop()
    quantize = getattr(args, "quantize", "auto")
    engine = await loop.run_in_executor(None, lambda: Engine.load(args.model, device=args.device, dtype=args.dtype,
                                                                  quantize=None if quantize == "none" else quantize,
                                                                  threads=_llm_threads(args),
                                                                  scheduler=getattr(args, "scheduler", None)))
    k = engine.describe()
    print(f"engine: {k['model']} on {k['device']}, {k['dtype']}{'+' + k['quantization'] if k['quantization'] else ''}, "
          f"{k['threads']} thread(s) ({k['threads_while_no_speech_stage']} while no speech stage runs), "
          f"attention {k.get('attention_isa') or 'torch'}"
          + (f", int8 {k['int8_kernel']} ({k['int8_isa']})" if k.get("int8_kernel") else ""), file=sys.stderr)
    tts, asr = await loop.run_in_executor(None, _load_audio, args)
    token = getattr(args, "auth_token", None) or os.environ.get("DUPLEX_AUTH_TOKEN") or None
    config = voice_config_from_args(args)
    limits = ServerLimits(max_sessions=getattr(args, "max_sessions", None),
                          max_detached_sessions=getattr(args, "max_detached_sessions", None),
                          max_kv_mb=getattr(args, "max_kv_mb", None))
    from duplex.translate.serving import TranslateService

    translate = TranslateService(getattr(args, "translate_model", None), device=args.device,
                                 quantize=None if quantize == "none" else quantize,  # loaded on first use
                                 probe=True)  # a model that cannot translate a pair is refused at session.update
    server = DuplexServer(engine, config=config, tts=tts, asr=asr, auth_token=token, limits=limits,
                          allowed_origins=getattr(args, "allowed_origin", None) or (), translate=translate)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await server.start(args.host, args.port)
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        suffix = f"?token={urllib.parse.quote(token)}" if token else ""
        print(f"duplex: voice chat at {server.url(shown)}{suffix}  (WebSocket {server.ws_url(shown)}; "
              f"tts={getattr(tts, 'name', 'off')}, asr={'on' if asr else 'off'}; Ctrl-C to stop)", flush=True)
        await stop.wait()
        print("duplex: shutting down ...", file=sys.stderr)
    finally:
        await server.close()
        engine.close()
        translate.close()
    return 0
