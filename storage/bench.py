"""Benchmarks of the room core (not a test; timings are reported, never asserted).

    python -m storage.bench [--commands N] [--latency-commands N]

1. Commands per second through the pure `rules.apply` on one core, with a realistic mix
   (raise/lower hand, give floor, next, mute/unmute, release).
2. p50/p99 latency of one command through `RoomManager.execute` on each store; the Redis store
   runs against a `redis-server` this bench starts on a free loopback port and stops after
   (`testkit.redis_server`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from rooms import commands as c
from rooms import rules
from rooms.errors import RoomError
from rooms.model import CircleSettings, Invite, Role, RoomState
from storage.manager import RoomManager
from storage.memory_store import MemoryStore
from storage.redis_store import RedisStore
from storage.store import Store
from testkit.redis_server import RedisServer
from testkit.stats import percentiles

MEMBERS = [f"m{i}" for i in range(10)]
INVITES = [Invite("inv-mod", Role.MODERATOR), Invite("inv-member", Role.MEMBER)]


def _circle(circle_id: str) -> CircleSettings:
    return CircleSettings(id=circle_id, title="bench", lobby=False, capacity=20)


def _joins() -> list[c.Command]:
    out: list[c.Command] = [c.Join("mod", "inv-mod", Role.MODERATOR, "mod", False, "h")]
    out += [c.Join(m, "inv-member", Role.MEMBER, m, False, "h") for m in MEMBERS]
    return out


def _mix(i: int) -> c.Command:
    """A moderated circle's traffic: hands up and down, turns given and passed on, mutes."""
    m = MEMBERS[i % len(MEMBERS)]
    step = (i // len(MEMBERS)) % 8
    options: list[c.Command] = [
        c.RaiseHand(m), c.UnmuteSelf(m), c.GiveFloor("mod", m), c.MuteSelf(m),
        c.RaiseHand(m), c.Next("mod"), c.LowerHand(m), c.ReleaseFloor("mod"),
    ]
    return options[step]


def bench_apply(n: int) -> tuple[float, int]:
    state = RoomState.new(_circle("bench"))
    state.invites = {i.id: i for i in INVITES}
    now = 1_700_000_000_000
    for cmd in _joins():
        state, _ = rules.apply(state, cmd, now)
    commands = [_mix(i) for i in range(n)]
    refused = 0
    start = time.perf_counter()
    for cmd in commands:
        now += 1
        try:
            state, _ = rules.apply(state, cmd, now)
        except RoomError:
            refused += 1
    return n / (time.perf_counter() - start), refused


async def bench_manager(store: Store, n: int) -> tuple[float, float, float]:
    manager = RoomManager(store)
    try:
        await manager.create(_circle("bench"), INVITES)
        for cmd in _joins():
            await manager.execute("bench", cmd)
        manager.subscribe("bench", 0).listen(lambda item: None)  # a live subscriber, as in a real circle
        timings: list[float] = []
        for i in range(n):
            cmd = _mix(i)
            start = time.perf_counter()
            with contextlib.suppress(RoomError):
                await manager.execute("bench", cmd)
            timings.append(time.perf_counter() - start)
        p50, p99 = percentiles(timings, 50, 99, scale=1000)
        return p50, p99, n / sum(timings)
    finally:
        await manager.close()


async def _run_stores(n: int) -> list[tuple[str, float, float, float]]:
    rows = []
    memory = MemoryStore()
    rows.append(("manager, memory store", *await bench_manager(memory, n)))
    await memory.close()
    with RedisServer() as server:
        redis = RedisStore(server.url)
        try:
            rows.append(("manager, redis store", *await bench_manager(redis, n)))
        finally:
            await redis.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=200_000)
    parser.add_argument("--latency-commands", type=int, default=5_000)
    args = parser.parse_args()

    rate, refused = bench_apply(args.commands)
    rows = asyncio.run(_run_stores(args.latency_commands))
    print(f"{'what':<26}{'p50 ms':>10}{'p99 ms':>10}{'commands/s':>14}   target")
    print(f"{'rules.apply, one core':<26}{'':>10}{'':>10}{rate:>14,.0f}   >= 50,000/s"
          f"  ({refused} of {args.commands} refused by the rules)")
    for name, p50, p99, per_s in rows:
        target = "p99 <= 2 ms" if "redis" in name else ""
        print(f"{name:<26}{p50:>10.3f}{p99:>10.3f}{per_s:>14,.0f}   {target}")


if __name__ == "__main__":
    main()
