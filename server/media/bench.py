"""Benchmark of the media relay: CPU per forwarded packet, idle cost and added latency.

    python -m server.media.bench [--sizes 7,30,100,300] [--seconds 3] [--quiet-seconds S]
    python -m server.media.bench --sizes 100,300 --janus DIR --rounds 3 --out runs.jsonl

The relay runs alone in a child process (its CPU time is that process's user+sys); the
parent runs one speaker and N listeners as real aiortc peers on loopback, and a direct
speaker → listener pair beside them. For each size it prints the relay's CPU per forwarded
packet (total, and marginal over its idle cost) and its share of a core, the idle cost (the
speaker gated; and with --quiet-seconds the listeners alone, per 100 listeners), and the
relay-added latency: the listeners' kernel receive timestamps − the speaker's send time,
minus the same on the direct pair in the same window, percentile by percentile, as the
Janus anchor's harness computes it (`testkit/kstamp.py`). Also the end-to-end latency at
the listeners' handler and, with --relay-delay, the delay inside the relay (tap → datagram
handed to the kernel for the last listener; a probe patching the relay's fan-out).
With --janus DIR (a copy of ../shared/anchors/janus) each size runs K interleaved rounds of
Lingkar then Janus tuned in the same run (`bench_janus.py`), 20 s windows by default.
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
from testkit import kstamp
from testkit.loop import run as run_loop
from testkit.opus import PacedTone, unmark
from testkit.stats import percentiles

from . import bench_janus, circle, tap
from .relay import MediaRelay

CIRCLE = "bench"
SLOTS = 3
QUIET_SETTLE = 16.0  # s: two of the slots' longest report intervals (fastpath.RTCP_INTERVAL ×1.5)


# -- the relay side (child process) --------------------------------------------------------


def _probe_slot_delay(delays: list[float]) -> None:
    """Record, in this process only, how long each forwarded packet takes from the tap to
    the end of its fan-out: every copy written and handed to the kernel (the compiled
    loop flushes before it returns; the Python path leaves its last chunk to the flush
    that follows), one sample per packet (the last listener's delay)."""
    forward = circle.MediaCircle.forward

    def timed_forward(self: circle.MediaCircle, *args: Any) -> int:
        tapped = time.perf_counter()
        sent = forward(self, *args)
        if sent > 0:
            delays.append(time.perf_counter() - tapped)
        return sent

    circle.MediaCircle.forward = timed_forward  # type: ignore[method-assign]


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

GRACE = 1.0  # s after a window for its last packets to land (the Janus anchor's --grace)


class _Clients:
    """One speaker (a paced, marked Opus tone, `source`) and listeners. While `stamping`,
    `arrivals` gets (listener, kernel receive time, handler time, payload) for every packet a
    listener handles; the marks are read afterwards (`latencies`), to keep the listeners'
    receive path as cheap as the Janus anchor's. `lean`: the listeners' receivers keep no RTP
    statistics (their receiver reports carry no report block), as the anchor's --no-decode."""

    def __init__(self, source: str = "speaker", *, lean: bool = False) -> None:
        self.source = source
        self.lean = lean
        self.speaker = PacedTone(source)
        self.pcs: list[RTCPeerConnection] = []
        self.arrivals: list[tuple[int, float | None, int, bytes]] = []
        self.received = 0
        self.stamping = False
        self.progress = asyncio.Event()
        self.sent: dict[tuple[str, int], float] = {}  # the speaker's send times (kstamp)

    def tap(self, receiver: Any, listener: int) -> None:
        arrivals, arrival, progress = self.arrivals, kstamp.arrival, self.progress

        def on_packet(packet: Any, arrival_time_ms: int) -> None:
            self.received += 1
            if self.stamping:
                arrivals.append((listener, arrival(receiver), time.monotonic_ns(), packet.payload))
            elif not progress.is_set():
                progress.set()

        if not self.lean:
            tap.install_tap(receiver, on_packet)
            return
        receive = receiver.receive

        async def handle_rtp_packet(packet: Any, arrival_time_ms: int) -> None:
            on_packet(packet, arrival_time_ms)

        async def receive_only(parameters: Any) -> None:
            await receive(parameters)
            tap.stop_decoder(receiver)

        receiver._handle_rtp_packet = handle_rtp_packet
        receiver.receive = receive_only

    async def offer(self, *, speaker: bool, slots: int) -> RTCPeerConnection:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        listener = len(self.pcs)
        self.pcs.append(pc)
        if speaker:
            pc.addTransceiver(self.speaker, direction="sendrecv")
        for _ in range(slots):
            self.tap(pc.addTransceiver("audio", direction="recvonly").receiver, listener)
        await pc.setLocalDescription(await pc.createOffer())
        return pc

    def log_sends(self) -> None:
        """Record the speaker's send times from now on (its peer, the first, is connected)."""
        self.sent = kstamp.log_sends(self.pcs[0].getSenders()[0])

    def latencies(self, t0: float, t1: float) -> tuple[list[float], list[float]]:
        """As the anchor: for the packets sent in [t0, t1], each listener's first arrival −
        send time in ms, from the kernel receive time (CLOCK_REALTIME, against the send time
        at `_send_rtp`) and, end to end, from the handler (CLOCK_MONOTONIC, against the mark)."""
        sent = {seq: t for (src, seq), t in self.sent.items() if src == self.source and t0 <= t <= t1}
        seen: set[tuple[int, int]] = set()
        kernel, e2e = [], []
        for listener, arrived, handled_ns, payload in self.arrivals:
            marked = unmark(payload)
            if marked is None or marked.source != self.source:
                continue
            t = sent.get(marked.seq)
            if t is not None and (listener, marked.seq) not in seen:
                seen.add((listener, marked.seq))
                e2e.append((handled_ns - marked.sent_ns) / 1e6)
                if arrived is not None:
                    kernel.append((arrived - t) * 1e3)
        return kernel, e2e

    async def close(self) -> None:
        await asyncio.gather(*(pc.close() for pc in self.pcs), return_exceptions=True)


def _percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in ms of durations in seconds."""
    p50, p99 = percentiles(values, 50, 99, scale=1000)
    return p50, p99


async def _until(clients: _Clients, condition: Callable[[], bool], limit: float) -> None:
    async with asyncio.timeout(limit):
        while not condition():
            clients.progress.clear()
            await clients.progress.wait()


async def _direct_pair(lean: bool) -> _Clients:
    """A speaker → one listener peer to peer, in this process: the path without the relay,
    measured at the same time as the relay's so that both see the same load."""
    clients = _Clients("direct", lean=lean)
    try:
        speaker_pc = await clients.offer(speaker=True, slots=0)
        listener = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        clients.pcs.append(listener)
        await listener.setRemoteDescription(speaker_pc.localDescription)
        clients.tap(listener.getTransceivers()[0].receiver, 1)
        await listener.setLocalDescription(await listener.createAnswer())
        await speaker_pc.setRemoteDescription(listener.localDescription)
        await _until(clients, lambda: clients.received > 10, 20)
        clients.log_sends()
        return clients
    except BaseException:
        await clients.close()
        raise


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
    relay: _RelayProcess,
    listeners: int,
    seconds: float,
    idle_seconds: float,
    quiet_seconds: float,
    lean: bool,
) -> dict[str, Any]:
    clients = _Clients(lean=lean)
    direct: _Clients | None = None
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
        clients.log_sends()
        direct = await _direct_pair(lean)

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
        await asyncio.sleep(1.0)  # the gate open again: forwarding in full before the window

        # The window: the relay's CPU, and both paths' latency at the same time.
        clients.stamping = direct.stamping = True
        client_cpu = time.process_time()
        drops = _udp_rcvbuf_errors()
        before = await relay.call(op="sample")
        t0 = time.time()
        await asyncio.sleep(seconds)
        t1 = time.time()
        after = await relay.call(op="sample")
        client_cpu = time.process_time() - client_cpu
        drops = _udp_rcvbuf_errors() - drops
        await asyncio.sleep(GRACE)  # packets sent before t1 still land
        clients.stamping = direct.stamping = False
        forwarded = after["packets_forwarded"] - before["packets_forwarded"]
        cpu = after["cpu"] - before["cpu"]
        wall = seconds  # the sampling calls add a little; CPU share is approximate
        relay_k, relay_e2e = clients.latencies(t0, t1)
        direct_k, _ = direct.latencies(t0, t1)
        sent = sum(1 for (_, t) in clients.sent.items() if t0 <= t <= t1)
        await direct.close()
        direct = None
        p50, p99 = (kstamp.pct(relay_e2e, q) for q in (50, 99))
        in50, in99 = _percentiles(after["delays"])
        quiet = (
            await _quiet_share(relay, clients, listeners, quiet_seconds) if quiet_seconds else float("nan")
        )
        path = [kstamp.pct(relay_k, q) for q in (50, 95, 99)]
        base = [kstamp.pct(direct_k, q) for q in (50, 95, 99)]
        return {
            "listeners": listeners,
            "window_s": seconds,
            "forwarded": forwarded,
            "cpu_us_per_packet": cpu / forwarded * 1e6 if forwarded else float("nan"),
            "cpu_share": cpu / wall,
            "marginal_us_per_packet": (cpu - idle_cpu_per_s * wall) / forwarded * 1e6 if forwarded else 0,
            "idle_share": idle_cpu_per_s,
            "idle_system_share": idle_system_per_s,
            "quiet_share": quiet,
            "quiet_share_per_100": quiet / listeners * 100 if listeners else float("nan"),
            "system_share": (after["system"] - before["system"]) / wall,
            # relay-added latency, as the anchor: percentile of the relay path's kernel-timestamped
            # latency minus the same percentile of the direct pair's, both measured in this window
            "added_p50_ms": path[0] - base[0],
            "added_p99_ms": path[2] - base[2],
            "path_ms": path,
            "direct_ms": base,
            "kernel_samples": len(relay_k),
            "direct_samples": len(direct_k),
            "loss_pct": 100 * (1 - len(relay_k) / (sent * listeners)) if sent and listeners else float("nan"),
            "p50_ms": p50,
            "p99_ms": p99,
            "relay_p50_ms": in50,
            "relay_p99_ms": in99,
            "received": len(relay_e2e),
            "client_share": client_cpu / wall,
            "udp_rcvbuf_drops": drops,
            "join_s": join_seconds,
        }
    finally:
        if direct is not None:
            await direct.close()
        await clients.close()
        await relay.call(op="reset")


async def measure(
    size: int, seconds: float, idle_seconds: float, quiet_seconds: float, probe: bool, lean: bool = False
) -> dict[str, Any]:
    """One size in a relay process of its own."""
    relay = _RelayProcess(probe)
    await relay.start()
    try:
        row = await _one_size(relay, size, seconds, idle_seconds, quiet_seconds, lean)
        return {**row, "lean_listeners": lean}
    finally:
        await relay.stop()


def _udp_rcvbuf_errors() -> int:
    """The machine's count of UDP datagrams dropped because a socket's receive buffer was full
    (/proc/net/snmp): here, the listeners' process falling behind (0 where unreadable)."""
    try:
        with open("/proc/net/snmp") as f:
            head, values = [line.split() for line in f if line.startswith("Udp:")][:2]
        return int(values[head.index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return 0


def print_row(row: dict[str, Any], probe: bool) -> None:
    print(
        f"{row['listeners']:>5} listeners: {row['forwarded']} packets forwarded in {row['window_s']:.0f} s, "
        f"{row['cpu_us_per_packet']:.1f} µs of CPU per packet (marginal {row['marginal_us_per_packet']:.1f}), "
        f"{row['cpu_share']:.0%} of a core (sys {row['system_share']:.1%}); joined in {row['join_s']:.1f} s; "
        f"clients {row['client_share']:.0%} of a core\n"
        f"       idle (gated) {row['idle_share']:.1%} (sys {row['idle_system_share']:.1%}), "
        f"quiet (listeners alone) {row['quiet_share']:.2%}: "
        f"idle cost per 100 listeners {row['quiet_share_per_100']:.2%} of a core\n"
        f"       relay-added latency p50 {row['added_p50_ms']:.2f} ms, p99 {row['added_p99_ms']:.2f} ms "
        f"(kernel rx: relay path p50/p99 {row['path_ms'][0]:.2f}/{row['path_ms'][2]:.2f}, "
        f"direct pair {row['direct_ms'][0]:.2f}/{row['direct_ms'][2]:.2f}; "
        f"loss {row['loss_pct']:.2f} %; UDP datagrams dropped at full receive buffers {row['udp_rcvbuf_drops']})\n"
        f"       e2e at the listeners' handler p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms"
        + (
            f"; tap → last copy sent p50 {row['relay_p50_ms']:.2f} ms, p99 {row['relay_p99_ms']:.2f} ms"
            if probe
            else ""
        ),
        flush=True,
    )
    if row["loss_pct"] > 1 or row["p50_ms"] > 100:
        print(
            "       the listeners' process fell behind (loss, or e2e p50 over 100 ms): at this size the "
            "client, not the relay, is the limit; kernel timestamps keep its queueing out of the latency",
            flush=True,
        )


LEGEND = """\
relay-added latency: p(relay path) − p(direct pair), percentile by percentile, each from the
  listener's kernel receive timestamp (SIOCGSTAMPNS) − the speaker's send time at aiortc's
  _send_rtp, both CLOCK_REALTIME (testkit/kstamp.py; as ../shared/anchors/janus/bench.py);
  the direct aiortc pair runs in this process during the same window.
e2e: speaker's mark → listener's packet handler (includes the listeners' event loop).
idle: the speaker still sends, gated; quiet: listeners only, no speaker (--quiet-seconds);
  idle cost per 100 listeners = quiet share ÷ listeners × 100. sys: CPU in the kernel."""


async def _main(
    sizes: list[int],
    seconds: float,
    idle_seconds: float,
    quiet_seconds: float,
    probe: bool,
    out: str | None,
    lean: bool,
) -> None:
    for size in sizes:
        row = await measure(size, seconds, idle_seconds, quiet_seconds, probe, lean)
        print_row(row, probe)
        if out:
            bench_janus.append_jsonl(out, {"bench": "lingkar", **row})
    print(LEGEND)


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
    parser.add_argument(
        "--seconds", type=float, default=None, help="measured seconds per size; default 3, 20 with --janus"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        help="seconds of the idle window (the same peers, nothing forwarded); default --seconds",
    )
    parser.add_argument(
        "--quiet-seconds",
        type=float,
        default=None,
        help=f"also measure the listeners alone: speaker gone, {QUIET_SETTLE:.0f} s to settle, then this long;"
        " default 0 (not measured), --seconds with --janus",
    )
    parser.add_argument("--out", default=None, help="append every result as a JSON line to this file")
    parser.add_argument(
        "--janus",
        default=None,
        metavar="DIR",
        help="also run Janus tuned side by side: DIR is a copy of ../shared/anchors/janus",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --janus: interleaved rounds per size")
    parser.add_argument(
        "--janus-python",
        default=None,
        help="with --janus: the interpreter for the anchor (default: found/made)",
    )
    parser.add_argument(
        "--relay-delay",
        action="store_true",
        help="also time each packet from the tap to its datagram being sent (costs the relay ~1 µs a packet)",
    )
    parser.add_argument(
        "--lean-listeners",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the listeners keep no RTP statistics (a cheaper client, as the Janus anchor's --no-decode;"
        " their receiver reports then carry no report block); default: on with --janus, off without",
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
        seconds = args.seconds if args.seconds is not None else (20.0 if args.janus else 3.0)
        idle_seconds = seconds if args.idle_seconds is None else args.idle_seconds
        quiet_seconds = (
            args.quiet_seconds if args.quiet_seconds is not None else (seconds if args.janus else 0.0)
        )
        # by default side by side the listeners are as lean as the anchor's --no-decode ones
        lean = args.lean_listeners if args.lean_listeners is not None else bool(args.janus)
        kstamp.install()  # this (parent) process only: the listeners' kernel receive timestamps
        if args.janus:
            probe = args.relay_delay

            async def one(size: int) -> dict[str, Any]:
                return await measure(size, seconds, idle_seconds, quiet_seconds, probe, lean)

            async def both() -> None:
                await bench_janus.side_by_side(
                    one,
                    lambda row: print_row(row, probe),
                    anchor=args.janus,
                    sizes=sizes,
                    rounds=args.rounds,
                    seconds=seconds,
                    out=args.out,
                    python=args.janus_python,
                )
                print(LEGEND)

            asyncio.run(both())
        else:
            asyncio.run(
                _main(
                    sizes,
                    seconds,
                    idle_seconds,
                    quiet_seconds,
                    args.relay_delay,
                    args.out,
                    args.lean_listeners,
                )
            )


if __name__ == "__main__":
    main()
