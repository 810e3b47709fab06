"""A WebSocket client for load generators: a raw asyncio protocol with the least of RFC 6455
a client needs (the opening handshake, masked frames out, unmasked frames in, ping → pong,
the closing handshake), so that the generator spends little per frame it receives and is
not the limit of a fan-out bench (`loadtest.fanout` at 750 circles × 8 members).

It answers the subset of `websockets`' client that the benches use: `await connect(url)`,
`await ws.send(data)`, `await ws.recv()`, `async for message in ws`, `await ws.close()`.
No extensions (no compression), no proxies; `wss://` through the default TLS context.

A received message is taken from the socket in the step that read it (`data_received`), with
no task per socket and no per-message object beyond its bytes; `received_at(message)` is not
needed: whoever awaits `recv` (or iterates) reads the clock when it runs, as with
`websockets`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import ssl
import struct
from collections import deque
from typing import Any, cast
from urllib.parse import urlsplit

__all__ = ["ConnectionClosed", "FastSocket", "HandshakeError", "connect", "frame"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_MAX_HEADER = 16 * 1024

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class ConnectionClosed(Exception):
    """The connection is closed (`code` from the peer's close frame, 1006 when none came)."""

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(f"closed: {code} {reason}".strip())
        self.code = code
        self.reason = reason


class HandshakeError(Exception):
    """The server did not answer the upgrade with a valid 101."""


def frame(opcode: int, payload: bytes, mask_key: int | None = None) -> bytes:
    """One final frame; masked (RFC 6455 §5.3) with `mask_key` unless it is None."""
    n = len(payload)
    b0 = 0x80 | opcode
    bit = 0x80 if mask_key is not None else 0
    if n < 126:
        head = bytes((b0, bit | n))
    elif n < 65536:
        head = _HEAD16.pack(b0, bit | 126, n)
    else:
        head = _HEAD64.pack(b0, bit | 127, n)
    if mask_key is None:
        return head + payload
    key = mask_key.to_bytes(4, "big")
    if not n:
        return head + key
    repeated = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return head + key + masked


class FastSocket(asyncio.Protocol):
    """One client connection. Made by `connect`."""

    def __init__(self, host_header: str, target: str, max_size: int) -> None:
        self._key = base64.b64encode(os.urandom(16)).decode()
        self._request = (f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key}\r\n"
                         f"Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self._max_size = max_size
        self.transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = b""
        self._open = False  # the handshake is done and no close was sent or received
        self._fragments: list[bytes] | None = None
        self._fragment_text = False
        self._messages: deque[bytes | str] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: ConnectionClosed | None = None  # set once nothing more will be received
        self._lost: asyncio.Future[None] = self._handshake.get_loop().create_future()
        self._paused: asyncio.Future[None] | None = None
        self.close_code: int | None = None

    # ---- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if not self._open and not self._handshake.done():
            self._buffer += data
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > _MAX_HEADER:
                    self._fail_handshake("response headers too long")
                return
            response, data = self._buffer[:end], self._buffer[end + 4:]
            self._buffer = b""
            problem = self._check_response(response)
            if problem:
                self._fail_handshake(problem)
                return
            self._open = True
            self._handshake.set_result(None)
            if not data:
                return
        buf = self._buffer + data if self._buffer else data
        n = len(buf)
        # The common case on a fan-out: exactly one small final binary frame.
        if n >= 2 and buf[0] == 0x82 and buf[1] < 126 and n == 2 + buf[1] and self._fragments is None:
            self._buffer = b""
            self._message(buf[2:])
            return
        pos = 0
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b1 & 0x80:  # a server never masks (RFC 6455 §5.1)
                self._protocol_error()
                return
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if length > self._max_size:
                self._protocol_error(1009)
                return
            end = pos + head + length
            if end > n:
                break
            payload = buf[pos + head:end]
            pos = end
            if not self._frame(b0, payload):
                return
        self._buffer = buf[pos:] if pos < n else b""

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        if not self._handshake.done():
            self._handshake.set_exception(ConnectionClosed(1006, "lost during the handshake"))
        self._finish(ConnectionClosed(self.close_code or 1006))
        if not self._lost.done():
            self._lost.set_result(None)
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    def pause_writing(self) -> None:
        if self._paused is None or self._paused.done():
            self._paused = self._handshake.get_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    # ---- frames in -------------------------------------------------------------------------

    def _check_response(self, head: bytes) -> str:
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            return f"upgrade answered {lines[0]!r}"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self._key.encode() + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            return "bad Sec-WebSocket-Accept"
        if headers.get("upgrade", "").lower() != "websocket":
            return "no Upgrade: websocket"
        if headers.get("sec-websocket-extensions"):
            return "extensions were not asked for"
        return ""

    def _fail_handshake(self, problem: str) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(HandshakeError(problem))
        assert self.transport is not None
        self.transport.close()

    def _frame(self, b0: int, payload: bytes) -> bool:
        """One frame; False once the connection is closing (stop parsing)."""
        opcode, fin = b0 & 0x0F, b0 & 0x80
        if opcode == OP_BINARY or opcode == OP_TEXT:
            if self._fragments is not None:
                return self._protocol_error()
            if fin:
                self._message(payload if opcode == OP_BINARY else payload.decode())
            else:
                self._fragments, self._fragment_text = [payload], opcode == OP_TEXT
        elif opcode == OP_CONT:
            if self._fragments is None:
                return self._protocol_error()
            self._fragments.append(payload)
            if sum(len(p) for p in self._fragments) > self._max_size:
                return self._protocol_error(1009)
            if fin:
                whole = b"".join(self._fragments)
                self._fragments = None
                self._message(whole.decode() if self._fragment_text else whole)
        elif opcode == OP_PING:
            self._write(OP_PING + 1, payload)  # a pong with the same data
        elif opcode == OP_PONG:
            pass
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_code = code
            reason = payload[2:].decode(errors="replace")
            if self._open:  # answer the close, then the server closes the TCP connection
                self._write(OP_CLOSE, payload[:2])
                self._open = False
            self._finish(ConnectionClosed(code, reason))
            return False
        else:
            return self._protocol_error()
        return True

    def _message(self, message: bytes | str) -> None:
        if self._closed is not None:
            return
        self._messages.append(message)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _protocol_error(self, code: int = 1002) -> bool:
        if self._open:
            self._write(OP_CLOSE, code.to_bytes(2, "big"))
            self._open = False
        self.close_code = code
        self._finish(ConnectionClosed(code, "protocol error"))
        assert self.transport is not None
        self.transport.close()
        return False

    def _finish(self, closed: ConnectionClosed) -> None:
        if self._closed is None:
            self._closed = closed
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- the API ---------------------------------------------------------------------------

    def _write(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(frame(opcode, payload, random.getrandbits(32)))

    def send_now(self, data: bytes | str) -> None:
        """Send one message (binary for bytes, text for str) without waiting."""
        if not self._open:
            raise self._closed or ConnectionClosed(self.close_code or 1006)
        if isinstance(data, str):
            self._write(OP_TEXT, data.encode())
        else:
            self._write(OP_BINARY, data)

    async def send(self, data: bytes | str) -> None:
        self.send_now(data)
        paused = self._paused
        if paused is not None and not paused.done():
            await paused

    async def recv(self) -> bytes | str:
        """The next message; raises ConnectionClosed once none will come."""
        while not self._messages:
            if self._closed is not None:
                raise self._closed
            waiter = self._waiter = self._handshake.get_loop().create_future()
            await waiter
        return self._messages.popleft()

    def __aiter__(self) -> FastSocket:
        return self

    async def __anext__(self) -> bytes | str:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake (bounded by a few seconds), then the TCP connection."""
        if self.transport is None:
            return
        if self._open:
            self._write(OP_CLOSE, code.to_bytes(2, "big") + reason.encode())
            self._open = False
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), 5)
            except TimeoutError:
                pass
        self.transport.close()
        self._finish(ConnectionClosed(self.close_code or code))


async def connect(url: str, *, open_timeout: float = 30, max_size: int = 2**20,
                  **_: Any) -> FastSocket:
    """Open a WebSocket to `url` (ws:// or wss://). Other `websockets.connect` keyword
    arguments (such as compression=None) are accepted and ignored: nothing is negotiated."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL: {url}")
    secure = parts.scheme == "wss"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    default = (secure and port == 443) or (not secure and port == 80)
    host_header = (f"[{host}]" if ":" in host else host) + ("" if default else f":{port}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()

    async def opening() -> FastSocket:
        _, protocol = await loop.create_connection(
            lambda: FastSocket(host_header, target, max_size), host, port,
            ssl=ssl.create_default_context() if secure else None,
            server_hostname=host if secure else None)
        try:
            await protocol._handshake
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.close()
            raise
        return protocol

    return await asyncio.wait_for(opening(), open_timeout)
