"""Churn soak (issue 17): does a circle leave anything behind in the server once it ended?

Rounds of N circles on a `lingkar serve` subprocess of its own (free loopback port; with
`--store redis` a throwaway `redis-server` too). In every circle of a round, all at once: the
organizer creates it, a moderator joins, four members knock and are admitted from the lobby,
each raises a hand and leaves (every other one quietly), and the organizer ends the circle
(`DELETE /api/circles/{id}`). After each round the soak waits until the server reports no
circle and no connection, then reads the server's RSS (VmRSS, /proc/<pid>/status). With
`--media-circles K`, everyone in the first K circles of a round also connects to the media
relay (an aiortc peer listening on its slots, `loadtest.peer`) before the hands go up, and
closes it on the way out.

Verdict: the RSS after the last round is within `--tolerance` (5 %) of the warm level, the
RSS after round `--warm-round` (5), once at least 2,000 circles came and went. The exit
status is 1 when it grew more, or when circles failed (2 when the run was too short to say).
The warm level is taken after round 5, not 2: with nothing kept per circle, the allocator's
high-water mark still rose in steps of 1–4 MiB now and then in rounds 3–5 (100 circles a
round, the server at ~100 MiB), enough to fail a 5 % test now and then; a leak is a trend
instead, which the verdict also reports (least squares over the rounds after the warm one).

    python -m loadtest.soak --store memory|redis [--circles 100] [--rounds 20] [--members 4]
                            [--media-circles 0] [--tracemalloc DIR [--frames 16]] [--out soak.json]

With `--tracemalloc DIR` the server runs under `loadtest.tracemem`, which after every round
writes DIR/growth-<n>.txt (the top of each is printed): the reference cycles a full
collection finds, by type (what waits for the rare full collections of `server.gctune`),
then the growth of what is still reachable since the previous round, by traceback.
`--frames 0` leaves tracing off and takes the census of cycles only, at full speed; with
tracing the rounds are ~20 times slower and the RSS is inflated, so there is no verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.client import Client, Closed, Frame
from loadtest.procs import ServerProcess
from testkit.http import call
from testkit.loop import run as run_loop
from testkit.procs import rss_bytes

MIN_CIRCLES_FOR_VERDICT = 2000
STEP_TIMEOUT = 15.0  # any one wait for the server (a frame, a close)
QUIET_TIMEOUT = 30.0  # after a round, until the server shows no circle and no connection
TRACE_TIMEOUT = 120.0  # a tracemalloc snapshot of a big heap takes a while
CONNECT_CONCURRENCY = 64
ENDED = 4000  # the close code of a circle its moderator or organizer ended (DESIGN §5)


@dataclass
class RoundResult:
    round: int
    circles: int
    seconds: float
    rss: int
    failures: Counter[str] = field(default_factory=Counter)


class Soak:
    def __init__(self, base_url: str, api_key: str, members: int, media_circles: int = 0) -> None:
        self.base = base_url
        self.key = api_key
        self.ws_url = base_url.replace("http://", "ws://") + "/ws"
        self.members = members
        self.media_circles = media_circles
        self.connect_limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await asyncio.to_thread(call, method, self.base + path, body, self.key)

    async def hello(self, client: Client, link: str, expect: str) -> Frame:
        async with self.connect_limit:
            await client.connect(STEP_TIMEOUT)
        first = client.expect("welcome", "lobby")
        await client.send({"type": "hello", "token": link.split("#t=", 1)[1], "name": client.name,
                           "listen_only": False})
        frame, _ = await asyncio.wait_for(first, STEP_TIMEOUT)
        if frame["type"] != expect:
            raise Closed(f"hello: expected {expect}, got {frame['type']}")
        client.member_id = str(frame["member_id"])
        return frame

    async def circle(self, index: int) -> None:
        """One circle's whole life. Raises on anything unexpected (the round counts it)."""
        status, circle = await self.api("POST", "/api/circles", {
            "title": f"soak {index}", "language": "en", "capacity": 15, "floor_mode": "hands",
            "lobby": True, "turn_seconds": 1800})
        if status != 201:
            raise RuntimeError(f"create answered {status}")
        circle_id, links = circle["id"], circle["links"]
        loop = asyncio.get_running_loop()
        knocks: dict[str, asyncio.Future[None]] = {}

        def on_moderator_event(client: Client, frame: Frame, at: float) -> None:
            if frame.get("name") == "lobby_waiting":
                fut = knocks.setdefault(frame["data"]["member"]["id"], loop.create_future())
                if not fut.done():
                    fut.set_result(None)

        mod = Client(self.ws_url, f"Pendamping {index}")
        mod.on_event = on_moderator_event
        people = [mod]
        peers: list[Any] = []
        try:
            await self.hello(mod, links["moderator"], "welcome")

            async def member(k: int) -> Client:
                client = Client(self.ws_url, f"Anggota {index}.{k}")
                people.append(client)
                await self.hello(client, links["member"], "lobby")
                knocked = knocks.setdefault(client.member_id, loop.create_future())
                await asyncio.wait_for(knocked, STEP_TIMEOUT)
                admitted = client.expect("admitted")
                answer, _, _ = await mod.command("admit", STEP_TIMEOUT, member_id=client.member_id)
                if answer["type"] != "ack":
                    raise RuntimeError(f"admit: {answer.get('code')}")
                await asyncio.wait_for(admitted, STEP_TIMEOUT)
                return client

            inside = await asyncio.gather(*(member(k) for k in range(self.members)))
            if index < self.media_circles:
                await asyncio.gather(*(self.media(client, peers) for client in [mod, *inside]))
            for client in inside:
                answer, _, _ = await client.command("raise_hand", STEP_TIMEOUT)
                if answer["type"] != "ack":
                    raise RuntimeError(f"raise_hand: {answer.get('code')}")
            for k, client in enumerate(inside):
                answer, _, _ = await client.command("leave_quietly" if k % 2 else "leave", STEP_TIMEOUT)
                if answer["type"] != "ack":
                    raise RuntimeError(f"leave: {answer.get('code')}")
                await client.closed(STEP_TIMEOUT)
            status, _ = await self.api("DELETE", f"/api/circles/{circle_id}")
            if status != 204:
                raise RuntimeError(f"end answered {status}")
            code = await mod.closed(STEP_TIMEOUT)
            if code != ENDED:
                raise RuntimeError(f"the moderator was closed with {code}, not {ENDED}")
        finally:
            await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
            await asyncio.gather(*(c.close() for c in people), return_exceptions=True)

    async def media(self, client: Client, peers: list[Any]) -> None:
        """Connect `client` to the relay: offer, answer, ICE and DTLS done."""
        from loadtest.peer import LoadPeer  # aiortc only when media is asked for

        peer = LoadPeer(lambda *heard: None)
        peers.append(peer)
        answer, _, _ = await client.command("offer", STEP_TIMEOUT, sdp=await peer.offer())
        if answer["type"] != "answer":
            raise RuntimeError(f"offer: {answer.get('code')}")
        await peer.accept(answer["sdp"])
        await asyncio.wait_for(peer.connected.wait(), STEP_TIMEOUT)

    async def round(self, circles: int) -> Counter[str]:
        results = await asyncio.gather(*(self.circle(i) for i in range(circles)),
                                       return_exceptions=True)
        return Counter(f"{type(r).__name__}: {r}"[:120] for r in results if isinstance(r, BaseException))

    async def quiet(self) -> None:
        """Wait (bounded) until the server lists no circle and has no connection left."""
        deadline = time.monotonic() + QUIET_TIMEOUT
        while True:
            status, listed = await self.api("GET", "/api/circles")
            metrics = await asyncio.to_thread(_metrics, self.base, self.key)
            left = (len(listed["circles"]) if status == 200 else -1,
                    metrics.get("lingkar_connections", -1), metrics.get("lingkar_circles", -1))
            if left == (0, 0, 0):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not quiet after {QUIET_TIMEOUT:.0f} s: circles listed, "
                                   f"connections, circles with a connection = {left}")
            await asyncio.sleep(0.2)


def _metrics(base: str, key: str) -> dict[str, float]:
    status, text = call("GET", base + "/metrics", key=key)
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and " " in line:
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def _trace(pid: int, out: Path, n: int) -> str:
    """Ask the traced server for its growth report number `n` and return it."""
    os.kill(pid, signal.SIGUSR1)
    path = out / f"growth-{n}.txt"
    deadline = time.monotonic() + TRACE_TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {path} within {TRACE_TIMEOUT:.0f} s")
        await asyncio.sleep(0.1)
    return path.read_text()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


async def run(store_label: str, circles: int, rounds: int, members: int,
              trace_dir: Path | None = None, frames: int = 16, top: int = 8,
              media_circles: int = 0) -> list[RoundResult]:
    server: ServerProcess | None = None
    log_path = Path(tempfile.gettempdir()) / f"lingkar-soak-{store_label}-{os.getpid()}.log"
    results: list[RoundResult] = []
    try:
        if trace_dir is not None:
            server = ServerProcess(store_label, log_path, module="loadtest.tracemem",
                                   env={"LINGKAR_TRACEMALLOC_DIR": str(trace_dir),
                                        "LINGKAR_TRACEMALLOC_FRAMES": str(frames)})
        else:
            server = ServerProcess(store_label, log_path)
        await asyncio.to_thread(server.start)
        soak = Soak(server.url, server.api_key, members, media_circles)
        print(f"{store_label}: server pid {server.pid} at {server.url}; RSS at start "
              f"{_mib(rss_bytes(server.pid))}", flush=True)
        traces = 0
        if trace_dir is not None:
            traces += 1
            await _trace(server.pid, trace_dir, traces)
        for n in range(1, rounds + 1):
            started = time.perf_counter()
            failures = await soak.round(circles)
            await soak.quiet()
            seconds = time.perf_counter() - started
            rss = rss_bytes(server.pid)
            results.append(RoundResult(n, n * circles, seconds, rss, failures))
            grown = f", {(rss - results[0].rss) / 2**20:+.1f} MiB since round 1" if n > 1 else ""
            failed = f"; FAILED circles: {dict(failures)}" if failures else ""
            print(f"round {n:3d}: {n * circles:6d} circles ended, RSS {_mib(rss)}{grown} "
                  f"({seconds:.1f} s){failed}", flush=True)
            if trace_dir is not None:
                traces += 1
                report = await _trace(server.pid, trace_dir, traces)
                head = report.split("\n\n")
                print("  " + "\n  ".join("\n\n".join(head[: top + 2]).splitlines()), flush=True)
        return results
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        if results and not any(r.failures for r in results):
            log_path.unlink(missing_ok=True)
        elif log_path.exists():
            print(f"server log kept: {log_path}", flush=True)


def _trend(results: list[RoundResult]) -> float:
    """The least-squares slope of RSS over circles ended, in bytes per circle."""
    xs = [float(r.circles) for r in results]
    ys = [float(r.rss) for r in results]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def verdict(results: list[RoundResult], warm_round: int, tolerance: float, traced: bool
            ) -> tuple[int, str]:
    failed = sum(sum(r.failures.values()) for r in results)
    if failed:
        return 1, f"FAIL: {failed} circles did not go as scripted"
    if len(results) <= warm_round:
        return 2, f"no verdict: only {len(results)} rounds (the warm level is round {warm_round})"
    warm, last = results[warm_round - 1], results[-1]
    churned = last.circles - warm.circles
    growth = last.rss / warm.rss - 1
    per_circle = (last.rss - warm.rss) / churned
    summary = (f"RSS {_mib(warm.rss)} after round {warm_round} → {_mib(last.rss)} after round "
               f"{last.round}: {growth:+.1%} over {churned} circles ({per_circle:+.0f} B per circle; "
               f"trend {_trend(results[warm_round - 1:]):+.0f} B per circle)")
    if traced:
        return 2, f"no verdict under tracemalloc (its own memory grows too): {summary}"
    if last.circles < MIN_CIRCLES_FOR_VERDICT:
        return 2, f"no verdict: {last.circles} circles < {MIN_CIRCLES_FOR_VERDICT}; {summary}"
    if growth > tolerance:
        return 1, f"FAIL (more than {tolerance:.0%}): {summary}"
    return 0, f"PASS (within {tolerance:.0%}): {summary}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    parser.add_argument("--circles", type=int, default=100, help="circles per round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--members", type=int, default=4, help="members per circle, besides the moderator")
    parser.add_argument("--media-circles", type=int, default=0, metavar="K",
                        help="in the first K circles of each round everyone connects to the media relay")
    parser.add_argument("--warm-round", type=int, default=5, help="the RSS after this round is the warm level")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--tracemalloc", type=Path, metavar="DIR",
                        help="run the server under tracemalloc; growth per round in DIR")
    parser.add_argument("--frames", type=int, default=16,
                        help="with --tracemalloc: frames per traceback; 0 = only the census of "
                             "cyclic garbage after each round, no tracing")
    parser.add_argument("--top", type=int, default=8, help="traced growth entries printed per round")
    parser.add_argument("--out", type=Path, help="write the rounds as JSON here")
    args = parser.parse_args(argv)
    if not (1 <= args.circles <= 500 and 1 <= args.rounds <= 200 and 1 <= args.members <= 12
            and 1 <= args.warm_round and 0 <= args.media_circles <= args.circles):
        parser.error("need 1 ≤ --circles ≤ 500, 1 ≤ --rounds ≤ 200, 1 ≤ --members ≤ 12, "
                     "--warm-round ≥ 1, 0 ≤ --media-circles ≤ --circles")
    if args.tracemalloc is not None:
        args.tracemalloc.mkdir(parents=True, exist_ok=True)
    results = run_loop(run(args.store, args.circles, args.rounds, args.members, args.tracemalloc,
                       args.frames, args.top, args.media_circles))
    code, text = verdict(results, args.warm_round, args.tolerance, args.tracemalloc is not None)
    print(f"{args.store}: {text}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({
            "store": args.store, "circles_per_round": args.circles, "members": args.members,
            "media_circles": args.media_circles,
            "verdict": text, "rounds": [{"round": r.round, "circles": r.circles, "rss": r.rss,
                                         "seconds": round(r.seconds, 2), "failures": dict(r.failures)}
                                        for r in results]}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
