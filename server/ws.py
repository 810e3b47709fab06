"""The `/ws` endpoint: the Origin check, the per-address cap, then a `Session`."""

from __future__ import annotations

from collections import Counter

from starlette.websockets import WebSocket, WebSocketDisconnect

from server import metrics
from server.config import Settings, origin_allowed
from server.local import LocalCircles
from signaling.session import DEFAULT_LIMITS, Limits, Session


class _StarletteTransport:
    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def receive(self) -> bytes | str | None:
        try:
            message = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        if data is not None:
            return bytes(data)
        return message.get("text") or ""

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self, code: int, reason: str = "") -> None:
        try:
            await self.ws.close(code, reason)
        except (RuntimeError, OSError):
            pass  # already closed by the client


class WebSocketEndpoint:
    def __init__(self, settings: Settings, local: LocalCircles, manager: object,
                 limits: Limits = DEFAULT_LIMITS, max_per_address: int = 0) -> None:
        self.settings = settings
        self.local = local
        self.manager = manager
        self.limits = limits
        self.max_per_address = max_per_address
        self._per_address: Counter[str] = Counter()
        self.draining = False

    async def handle(self, ws: WebSocket) -> None:
        if self.draining or not origin_allowed(self.settings, ws.headers.get("origin")):
            await ws.close(1008)  # before accept: uvicorn answers the upgrade with 403
            return
        address = ws.client.host if ws.client else ""
        if self.max_per_address and self._per_address[address] >= self.max_per_address:
            await ws.close(1008)
            return
        self._per_address[address] += 1
        metrics.CONNECTIONS.inc()
        try:
            await ws.accept()
            session = Session(_StarletteTransport(ws), self.local.manager, secret=self.settings.secret,
                              media=self.local.relay, observer=self.local, limits=self.limits,
                              homes=self.local.homes)
            await session.run()
        finally:
            metrics.CONNECTIONS.dec()
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]
