"""The `/ws` endpoint: the Origin check, the per-address cap, then a `Session`."""

from __future__ import annotations

import logging
import struct
from collections import Counter
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.protocol import State as WsState

from server import metrics
from server.circles import Circles
from server.config import Settings, origin_allowed
from signaling.addresses import prefix
from signaling.session import DEFAULT_LIMITS, Home, Limits, Session
from signaling.turn import IceServers
from storage.manager import RoomManager

log = logging.getLogger("lingkar.ws")
_OPEN = WsState.OPEN
_CONNECTED = WebSocketState.CONNECTED
_DISCONNECTED = WebSocketState.DISCONNECTED
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _SansIOProtocol,
    )
except ImportError:  # pragma: no cover - uvicorn without the websockets package
    _SansIOProtocol = None  # type: ignore[assignment,misc]


_last_framed: list[Any] = [None, b""]  # (payload, frame): an event goes to every member in turn


def _framed(data: bytes) -> bytes:
    """`data` as one unmasked binary WebSocket frame (RFC 6455 §5.2), as websockets would
    serialize it without extensions; built once for all the members an event goes to."""
    if data is _last_framed[0]:
        return _last_framed[1]
    n = len(data)
    if n < 126:
        head = bytes((0x82, n))
    elif n < 65536:
        head = _HEAD16.pack(0x82, 126, n)
    else:
        head = _HEAD64.pack(0x82, 127, n)
    frame = head + data
    _last_framed[0], _last_framed[1] = data, frame
    return frame


def _uvicorn_protocol(ws: WebSocket) -> Any:
    """uvicorn's sans-I/O WebSocket protocol behind `ws`, or None (another server, or a
    middleware between): its ASGI ``receive`` is the protocol's bound method."""
    protocol = getattr(getattr(ws, "_receive", None), "__self__", None)
    if _SansIOProtocol is not None and isinstance(protocol, _SansIOProtocol):
        return protocol
    return None


class WritePath:
    """Which way frames leave: "direct" (written into uvicorn's sans-I/O protocol from the
    fan-out step, no task switch per member) or "asgi" (each through the ASGI ``send``). The
    direct path leans on uvicorn's private attributes (pinned in pyproject.toml, checked by
    tests/server/test_ws_write.py); should they change under us, it fails once, loudly, and
    every frame goes the ASGI way from then on instead of vanishing."""

    direct = _SansIOProtocol is not None

    @classmethod
    def name(cls) -> str:
        return "direct" if cls.direct else "asgi"

    @classmethod
    def broken(cls, exc: BaseException) -> None:
        if cls.direct:
            cls.direct = False
            metrics.WRITE_PATH.labels("direct").set(0)
            metrics.WRITE_PATH.labels("asgi").set(1)
            log.error("the direct WebSocket write failed (%s); every frame goes through ASGI now",
                      type(exc).__name__, exc_info=exc)


class _StarletteTransport:
    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self._protocol = _uvicorn_protocol(ws) if WritePath.direct else None
        self._asgi_receive = ws._receive  # the server's ASGI `receive`, as Starlette calls it

    def write_now(self, *frames: bytes) -> bool:
        """What uvicorn's ASGI ``send`` does for a ``websocket.send`` of bytes, minus the
        awaits: only when it would not have waited (the transport takes writes) and the
        connection is open; otherwise False and the frame goes through `send`."""
        protocol = self._protocol
        if protocol is None:
            return False
        try:  # one call per member on the fan-out path: kept in one function
            if (
                not protocol.writable.is_set()
                or protocol.disconnected
                or protocol.close_sent
                or protocol.initial_response is not None
                or not protocol.handshake_complete
            ):
                return False
            transport = protocol.transport
            conn = protocol.conn
            if transport.is_closing() or conn.state is not _OPEN:
                return False
            if conn.extensions or conn.expect_continuation_frame:  # never negotiated here; kept right
                for data in frames:
                    conn.send_binary(data)
                transport.write(b"".join(conn.data_to_send()))
            elif len(frames) == 1:
                data = frames[0]
                transport.write(_last_framed[1] if data is _last_framed[0] else _framed(data))
            else:
                transport.write(b"".join([_framed(data) for data in frames]))
            return True
        except Exception as exc:  # uvicorn changed under us: never drop the frame
            WritePath.broken(exc)
            self._protocol = None
            return False

    async def receive(self) -> bytes | str | None:
        ws = self.ws
        if ws.client_state is not _CONNECTED:
            try:
                message = await ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
        else:  # what Starlette's `receive` does once connected, minus a coroutine per frame
            try:
                message = await self._asgi_receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
            kind = message["type"]
            if kind != "websocket.receive":
                if kind == "websocket.disconnect":
                    ws.client_state = _DISCONNECTED
                return None  # Starlette raises RuntimeError for any other type
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
    def __init__(self, settings: Settings, manager: RoomManager, circles: Circles, home: Home, *,
                 limits: Limits = DEFAULT_LIMITS, max_per_address: int = 0,
                 ice: IceServers | None = None) -> None:
        self.settings = settings
        self.manager = manager
        self.circles = circles
        self.home = home
        self.ice = ice or IceServers()
        self.limits = limits
        self.max_per_address = max_per_address
        self.metrics = metrics.SessionMetrics()
        self._per_address: Counter[str] = Counter()
        self.draining = False
        # Behind a proxy that routes `/ws?c=` (each process has a URL of its own under the
        # public one): a hello it sends to a process that is not the circle's home asks
        # the home to hand the circle over (DESIGN §8).
        self.behind_proxy = (settings.process_url or settings.public_url) != settings.public_url

    async def handle(self, ws: WebSocket) -> None:
        if self.draining or not origin_allowed(self.settings, ws.headers.get("origin")):
            await ws.close(1008)  # before accept: uvicorn answers the upgrade with 403
            return
        address = ws.client.host if ws.client else ""
        unit = prefix(address)  # an IPv6 /64 is one client
        if self.max_per_address and self._per_address[unit] >= self.max_per_address:
            await ws.close(1008)
            return
        self._per_address[unit] += 1
        metrics.CONNECTIONS.inc()
        try:
            await ws.accept()
            session = Session(_StarletteTransport(ws), self.manager, secret=self.settings.secret,
                              circles=self.circles, observer=self.metrics, limits=self.limits,
                              home=self.home, address=address, ice=self.ice,
                              routed=self.behind_proxy and ws.query_params.get("c") is not None)
            await session.run()
        finally:
            metrics.CONNECTIONS.dec()
            self._per_address[unit] -= 1
            if self._per_address[unit] <= 0:
                del self._per_address[unit]
