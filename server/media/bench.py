"""Benchmark of the media relay: CPU per forwarded packet and added latency.

    python -m server.media.bench [--sizes 7,30,100,300] [--seconds 3]

The relay runs alone in a child process (its CPU time is that process's CPU time); the
parent runs one speaker and N listeners as real aiortc peers on loopback. For each size it
prints the relay's CPU per forwarded packet and its share of a core, the end-to-end
latency speaker → listener (p50/p99), the same path peer-to-peer without the relay, and
the delay inside the relay (from the tap to the datagram handed to the listener's socket).
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from server.gctune import tune_gc
from testkit.loop import run as run_loop
from testkit.opus import PacedTone, unmark
from testkit.stats import percentiles

from . import circle, fastpath, tap
from .relay import MediaRelay

CIRCLE = "bench"
SLOTS = 3
QUIET_SETTLE = 16.0  # s: two of the slots' longest report intervals (fastpath.RTCP_INTERVAL ×1.5)


# -- the relay side (child process) --------------------------------------------------------


def _probe_slot_delay(delays: list[float]) -> None:
    """Record, in this process only, how long each forwarded packet takes from the tap to
    its datagram being handed to the listener's socket (the relay's fan-out delay)."""
    forward, send = circle.MediaCircle.forward, fastpath.RtpOut.send
    tapped = [0.0]

    def timed_forward(self: circle.MediaCircle, *args: Any) -> int:
        tapped[0] = time.perf_counter()
        return forward(self, *args)

    def timed_send(self: fastpath.RtpOut, *args: Any) -> bool:
        sent = send(self, *args)
        if sent:
            delays.append(time.perf_counter() - tapped[0])
        return sent

    circle.MediaCircle.forward = timed_forward  # type: ignore[method-assign]
    fastpath.RtpOut.send = timed_send  # type: ignore[method-assign]


async def _child(probe: bool) -> None:
    delays: list[float] = []
    if probe:
        _probe_slot_delay(delays)
    relay = MediaRelay(slots=SLOTS)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    profiler: list[Any] = [None]

    async def handle(request: dict[str, Any]) -> None:
        op = request["op"]
        if op == "answer":
            sdp = await relay.answer(
                CIRCLE, request["member"], request["sdp"], listen_only=request["listen_only"]
            )
            reply({"id": request["id"], "sdp": sdp})
        elif op == "audible":
            relay.set_audible(CIRCLE, request["members"])
            reply({"id": request["id"]})
        elif op == "sample":
            delays_now = list(delays)
            delays.clear()
            times = os.times()
            reply(
                {
                    "id": request["id"],
                    "cpu": time.process_time(),
                    "system": times.system,
                    "delays": delays_now,
                    **relay.stats(),
                }
            )
        elif op == "reset":
            await relay.close()
            reply({"id": request["id"]})
        elif op == "profile":  # LINGKAR_BENCH_IDLE_PROFILE=<file>: <file>.idle, <file>.quiet
            path = os.environ.get("LINGKAR_BENCH_IDLE_PROFILE")
            if path:
                import cProfile

                if request["on"]:
                    profiler[0] = cProfile.Profile(time.process_time)
                    profiler[0].enable()
                elif profiler[0] is not None:
                    profiler[0].disable()
                    profiler[0].dump_stats(f"{path}.{request['window']}")
            reply({"id": request["id"]})
        elif op == "collect":  # what a full collection costs with these peers alive
            started = time.perf_counter()
            gc.collect()
            pause = time.perf_counter() - started
            reply({"id": request["id"], "pause": pause, "tracked": len(gc.get_objects())})

    tasks = set()
    while line := await reader.readline():
        task = asyncio.ensure_future(handle(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await relay.close()


class _RelayProcess:
    def __init__(self, probe: bool) -> None:
        self._probe = probe
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.media.bench",
            "--child",
            *(["--relay-delay"] if self._probe else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            message = json.loads(line)
            self._pending.pop(message["id"]).set_result(message)

    async def call(self, **request: Any) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        self._proc.stdin.write((json.dumps({"id": self._next, **request}) + "\n").encode())
        return await asyncio.wait_for(future, 60)

    async def stop(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
            await self._proc.wait()
        if self._reader is not None:
            await self._reader


# -- the client side (parent process) ------------------------------------------------------


class _Clients:
    """One speaker (a paced, marked Opus tone) and listeners; `latencies` holds, for every
    marked packet any listener received while recording, arrival − the mark's send time (s)."""

    def __init__(self) -> None:
        self.speaker = PacedTone("speaker")
        self.pcs: list[RTCPeerConnection] = []
        self.latencies: list[float] = []
        self.received = 0
        self.recording = False
        self.progress = asyncio.Event()

    def _sink(self) -> Callable[[Any, int], None]:
        def on_packet(packet: Any, arrival_time_ms: int) -> None:
            self.received += 1
            self.progress.set()
            if self.recording:
                marked = unmark(packet.payload)
                if marked is not None:
                    self.latencies.append((time.monotonic_ns() - marked.sent_ns) / 1e9)

        return on_packet

    async def offer(self, *, speaker: bool, slots: int) -> RTCPeerConnection:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.append(pc)
        if speaker:
            pc.addTransceiver(self.speaker, direction="sendrecv")
        for _ in range(slots):
            tap.install_tap(pc.addTransceiver("audio", direction="recvonly").receiver, self._sink())
        await pc.setLocalDescription(await pc.createOffer())
        return pc

    async def close(self) -> None:
        await asyncio.gather(*(pc.close() for pc in self.pcs))


def _percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in ms of durations in seconds."""
    p50, p99 = percentiles(values, 50, 99, scale=1000)
    return p50, p99


async def _until(clients: _Clients, condition: Callable[[], bool], limit: float) -> None:
    async with asyncio.timeout(limit):
        while not condition():
            clients.progress.clear()
            await clients.progress.wait()


async def _direct_baseline(seconds: float) -> tuple[float, float]:
    """Speaker → one listener peer to peer: the path without the relay."""
    clients = _Clients()
    try:
        speaker_pc = await clients.offer(speaker=True, slots=0)
        listener = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        clients.pcs.append(listener)
        await listener.setRemoteDescription(speaker_pc.localDescription)
        tap.install_tap(listener.getTransceivers()[0].receiver, clients._sink())
        await listener.setLocalDescription(await listener.createAnswer())
        await speaker_pc.setRemoteDescription(listener.localDescription)
        await _until(clients, lambda: clients.received > 10, 20)
        clients.recording = True
        await asyncio.sleep(seconds)
        return _percentiles(clients.latencies)
    finally:
        await clients.close()


async def _quiet_share(relay: _RelayProcess, clients: _Clients, listeners: int, seconds: float) -> float:
    """The relay's CPU share with the listeners alone: the speaker gone, the slots' last
    sender reports over (`QUIET_SETTLE` s), nothing received or forwarded."""
    await clients.pcs[0].close()  # the speaker (the first peer offered)
    for _ in range(150):  # the relay process is polled: it closes the peer within seconds
        if (await relay.call(op="sample"))["peers"] <= listeners:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(QUIET_SETTLE)
    await relay.call(op="profile", on=True)
    before = await relay.call(op="sample")
    await asyncio.sleep(seconds)
    after = await relay.call(op="sample")
    await relay.call(op="profile", on=False, window="quiet")
    return (after["cpu"] - before["cpu"]) / seconds


async def _one_size(
    relay: _RelayProcess, listeners: int, seconds: float, idle_seconds: float, quiet_seconds: float
) -> dict[str, float]:
    clients = _Clients()
    try:
        started = time.perf_counter()
        members = [("speaker", True)] + [(f"l{i}", False) for i in range(listeners)]

        async def join(member: str, speaker: bool) -> None:
            pc = await clients.offer(speaker=speaker, slots=0 if speaker else SLOTS)
            answer = await relay.call(
                op="answer", member=member, sdp=pc.localDescription.sdp, listen_only=not speaker
            )
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

        for i in range(0, len(members), 20):
            await asyncio.gather(*(join(m, s) for m, s in members[i : i + 20]))
        await relay.call(op="audible", members=["speaker"])
        # warm up until every listener gets packets
        await _until(clients, lambda: clients.received >= listeners * 20, 60 + listeners / 2)
        join_seconds = time.perf_counter() - started

        # The same peers with nothing forwarded: the relay's fixed cost (ICE, RTCP, timers).
        await relay.call(op="audible", members=[])
        await relay.call(op="profile", on=True)
        idle_before = await relay.call(op="sample")
        await asyncio.sleep(idle_seconds)
        idle_after = await relay.call(op="sample")
        await relay.call(op="profile", on=False, window="idle")
        idle_cpu_per_s = (idle_after["cpu"] - idle_before["cpu"]) / idle_seconds
        idle_system_per_s = (idle_after["system"] - idle_before["system"]) / idle_seconds
        await relay.call(op="audible", members=["speaker"])

        before = await relay.call(op="sample")
        clients.recording = True
        await asyncio.sleep(seconds)
        clients.recording = False
        after = await relay.call(op="sample")
        forwarded = after["packets_forwarded"] - before["packets_forwarded"]
        cpu = after["cpu"] - before["cpu"]
        wall = seconds  # the sampling calls add a little; CPU share is approximate
        p50, p99 = _percentiles(clients.latencies)
        in50, in99 = _percentiles(after["delays"])
        received = len(clients.latencies)
        quiet = (
            await _quiet_share(relay, clients, listeners, quiet_seconds) if quiet_seconds else float("nan")
        )
        return {
            "listeners": listeners,
            "forwarded": forwarded,
            "cpu_us_per_packet": cpu / forwarded * 1e6 if forwarded else float("nan"),
            "cpu_share": cpu / wall,
            "marginal_us_per_packet": (cpu - idle_cpu_per_s * wall) / forwarded * 1e6 if forwarded else 0,
            "idle_share": idle_cpu_per_s,
            "idle_system_share": idle_system_per_s,
            "quiet_share": quiet,
            "system_share": (after["system"] - before["system"]) / wall,
            "p50_ms": p50,
            "p99_ms": p99,
            "relay_p50_ms": in50,
            "relay_p99_ms": in99,
            "received": received,
            "join_s": join_seconds,
        }
    finally:
        await clients.close()
        await relay.call(op="reset")


async def _main(
    sizes: list[int], seconds: float, idle_seconds: float, quiet_seconds: float, probe: bool
) -> None:
    base50, base99 = await _direct_baseline(seconds)
    print(f"direct peer-to-peer (no relay): p50 {base50:.2f} ms, p99 {base99:.2f} ms")
    header = (
        f"{'listeners':>9} {'fwd pkts':>9} {'CPU µs/pkt':>10} {'marginal':>8} {'CPU core':>8} {'idle':>5} "
        f"{'e2e p50':>8} {'e2e p99':>8} {'relay p50':>9} {'relay p99':>9} {'join s':>7} {'sys':>5} {'idle sys':>8} {'quiet':>6}"
    )
    print(header)
    for size in sizes:
        relay = _RelayProcess(probe)
        await relay.start()
        try:
            row = await _one_size(relay, size, seconds, idle_seconds, quiet_seconds)
        finally:
            await relay.stop()
        print(
            f"{row['listeners']:>9} {row['forwarded']:>9} {row['cpu_us_per_packet']:>10.1f} "
            f"{row['marginal_us_per_packet']:>8.1f} {row['cpu_share']:>8.0%} {row['idle_share']:>5.1%} "
            f"{row['p50_ms']:>6.2f}ms {row['p99_ms']:>6.2f}ms "
            f"{row['relay_p50_ms']:>7.2f}ms {row['relay_p99_ms']:>7.2f}ms {row['join_s']:>7.1f} "
            f"{row['system_share']:>5.1%} {row['idle_system_share']:>8.1%} {row['quiet_share']:>6.2%}",
            flush=True,
        )
    print("e2e: speaker send → listener receive (both in this process); relay: tap → datagram sent.")
    print("sys, idle sys: the relay's CPU spent in the kernel, forwarding and idle (share of a core).")
    print("idle: the speaker still sends, gated; quiet: listeners only, no speaker (--quiet-seconds).")


def _run(main: Any) -> None:
    """Run the relay as `lingkar serve` runs it: with its garbage-collector settings, and on
    the event loop uvicorn picks, uvloop when it is installed (LINGKAR_BENCH_LOOP=asyncio
    measures the standard loop)."""
    tune_gc()
    run_loop(main, uvloop=os.environ.get("LINGKAR_BENCH_LOOP", "uvloop") == "uvloop")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="7,30,100,300", help="listener counts, comma separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per size")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        help="seconds of the idle window (the same peers, nothing forwarded); default --seconds",
    )
    parser.add_argument(
        "--quiet-seconds",
        type=float,
        default=0.0,
        help=f"also measure the listeners alone: speaker gone, {QUIET_SETTLE:.0f} s to settle, then this long",
    )
    parser.add_argument(
        "--relay-delay",
        action="store_true",
        help="also time each packet from the tap to its datagram being sent (costs the relay ~1 µs a packet)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        profile = os.environ.get("LINGKAR_BENCH_PROFILE")
        if profile:  # python -m pstats <file>: where the relay's CPU goes
            import cProfile

            profiler = cProfile.Profile(time.process_time)  # CPU time, not wall time
            profiler.runcall(_run, _child(args.relay_delay))
            profiler.dump_stats(profile)
        else:
            _run(_child(args.relay_delay))
    else:
        sizes = [int(s) for s in args.sizes.split(",")]
        idle_seconds = args.seconds if args.idle_seconds is None else args.idle_seconds
        asyncio.run(_main(sizes, args.seconds, idle_seconds, args.quiet_seconds, args.relay_delay))


if __name__ == "__main__":
    main()
