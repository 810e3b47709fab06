"""Browser fixtures for the end-to-end tests: real headless Chromium (Debian's /usr/bin/chromium)
driven by Playwright's async API, in the same event loop as the live server (tests/live.py), so
the server keeps running while the browser acts.

Playwright is only the driver: no browser is ever downloaded. Without /usr/bin/chromium every
test here is skipped with a reason (`make test` installs it); with it, nothing is skipped."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("LINGKAR_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--no-sandbox",
    "--disable-background-networking",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-gpu",
    "--disable-component-update",
    "--no-first-run",
]
PHONE = {"width": 360, "height": 640}
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CHROMIUM.exists():
        return
    skip = pytest.mark.skip(reason=f"{CHROMIUM} is missing (`make test` installs Debian's chromium)")
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(here):
            item.add_marker(skip)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    # Imported here so collecting the suite never needs Playwright's browsers.
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


NewPage = Callable[..., Awaitable[Any]]


@pytest.fixture
async def new_page(browser: Any) -> AsyncIterator[NewPage]:
    """new_page(**context_options) -> a page in a fresh browser context (its own storage), phone
    sized by default; every context is closed at the end of the test."""
    contexts: list[Any] = []

    async def make(**options: Any) -> Any:
        options.setdefault("viewport", PHONE)
        ctx = await browser.new_context(**options)
        ctx.set_default_timeout(15_000)
        contexts.append(ctx)
        page = await ctx.new_page()
        page.on("pageerror", lambda err: print(f"[pageerror] {err}"))
        return page

    yield make
    for ctx in contexts:
        await ctx.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
