"""Lingkar's fan-out side by side with the bare relay anchor (issue 15): deliveries per CPU
second of the server, in interleaved rounds (Lingkar, anchor, Lingkar, anchor, …) on the same
machine, so that whatever else runs on it weighs on both alike. Not a test: numbers are
reported, never asserted.

    python -m loadtest.anchor --anchor ../shared/anchors/signaling [--sizes 200,400]
                              [--rounds 4] [--seconds 10] [--out rounds.jsonl]
                              [--clients own,ours]

Lingkar: `loadtest.fanout` on the memory store (its own `lingkar serve`, N circles × 8, a
command per circle every 200 ms). The anchor: the directory's `app:app` under uvicorn (memory
store, direct sends: a relay-only Starlette server, no rules, no validation, no store) driven
by the directory's own `fanout_client.py`, one command per room every 200 ms; its CPU window
is read by that client, after a warm-up of one second, as `loadtest.fanout`'s is. Both run
with this interpreter (the anchor needs uvicorn, starlette, msgpack, uvloop and websockets,
which Lingkar's environment has); the anchor's directory is only read. Before each run it
waits (at most --gate-wait seconds) for the machine to be quiet, as the anchor's own runs do.

`--clients own,ours` runs the anchor twice per round: after its own client, under Lingkar's
generator (`loadtest.fastclient`, speaking the anchor's protocol on the same schedule and CPU
window as `loadtest.fanout`). The two servers then face the same client. On loopback a
reader asleep when the server writes is woken in the server's system time, and the anchor's
own client (websockets' asyncio client, heavier per frame) is mostly awake when its server
writes, where Lingkar's light generator mostly sleeps: under Lingkar's generator the anchor's
system time per delivery rises, and its user time falls (README, "Signaling against a bare
relay").

Printed per round: deliveries per second, the server's CPU per delivery (user and system,
from /proc), deliveries per CPU-second and p99; the ratio of Lingkar's deliveries per
CPU-second to the anchor's in the same round; and how often each generator's event loop went
to sleep per command (a sleeping generator is woken by the server's writes, in the server's
system time: loopback delivers in the writer's context). Then the medians per size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from loadtest import fanout, fastclient
from testkit.loop import quiet_gc
from testkit.loop import run as run_loop
from testkit.ports import free_port
from testkit.procs import machine_busy_seconds, sleeps, stop, user_system_seconds
from testkit.stats import percentile

MEMBERS = 8

# Runs the anchor's client as it is, with its CPU window also read as user and system time
# of the server and as this process's sleeps: `common.cpu_seconds`, which the client's window
# calls at its start and end, is wrapped (the anchor's files are not changed).
_CLIENT = """
import json, runpy, sys
from testkit.procs import sleeps, user_system_seconds
sys.path.insert(0, {dir!r})
import common
server, marks, real = {server}, [], common.cpu_seconds
def wrapped(pid):
    if pid == server:
        marks.append((*user_system_seconds(pid), sleeps(), sleeps(pid)))
    return real(pid)
common.cpu_seconds = wrapped
sys.argv = ["fanout_client.py"] + sys.argv[1:]
try:
    runpy.run_path({client!r}, run_name="__main__")
finally:
    print("MARKS", json.dumps(marks), flush=True)
"""


def quiet(threshold: float, wait: float) -> float:
    """Wait (at most `wait` seconds) until the machine is quiet: all cores together busy less
    than `threshold` % of one core over 2 s, as the anchor's own runs do (`quiet_gate.py`);
    other work may share this machine. Returns the last reading; it never touches others."""
    deadline = time.monotonic() + wait
    while True:
        before, at = machine_busy_seconds(), time.monotonic()
        time.sleep(2)
        busy = 100 * (machine_busy_seconds() - before) / (time.monotonic() - at)
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def lingkar_round(rooms: int, seconds: float) -> dict[str, Any]:
    r = run_loop(fanout.run_store("memory", rooms, MEMBERS, seconds))
    n = max(1, r["overall"]["n"])
    user, system = r["server_user_seconds"], r["server_system_seconds"]
    return {"who": "lingkar", "rooms": rooms, "deliveries": r["overall"]["n"],
            "per_second": r["deliveries_per_second"], "user_us": 1e6 * user / n,
            "system_us": 1e6 * system / n, "per_cpu_second": n / max(user + system, 1e-9),
            "p99_ms": r["overall"]["p99_ms"], "missing": r["missing_deliveries"],
            "server_percent": r["server_cpu_percent_of_one_core"],
            "generator_percent": r["client_cpu_percent_of_one_core"],
            "generator_sleeps_per_command": r["generator_sleeps"] / (n / MEMBERS),
            "server_sleeps_per_command": r["server_sleeps"] / (n / MEMBERS)}


@contextlib.contextmanager
def anchor_server(directory: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The anchor's `app:app` under uvicorn (memory store, direct sends), up: (process, port)."""
    port = free_port()
    env = {**os.environ, "STORE": "memory", "SEND": "direct", "WAKE": "payload"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log", "--backlog", "4096"],
        cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    output: list[bytes] = []
    said = threading.Event()  # it printed "app ready", or its output ended

    def read() -> None:  # read all it prints (a full pipe would stop it), and say when it is up
        assert server.stdout is not None
        for line in server.stdout:
            output.append(line)
            if b"app ready" in line:
                said.set()
        said.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not said.wait(30) or not any(b"app ready" in line for line in output):
            raise RuntimeError("the anchor did not start: " + b"".join(output)[-500:].decode(errors="replace"))
        deadline = time.monotonic() + 30  # "app ready" is said at startup, before uvicorn binds
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the anchor does not listen") from None
                time.sleep(0.05)
        yield server, port
    finally:
        stop(server, 10)


def anchor_round(directory: Path, rooms: int, seconds: float) -> dict[str, Any]:
    """The anchor driven by its own client (`fanout_client.py`)."""
    out_path = Path(tempfile.gettempdir()) / f"anchor-results-{os.getpid()}.jsonl"
    try:
        with anchor_server(directory) as (server, port):
            code = _CLIENT.format(dir=str(directory), server=server.pid,
                                  client=str(directory / "fanout_client.py"))
            done = subprocess.run(
                [sys.executable, "-c", code, "--url", f"ws://127.0.0.1:{port}/room", "--rooms", str(rooms),
                 "--members", str(MEMBERS), "--warm", "1", "--duration", str(seconds), "--drain", "2",
                 "--server-pid", str(server.pid), "--out", str(out_path)],
                cwd=directory, capture_output=True, text=True, timeout=300 + seconds, check=False)
    finally:
        out_path.unlink(missing_ok=True)
    res = marks = None
    for line in done.stdout.splitlines():
        if line.startswith("JSON "):
            res = json.loads(line[5:])
        elif line.startswith("MARKS "):
            marks = json.loads(line[6:])
    if res is None or not marks:
        raise RuntimeError(f"the anchor's client failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    (u0, s0, c0, w0), (u1, s1, c1, w1) = marks[0], marks[-1]
    n = max(1, res["received"])
    return {"who": "anchor", "rooms": rooms, "deliveries": res["received"],
            "per_second": res["deliveries_per_s"], "user_us": 1e6 * (u1 - u0) / n,
            "system_us": 1e6 * (s1 - s0) / n, "per_cpu_second": n / max(u1 - u0 + s1 - s0, 1e-9),
            "p99_ms": res["p99_us"] / 1000, "missing": res["loss"],
            "server_percent": res["cpu_server_pct"], "generator_percent": res.get("cpu_client_pct"),
            "generator_sleeps_per_command": (c1 - c0) / (n / MEMBERS),
            "server_sleeps_per_command": (w1 - w0) / (n / MEMBERS)}


async def _drive_anchor(url: str, server_pid: int, rooms: int, seconds: float) -> dict[str, Any]:
    """The anchor's protocol (`/room/r{i}?m=m{k}`: a `joined` frame, then `cmd` in and `ev`
    out) under Lingkar's generator: the same light client (`loadtest.fastclient`), the same
    schedule (one command per circle every `fanout.PERIOD`, phases spread evenly), the same
    warm-up and CPU window as `loadtest.fanout`; its m0 sends, as the anchor's client does."""
    sockets: list[Any] = []
    try:
        limit = asyncio.Semaphore(fanout.CONNECT_CONCURRENCY)

        async def connect(r: int, k: int) -> Any:
            async with limit:
                ws = await fastclient.connect(f"{url}/r{r}?m=m{k}", open_timeout=30)
                sockets.append(ws)
                first = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))
                if first.get("op") != "joined":
                    raise RuntimeError(f"expected joined, got {first!r}")
                return ws

        started = time.perf_counter()
        room_sockets = await asyncio.gather(*(asyncio.gather(*(connect(r, k) for k in range(MEMBERS)))
                                              for r in range(rooms)))
        connect_seconds = time.perf_counter() - started
        quiet_gc()
        t0 = time.monotonic_ns()
        lo = t0 + int(fanout.WARMUP * 1e9)
        hi = lo + int(seconds * 1e9)
        samples: list[float] = []
        sent = [0]
        progress = fanout.Progress()

        async def reader(ws: Any) -> None:
            try:
                async for message in ws:
                    frame = msgpack.unpackb(message)
                    if frame.get("op") == "ev" and lo <= frame["t"] < hi:
                        samples.append((time.monotonic_ns() - frame["t"]) / 1e6)
                        progress.add()
            except fastclient.ConnectionClosed:
                pass

        async def driver(ws: Any, phase: float) -> None:
            seq = 0
            await asyncio.sleep(phase)
            tick = time.monotonic_ns()
            while tick < hi:
                seq += 1
                now = time.monotonic_ns()
                if lo <= now < hi:
                    sent[0] += 1
                await ws.send(msgpack.packb({"op": "cmd", "t": now, "seq": seq,
                                             "kind": "hand" if seq % 2 else "floor", "m": f"m{seq % MEMBERS}"}))
                tick += int(fanout.PERIOD * 1e9)
                await asyncio.sleep(max(0.0, (tick - time.monotonic_ns()) / 1e9))

        readers = [asyncio.create_task(reader(ws)) for group in room_sockets for ws in group]
        marks: list[tuple[float, float, int, int]] = []

        async def mark(at: int) -> None:
            await asyncio.sleep(max(0.0, (at - time.monotonic_ns()) / 1e9))
            marks.append((*user_system_seconds(server_pid), sleeps(), sleeps(server_pid)))

        client_before, client_from = time.process_time(), time.monotonic_ns()
        window = [asyncio.create_task(mark(lo)), asyncio.create_task(mark(hi))]
        await asyncio.gather(*(driver(group[0], fanout.PERIOD * i / rooms)
                               for i, group in enumerate(room_sockets)), *window)
        client_percent = 100 * (time.process_time() - client_before) / ((time.monotonic_ns() - client_from) / 1e9)
        expected = progress.target = sent[0] * MEMBERS
        if progress.count >= expected:
            progress.done.set()
        with contextlib.suppress(TimeoutError):  # late answers count; the missing ones are counted
            await asyncio.wait_for(progress.done.wait(), 5)
        for task in readers:
            task.cancel()
        return {"samples": samples, "expected": expected, "marks": marks,
                "connect_seconds": connect_seconds, "generator_percent": round(client_percent, 1)}
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


def anchor_round_lingkar_client(directory: Path, rooms: int, seconds: float) -> dict[str, Any]:
    """The anchor driven by Lingkar's own generator, so that both servers face the same
    client: how often it sleeps decides whom the server's writes have to wake (loopback
    charges that to the writer), and the anchor's own client is heavier and sleeps less."""
    with anchor_server(directory) as (server, port):
        r = run_loop(_drive_anchor(f"ws://127.0.0.1:{port}/room", server.pid, rooms, seconds))
    (u0, s0, c0, w0), (u1, s1, c1, w1) = r["marks"]
    n = max(1, len(r["samples"]))
    return {"who": "anchor+ours", "rooms": rooms, "deliveries": len(r["samples"]),
            "per_second": len(r["samples"]) / seconds, "user_us": 1e6 * (u1 - u0) / n,
            "system_us": 1e6 * (s1 - s0) / n, "per_cpu_second": n / max(u1 - u0 + s1 - s0, 1e-9),
            "p99_ms": percentile(sorted(r["samples"]), 99),
            "missing": r["expected"] - len(r["samples"]),
            "server_percent": round(100 * (u1 - u0 + s1 - s0) / seconds, 1),
            "generator_percent": r["generator_percent"],
            "generator_sleeps_per_command": (c1 - c0) / (n / MEMBERS),
            "server_sleeps_per_command": (w1 - w0) / (n / MEMBERS)}


_ANCHOR_ROUNDS = {"own": anchor_round, "ours": anchor_round_lingkar_client}
_DRIVEN_BY = {"own": "its own client", "ours": "Lingkar's generator"}


def _line(r: dict[str, Any]) -> str:
    return (f"{r['who']:>7} {r['rooms']}×{MEMBERS}: {r['per_second']:.0f} deliveries/s, server "
            f"{r['server_percent']} % of a core, user/system {r['user_us']:.1f}/{r['system_us']:.1f} µs "
            f"per delivery = {r['per_cpu_second']:.0f} per CPU-second; p99 {r['p99_ms']:.1f} ms; "
            f"missing {r['missing']}; generator {r['generator_percent']} %, "
            f"machine busy {r['machine_busy_before_percent']} % before; "
            f"sleeps per command: generator {r['generator_sleeps_per_command']:.2f}, "
            f"server {r['server_sleeps_per_command']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.anchor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchor", type=Path, required=True, help="the anchor's directory (app.py, fanout_client.py)")
    parser.add_argument("--sizes", default="200,400", help="circles (rooms) per run, comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, help="append every run here as a JSON line")
    parser.add_argument("--gate", type=float, default=15.0,
                        help="before each run, wait until the machine is busy less than this %% of a core")
    parser.add_argument("--gate-wait", type=float, default=60.0, help="… but no longer than this (seconds)")
    parser.add_argument("--clients", default="own",
                        help="what drives the anchor, in turn after each Lingkar run: 'own' (its "
                             "fanout_client.py), 'ours' (Lingkar's generator), or both: own,ours")
    args = parser.parse_args(argv)
    directory = args.anchor.resolve()
    if not (directory / "app.py").is_file() or not (directory / "fanout_client.py").is_file():
        parser.error(f"{directory} has no app.py and fanout_client.py")
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    clients = [x.strip() for x in args.clients.split(",") if x.strip()]
    if not clients or any(c not in _ANCHOR_ROUNDS for c in clients):
        parser.error(f"--clients: a comma-separated choice of {', '.join(_ANCHOR_ROUNDS)}")
    ratios: dict[tuple[int, str], list[float]] = {}
    for rooms in sizes:
        for k in range(1, args.rounds + 1):
            gates = [quiet(args.gate, args.gate_wait)]
            runs = [lingkar_round(rooms, args.seconds)]
            for client in clients:
                gates.append(quiet(args.gate, args.gate_wait))
                runs.append(_ANCHOR_ROUNDS[client](directory, rooms, args.seconds))
            for r, busy in zip(runs, gates, strict=True):
                r["machine_busy_before_percent"] = round(busy, 1)
            lingkar = runs[0]
            said = []
            for client, r in zip(clients, runs[1:], strict=True):
                r["ratio"] = lingkar["per_cpu_second"] / r["per_cpu_second"]
                lingkar.setdefault("ratio", r["ratio"])  # against the first anchor run
                ratios.setdefault((rooms, client), []).append(r["ratio"])
                said.append(f"ratio {r['ratio']:.2f} (anchor driven by {_DRIVEN_BY[client]})")
            print(f"round {k}, {rooms}×{MEMBERS}: {', '.join(said)}", flush=True)
            for r in runs:
                print("  " + _line(r), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps({**r, "round": k}) + "\n")
    for (rooms, client), rs in ratios.items():
        print(f"{rooms}×{MEMBERS}, anchor driven by {_DRIVEN_BY[client]}: ratios "
              f"{', '.join(f'{r:.2f}' for r in rs)}; median {statistics.median(rs):.2f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
