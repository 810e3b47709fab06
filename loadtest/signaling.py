"""The signaling load: in every room a scripted moderator and members run a session.

Each room joins through the lobby (member `hello` → `lobby`; the moderator admits on
`lobby_waiting`; the member gets `admitted`), then repeats a cycle at a steady pace:

    a raise_hand · b raise_hand · give_floor(a) · a unmute_self · next (→ b) ·
    mute(a) · b private_note · next (floor released)

and, once, one member leaves quietly and joins again with a fresh `hello`.
For every command the script remembers the room version its `ack` carried and who should
see the event; afterwards each recipient's log says when (version, event) arrived. The
latency is arrival − send, per recipient. A recipient that never got it is an error.

`run_process` is the entry point of a generator process (multiprocessing, spawn).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from loadtest.client import Client, Closed, Frame
from testkit.loop import quiet_gc

DRAIN_SECONDS = 1.0  # after the last command, wait this long for the last events
JOIN_TIMEOUT = 15.0


@dataclass
class Pending:
    command: str
    event: str
    version: int
    sent: float
    recipients: list[Client]
    text: str | None = None  # ephemeral events (private notes) are matched by text
    phase: str = "steady"  # "join": the burst of everyone joining at once, reported apart


@dataclass
class Counters:
    """What the progress bar shows; one per generator process."""

    commands: int = 0
    errors: int = 0
    joined: int = 0
    packets: int = 0
    leaked: int = 0


COUNTERS = Counters()


@dataclass
class RoomBase:
    index: int
    circle_id: str
    ws_url: str
    moderator_token: str
    member_token: str
    members: int
    pending: list[Pending] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    joins: list[float] = field(default_factory=list)  # hello → welcome/lobby, ms
    admits: list[float] = field(default_factory=list)  # admit sent → admitted, ms
    lobby_notices: list[float] = field(default_factory=list)  # hello → moderator's lobby_waiting, ms
    acks: list[float] = field(default_factory=list)  # command → its ack, ms
    moderator: Client | None = None
    inside: list[Client] = field(default_factory=list)  # admitted members (not the moderator)
    _waiting: dict[str, asyncio.Future[float]] = field(default_factory=dict)
    _gone: list[Client] = field(default_factory=list)
    _seq: int = 0
    _dirty: bool = False  # a command failed: the next `tidy` repairs the room
    phase: str = "join"

    # --- joining ----------------------------------------------------------------------

    def _on_moderator_event(self, client: Client, frame: Frame, at: float) -> None:
        if frame["name"] == "lobby_waiting":
            member_id = frame["data"]["member"]["id"]
            fut = self._waiting.setdefault(member_id, asyncio.get_running_loop().create_future())
            if not fut.done():
                fut.set_result(at)

    def everyone(self) -> list[Client]:
        assert self.moderator is not None
        return [self.moderator, *self.inside]

    async def hello(self, client: Client, token: str, expect: tuple[str, ...]) -> Frame:
        await client.connect()
        first = client.expect("welcome", "lobby")
        sent = time.perf_counter()
        await client.send({"type": "hello", "token": token, "name": client.name, "listen_only": False})
        frame, at = await asyncio.wait_for(first, JOIN_TIMEOUT)
        if frame["type"] not in expect:
            raise Closed(f"expected {expect}, got {frame['type']}")
        self.joins.append((at - sent) * 1000)
        client.member_id = frame["member_id"]
        client.role = frame.get("role", "member")
        client.hello_sent = sent  # type: ignore[attr-defined]
        return frame

    async def join_moderator(self) -> None:
        mod = Client(self.ws_url, f"Pendamping{self.index}")
        mod.on_event = self._on_moderator_event
        self.moderator = mod
        await self.hello(mod, self.moderator_token, ("welcome",))
        COUNTERS.joined += 1

    async def join_member(self, name: str) -> Client:
        """hello → lobby; the moderator admits on lobby_waiting; → admitted."""
        assert self.moderator is not None
        client = Client(self.ws_url, name)
        await self.hello(client, self.member_token, ("lobby",))
        loop = asyncio.get_running_loop()
        noticed = self._waiting.setdefault(client.member_id, loop.create_future())
        at = await asyncio.wait_for(noticed, JOIN_TIMEOUT)
        self._waiting.pop(client.member_id, None)
        self.lobby_notices.append((at - client.hello_sent) * 1000)  # type: ignore[attr-defined]
        admitted = client.expect("admitted")
        recipients = self.everyone()
        ok = await self.command(self.moderator, "admit", "member_joined", recipients,
                                member_id=client.member_id)
        if not ok:
            raise Closed("admit refused")
        frame, at = await asyncio.wait_for(admitted, JOIN_TIMEOUT)
        self.admits.append((at - self.pending[-1].sent) * 1000)
        self.inside.append(client)
        COUNTERS.joined += 1
        return client

    async def join_all(self, names: list[str]) -> None:
        await self.join_moderator()
        for name in names:
            await self.join_member(name)

    # --- commands ---------------------------------------------------------------------

    async def command(self, client: Client, type_: str, event: str, recipients: list[Client],
                      text: str | None = None, **fields: Any) -> bool:
        if text is not None:
            fields["text"] = text
        try:
            answer, sent, at = await client.command(type_, **fields)
        except Closed:
            self._dirty = True
            self.errors[type_] += 1
            self.error_codes["closed"] += 1
            COUNTERS.errors += 1
            return False
        COUNTERS.commands += 1
        if answer["type"] == "error":
            self._dirty = True
            self.errors[type_] += 1
            self.error_codes[str(answer.get("code"))] += 1
            COUNTERS.errors += 1
            return False
        self.acks.append((at - sent) * 1000)
        self.pending.append(Pending(type_, event, int(answer.get("version", 0)), sent, list(recipients), text,
                                    self.phase))
        return True

    def note_text(self) -> str:
        self._seq += 1
        return f"lt{self.index}-{self._seq} I would like to talk later"

    # --- results ----------------------------------------------------------------------

    def latencies(self) -> tuple[dict[str, list[float]], Counter[str], list[tuple[float, float]]]:
        """Per command: every recipient's latency in ms (commands of the join burst under
        "<command>@join"); the deliveries that never came; (sent, ms) for a timeline."""
        out: dict[str, list[float]] = {}
        missing: Counter[str] = Counter()
        timeline: list[tuple[float, float]] = []
        for p in self.pending:
            key = p.command if p.phase == "steady" else f"{p.command}@join"
            samples = out.setdefault(key, [])
            for client in p.recipients:
                if p.text is not None:
                    at = next((t for name, text, t in client.ephemeral if name == p.event and text == p.text),
                              None)
                else:
                    at = client.events.get((p.version, p.event))
                if at is None:
                    missing[key] += 1
                else:
                    samples.append((at - p.sent) * 1000)
                    timeline.append((p.sent, samples[-1]))
        return out, missing, timeline

    def record(self) -> dict[str, Any]:
        latencies, missing, timeline = self.latencies()
        return {
            "room": self.index, "circle_id": self.circle_id, "members": self.members,
            "latency_ms": latencies, "missing": dict(missing), "errors": dict(self.errors),
            "error_codes": dict(self.error_codes), "join_ms": self.joins, "admit_ms": self.admits,
            "lobby_notice_ms": self.lobby_notices, "ack_ms": self.acks,
            "commands": sum(1 for p in self.pending if p.phase == "steady"), "timeline": timeline,
        }

    async def close(self) -> None:
        clients = [*self.everyone(), *self._gone] if self.moderator else []
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


class SignalingRoom(RoomBase):
    """The scripted session of one room."""

    async def run(self, until: float, pace: float) -> None:
        assert self.moderator is not None
        mod = self.moderator
        self.phase = "steady"
        await asyncio.sleep(random.uniform(0, pace))  # rooms out of step with each other
        start = time.monotonic()
        # Spread over the run: people do not all leave at the same second.
        leave_at = start + (until - start) * random.uniform(0.15, 0.75)
        left = False
        cycle = 0
        max_cycles = int((until - start) / pace) + 1

        async def step(client: Client, type_: str, event: str, audience: list[Client],
                       text: str | None = None, **fields: Any) -> bool:
            if time.monotonic() >= until:
                return False
            ok = await self.command(client, type_, event, audience, text, **fields)
            await asyncio.sleep(pace)
            return ok

        while time.monotonic() < until and cycle < max_cycles:
            n = len(self.inside)
            if n < 2:
                break
            if not left and time.monotonic() >= leave_at:
                left = True
                await self.quiet_leave_and_rejoin(cycle % n, until, pace)
                continue
            a, b = self.inside[cycle % n], self.inside[(cycle + 1) % n]
            everyone = self.everyone()
            await step(a, "raise_hand", "hand_raised", everyone)
            await step(b, "raise_hand", "hand_raised", everyone)
            await step(mod, "give_floor", "floor_given", everyone, member_id=a.member_id)
            await step(a, "unmute_self", "unmuted", everyone)
            await step(mod, "next", "floor_given", everyone)
            await step(mod, "mute", "muted", everyone, member_id=a.member_id)
            await step(b, "private_note", "private_note", [mod], text=self.note_text(),
                       need_support=False)
            await step(mod, "next", "floor_released", everyone)
            cycle += 1
            if time.monotonic() < until:
                await self.tidy()

    async def tidy(self) -> None:
        """Between cycles nobody should hold the floor or wait in the queue (a refused
        command must not derail the next cycle): `sync` and undo what is left."""
        if not self._dirty:  # the script leaves traces only when a command failed
            return
        self._dirty = False
        assert self.moderator is not None
        mod = self.moderator
        fut = mod.expect("snapshot")  # `snapshot` carries no ref: wait for the frame itself
        try:
            await mod.send({"type": "sync"})
            frame, _ = await asyncio.wait_for(fut, 5)
        except (TimeoutError, Closed, OSError):
            return
        state = frame["state"]
        by_id = {c.member_id: c for c in self.inside}
        try:
            for member_id in state.get("queue", []):
                if member_id in by_id:
                    await by_id[member_id].command("lower_hand")
            if (state.get("floor") or {}).get("holder"):
                await mod.command("release_floor")
            if any(not m.get("muted") and m.get("role") != "moderator" for m in state.get("members", [])):
                await mod.command("mute_all")
        except Closed:
            pass

    async def quiet_leave_and_rejoin(self, position: int, until: float, pace: float) -> None:
        assert self.moderator is not None
        leaver = self.inside[position]
        others = [c for c in self.everyone() if c is not leaver]
        ok = await self.command(leaver, "leave_quietly", "member_left", others, need_support=False)
        if ok:  # the moderators also get the private notice, same version
            p = self.pending[-1]
            self.pending.append(Pending("leave_quietly(moderator)", "member_left_quietly", p.version, p.sent,
                                        [self.moderator]))
        self.inside.remove(leaver)
        self._gone.append(leaver)
        await asyncio.sleep(pace)
        if time.monotonic() >= until:
            return
        try:
            client = await self.join_member(leaver.name)
        except (Closed, TimeoutError, OSError):
            self.errors["rejoin"] += 1
            self.error_codes["rejoin"] += 1
            COUNTERS.errors += 1
            return
        self.inside.remove(client)
        self.inside.insert(position, client)
        await asyncio.sleep(pace)


# --- the generator process ----------------------------------------------------------------


def member_names(members: int) -> list[str]:
    return [f"Anggota{i}" for i in range(1, members)]


async def report_progress(queue: Any, kind: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        queue.put(("progress", kind, COUNTERS.__dict__.copy()))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass
    queue.put(("progress", kind, COUNTERS.__dict__.copy()))


LOOP_LAG: list[float] = []  # ms the generator's event loop woke up late (every 20 ms)


async def watch_loop_lag(stop: asyncio.Event) -> None:
    """How late this generator's event loop runs: when it lags, its own timestamps do too,
    so the report shows it next to the latencies it measured."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.02)
        LOOP_LAG.append(max(0.0, (loop.time() - before - 0.02) * 1000))


async def wait_go(go: Any, timeout: float) -> bool:
    return bool(await asyncio.to_thread(go.wait, timeout))


def room_records(rooms: list[Any], joined: list[Any], kind: str) -> list[dict[str, Any]]:
    """Each room's record, marked with `kind`, and why it could not join where it failed
    (`joined` holds each room's join result or exception, in the same order)."""
    records = []
    for room, result in zip(rooms, joined, strict=True):
        rec = room.record()
        rec["kind"] = kind
        if isinstance(result, BaseException):
            rec["join_failed"] = repr(result)[:200]
        records.append(rec)
    return records


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _main(cfg: dict[str, Any], queue: Any, go: Any) -> None:
    stop = asyncio.Event()
    progress = asyncio.create_task(report_progress(queue, "signaling", stop))
    rooms = [SignalingRoom(r["index"], r["circle_id"], cfg["ws_url"], r["moderator"], r["member"],
                           cfg["members"]) for r in cfg["rooms"]]
    names = member_names(cfg["members"])
    try:
        joined = await asyncio.gather(*(asyncio.wait_for(room.join_all(names), cfg["join_timeout"])
                                        for room in rooms), return_exceptions=True)
        failed = [r for r in joined if isinstance(r, BaseException)]
        queue.put(("joined", "signaling", {"failed": len(failed),
                                           "reasons": sorted({repr(f)[:120] for f in failed})}))
        if not await wait_go(go, cfg["join_timeout"] + 60):
            raise RuntimeError("no go signal")
        cpu0 = self_cpu()
        lag_stop = asyncio.Event()
        lag = asyncio.create_task(watch_loop_lag(lag_stop))
        until = time.monotonic() + cfg["duration"]
        ok_rooms = [room for room, r in zip(rooms, joined, strict=True) if not isinstance(r, BaseException)]
        await asyncio.gather(*(asyncio.wait_for(room.run(until, cfg["pace"]), cfg["duration"] + 30)
                               for room in ok_rooms), return_exceptions=True)
        await asyncio.sleep(DRAIN_SECONDS)
        cpu1 = self_cpu()
        lag_stop.set()
        await lag
        records = room_records(rooms, joined, "signaling")
        queue.put(("result", "signaling", {"rooms": records, "generator_cpu_s": cpu1 - cpu0, "loop_lag_ms": LOOP_LAG,
                                           "generator_pid": os.getpid()}))
    finally:
        stop.set()
        await progress
        await asyncio.gather(*(room.close() for room in rooms), return_exceptions=True)


def run_generator(kind: str, main: Callable[[dict[str, Any], Any, Any], Coroutine[Any, Any, None]],
                  cfg: dict[str, Any], queue: Any, go: Any) -> None:
    """Run one generator process's `main`; a failure is reported to the parent, which decides."""
    quiet_gc()
    try:
        asyncio.run(main(cfg, queue, go))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        queue.put(("failed", kind, repr(err)[:500]))


def run_process(cfg: dict[str, Any], queue: Any, go: Any) -> None:
    """Entry point of the signaling generator process."""
    run_generator("signaling", _main, cfg, queue, go)
