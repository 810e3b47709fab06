"""A lean msgpack WebSocket client of DESIGN §5 for the load generator.

It timestamps every frame the moment it is read (``time.perf_counter``) and keeps the
arrival time of each room event by (version, name) — the first one wins — so latencies are
computed afterwards from logs, not by waiting on each event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgpack
import websockets

Frame = dict[str, Any]


class Closed(Exception):
    """The socket closed (or the wait ran out) before the expected frame."""


class Client:
    def __init__(self, ws_url: str, name: str) -> None:
        self.ws_url = ws_url
        self.name = name
        self.ws: Any = None
        self.member_id = ""
        self.role = ""
        self.events: dict[tuple[int, str], float] = {}
        self.ephemeral: list[tuple[str, str, float]] = []  # (name, text or member id, at)
        self.admitted_at: float | None = None
        self.close_code: int | None = None
        self.on_event: Callable[[Client, Frame, float], None] | None = None
        self.frames_in = 0
        self._ref = 0
        self._answers: dict[int, asyncio.Future[tuple[Frame, float]]] = {}
        self._firsts: dict[str, asyncio.Future[tuple[Frame, float]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, timeout: float = 10.0) -> None:
        self.ws = await asyncio.wait_for(
            websockets.connect(self.ws_url, max_size=2**20, compression=None, open_timeout=timeout,
                               ping_interval=None, close_timeout=2), timeout)
        self._reader = asyncio.create_task(self._read())

    def expect(self, *types: str) -> asyncio.Future[tuple[Frame, float]]:
        """A future for the next frame of one of `types` (register before sending)."""
        fut: asyncio.Future[tuple[Frame, float]] = asyncio.get_running_loop().create_future()
        for t in types:
            self._firsts[t] = fut
        return fut

    async def _read(self) -> None:
        unpack = msgpack.unpackb
        try:
            async for message in self.ws:
                at = time.perf_counter()
                self.frames_in += 1
                if not isinstance(message, bytes):
                    continue
                frame = unpack(message)
                kind = frame.get("type")
                if kind == "event":
                    name = frame["name"]
                    data = frame.get("data") or {}
                    if name == "private_note":
                        self.ephemeral.append((name, str(data.get("text", "")), at))
                    else:
                        self.events.setdefault((frame["version"], name), at)
                    if self.on_event is not None:
                        self.on_event(self, frame, at)
                    continue
                if kind in ("ack", "error", "answer") and frame.get("ref") in self._answers:
                    fut = self._answers.pop(frame["ref"])
                    if not fut.done():
                        fut.set_result((frame, at))
                    continue
                if kind == "admitted":
                    self.admitted_at = at
                fut2 = self._firsts.pop(kind, None)
                if fut2 is not None and not fut2.done():
                    fut2.set_result((frame, at))
        except websockets.ConnectionClosed:
            pass
        except Exception:  # noqa: BLE001 - a reader never takes the generator down
            pass
        finally:
            self.close_code = self.ws.close_code
            err = Closed(f"closed with {self.close_code}")
            for fut in [*self._answers.values(), *self._firsts.values()]:
                if not fut.done():
                    fut.set_exception(err)
            self._answers.clear()
            self._firsts.clear()

    async def send(self, frame: Frame) -> None:
        await self.ws.send(msgpack.packb(frame))

    async def command(self, type_: str, timeout: float = 10.0, **fields: Any) -> tuple[Frame, float, float]:
        """Send a command; returns (answer, sent_at, answered_at). Raises Closed."""
        self._ref += 1
        ref = self._ref
        fut: asyncio.Future[tuple[Frame, float]] = asyncio.get_running_loop().create_future()
        self._answers[ref] = fut
        sent = time.perf_counter()
        await self.send({"type": type_, "ref": ref, **fields})
        try:
            answer, at = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._answers.pop(ref, None)
            raise Closed(f"no answer to {type_} within {timeout} s") from None
        return answer, sent, at

    async def closed(self, timeout: float = 10.0) -> int | None:
        """Wait until the server has closed the socket (or `timeout` s); its close code."""
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)
            except TimeoutError:
                pass
        return self.close_code

    async def close(self) -> None:
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 3)
            except (TimeoutError, OSError, websockets.WebSocketException):
                pass
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
