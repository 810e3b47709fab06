"""The load generators' light WebSocket client against a real WebSocket server (websockets')."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import ServerConnection, serve

from loadtest import fastclient


async def _echo(ws: ServerConnection) -> None:
    async for message in ws:
        if message == b"ping me":
            await asyncio.wait_for(await ws.ping(b"are you there"), 5)  # answered: a pong
            await ws.send(b"ponged")
        elif message == b"close me":
            await ws.close(4001, "left")
            return
        else:
            await ws.send(message)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with serve(_echo, "127.0.0.1", 0, compression=None, max_size=2**20) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws?c=x"


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
async def test_messages_of_every_length_go_and_come_back(url: str, size: int) -> None:
    ws = await fastclient.connect(url)
    data = os.urandom(size)
    await ws.send(data)
    assert await ws.recv() == data
    await ws.send("teks ✓")
    assert await ws.recv() == "teks ✓"
    await ws.close()


async def test_many_messages_in_one_read_arrive_in_order(url: str) -> None:
    ws = await fastclient.connect(url)
    for i in range(200):
        await ws.send(i.to_bytes(2, "big") * (i % 70))
    for i in range(200):
        assert await ws.recv() == i.to_bytes(2, "big") * (i % 70)
    await ws.close()


async def test_a_ping_is_answered(url: str) -> None:
    ws = await fastclient.connect(url)
    await ws.send(b"ping me")
    assert await ws.recv() == b"ponged"
    await ws.close()


async def test_the_servers_close_ends_iteration_with_its_code(url: str) -> None:
    ws = await fastclient.connect(url)
    await ws.send(b"one")
    await ws.send(b"close me")
    assert [m async for m in ws] == [b"one"]
    assert ws.close_code == 4001
    with pytest.raises(fastclient.ConnectionClosed):
        await ws.recv()
    with pytest.raises(fastclient.ConnectionClosed):
        await ws.send(b"too late")


async def test_a_refused_upgrade_raises() -> None:
    async def not_websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_websocket, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(fastclient.HandshakeError):
            await fastclient.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5)
    finally:
        server.close()
        await server.wait_closed()


def test_a_masked_frame_unmasks_to_its_payload() -> None:
    payload = os.urandom(300)
    data = fastclient.frame(fastclient.OP_BINARY, payload, 0x01020304)
    assert data[:4] == bytes((0x82, 0x80 | 126)) + (300).to_bytes(2, "big")
    key, body = data[4:8], data[8:]
    assert bytes(b ^ key[i % 4] for i, b in enumerate(body)) == payload


def test_it_runs_on_uvloop_as_the_benches_do() -> None:
    from testkit.loop import run

    async def round_trip() -> bytes | str:
        async with serve(_echo, "127.0.0.1", 0, compression=None) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            ws = await fastclient.connect(f"ws://127.0.0.1:{port}/")
            await ws.send(b"uv")
            answer = await ws.recv()
            await ws.close()
            return answer

    assert run(round_trip()) == b"uv"
