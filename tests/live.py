"""A real Lingkar server on a free loopback port inside the test's event loop, and a small
msgpack WebSocket client that speaks DESIGN §5."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import uvicorn
import websockets

from server.app import Parts, build_app, make_store
from server.config import Settings, load_settings
from signaling.session import DEFAULT_LIMITS, Limits
from storage.clock import Clock
from testkit.http import call
from testkit.ports import listening_socket

API_KEY = "test-organizer-key-0123456789abcdef"
SECRET = "test-signing-secret-0123456789abcdef-0123456789"


@dataclass
class Live:
    url: str
    parts: Parts
    server: uvicorn.Server

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    async def api(self, method: str, path: str, body: Any = None, key: str = API_KEY) -> tuple[int, Any]:
        return await asyncio.to_thread(call, method, self.url + path, body, key)

    async def create_circle(self, **settings: Any) -> dict[str, Any]:
        body = {"title": "Lingkar Uji", "lobby": False, **settings}
        status, circle = await self.api("POST", "/api/circles", body)
        assert status == 201, circle
        return dict(circle)


def settings_for(store: str = "memory", **extra: Any) -> Settings:
    env = {"LINGKAR_SECRET": SECRET, "LINGKAR_API_KEY": API_KEY, "LINGKAR_STORE": store,
           **{f"LINGKAR_{k.upper()}": str(v) for k, v in extra.items()}}
    return load_settings(env)


@contextlib.asynccontextmanager
async def live_server(store_url: str = "memory", *, limits: Limits = DEFAULT_LIMITS,
                      clock: Clock | None = None, **extra: Any) -> AsyncIterator[Live]:
    sock, port = listening_socket()  # the port is ours before the server starts: no race
    if "public_url" in extra:  # one deployment URL for several processes: each has its own too
        extra.setdefault("process_url", f"http://127.0.0.1:{port}")
    settings = settings_for(store_url, port=port, **extra)
    store = make_store(settings)
    app = build_app(settings, store=store, limits=limits, clock=clock)
    config = uvicorn.Config(app, log_config=None, access_log=False,
                            ws="websockets-sansio", ws_max_size=64 * 1024,
                            ws_per_message_deflate=False, lifespan="on", proxy_headers=False)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])  # returns once the server listens
    main_loop = asyncio.create_task(server.main_loop())
    try:
        yield Live(f"http://127.0.0.1:{port}", app.state.parts, server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(main_loop, 15)
        await asyncio.wait_for(server.shutdown(sockets=[sock]), 15)
        sock.close()


def token_of(link: str) -> str:
    return link.split("#t=", 1)[1]


@dataclass
class Client:
    """One member's socket. `frames` keeps everything received, in order."""

    ws: websockets.ClientConnection
    frames: list[dict[str, Any]] = field(default_factory=list)
    member_id: str = ""
    resume: str = ""
    _ref: int = 0
    _new: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task[None] | None = None
    close_code: int | None = None

    @classmethod
    async def connect(cls, live: Live, **kwargs: Any) -> Client:
        ws = await websockets.connect(live.ws_url, max_size=2**20, compression=None, **kwargs)
        client = cls(ws)
        client._reader = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                frame = msgpack.unpackb(message) if isinstance(message, bytes) else {"text": message}
                async with self._new:
                    self.frames.append(frame)
                    self._new.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            async with self._new:
                self._new.notify_all()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(msgpack.packb(frame))

    async def command(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Send a command with a fresh ref and wait for its ack or error."""
        self._ref += 1
        ref = self._ref
        await self.send({"type": type_, "ref": ref, **fields})
        return await self.wait(lambda fr: fr.get("type") in ("ack", "error", "answer") and fr.get("ref") == ref)

    async def wait(self, match: Any, timeout: float = 10.0, start: int = 0) -> dict[str, Any]:
        async def find() -> dict[str, Any]:
            async with self._new:
                while True:
                    for frame in self.frames[start:]:
                        if match(frame):
                            return frame
                    if self.close_code is not None:
                        raise AssertionError(f"closed with {self.close_code} before a match; got {self.frames}")
                    await self._new.wait()

        return await asyncio.wait_for(find(), timeout)

    async def event(self, name: str, timeout: float = 10.0, **data: Any) -> dict[str, Any]:
        return await self.wait(lambda fr: fr.get("type") == "event" and fr.get("name") == name
                               and all(fr["data"].get(k) == v for k, v in data.items()), timeout)

    async def closed(self, timeout: float = 10.0) -> int:
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        assert self.close_code is not None
        return self.close_code

    def events(self) -> list[dict[str, Any]]:
        return [fr for fr in self.frames if fr.get("type") == "event"]

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def join(live: Live, link: str, name: str = "Melati", *, listen_only: bool = False,
               expect: str = "welcome", source: str | None = None) -> Client:
    """Join through `link`; `source` is the loopback address to connect from (127.0.0.0/8:
    another "address", for the limits that count per address)."""
    client = await Client.connect(live, **({"local_addr": (source, 0)} if source else {}))
    await client.send({"type": "hello", "token": token_of(link), "name": name, "listen_only": listen_only})
    first = await client.wait(lambda fr: fr.get("type") in ("welcome", "lobby"))
    assert first["type"] == expect, first
    client.member_id = first["member_id"]
    client.resume = first["resume"]
    return client
