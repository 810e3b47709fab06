"""Real Chromium inside a member's network namespace, driven by Playwright from the host.

Playwright starts the browser itself (``executable_path``) and talks to it over two pipes
(``--remote-debugging-pipe``), which cross namespaces: the "executable" is a two-line shell
script of this test's own that runs ``ip netns exec <ns> /usr/bin/chromium "$@"``, so every
process of that browser (its network service included) has the member's network and nothing
else. No browser is ever downloaded: Debian's /usr/bin/chromium (or LINGKAR_CHROMIUM).

The page is served over http from the server's namespace address (10.77.0.1), which is not a
secure context, so the browser is told to treat exactly that origin as one
(``--unsafely-treat-insecure-origin-as-secure``): getUserMedia and WebRTC need it. With
``--use-fake-device-for-media-stream`` the microphone is Chromium's fake device (a beep several
times a second), with ``--use-fake-ui-for-media-stream`` nothing asks for permission.

`unavailable()` says why this cannot run here (no Chromium, no Playwright), or None.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.e2e.conftest import ARGS, CHROMIUM, PHONE

from .world import Member, World

ENOUGH = 50  # packets: a second of her audio
VOICE = 20  # payload bytes: more than an Opus frame of digital silence (3 bytes); her beeps are 30-130

# What the page saw, with wall-clock times (Date.now(), comparable with time.time() here): the
# values #connection-status[data-media] takes, and the browser's online/offline and
# navigator.connection change events.
NETLOG = """
(() => {
  window.__netlog = [];
  const note = (what) => window.__netlog.push([what, Date.now()]);
  addEventListener('online', () => note('online'));
  addEventListener('offline', () => note('offline'));
  navigator.connection?.addEventListener?.('change', () => note('change'));
  const watch = () => {
    const el = document.querySelector('#connection-status');
    new MutationObserver(() => note(`media:${el.dataset.media}`))
      .observe(el, { attributes: true, attributeFilter: ['data-media'] });
  };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', watch);
  else watch();
})();
"""


def unavailable() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (`make test` installs Debian's chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright (the driver) is not installed"
    return None


def wrapper(folder: Path, ns: str) -> Path:
    """A script that runs Chromium inside `ns` with the arguments Playwright gives it."""
    script = folder / f"chromium-in-{ns}.sh"
    script.write_text(f"#!/bin/sh\nexec ip netns exec {shlex.quote(ns)} {shlex.quote(str(CHROMIUM))} \"$@\"\n")
    script.chmod(0o700)
    return script


class Browsers:
    """One Playwright driver; browsers launched in namespaces, each with its own page."""

    def __init__(self, folder: Path, origin: str) -> None:
        self.folder = folder
        self.origin = origin
        self._pw: Any = None
        self._manager: Any = None
        self.browsers: list[Any] = []

    async def start(self) -> None:
        from playwright.async_api import async_playwright

        self._manager = async_playwright()
        self._pw = await self._manager.start()

    async def page_in(self, ns: str) -> Any:
        """A fresh phone-sized page of a Chromium that runs inside `ns`."""
        browser = await self._pw.chromium.launch(
            executable_path=str(wrapper(self.folder, ns)), headless=True,
            args=[*ARGS, f"--unsafely-treat-insecure-origin-as-secure={self.origin}"])
        self.browsers.append(browser)
        context = await browser.new_context(viewport=PHONE)
        context.set_default_timeout(30_000)
        page = await context.new_page()
        page.on("pageerror", lambda err: print(f"[pageerror {ns}] {err}"))
        return page

    async def close(self) -> None:
        for browser in self.browsers:
            with contextlib.suppress(Exception):
                await browser.close()
        self.browsers.clear()
        if self._manager is not None:
            with contextlib.suppress(Exception):
                await self._manager.__aexit__(None, None, None)
            self._manager = self._pw = None


@contextlib.asynccontextmanager
async def browsers(folder: Path, origin: str) -> AsyncIterator[Browsers]:
    the_browsers = Browsers(folder, origin)
    try:
        await the_browsers.start()
        yield the_browsers
    finally:
        await the_browsers.close()


async def serve_instead(page: Any, files: dict[str, Path]) -> None:
    """Serve the page local files in place of some of the client's own (`{"js/room.js": path}`
    for /static/js/room.js): a proposed change to the client, measured without touching web/."""
    for name, path in files.items():
        body = path.read_text()

        def fulfill(body: str) -> Any:
            return lambda route: route.fulfill(body=body, content_type="text/javascript")

        await page.route(f"**/static/{name}", fulfill(body))


async def speaker_in_chromium(world: World, chromium: Browsers, ns: str, mod: Member, *,
                              name: str = "Melati", files: dict[str, Path] | None = None) -> tuple[Any, str]:
    """A member in Chromium inside `ns` who joins the world's circle, gets the floor from the
    moderator `mod` (an aiortc member) and unmutes, until the moderator hears her voice.
    Returns (her page, her member id)."""
    # Playwright only where a browser is used (collecting tests/net never needs it)
    from playwright.async_api import expect

    from tests.e2e.helpers import INSTRUMENT, WATCH_MEDIA, fill_join, my_id, screen

    page = await chromium.page_in(ns)
    await serve_instead(page, files or {})
    for script in (INSTRUMENT, WATCH_MEDIA, NETLOG):
        await page.add_init_script(script)
    await fill_join(page, world.link("member"), name)
    await page.click("button#join")
    await screen(page, "room")
    speaker = await my_id(page)
    await mod.ack("give_floor", member_id=speaker)
    await page.click("#prompt-unmute")
    await expect(page.locator("button#mute-self")).to_have_attribute("aria-pressed", "false")
    await expect(page.locator("#connection-status")).to_have_attribute("data-media", "connected")
    await mod.call("wait_member", member_id=speaker, n=ENOUGH, min_size=VOICE, within=30, limit=40)
    await note_rebuilds(page)
    return page, speaker


async def note_rebuilds(page: Any) -> None:
    """Every reason media.js rebuilds for from now on, in window.__netlog as `recover:<reason>`
    (its lastReason keeps only the latest)."""
    await page.evaluate("""async () => {
      const media = (await import('/static/js/room.js')).current().media;
      const recover = media.recover;
      media.recover = function (reason) {
        if (!this.retryTimer && !this.stopped) window.__netlog.push([`recover:${reason}`, Date.now()]);
        return recover.call(this, reason);
      };
    }""")
