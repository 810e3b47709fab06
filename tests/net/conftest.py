"""Fixtures of the network tests: skip where namespaces cannot be made, a `world` per test
that is torn down whatever happens, and leftovers of killed runs swept."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from . import browser, netlab
from .browser import Browsers
from .world import World


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def namespaces() -> Iterator[None]:
    reason = netlab.unavailable()
    if reason is not None:
        pytest.skip(reason)
    netlab.sweep_leftovers()
    yield
    netlab.sweep_own()


@pytest.fixture
async def world(namespaces: None, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    logs = tmp_path / "net"
    the_world = World(logs)
    try:
        yield the_world
    finally:
        await the_world.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for log in sorted(logs.glob("*.log")):
                lines = log.read_text(errors="replace").splitlines()[-25:]
                print(f"--- {log.name} (last {len(lines)} lines) ---", *lines, sep="\n")


@pytest.fixture
async def chromium(world: World) -> AsyncIterator[Browsers]:
    """Playwright, for Chromium processes inside the world's namespaces (tests/net/browser.py);
    closed before the world is torn down (which kills whatever is left in its namespaces)."""
    reason = browser.unavailable()
    if reason is not None:
        pytest.skip(reason)
    async with browser.browsers(world.logs, world.server_url) as the_browsers:
        yield the_browsers
