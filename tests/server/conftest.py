"""Fixtures and helpers of the server suite: every test runs on the three stores (memory,
one Redis, a Redis Cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from storage.clock import RealClock
from tests.live import Client, Live, join, live_server


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    if request.param == "redis-cluster":
        return str(request.getfixturevalue("redis_cluster_url"))
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def live(store_url: str) -> AsyncIterator[Live]:
    async with live_server(store_url) as server:
        yield server


async def settle(client: Client) -> dict[str, Any]:
    """A barrier on one socket: send `sync`, await its `snapshot`. Every event caused before
    the sync was applied has reached this socket by the time the snapshot arrives."""
    start = len(client.frames)
    await client.send({"type": "sync", "ref": 10_000 + start})
    return await client.wait(lambda fr: fr.get("type") == "snapshot", start=start)


async def ack_of(client: Client, type_: str, **fields: Any) -> dict[str, Any]:
    answer = await client.command(type_, **fields)
    assert answer["type"] == "ack", answer
    return answer


async def error_of(client: Client, type_: str, **fields: Any) -> str:
    answer = await client.command(type_, **fields)
    assert answer["type"] == "error", answer
    return str(answer["code"])


async def hello_close(live: Live, token: str, name: str = "Melati", **extra: Any) -> int:
    """Send a `hello` that must be refused; the close code."""
    client = await Client.connect(live)
    await client.send({"type": "hello", "token": token, "name": name, **extra})
    code = await client.closed()
    assert not [fr for fr in client.frames if fr.get("type") in ("welcome", "lobby")], client.frames
    return code


async def circle_of(live: Live, **settings: Any) -> tuple[dict[str, Any], Client, Client, Client]:
    """A circle with a moderator and two members, all admitted and settled."""
    circle = await live.create_circle(**settings)
    links = circle["links"]
    mod = await join(live, links["moderator"], "Pendamping")
    a = await join(live, links["member"], "Melati")
    b = await join(live, links["member"], "Kenanga")
    await mod.event("member_joined", timeout=10)
    await asyncio.gather(settle(mod), settle(a), settle(b))
    return circle, mod, a, b


def since(client: Client, start: int) -> list[dict[str, Any]]:
    return client.frames[start:]


def names(frames: list[dict[str, Any]]) -> list[str]:
    return [fr["name"] for fr in frames if fr.get("type") == "event"]


class SkipClock:
    """The real clock plus an offset that a test can push forward: `skip(ms)` jumps time and
    runs every timer that fell due, so a 30 s turn can end without waiting 30 s."""

    def __init__(self) -> None:
        self.offset = 0
        self._timers: list[tuple[int, Any, asyncio.TimerHandle]] = []

    def now(self) -> int:
        return RealClock().now() + self.offset

    def call_at(self, when_ms: int, callback: Any) -> Any:
        loop = asyncio.get_running_loop()
        entry: list[Any] = []

        def fire() -> None:
            if entry and entry[0] in self._timers:
                self._timers.remove(entry[0])
            callback()

        handle = loop.call_later(max(0.0, (when_ms - self.now()) / 1000), fire)
        entry.append((when_ms, fire, handle))
        self._timers.append(entry[0])
        return handle

    def skip(self, ms: int) -> None:
        self.offset += ms
        now = self.now()
        for when, fire, handle in list(self._timers):
            if when <= now and not handle.cancelled():
                handle.cancel()
                fire()


class ThreadedLive:
    """A live server in an event loop of its own thread, for tests that hypothesis (or a
    blocking client) drives from plain functions."""

    def __init__(self, store_url: str, **kwargs: Any) -> None:
        import contextlib
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._stack = contextlib.AsyncExitStack()
        self.live: Live = self.run(self._stack.enter_async_context(live_server(store_url, **kwargs)))

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        try:
            self.run(self._stack.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
