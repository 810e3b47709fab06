"""Lingkar's fan-out side by side with the bare relay anchor (issue 15): deliveries per CPU
second of the server, in interleaved rounds (Lingkar, anchor, Lingkar, anchor, …) on the same
machine, so that whatever else runs on it weighs on both alike. Not a test: numbers are
reported, never asserted.

    python -m loadtest.anchor --anchor ../shared/anchors/signaling [--sizes 200,400]
                              [--rounds 4] [--seconds 10] [--out rounds.jsonl]

Lingkar: `loadtest.fanout` on the memory store (its own `lingkar serve`, N circles × 8, a
command per circle every 200 ms). The anchor: the directory's `app:app` under uvicorn (memory
store, direct sends: a relay-only Starlette server, no rules, no validation, no store) driven
by the directory's own `fanout_client.py`, one command per room every 200 ms; its CPU window
is read by that client, after a warm-up of one second, as `loadtest.fanout`'s is. Both run
with this interpreter (the anchor needs uvicorn, starlette, msgpack, uvloop and websockets,
which Lingkar's environment has); the anchor's directory is only read. Before each run it
waits (at most --gate-wait seconds) for the machine to be quiet, as the anchor's own runs do.

Printed per round: deliveries per second, the server's CPU per delivery (user and system,
from /proc), deliveries per CPU-second and p99; the ratio of Lingkar's deliveries per
CPU-second to the anchor's in the same round; and how often each generator's event loop went
to sleep per command (a sleeping generator is woken by the server's writes, in the server's
system time: loopback delivers in the writer's context). Then the medians per size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loadtest import fanout
from testkit.loop import run as run_loop
from testkit.ports import free_port
from testkit.procs import machine_busy_seconds, stop

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


def anchor_round(directory: Path, rooms: int, seconds: float) -> dict[str, Any]:
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
    out_path = Path(tempfile.gettempdir()) / f"anchor-results-{os.getpid()}.jsonl"
    try:
        if not said.wait(30) or not any(b"app ready" in line for line in output):
            raise RuntimeError("the anchor did not start: " + b"".join(output)[-500:].decode(errors="replace"))
        code = _CLIENT.format(dir=str(directory), server=server.pid,
                              client=str(directory / "fanout_client.py"))
        done = subprocess.run(
            [sys.executable, "-c", code, "--url", f"ws://127.0.0.1:{port}/room", "--rooms", str(rooms),
             "--members", str(MEMBERS), "--warm", "1", "--duration", str(seconds), "--drain", "2",
             "--server-pid", str(server.pid), "--out", str(out_path)],
            cwd=directory, capture_output=True, text=True, timeout=300 + seconds, check=False)
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
    finally:
        stop(server, 10)
        out_path.unlink(missing_ok=True)


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
    args = parser.parse_args(argv)
    directory = args.anchor.resolve()
    if not (directory / "app.py").is_file() or not (directory / "fanout_client.py").is_file():
        parser.error(f"{directory} has no app.py and fanout_client.py")
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    ratios: dict[int, list[float]] = {}
    for rooms in sizes:
        for k in range(1, args.rounds + 1):
            gates = [quiet(args.gate, args.gate_wait)]
            lingkar = lingkar_round(rooms, args.seconds)
            gates.append(quiet(args.gate, args.gate_wait))
            pair = [lingkar, anchor_round(directory, rooms, args.seconds)]
            for r, busy in zip(pair, gates, strict=True):
                r["machine_busy_before_percent"] = round(busy, 1)
            ratio = pair[0]["per_cpu_second"] / pair[1]["per_cpu_second"]
            ratios.setdefault(rooms, []).append(ratio)
            print(f"round {k}, {rooms}×{MEMBERS}: ratio {ratio:.2f}", flush=True)
            for r in pair:
                print("  " + _line(r), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps({**r, "round": k, "ratio": ratio}) + "\n")
    for rooms, rs in ratios.items():
        print(f"{rooms}×{MEMBERS}: ratios {', '.join(f'{r:.2f}' for r in rs)}; median {statistics.median(rs):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
