"""Fuzzing over a real socket to uvicorn: the same frames as in process, plus what only a
socket has — WebSocket framing (bad opcodes, reserved bits, unmasked or oversize frames, a
continuation with nothing to continue), text frames and ping floods.

Each batch joins a member, sends it a few hundred frames and one last `raise_hand` with a
known ref, and reads until that one is answered or the socket closes: every frame before it
must have had exactly one answer (frames are answered in order), or the socket a close code.
Between batches, raw sockets abuse the framing. At the end the moderator and a witness who
joined first are still connected and get answers, the server logged no traceback, and the
circle still works (the witness's hand is raised and seen by the moderator).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import websockets

from signaling.session import Limits
from tests.fuzz.engine import ANSWERS, Broken, Tracebacks
from tests.fuzz.frames import FrameMaker
from tests.live import Client, Live, join, live_server, token_of

LIMITS = Limits(hello_seconds=10.0, rate=1e12, burst=10**12)
LAST_REF = 2**31 - 1


@dataclass
class WireReport:
    frames: int = 0
    seconds: float = 0.0
    batches: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    framing: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        return (f"{self.frames} frames over sockets in {self.seconds:.1f} s: {rate:,.0f} frames/s, "
                f"{self.batches} batches\n  answers: {dict(self.answers.most_common())}\n"
                f"  closes: {dict(self.closes.most_common())}\n  framing abuse: {dict(self.framing)}")


async def _batch(live: Live, link: str, maker: FrameMaker, rng: random.Random, report: WireReport) -> None:
    ws = await websockets.connect(live.ws_url, max_size=2**20, compression=None)
    try:
        await ws.send(msgpack.packb({"type": "hello", "token": token_of(link), "name": "Pengacak"}))
        welcome = msgpack.unpackb(await ws.recv())
        if welcome.get("type") != "welcome":
            raise Broken(f"the fuzzer could not join: {welcome}")
        sent: list[tuple[str, bytes | str]] = []
        for _ in range(rng.randrange(100, 400)):
            kind, data = maker.next()
            if kind == "nasty" and len(data) > 60_000:
                continue  # over a socket that is framing, covered below
            if isinstance(data, bytes) and (b"leave" in data or b"\xa3end" in data):
                continue  # a leave ends the batch early: covered in process (engine.py)
            sent.append((kind, data))
        payloads = [data for _, data in sent] + [msgpack.packb({"type": "raise_hand", "ref": LAST_REF})]
        for data in payloads:
            await ws.send(data)
        answered = 0
        try:
            while True:
                frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))
                if frame.get("type") in ANSWERS:
                    answered += 1
                    report.answers[frame["type"]] += 1
                    if frame.get("ref") == LAST_REF and frame["type"] in ("ack", "error"):
                        break
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else 1006
            report.closes[code] += 1
            if code not in (4001,):  # only its own valid leave ends it
                raise Broken(f"closed with {code} after {answered} answers") from None
        else:
            if answered != len(payloads):
                raise Broken(f"{len(payloads)} frames, {answered} answers")
        report.frames += answered  # each answered (a mutated frame may still decode as a leave)
        report.batches += 1
        if ws.close_code is None:  # leave, so that the seat is free at once (no grace period)
            await ws.send(msgpack.packb({"type": "leave"}))
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed:
                pass
    finally:
        await ws.close()


def _frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0,
           declared: int | None = None) -> bytes:
    n = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


ABUSE = {
    "reserved opcode": lambda: _frame(0x3, b"x"),
    "rsv bits": lambda: _frame(0x2, b"\x80", rsv=7),
    "unmasked": lambda: _frame(0x2, b"\x80", mask=False),
    "oversize": lambda: _frame(0x2, b"\x00" * 70_000),
    "declared 2^63": lambda: _frame(0x2, b"", declared=2**63 - 1),
    "lone continuation": lambda: _frame(0x0, b"x"),
    "fragmented control": lambda: _frame(0x9, b"p", fin=False),
    "long ping": lambda: _frame(0x9, b"p" * 200),
    "bad utf-8 text": lambda: _frame(0x1, b"\xff\xfe"),
    "close 1005 sent": lambda: _frame(0x8, struct.pack("!H", 1005)),
    "ping flood": lambda: b"".join(_frame(0x9, os.urandom(8)) for _ in range(2000)),
}


async def _abuse(live: Live, name: str, report: WireReport) -> None:
    host, port = live.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if b" 101 " not in status.split(b"\r\n")[0]:
            raise Broken(f"upgrade refused: {status[:80]!r}")
        writer.write(ABUSE[name]())
        await writer.drain()
        # The server answers (pongs), closes, or waits for a hello; either way it must not hang
        # the others. Read what comes for a moment's worth of bytes, then leave.
        try:
            await asyncio.wait_for(reader.read(65536), 2)
        except TimeoutError:
            pass
        report.framing[name] += 1
    except (ConnectionError, asyncio.IncompleteReadError):
        report.framing[name] += 1
    finally:
        writer.close()


async def run_wire(*, frames: int, seconds: float, seed: int) -> WireReport:
    rng = random.Random(seed)
    maker = FrameMaker(rng)
    report = WireReport()
    handler = Tracebacks()
    logging.getLogger().addHandler(handler)
    try:
        async with live_server("memory", limits=LIMITS, max_connections_per_address=0) as live:
            circle = await live.create_circle(lobby=False, capacity=50)
            links = circle["links"]
            mod = await join(live, links["moderator"], "Pendamping")
            witness = await join(live, links["member"], "Saksi")
            maker.members = [mod.member_id, witness.member_id]
            started = time.perf_counter()
            while report.frames < frames and time.perf_counter() - started < seconds:
                await _batch(live, links["member"], maker, rng, report)
                if rng.random() < 0.3:
                    await _abuse(live, rng.choice(list(ABUSE)), report)
                if handler.records:
                    raise Broken(f"logged: {handler.records[0].getMessage()}")
            report.seconds = time.perf_counter() - started
            await _still_fine(mod, witness)
            if handler.records:
                raise Broken(f"logged: {handler.records[0].getMessage()}")
    finally:
        logging.getLogger().removeHandler(handler)
    return report


async def _still_fine(mod: Client, witness: Client) -> None:
    if mod.close_code is not None or witness.close_code is not None:
        raise Broken(f"the moderator or the witness was closed: {mod.close_code}, {witness.close_code}")
    answer = await witness.command("raise_hand")
    if answer["type"] != "ack":
        raise Broken(f"the witness could not raise a hand: {answer}")
    await mod.event("hand_raised", member_id=witness.member_id)
