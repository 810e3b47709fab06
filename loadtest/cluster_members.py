"""A member as the web client behaves, and a `lingkar cluster` of the bench's own: what
loadtest.cluster's subcommands share."""

from __future__ import annotations

import asyncio
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.client import Client
from loadtest.procs import ClusterProcess
from testkit.http import call
from testkit.procs import machine_busy_seconds
from testkit.stats import percentile

RETRY = 0.2  # seconds between a member's attempts to get back in (as tests/deploy's members)
WEB_BASE, WEB_MAX = 0.5, 10.0  # the web client's backoff (web/js/protocol.js): 0.5 s × 2^n, jittered
SETTLE = 2.0  # after a rolling restart: the last process back in Caddy's ring (fail_duration)


def _quiet(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """A future whose exception (a close) nobody may read: not reported as never retrieved."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


def token_of(link: str) -> str:
    return link.split("#t=", 1)[1]


def pcts(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"n": len(s), "p50": round(percentile(s, 50), 3), "p95": round(percentile(s, 95), 3),
            "max": round(s[-1], 3) if s else math.nan}


async def api(base: str, key: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return await asyncio.to_thread(call, method, base + path, body, key)


async def new_circle(base: str, key: str, title: str, capacity: int = 16) -> dict[str, Any]:
    for attempt in range(20):  # a process restarting behind the proxy: try again
        try:
            status, circle = await api(base, key, "POST", "/api/circles",
                                       {"title": title, "lobby": False, "capacity": capacity,
                                        "floor_mode": "hands", "turn_seconds": 1800})
        except OSError as err:
            status, circle = 0, str(err)
        if status == 201:
            return dict(circle)
        await asyncio.sleep(0.25 * (attempt + 1))
    raise RuntimeError(f"POST /api/circles answered {status}: {circle}")


def seats(state: dict[str, Any]) -> dict[str, int]:
    return {m["id"]: m["seat"] for m in state["members"]}


# ---- a member as the web client behaves -------------------------------------------------------

@dataclass
class Member:
    """Joins through the proxy (`/ws?c={circle}`, or `/ws` with `with_c=False`), follows a
    `redirect` once to the URL it names, and resumes with its secret. `backoff` "fixed" tries
    again every RETRY s (the first time at once); "web" waits as web/js/protocol.js does
    (0.5 s × 2^attempt, jittered, at most 10 s; reset by a welcome).

    Counted: `hellos` sent to the proxy that were answered (welcome, lobby or redirect),
    `redirected` of those answered `redirect`, `failed` attempts (refused upgrade, a close
    without an answer: 502, 1013, …), `moved` redirects received while in the circle."""

    base: str  # the proxy's http URL
    circle_id: str
    token: str
    name: str
    with_c: bool = True
    backoff: str = "fixed"
    member_id: str = ""
    resume: str = ""
    client: Client | None = None
    hellos: int = 0
    redirected: int = 0
    followed: int = 0
    failed: int = 0
    moved: int = 0
    welcomes: list[dict[str, Any]] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _moved_to: asyncio.Future[Any] | None = None

    @property
    def entry(self) -> str:
        url = self.base.replace("http://", "ws://", 1) + "/ws"
        return f"{url}?c={self.circle_id}" if self.with_c else url

    async def _hello(self, url: str) -> tuple[Client | None, dict[str, Any] | None]:
        client = Client(url, self.name)
        try:
            await client.connect(timeout=10)
        except Exception:  # noqa: BLE001 - refused upgrade (502), reset, timeout: try again
            return None, None
        answer = _quiet(client.expect("welcome", "lobby", "redirect"))
        frame: dict[str, Any] = {"type": "hello", "token": self.token, "name": self.name, "listen_only": False}
        if self.resume:
            frame["resume"] = self.resume
        try:
            await client.send(frame)
            first, _ = await asyncio.wait_for(answer, 10)
        except Exception:  # noqa: BLE001 - closed without an answer (1013, 1001, …), a timeout
            await client.close()
            return None, None
        return client, first

    async def join(self, at: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """Until a `welcome` (TimeoutError after `timeout` s)."""
        async def attempt() -> dict[str, Any]:
            tries = 0
            url = at
            while True:
                to_proxy = url is None
                client, first = await self._hello(url or self.entry)
                url = None
                if first is not None and to_proxy:
                    self.hellos += 1
                if first is not None and first["type"] == "redirect":
                    if to_proxy:
                        self.redirected += 1
                    self.followed += 1
                    assert client is not None
                    await client.close()
                    client, first = await self._hello(str(first["url"]).replace("http", "ws", 1))
                if first is not None and first["type"] == "welcome":
                    assert client is not None
                    return self._welcomed(client, first)
                if client is not None:
                    await client.close()
                self.failed += 1
                await asyncio.sleep(self._delay(tries))
                tries += 1

        return await asyncio.wait_for(attempt(), timeout)

    def _delay(self, tries: int) -> float:
        if self.backoff == "web":
            return float(min(WEB_MAX, WEB_BASE * 2.0 ** tries) * (0.75 + random.random() / 2))
        return RETRY

    def _welcomed(self, client: Client, welcome: dict[str, Any]) -> dict[str, Any]:
        self.client = client
        self.welcomes.append(welcome)
        self.member_id = self.member_id or str(welcome["member_id"])
        self.resume = welcome["resume"]
        self._moved_to = _quiet(client.expect("redirect"))  # a draining process names the next home
        self.connected.set()
        return welcome

    async def gone(self, timeout: float | None = None) -> str | None:
        """Until the socket closes; the URL a `redirect` before the close named, if any."""
        assert self.client is not None
        await self.client.closed(timeout=timeout)  # type: ignore[arg-type]
        self.connected.clear()
        fut = self._moved_to
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            self.moved += 1
            return str(fut.result()[0]["url"]).replace("http", "ws", 1)
        return None

    async def back_in(self, moved_to: str | None) -> dict[str, Any]:
        """Resume after a close, as the web client: where a `redirect` said at once, else
        through the proxy (after the first delay of the web client's backoff)."""
        if moved_to is None and self.backoff == "web":
            await asyncio.sleep(self._delay(0))
        return await self.join(at=moved_to)

    async def keep(self) -> None:
        """Stay in: whenever the socket closes, resume."""
        while True:
            await self.back_in(await self.gone())

    async def command(self, type_: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        assert self.client is not None
        answer, _, _ = await self.client.command(type_, timeout=timeout, **fields)
        return answer

    async def sync(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.client is not None
        snapshot = _quiet(self.client.expect("snapshot"))
        await self.client.send({"type": "sync"})
        frame, _ = await asyncio.wait_for(snapshot, timeout)
        return dict(frame["state"])

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def members_of(base: str, circle: dict[str, Any], names: list[str], *, moderator: bool = True,
               **kw: Any) -> list[Member]:
    """With `moderator`, the first one joins with the moderator link; the others (all of them
    without it) with the member link."""
    links = circle["links"]
    return [Member(base, circle["id"], token_of(links["moderator" if i == 0 and moderator else "member"]), name, **kw)
            for i, name in enumerate(names)]


# ---- running something, and what is left afterwards -----------------------------------------

def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "busy_seconds": round(machine_busy_seconds(), 1)}


class Cluster:
    """A `lingkar cluster` of its own in a temporary data directory, for `async with`."""

    def __init__(self, n: int, env: dict[str, str] | None = None, store: str | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="lk-bench-"))  # short: the control socket's path
        self.proc = ClusterProcess(n, self.tmp / "data", env=env, store=store)
        self.left: list[str] = []

    async def __aenter__(self) -> ClusterProcess:
        try:
            await self.proc.start()
        except BaseException:
            await self.__aexit__()
            raise
        return self.proc

    async def __aexit__(self, *exc: object) -> None:
        self.left = await self.proc.stop()
        if self.left:
            print(f"LEFT BEHIND by lingkar cluster (killed now): {self.left}", flush=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
