"""The page's translate toggle in headless Debian Chromium with the tiny model: the toggle switches
the session, typed words go out as source words, the subtitle lines show the source and target;
a refused switch leaves the toggle off. Every wait is a hang guard, never a timing assertion."""

from __future__ import annotations

import os
from typing import Any

import pytest

from duplex.serving.server import DuplexServer
from duplex.session.core import SessionConfig
from duplex.translate.serving import TranslateService

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
GUARD_MS = 60_000


@pytest.fixture()
async def server(tiny_engine):
    srv = DuplexServer(tiny_engine, config=SessionConfig(policy="silence"),
                       translate=TranslateService(engine=tiny_engine, speech=False))
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.close()


async def test_translate_toggle_shows_growing_subtitles(server: DuplexServer) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium not installed")
    console: list[str] = []
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            await page.goto(server.url() + "?k=1")
            await page.wait_for_function("window.duplex && window.duplex.state.configured", timeout=GUARD_MS)
            assert await page.is_hidden("#subtitles")
            await page.click("#translate")
            await page.wait_for_function("window.duplex.state.mode === 'translate'", timeout=GUARD_MS)
            assert await page.is_visible("#subtitles")
            await page.type("#text", "where is the ")  # three words sent as they are typed
            await page.wait_for_function("document.querySelector('#sub-source').textContent === 'where is the'",
                                         timeout=GUARD_MS)
            await page.type("#text", "station")
            await page.press("#text", "Enter")
            await page.wait_for_function("window.duplexLog.some(e => e.type === 'response.done')", timeout=GUARD_MS)
            shown: dict[str, Any] = await page.evaluate("""() => ({
                source: document.querySelector('#sub-source').textContent,
                target: document.querySelector('#sub-target .text').textContent,
                guess: document.querySelector('#sub-target .tentative').textContent,
                agent: [...document.querySelectorAll('.msg.agent .text')].map(e => e.textContent),
                sources: window.duplexLog.filter(e => e.type === 'translation.updated').length,
            })""")
            assert shown["source"] == "where is the station"
            assert shown["target"] == shown["agent"][-1].strip() and shown["guess"] == ""
            assert shown["sources"] == 5  # one translation.updated per source word, one at the sentence end
            # back to chat, then a refused switch (?tgt=xx) leaves the toggle off
            await page.click("#translate")
            await page.wait_for_function("window.duplex.state.mode === 'chat'", timeout=GUARD_MS)
            await page.goto(server.url() + "?tgt=xx")
            await page.wait_for_function("window.duplex && window.duplex.state.configured", timeout=GUARD_MS)
            await page.click("#translate")
            await page.wait_for_function("window.duplex.state.errors.includes('unsupported_language_pair')",
                                         timeout=GUARD_MS)
            assert not await page.is_checked("#translate") and await page.is_hidden("#subtitles")
        finally:
            await browser.close()
    assert not console, console
