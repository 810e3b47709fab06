"""Signaling fan-out benchmark (DESIGN §9): N circles × M members on a `lingkar serve`
subprocess; one command per circle every 200 ms (a member raises, then lowers, a hand) and
the time from its send to the matching event at EVERY member of the circle (the sender and
the moderator included). Reports p50/p95/p99/max overall and the worst circle's p99, and the
server's CPU (utime+stime from /proc) per store. Not a test: timings are reported, never
asserted.

    python -m loadtest.fanout [--store memory|redis|both] [--rooms 200] [--members 8]
                              [--seconds 10] [--out fanout.json]
    python -m loadtest.fanout --url URL --api-key KEY [--by-circle] [--pids PID,…] …
    python -m loadtest.fanout --store memory --rooms 400 --profile /tmp/fanout.prof

`--profile FILE` runs the server under cProfile over the measured window only (switched on
and off by SIGUSR1/SIGUSR2, which `python -m loadtest.fanout serve` installs before running
`server.cli`), writes the stats to FILE and prints the top entries per delivery and per
command. cProfile's own cost inflates every figure: compare profiles with each other, and
CPU per delivery only from runs without it.

With `--url` it loads a server that is already running (a proxy in front of several, with
`--by-circle`: hellos go to `/ws?c={circle}` and follow a `redirect`, as the web client's do);
`--pids` names the processes whose CPU is read. `measure()` is the loop itself, for other
benches (loadtest.cluster) that start their own deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import websockets

from loadtest import fastclient
from loadtest.procs import ServerProcess
from testkit.http import call
from testkit.loop import quiet_gc
from testkit.loop import run as run_loop
from testkit.procs import cpu_seconds, sleeps, user_system_seconds
from testkit.stats import percentile

PERIOD = 0.2  # one command per circle every 200 ms
WARMUP = 1.0  # seconds of commands before measuring
CONNECT_CONCURRENCY = 64


def summary(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"n": len(s), "p50_ms": percentile(s, 50), "p95_ms": percentile(s, 95),
            "p99_ms": percentile(s, 99), "max_ms": s[-1] if s else math.nan}


@dataclass
class Progress:
    """Measured deliveries so far; `done` is set once `target` (known at the end) is met."""

    count: int = 0
    target: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self) -> None:
        self.count += 1
        if self.target and self.count >= self.target:
            self.done.set()


@dataclass
class Room:
    index: int
    circle_id: str
    links: dict[str, str]
    sockets: list[Any] = field(default_factory=list)
    actor_id: str = ""
    # send time of the k-th command, and whether it is measured (after the warm-up); the k-th
    # hand event a socket sees answers the k-th command (each command toggles the hand once)
    sent: list[tuple[float, bool]] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)
    errors: int = 0
    progress: Progress | None = None


async def hello(ws_url: str, link: str, name: str, follow: bool = False) -> tuple[Any, str, int]:
    """A member in: (socket, member id, redirects followed). With `follow`, a `redirect` is
    followed (once, as the web client does) to the URL it names."""
    token = link.split("#t=", 1)[1]
    redirects = 0
    while True:
        ws = await fastclient.connect(ws_url, max_size=2**20, open_timeout=30)  # a light client
        await ws.send(msgpack.packb({"type": "hello", "token": token, "name": name, "listen_only": False}))
        frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))
        if frame.get("type") == "redirect" and follow and redirects == 0:
            redirects += 1
            await ws.close()
            ws_url = str(frame["url"]).replace("http", "ws", 1)
            continue
        if frame.get("type") != "welcome":
            await ws.close()
            raise RuntimeError(f"expected welcome, got {frame.get('type')}")
        return ws, str(frame["member_id"]), redirects


async def reader(room: Room, ws: Any) -> None:
    seen = 0
    try:
        async for message in ws:
            frame = msgpack.unpackb(message)
            kind = frame.get("type")
            if kind == "error":
                room.errors += 1
                continue
            if kind != "event" or frame.get("name") not in ("hand_raised", "hand_lowered"):
                continue
            if frame["data"].get("member_id") != room.actor_id:
                continue
            now = time.perf_counter()
            sent_at, measured = room.sent[seen]
            seen += 1
            if measured:
                room.samples.append((now - sent_at) * 1000)
                if room.progress is not None:
                    room.progress.add()
    except websockets.ConnectionClosed:
        pass


async def driver(room: Room, phase: float, stop_at: float, measure_from: float) -> None:
    actor = room.sockets[1]
    raised = False
    await asyncio.sleep(phase)
    tick = time.perf_counter()
    while tick < stop_at:
        raised = not raised
        room.sent.append((time.perf_counter(), tick >= measure_from))
        await actor.send(msgpack.packb({"type": "raise_hand" if raised else "lower_hand"}))
        tick += PERIOD
        await asyncio.sleep(max(0.0, tick - time.perf_counter()))


@dataclass
class Target:
    """Where the load goes: a base URL and its organizer key; with `by_circle` hellos go to
    `/ws?c={circle}` and follow a `redirect` (a proxy in front of several processes); `pids`
    names whose CPU is read, by role ("server" counts as the server's; others, such as
    "proxy" and "redis", are reported beside it)."""

    label: str
    url: str
    api_key: str
    by_circle: bool = False
    pids: dict[str, list[int]] = field(default_factory=dict)
    profiled: bool = False  # the server's profiler follows the window (SIGUSR1 on, SIGUSR2 off)


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:  # gone: what it used is not counted
            pass
    return total


def _user_system(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of `pids` (a process gone counts nothing)."""
    user = system = 0.0
    for pid in pids:
        try:
            u, s = user_system_seconds(pid)
        except OSError:
            continue
        user += u
        system += s
    return user, system


def _sleeps(pid: int | None = None) -> int:
    """How often a process's main thread (this thread when None) has gone to sleep
    (voluntary context switches). A generator that sleeps is woken by the server's writes, in
    the server's own system time (loopback delivers in the writer's context), and the other
    way round."""
    try:
        return sleeps(pid)
    except OSError:
        return 0


async def measure(target: Target, rooms_n: int, members_n: int, seconds: float) -> dict[str, Any]:
    """The measuring loop against a running deployment: create the circles, join everyone,
    drive one command per circle every PERIOD, and time every delivery."""
    sockets: list[Any] = []
    base, key = target.url, target.api_key
    ws_base = base.replace("http://", "ws://").replace("https://", "wss://") + "/ws"
    try:
        async def create(i: int) -> Room:
            body = {"title": f"fanout {i}", "capacity": max(2, members_n), "lobby": False,
                    "turn_seconds": 1800, "floor_mode": "hands"}
            status, circle = await asyncio.to_thread(call, "POST", base + "/api/circles", body, key)
            if status != 201:
                raise RuntimeError(f"POST /api/circles answered {status}: {circle}")
            return Room(i, circle["id"], circle["links"])

        rooms = await asyncio.gather(*(create(i) for i in range(rooms_n)))
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
        redirects = 0

        async def connect(room: Room, k: int) -> tuple[Any, str]:
            nonlocal redirects
            async with limit:
                link = room.links["moderator" if k == 0 else "member"]
                url = f"{ws_base}?c={room.circle_id}" if target.by_circle else ws_base
                ws, member_id, followed = await hello(url, link, f"m{k}", follow=target.by_circle)
                redirects += followed
                return ws, member_id

        async def join(room: Room) -> None:
            joined = await asyncio.gather(*(connect(room, k) for k in range(members_n)))
            room.sockets = [ws for ws, _ in joined]  # seat order: the moderator first
            room.actor_id = joined[1][1]
            sockets.extend(room.sockets)

        started = time.perf_counter()
        await asyncio.gather(*(join(room) for room in rooms))
        connect_seconds = time.perf_counter() - started
        quiet_gc()  # the generator's own pauses must not pass for the server's latency
        progress = Progress()
        for room in rooms:
            room.progress = progress
        readers = [asyncio.create_task(reader(room, ws)) for room in rooms for ws in room.sockets]

        t0 = time.perf_counter()
        measure_from = t0 + WARMUP
        stop_at = measure_from + seconds
        cpu_before: dict[str, float] = {}
        split_before: list[float] = []

        async def cpu_mark() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            cpu_before.update({role: _cpu(pids) for role, pids in target.pids.items()})
            split_before.extend(_user_system(target.pids.get("server", [])))
            split_before.append(_sleeps())
            split_before.append(sum(_sleeps(pid) for pid in target.pids.get("server", [])))
            cpu_before["at"] = time.perf_counter()
            _signal_servers(target, signal.SIGUSR1)

        client_before, client_from = time.process_time(), time.perf_counter()
        marker = asyncio.create_task(cpu_mark())
        await asyncio.gather(*(driver(room, PERIOD * i / rooms_n, stop_at, measure_from)
                               for i, room in enumerate(rooms)))
        await marker
        cpu_used = {role: _cpu(pids) - cpu_before[role] for role, pids in target.pids.items()}
        user, system = _user_system(target.pids.get("server", []))
        sleeps = _sleeps() - int(split_before[2])
        server_sleeps = sum(_sleeps(pid) for pid in target.pids.get("server", [])) - int(split_before[3])
        _signal_servers(target, signal.SIGUSR2)
        client_cpu = time.process_time() - client_before
        # An overloaded generator finishes its schedule late: CPU is per second of the window
        # actually read, and the lag is reported (its sends bunch up; latencies then include it).
        ended = time.perf_counter()
        window, lag = ended - cpu_before["at"], max(0.0, ended - stop_at - PERIOD)  # the last tick ends ≤ PERIOD after
        expected = sum(sum(1 for _, m in room.sent if m) * len(room.sockets) for room in rooms)
        progress.target = expected
        if progress.count >= expected:
            progress.done.set()
        try:  # late answers are measured, not dropped; the missing ones are counted
            await asyncio.wait_for(progress.done.wait(), 5)
        except TimeoutError:
            pass

        all_samples = [s for room in rooms for s in room.samples]
        per_room = [summary(room.samples) for room in rooms]
        missing = expected - len(all_samples)
        server_cpu = cpu_used.get("server", math.nan)
        cpu_window = max(window, 1e-9)
        result = {
            "store": target.label, "rooms": rooms_n, "members": members_n, "seconds": seconds,
            "commands_per_second": rooms_n / PERIOD, "events_per_second": rooms_n * members_n / PERIOD,
            "connect_seconds": round(connect_seconds, 2),
            "overall": summary(all_samples),
            "deliveries_per_second": round(len(all_samples) / seconds, 1),
            "worst_room_p99_ms": max((r["p99_ms"] for r in per_room if r["n"]), default=math.nan),
            "missing_deliveries": missing,
            "command_errors": sum(room.errors for room in rooms),
            "redirects_at_join": redirects,
            "server_cpu_seconds": round(server_cpu, 3),
            "server_user_seconds": round(user - split_before[0], 3),
            "server_system_seconds": round(system - split_before[1], 3),
            "generator_sleeps": sleeps,
            "server_sleeps": server_sleeps,
            "server_cpu_percent_of_one_core": round(100 * server_cpu / cpu_window, 1),
            "cpu_percent_of_one_core": {role: round(100 * used / cpu_window, 1) for role, used in cpu_used.items()},
            "client_cpu_percent_of_one_core": round(100 * client_cpu / max(ended - client_from, 1e-9), 1),
            "generator_lag_seconds": round(lag, 2),
            "per_room": per_room,
        }
        for task in readers:
            task.cancel()
        return result
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


def _signal_servers(target: Target, sig: signal.Signals) -> None:
    if target.profiled:
        for pid in target.pids.get("server", []):
            os.kill(pid, sig)


async def run_store(store_label: str, rooms_n: int, members_n: int, seconds: float,
                    profile: Path | None = None) -> dict[str, Any]:
    server: ServerProcess | None = None
    log_path = Path(tempfile.gettempdir()) / f"lingkar-fanout-{store_label}-{os.getpid()}.log"
    try:
        if profile is None:
            server = ServerProcess(store_label, log_path)
        else:  # an absolute path, removed beforehand (see main)
            server = ServerProcess(store_label, log_path, module="loadtest.fanout",
                                   env={PROFILE_ENV: str(profile)})
        await asyncio.to_thread(server.start)
        target = Target(store_label, server.url, server.api_key, pids={"server": [server.pid]},
                        profiled=profile is not None)
        return await measure(target, rooms_n, members_n, seconds)
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        log_path.unlink(missing_ok=True)


def _fmt(r: dict[str, Any]) -> str:
    o = r["overall"]
    return (f"{r['store']:>6}: {r['rooms']}×{r['members']}, {o['n']} deliveries in {r['seconds']:.0f} s: "
            f"p50 {o['p50_ms']:.2f} ms, p95 {o['p95_ms']:.2f} ms, p99 {o['p99_ms']:.2f} ms, "
            f"max {o['max_ms']:.2f} ms; worst room p99 {r['worst_room_p99_ms']:.2f} ms; "
            f"missing {r['missing_deliveries']}; server CPU {r['server_cpu_percent_of_one_core']} % of a core "
            + "".join(f"({role} {pct} %) " for role, pct in r["cpu_percent_of_one_core"].items() if role != "server")
            + f"(client {r['client_cpu_percent_of_one_core']} %)")


PROFILE_ENV = "LINGKAR_FANOUT_PROFILE"


def serve_profiled() -> int:
    """`python -m loadtest.fanout serve`: `server.cli serve` in this process, with cProfile
    switched on by SIGUSR1 and off by SIGUSR2, which writes the stats to $LINGKAR_FANOUT_PROFILE
    (renamed into place once complete)."""
    import cProfile
    import runpy

    out = Path(os.environ[PROFILE_ENV])
    profiler = cProfile.Profile()

    def on(signum: int, frame: Any) -> None:
        profiler.enable()

    def off(signum: int, frame: Any) -> None:
        profiler.disable()
        partial = out.with_suffix(".part")
        profiler.dump_stats(partial)
        partial.replace(out)

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    sys.argv = ["lingkar", "serve"]
    try:
        runpy.run_module("server.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def print_profile(path: Path, result: dict[str, Any], top: int = 30) -> None:
    """The profile's top entries by own time, in µs per delivery and per command."""
    import pstats

    stats = pstats.Stats(str(path))
    deliveries = max(1, result["overall"]["n"])
    commands = max(1, deliveries // result["members"])
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    total = sum(v[2] for _, v in rows)
    print(f"profile {path}: {total:.2f} s own time in the window; {deliveries} deliveries, "
          f"{commands} commands: {1e6 * total / deliveries:.1f} µs per delivery")
    print(f"{'calls':>9} {'own µs/deliv':>12} {'cum µs/cmd':>11}  function")
    for (file, line, name), (_, calls, own, cum, _) in rows[:top]:
        where = f"{Path(file).name}:{line}({name})" if line else name
        print(f"{calls:>9} {1e6 * own / deliveries:>12.2f} {1e6 * cum / commands:>11.1f}  {where}")


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["serve"]:
        return serve_profiled()
    parser = argparse.ArgumentParser(prog="python -m loadtest.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["memory", "redis", "both"], default="both")
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--url", help="load a running deployment at this URL instead (with --api-key)")
    parser.add_argument("--api-key", default=os.environ.get("LINGKAR_API_KEY"))
    parser.add_argument("--by-circle", action="store_true",
                        help="with --url: hellos to /ws?c={circle}, following a redirect (a proxy in front)")
    parser.add_argument("--pids", default="", help="with --url: the server processes' pids, comma-separated, for CPU")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--profile", type=Path,
                        help="run the server under cProfile over the window and write its stats here")
    args = parser.parse_args(argv)
    if args.members < 2 or args.rooms < 1 or not 0 < args.seconds <= 600:
        parser.error("need --members ≥ 2, --rooms ≥ 1, 0 < --seconds ≤ 600")
    if args.url and not args.api_key:
        parser.error("--url needs --api-key (or LINGKAR_API_KEY)")
    results = []
    if args.url:
        pids = [int(p) for p in args.pids.split(",") if p.strip()]
        target = Target("url", args.url.rstrip("/"), args.api_key, args.by_circle, {"server": pids} if pids else {})
        results.append(run_loop(measure(target, args.rooms, args.members, args.seconds)))
        print(_fmt(results[-1]), flush=True)
    else:
        stores = ["memory", "redis"] if args.store == "both" else [args.store]
        for store in stores:
            profile = None
            if args.profile is not None:
                profile = args.profile if len(stores) == 1 else args.profile.with_suffix(f".{store}.prof")
                profile = profile.resolve()
                profile.unlink(missing_ok=True)
            result = run_loop(run_store(store, args.rooms, args.members, args.seconds, profile))
            print(_fmt(result), flush=True)
            if profile is not None:
                for _ in range(100):  # written by the server once told (SIGUSR2)
                    if profile.exists():
                        break
                    time.sleep(0.05)
                print_profile(profile, result)
            results.append(result)
    report = json.dumps({"results": results}, indent=1)
    if args.out:
        args.out.write_text(report)
    else:
        print(json.dumps([{k: v for k, v in r.items() if k != "per_room"} for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
