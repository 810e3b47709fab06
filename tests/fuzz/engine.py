"""In-process fuzzing: frames through the real `Session`, `RoomManager`, rules and memory
store, with a transport that is a pair of queues instead of a socket (so hundreds of thousands
of frames a minute, not the ~24k/s of a real socket).

A circle holds a moderator, a witness member and the fuzzer (a member, or a moderator in some
runs). Each frame goes to the fuzzer's session; the engine then waits until its reader asks
for the next frame (the frame is fully handled: commands run, events delivered) and checks:
- the fuzzer got exactly one answer (`ack`, `error`, `snapshot`, `answer`) or its socket was
  closed with a code;
- a refused frame (`error`, or a close) reached nobody else: the moderator and the witness
  received nothing;
- the room keeps the §4 invariants that a state shows on its own (one holder, who is admitted;
  the queue once each and admitted; capacity and lobby bounds; no moderator waiting; nobody
  both seated and waiting);
- nothing was logged as an error or with a traceback.
A fuzzer closed by a valid `leave` joins again; an ended circle is made again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

import msgpack

from rooms.model import CircleSettings, FloorMode, Invite, Role, RoomState
from signaling import tokens
from signaling.session import Limits, Session
from storage.manager import RoomManager
from storage.memory_store import MemoryStore
from storage.store import NoSuchCircle
from tests.fuzz.frames import FrameMaker

SECRET = "fuzz-secret-0123456789abcdef0123456789"
# The rate limit is tested on its own (tests/signaling/test_ratelimit.py); here it would turn
# every frame after the 40th into `rate_limited`.
UNLIMITED = Limits(hello_seconds=30.0, rate=1e12, burst=10**12, send_queue=1 << 20)
ANSWERS = {"ack", "error", "snapshot", "answer"}


class Broken(AssertionError):
    """A frame broke a promise; the message says which, with the frame."""


class QueueTransport:
    """The socket, as two queues: frames in, frames out (decoded lazily by the checks)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self.out: list[bytes] = []
        self.closed_with: int | None = None
        self.waiting = asyncio.Event()  # the reader asked for the next frame and found none
        self.gone = asyncio.Event()

    async def receive(self) -> bytes | str | None:
        if self.inbox.empty():
            self.waiting.set()
        item = await self.inbox.get()
        self.waiting.clear()
        return item

    async def send(self, data: bytes) -> None:
        self.out.append(data)

    def write_now(self, *frames: bytes) -> bool:
        if self.closed_with is not None:
            return False
        self.out.extend(frames)
        return True

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed_with is None:
            self.closed_with = code
        self.gone.set()


class NoMedia:
    """The server's circles without media: every session's circle runtime (`Here`)."""

    def enter(self, session: Session) -> NoMedia:
        return self

    async def answer(self, member_id: str, offer_sdp: str, *, listen_only: bool) -> str:
        raise ValueError("no media in the fuzzer")

    def slots(self, member_id: str) -> list[str | None] | None:
        return None

    async def close_media(self, member_id: str) -> None:
        return None

    async def leave(self, session: Session) -> None:
        return None


class Quiet:
    """The session observer, counting nothing."""

    def frame_in(self) -> None: ...
    def frame_out(self) -> None: ...
    def error(self, code: str) -> None: ...
    def closed(self, code: int) -> None: ...
    def command_took(self, seconds: float) -> None: ...


class Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Member:
    transport: QueueTransport
    task: asyncio.Task[None]
    member_id: str = ""


@dataclass
class Report:
    frames: int = 0
    seconds: float = 0.0
    answers: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    rejoins: int = 0
    circles: int = 0

    def summary(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        answers = ", ".join(f"{k} {v}" for k, v in self.answers.most_common())
        closes = ", ".join(f"{k} {v}" for k, v in self.closes.most_common()) or "none"
        kinds = ", ".join(f"{k} {v}" for k, v in self.kinds.most_common())
        return (f"{self.frames} frames in {self.seconds:.1f} s: {rate:,.0f} frames/s\n"
                f"  frames: {kinds}\n  answers: {answers}\n  closes: {closes}\n"
                f"  rejoins {self.rejoins}, circles {self.circles}; every promise kept")


class Engine:
    def __init__(self, seed: int, *, fuzzer_role: Role = Role.MEMBER) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.fuzzer_role = fuzzer_role
        self.manager = RoomManager(MemoryStore())
        self.report = Report()
        self.maker = FrameMaker(self.rng)
        self.circle_id = ""
        self.tokens: dict[str, str] = {}
        self.others: list[Member] = []
        self.fuzzer: Member | None = None

    async def _session(self, who: str, name: str) -> Member:
        transport = QueueTransport()
        session = Session(transport, self.manager, secret=SECRET, circles=NoMedia(), observer=Quiet(),
                          limits=UNLIMITED, address=f"10.0.{self.rng.randrange(256)}.1")
        member = Member(transport, asyncio.create_task(session.run()))
        hello = {"type": "hello", "token": self.tokens[who], "name": name, "listen_only": False}
        transport.inbox.put_nowait(msgpack.packb(hello))
        await _either(transport.waiting, transport.gone)
        if transport.closed_with is not None:
            raise _Refused(transport.closed_with)  # e.g. a fuzzing moderator locked the circle
        first = msgpack.unpackb(transport.out[0])
        if first.get("type") != "welcome":
            raise Broken(f"{name} could not join: {first}")
        member.member_id = first["member_id"]
        transport.out.clear()
        return member

    async def new_circle(self) -> None:
        for m in [*self.others, *([self.fuzzer] if self.fuzzer else [])]:
            m.task.cancel()
        self.circle_id = secrets.token_urlsafe(9)
        # Moderator invites are for one person each: the fuzzer, as a moderator, has its own.
        invites = [*(Invite(f"inv-{role.value}", role) for role in Role), Invite("inv-fuzzer", Role.MODERATOR)]
        circle = CircleSettings(id=self.circle_id, title="Fuzz", capacity=50, floor_mode=FloorMode.HANDS,
                        lobby=False, grace_seconds=30)
        await self.manager.create(circle, invites)
        self.tokens = {role.value: tokens.issue(SECRET, self.circle_id, role.value, f"inv-{role.value}", 3600)
                       for role in Role}
        fuzzer_invite = "inv-fuzzer" if self.fuzzer_role is Role.MODERATOR else f"inv-{self.fuzzer_role.value}"
        self.tokens["fuzzer"] = tokens.issue(SECRET, self.circle_id, self.fuzzer_role.value, fuzzer_invite, 3600)
        self.others = [await self._session("moderator", "Pendamping"),
                       await self._session("member", "Saksi")]
        self.fuzzer = await self._session("fuzzer", "Pengacak")
        self.maker.members = [m.member_id for m in (*self.others, self.fuzzer)]
        self.report.circles += 1

    async def step(self, kind: str, data: bytes | str) -> None:
        fuzzer = self.fuzzer
        assert fuzzer is not None
        seen = [len(m.transport.out) for m in self.others]
        fuzzer.transport.out.clear()
        fuzzer.transport.waiting.clear()
        fuzzer.transport.inbox.put_nowait(data)
        await _either(fuzzer.transport.waiting, fuzzer.transport.gone)
        self.report.frames += 1
        self.report.kinds[kind] += 1
        if fuzzer.transport.closed_with is not None:
            await self._closed(kind, data)
            return
        if not fuzzer.transport.waiting.is_set():
            raise Broken(f"the session never asked for the next frame after {kind} {data!r:.200}")
        answers = [fr for fr in map(msgpack.unpackb, fuzzer.transport.out) if fr.get("type") in ANSWERS]
        if len(answers) != 1:
            raise Broken(f"{len(answers)} answers to {kind} {data!r:.200}: {answers!r:.300}")
        answer = answers[0]["type"]
        self.report.answers[answer] += 1
        if answer == "error":
            self._nobody_else_saw(seen, kind, data)
        await self._invariants(kind, data)

    async def _closed(self, kind: str, data: bytes | str) -> None:
        fuzzer = self.fuzzer
        assert fuzzer is not None
        code = fuzzer.transport.closed_with
        assert code is not None
        self.report.closes[code] += 1
        await asyncio.wait_for(fuzzer.task, 10)
        state = await self._state()
        if state is None:  # the fuzzer (a moderator) ended the circle
            await self.new_circle()
            return
        if code != 4001:  # anything but its own leave: nobody else may have seen it
            raise Broken(f"{kind} {data!r:.200} closed the fuzzer with {code}")
        try:
            self.fuzzer = await self._session("fuzzer", "Pengacak")
        except _Refused:  # it locked the circle before it left
            await self.new_circle()
            return
        self.maker.members = [m.member_id for m in (*self.others, self.fuzzer)]
        self.report.rejoins += 1

    def _nobody_else_saw(self, seen: list[int], kind: str, data: bytes | str) -> None:
        for member, before in zip(self.others, seen, strict=True):
            if len(member.transport.out) != before:
                got = [msgpack.unpackb(fr) for fr in member.transport.out[before:]]
                raise Broken(f"a refused {kind} {data!r:.200} reached another member: {got!r:.300}")

    async def _state(self) -> RoomState | None:
        try:
            return await self.manager.load(self.circle_id)
        except NoSuchCircle:
            return None

    async def _invariants(self, kind: str, data: bytes | str) -> None:
        s = await self._state()
        if s is None:
            await self.new_circle()
            return
        problem = broken_invariant(s)
        if problem:
            raise Broken(f"after {kind} {data!r:.200}: {problem}")
        if any(m.transport.closed_with is not None for m in self.others):
            # a fuzzing moderator may remove the others: start over with a fresh circle
            await self.new_circle()

    async def run(self, *, frames: int, seconds: float) -> Report:
        try:
            return await self._run(frames, seconds)
        except Broken as broken:
            raise Broken(f"seed {self.seed}, frame {self.report.frames + 1}: {broken}") from None

    async def _run(self, frames: int, seconds: float) -> Report:
        handler = Tracebacks()
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            await self.new_circle()
            started = time.perf_counter()
            deadline = started + seconds
            while self.report.frames < frames and time.perf_counter() < deadline:
                for _ in range(200):
                    kind, data = self.maker.next()
                    await self.step(kind, data)
                    if handler.records:
                        record = handler.records[0]
                        raise Broken(f"logged after {kind} {data!r:.200}: {record.getMessage()} "
                                     f"{'(with a traceback)' if record.exc_info else ''}")
            self.report.seconds = time.perf_counter() - started
            return self.report
        finally:
            root.removeHandler(handler)
            for m in [*self.others, *([self.fuzzer] if self.fuzzer else [])]:
                m.task.cancel()
            await self.manager.close()


class _Refused(Exception):
    pass


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    if a.is_set() or b.is_set():
        return
    waits = {asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())}
    _, pending = await asyncio.wait(waits, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


def broken_invariant(s: RoomState) -> str:
    """What a state shows of DESIGN §4 on its own; '' when all holds."""
    if s.floor is not None:
        holder = s.members.get(s.floor.holder)
        if holder is None:
            return "the floor is held by someone not admitted (1)"
        if holder.role is Role.MODERATOR:
            return "a moderator holds the floor (1)"
    if len(s.queue) != len(set(s.queue)) or any(mid not in s.members for mid in s.queue):
        return "the queue holds someone twice or someone not admitted (5)"
    if s.holder in s.queue:
        return "the holder is also in the queue (5)"
    if set(s.members) & set(s.lobby):
        return "someone is both seated and waiting"
    if s.seated > s.circle.capacity or len(s.lobby) > s.circle.capacity:
        return "over capacity"
    if any(m.role is Role.MODERATOR for m in s.lobby.values()):
        return "a moderator waits in the lobby"
    return ""
