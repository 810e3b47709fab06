"""One member's phone, as a process inside its own network namespace.

A Python process cannot use another namespace per socket, so each member of a network test
runs as ``ip netns exec <ns> python -m tests.net.agent --server http://10.77.0.1:8000`` and
is driven over JSON lines: the test writes ``{"id": n, "op": "...", ...}`` to its stdin and
reads ``{"id": n, "ok": {...}}`` or ``{"id": n, "error": "..."}`` from its stdout (the first
line is ``{"ready": true}``). Requests run concurrently, so a long wait does not block others.

The member joins over the real WebSocket (tests/live.py's client), builds its
RTCPeerConnection with the ``ice_servers`` the server handed over in ``welcome`` (nothing
else: no public STUN server is ever contacted), offers like the browser (tests/media/peers.py:
a paced, marked Opus tone and S slots), and counts what arrives per source. After its network
changed (``moved``) it does what the web client does on a resume: a new socket with its
resume secret, then a new PeerConnection and a new ``offer``; its tone then carries the
source name ``<name>~<generation>`` so listeners can tell the new stream from the old one.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtp import RtpPacket

from testkit.stats import percentile
from tests.live import Client, Live, token_of
from tests.media.peers import Arrival, ClientPeer, _poke, wait_until


class NetPeer(ClientPeer):
    """ClientPeer with the ICE servers the server handed over (ClientPeer uses none)."""

    def __init__(self, name: str, ice_servers: list[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._unused = self.pc
        servers = [RTCIceServer(**server) for server in ice_servers]
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self.pc.on("connectionstatechange", _poke)
        self.on_slot_packet: Callable[[int, int], None] | None = None

    def _sink(self, slot: int) -> Callable[[RtpPacket, int], None]:
        """ClientPeer's counting by marked source, and every packet's slot and payload size
        (a browser's packets carry no marker: they are told apart by slot)."""
        counted = super()._sink(slot)

        def on_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
            counted(packet, arrival_time_ms)
            if self.on_slot_packet is not None:
                self.on_slot_packet(slot, len(packet.payload))

        return on_packet

    async def close(self) -> None:
        await self._unused.close()
        await self.pc.close()


def _candidates(sdp: str) -> list[dict[str, Any]]:
    """The candidates of an SDP: address, port, type."""
    found = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            bits = line.split()
            found.append({"address": bits[4], "port": int(bits[5]), "type": bits[7]})
    return found


class Heard:
    """What arrived from one source: its sequence numbers and when the first came."""

    def __init__(self) -> None:
        self.packets = 0
        self.seqs: set[int] = set()
        self.first_at: float | None = None  # time.monotonic(), system-wide on Linux
        self.last_at: float | None = None

    def add(self, seq: int | None) -> None:
        now = time.monotonic()
        self.packets += 1
        if seq is not None:
            self.seqs.add(seq)
        if self.first_at is None:
            self.first_at = now
        self.last_at = now

    def summary(self) -> dict[str, Any]:
        """Counts over the span heard: distinct packets, the span from the first to the last
        sequence number heard, and the longest run of consecutive sequence numbers missing
        inside it (a stall, counted in 20 ms packets)."""
        if not self.seqs:
            return {"packets": self.packets, "distinct": 0, "span": 0, "longest_gap": 0,
                    "first_at": self.first_at, "last_at": self.last_at}
        ordered = sorted(self.seqs)
        gaps = [b - a - 1 for a, b in zip(ordered, ordered[1:], strict=False)]
        return {"packets": self.packets, "distinct": len(ordered),
                "span": ordered[-1] - ordered[0] + 1, "first_seq": ordered[0],
                "last_seq": ordered[-1], "longest_gap": max(gaps, default=0),
                "first_at": self.first_at, "last_at": self.last_at}


class Agent:
    def __init__(self, server: str) -> None:
        self.server = server.rstrip("/")
        self.client: Client | None = None
        self.peer: NetPeer | None = None
        self.old_peers: list[NetPeer] = []
        self.generation = 0
        self.name = ""
        self.token = ""
        self.listen_only = False
        self.ice_servers: list[dict[str, Any]] = []
        self.heard: dict[str, Heard] = {}
        self.slot_packets: dict[int, list[tuple[float, int]]] = {}  # slot: (arrival, payload size)
        self.joined_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- plumbing ----------------------------------------------------------------------

    def _on_arrival(self, arrival: Arrival) -> None:
        self.heard.setdefault(arrival.source, Heard()).add(arrival.seq)

    def _on_slot_packet(self, slot: int, size: int) -> None:
        self.slot_packets.setdefault(slot, []).append((time.monotonic(), size))

    @property
    def source(self) -> str:
        """The name this member's tone carries now."""
        return self.name if self.generation <= 1 else f"{self.name}~{self.generation - 1}"

    def _need_client(self) -> Client:
        if self.client is None:
            raise RuntimeError("not joined")
        return self.client

    async def _connect(self) -> Client:
        ws_url = self.server.replace("http://", "ws://") + "/ws"
        return await Client.connect(types.SimpleNamespace(ws_url=ws_url))  # type: ignore[arg-type]

    async def _hello(self, resume: str | None) -> dict[str, Any]:
        client = await self._connect()
        hello: dict[str, Any] = {"type": "hello", "token": self.token, "name": self.name,
                                 "listen_only": self.listen_only}
        if resume:
            hello["resume"] = resume
        await client.send(hello)
        first = await client.wait(lambda fr: fr.get("type") in ("welcome", "lobby"), timeout=20)
        client.member_id, client.resume = first["member_id"], first["resume"]
        self.ice_servers = list(first.get("ice_servers") or [])
        self.client = client
        return first

    # -- operations --------------------------------------------------------------------

    async def op_api(self, method: str, path: str, key: str, body: Any = None) -> dict[str, Any]:
        status, answer = await Live(self.server, None, None).api(method, path, body, key=key)  # type: ignore[arg-type]
        return {"status": status, "body": answer}

    async def op_join(self, link: str, name: str, listen_only: bool = False) -> dict[str, Any]:
        self.joined_at = time.monotonic()
        self.token, self.name, self.listen_only = token_of(link), name, listen_only
        first = await self._hello(None)
        return {"type": first["type"], "member_id": first["member_id"], "state": first.get("state"),
                "ice_servers": self.ice_servers, "joined_at": self.joined_at,
                "took": time.monotonic() - self.joined_at}

    async def op_media(self, within: float = 30.0) -> dict[str, Any]:
        """A new PeerConnection (closing the previous one), offered on the current socket."""
        client = self._need_client()
        if self.peer is not None:
            old, self.peer = self.peer, None
            self.old_peers.append(old)
            self._spawn(old.close())
        self.generation += 1
        started = time.monotonic()
        peer = NetPeer(self.source, self.ice_servers, mic=not self.listen_only,
                       hz=440.0 + 110 * (len(self.name) % 4))
        peer.on_arrival = self._on_arrival
        peer.on_slot_packet = self._on_slot_packet
        self.peer = peer
        offer = await peer.offer()
        start = len(client.frames)
        answer = await client.command("offer", sdp=offer)
        if answer["type"] != "answer":
            raise RuntimeError(f"offer refused: {answer}")
        await peer.accept(answer["sdp"])
        await client.wait(lambda fr: fr.get("type") == "media", start=start, timeout=within)
        await wait_until(lambda: peer.pc.connectionState in ("connected", "failed"), within)
        if peer.pc.connectionState != "connected":
            raise RuntimeError(f"connection {peer.pc.connectionState}")
        return {"source": self.source, "pair": self._pair(), "took": time.monotonic() - started,
                "answer_candidates": _candidates(answer["sdp"])}

    def _pair(self) -> dict[str, Any] | None:
        """The nominated ICE candidate pair (aioice's, behind aiortc's ICE transport)."""
        if self.peer is None:
            return None
        transceiver = self.peer.pc.getTransceivers()[0]
        connection = transceiver.receiver.transport.transport._connection
        pair = connection._nominated.get(1)
        if pair is None:
            return None
        local, remote = pair.local_candidate, pair.remote_candidate
        return {"local_type": local.type, "local": [local.host, local.port],
                "remote_type": remote.type, "remote": [remote.host, remote.port],
                "local_candidates": [c.type for c in connection.local_candidates]}

    async def op_pair(self) -> dict[str, Any] | None:
        return self._pair()

    async def op_cmd(self, type: str, **fields: Any) -> dict[str, Any]:
        return await self._need_client().command(type, **fields)

    async def op_wait_event(self, name: str, within: float = 20.0, **data: Any) -> dict[str, Any]:
        return await self._need_client().event(name, within, **data)

    async def op_wait_view(self, member_id: str, within: float = 20.0) -> list[Any]:
        """Wait until the latest `media {slots}` frame carries `member_id` in some slot."""
        client = self._need_client()

        def latest_has(frame: dict[str, Any]) -> bool:
            views = [fr for fr in client.frames if fr.get("type") == "media"]
            return frame is views[-1] and member_id in frame["slots"] if views else False

        frame = await client.wait(latest_has, within)
        return list(frame["slots"])

    async def op_wait_heard(self, source: str, n: int, within: float = 30.0, since_seq: int = -1) -> dict[str, Any]:
        """Wait until `n` distinct packets of `source` (with sequence numbers above
        `since_seq`) have arrived."""
        def enough() -> bool:
            heard = self.heard.get(source)
            return heard is not None and sum(1 for s in heard.seqs if s > since_seq) >= n

        await wait_until(enough, within)
        return self.heard[source].summary()

    def _slot_of(self, member_id: str) -> int | None:
        """The slot the latest `media {slots}` frame gives `member_id`, or None."""
        latest = next((fr for fr in reversed(self._need_client().frames) if fr.get("type") == "media"), None)
        slots = list(latest["slots"]) if latest else []
        return slots.index(member_id) if member_id in slots else None

    async def op_wait_member(self, member_id: str, n: int, since: float = 0.0, min_size: int = 0,
                             within: float = 30.0) -> dict[str, Any]:
        """Wait until `n` packets of at least `min_size` payload bytes have arrived after
        `since` (time.monotonic(), system-wide) in the slot that carries `member_id`: how a
        listener counts a browser's packets, which carry no marker. Returns the slot, the
        count, when the first and the n-th of them came, and the sizes seen."""
        def counted() -> list[tuple[float, int]]:
            slot = self._slot_of(member_id)
            packets = self.slot_packets.get(slot, []) if slot is not None else []
            start = bisect.bisect_right(packets, (since, 1 << 30))  # in arrival order
            return [(at, size) for at, size in packets[start:] if size >= min_size]

        await wait_until(lambda: len(counted()) >= n, within)
        got = counted()
        sizes = sorted(size for _, size in got)
        return {"slot": self._slot_of(member_id), "count": len(got), "first_at": got[0][0],
                "nth_at": got[n - 1][0], "size_p50": percentile(sizes, 50), "size_max": sizes[-1]}

    async def op_slot_log(self, member_id: str, since: float = 0.0) -> dict[str, Any]:
        """Every packet (arrival, size) after `since` in the slot of `member_id`."""
        slot = self._slot_of(member_id)
        packets = self.slot_packets.get(slot, []) if slot is not None else []
        return {"slot": slot, "packets": packets[bisect.bisect_right(packets, (since, 1 << 30)):]}

    async def op_heard(self, source: str) -> dict[str, Any]:
        return self.heard.get(source, Heard()).summary()

    async def op_sent(self) -> dict[str, Any]:
        track = self.peer.track if self.peer else None
        return {"source": self.source, "sent": track.sent if track else 0}

    async def op_sync(self) -> dict[str, Any]:
        """Send `sync`; the `snapshot` that answers it."""
        client = self._need_client()
        start = len(client.frames)
        await client.send({"type": "sync"})
        return await client.wait(lambda fr: fr.get("type") == "snapshot", timeout=20, start=start)

    async def op_frames(self, type: str) -> list[dict[str, Any]]:
        return [fr for fr in self._need_client().frames if fr.get("type") == type]

    async def op_moved(self, within: float = 30.0) -> dict[str, Any]:
        """The phone's network changed: its socket and PeerConnection are bound to an address
        that is gone. Resume on a new socket, then offer from a new PeerConnection."""
        old = self._need_client()
        started = time.monotonic()
        transport = old.ws.transport
        if transport is not None:
            transport.abort()  # nothing can be sent from the old address any more
        self._spawn(old.close())
        welcome = await self._hello(old.resume)
        resumed = time.monotonic()
        media = await self.op_media(within)
        return {"welcome": {"type": welcome["type"], "member_id": welcome["member_id"],
                            "state": welcome.get("state")},
                "resume_took": resumed - started, **media}

    async def op_close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 5)
        for peer in [*self.old_peers, *([self.peer] if self.peer else [])]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(peer.close(), 5)

    def _spawn(self, coro: Any) -> None:
        async def quietly() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(coro, 10)

        task = asyncio.create_task(quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def serve(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout

    def reply(message: dict[str, Any]) -> None:
        out.write(json.dumps(message, default=repr) + "\n")
        out.flush()

    async def handle(request: dict[str, Any]) -> None:
        rid = request.pop("id")
        op = request.pop("op")
        try:
            result = await getattr(agent, f"op_{op}")(**request)
            reply({"id": rid, "ok": result})
        except Exception as exc:  # reported to the test, which fails with it
            reply({"id": rid, "error": f"{type(exc).__name__}: {exc}"})

    reply({"ready": True})
    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        request = json.loads(line)
        if request.get("op") == "exit":
            break
        task = asyncio.create_task(handle(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await agent.op_close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    args = parser.parse_args()
    asyncio.run(serve(Agent(args.server)))


if __name__ == "__main__":
    main()
