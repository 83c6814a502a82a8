"""End to end in headless Debian Chromium: a Piper-spoken WAV is the fake microphone.

The page connects, the question is transcribed, the agent answers in text and audio, and a
second utterance that lands during the answer interrupts it. Real models (LLM, whisper, Piper);
every wait is a hang guard, never a timing assertion.
"""

from __future__ import annotations

import asyncio
import logging
import os
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
QUESTION = "Please tell me a long story about a brave little robot."
BARGE_IN = "Stop! Wait a moment please."
GUARD_MS = int(os.environ.get("DUPLEX_E2E_GUARD_MS", "240000"))
log = logging.getLogger(__name__)


def _speech_wav(path: Path) -> None:
    """1 s silence, the question, 9 s of silence (the agent answers), the barge-in, 40 s silence."""
    import soxr

    from duplex.audio import load_tts

    tts = load_tts()

    def say(text: str) -> np.ndarray:
        pcm, rate = tts.synthesize(text)
        x = pcm.astype(np.float32) / 32768.0
        return soxr.resample(x, rate, 16000) if rate != 16000 else x

    def silence(s: float) -> np.ndarray:
        return np.zeros(int(16000 * s), np.float32)

    audio = np.concatenate([silence(1.0), say(QUESTION), silence(9.0), say(BARGE_IN), silence(40.0)])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


async def test_browser_voice_chat_with_barge_in(tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium not installed")
    from duplex.audio import load_tts, load_whisper
    from duplex.engine.worker import Engine
    from duplex.serving.server import DuplexServer
    from duplex.session.core import SessionConfig

    wav = tmp_path / "mic.wav"
    await asyncio.to_thread(_speech_wav, wav)
    engine = await asyncio.to_thread(Engine.load, None, "cpu", "float32")
    tts = await asyncio.to_thread(load_tts)
    whisper = await asyncio.to_thread(load_whisper)
    server = DuplexServer(engine, config=SessionConfig(policy="eou"), tts=tts, asr=whisper)
    await server.start("127.0.0.1", 0)
    console: list[str] = []
    try:
        async with playwright_api.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}%noloop", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"])
            try:
                page = await browser.new_page()
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                await page.goto(server.url() + "?autostart=1")

                async def seen(kind: str) -> None:
                    try:
                        await page.wait_for_function(
                            f"window.duplexLog && window.duplexLog.some(e => e.type === {kind!r})", timeout=GUARD_MS)
                    except playwright_api.TimeoutError:
                        got = await page.evaluate("window.duplexLog.map(e => e.type + ':' + (e.turn ?? ''))")
                        texts = await page.evaluate("[...document.querySelectorAll('.msg')].map(e => e.textContent)")
                        raise AssertionError(f"no {kind}; events {got[-60:]}; messages {texts}; console {console}")

                await seen("session.created")
                await seen("mic.started")
                await seen("input_audio_buffer.speech_started")
                await seen("response.output_text.delta")
                await seen("response.output_audio.delta")
                await seen("response.interrupted")
                state: dict[str, Any] = await page.evaluate("""() => ({
                    user: [...document.querySelectorAll('.msg.user')].map(e => e.textContent),
                    agent: [...document.querySelectorAll('.msg.agent .text')].map(e => e.textContent),
                    frames: window.duplex.state.audioFrames,
                    types: window.duplexLog.map(e => e.type),
                    errors: window.duplex.state.errors,
                })""")
            finally:
                await browser.close()
    finally:
        await server.close()
        engine.close()
    log.info("browser console: %s", console[-20:])
    user_text = " ".join(state["user"]).lower()
    assert "story" in user_text and "robot" in user_text, state["user"]
    assert any(a.strip() for a in state["agent"]), state["agent"]
    assert state["frames"] >= 1
    types = state["types"]
    assert types.index("response.output_audio.delta") < types.index("response.interrupted")
    assert "conversation.item.truncate" not in state["errors"]
    assert not [c for c in console if c.startswith("pageerror")], console
