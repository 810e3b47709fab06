"""A userspace delay line: a wire between two interfaces that holds every frame a while.

This machine's kernel has no netem qdisc, so delay and jitter are made here: run inside a
namespace that has two veth ends and no addresses, ``python -m tests.net.delayline --a a
--b b --delay 40 --jitter 30``, it reads every Ethernet frame arriving on one end (an
AF_PACKET socket) and sends it out of the other after ``delay ± jitter`` ms, drawn uniformly
per frame (so frames may overtake each other, as with netem's jitter). ARP crosses it too:
to both sides it is a plain cable. It prints ``ready`` once both sockets are bound, one JSON
line with how many frames it forwarded each way for every ``stats`` line on its stdin, and
that line once more on SIGTERM or end of input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import sys

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def open_end(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((interface, 0))
    sock.setblocking(False)
    return sock


async def run(a: str, b: str, delay_ms: float, jitter_ms: float, seed: int | None) -> dict[str, int]:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    ends = {a: open_end(a), b: open_end(b)}
    forwarded = {f"{a}->{b}": 0, f"{b}->{a}": 0}
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def pump(src: str, dst: str) -> None:
        inbound, outbound = ends[src], ends[dst]
        while True:
            try:
                frame, address = inbound.recvfrom(65535)
            except BlockingIOError:
                return
            if address[2] == PACKET_OUTGOING:  # our own sends out of this end
                continue
            forwarded[f"{src}->{dst}"] += 1
            wait = max(0.0, delay_ms + rng.uniform(-jitter_ms, jitter_ms)) / 1000
            loop.call_later(wait, send, outbound, frame)

    def send(sock: socket.socket, frame: bytes) -> None:
        try:
            sock.send(frame)
        except OSError:
            pass  # a full queue or a link going down: the frame is lost, as on a wire

    loop.add_reader(ends[a].fileno(), pump, a, b)
    loop.add_reader(ends[b].fileno(), pump, b, a)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)

    async def commands() -> None:
        while line := await reader.readline():
            if line.strip() == b"stats":
                print(json.dumps({"forwarded": forwarded}), flush=True)

    eof = asyncio.ensure_future(commands())
    done = asyncio.ensure_future(stop.wait())
    await asyncio.wait({eof, done}, return_when=asyncio.FIRST_COMPLETED)
    eof.cancel()
    done.cancel()
    return forwarded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", required=True)
    parser.add_argument("--b", required=True)
    parser.add_argument("--delay", type=float, default=40.0, help="ms, one way")
    parser.add_argument("--jitter", type=float, default=30.0, help="± ms, uniform")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    forwarded = asyncio.run(run(args.a, args.b, args.delay, args.jitter, args.seed))
    print(json.dumps({"forwarded": forwarded}), flush=True)


if __name__ == "__main__":
    main()
