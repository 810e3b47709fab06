"""The media load: in K rooms, real aiortc peers through the relay.

Every media room: the moderator (no microphone) and members join through the lobby like the
signaling rooms and each negotiates one PeerConnection (`offer` → `answer`). Then:

- the *holder* gets the floor and unmutes: they send marked audio for the whole window;
- the *leaker* unmutes without the floor and keeps sending (a modified browser): by the
  rules nobody may hear them, so every packet of theirs reaching a listener is counted;
- everyone else (moderator included) listens.

Per listener: relay latency (arrival − mark's send time) p50/p95/p99, loss (holder's
sequence numbers sent in the window that never arrived), RFC 3550 jitter. The window starts
once every listener heard the holder and lasts `duration` seconds; the server's CPU time is
read from /proc at both ends when its pid is known.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

from loadtest.client import Client, Closed
from loadtest.peer import DirectPair, LoadPeer, source_of
from loadtest.signaling import (
    COUNTERS,
    DRAIN_SECONDS,
    JOIN_TIMEOUT,
    LOOP_LAG,
    RoomBase,
    report_progress,
    room_records,
    run_generator,
    self_cpu,
    wait_go,
    watch_loop_lag,
)
from testkit.opus import Mark, PacedTone
from testkit.procs import cpu_seconds
from testkit.stats import rfc3550_jitter

HOLDER, LEAKER = 1, 2  # senders in the marks' sources (0 is the moderator, who does not send)
TAIL_SECONDS = 0.5
FIRST_AUDIO_TIMEOUT = 10.0


@dataclass
class Listener:
    client: Client
    peer: LoadPeer
    arrivals: list[tuple[int, int, int]] = field(default_factory=list)  # holder's (seq, sent, arrived)
    leaked: int = 0
    foreign: int = 0  # marked packets of another room: must be 0 too


@dataclass
class MediaRoom(RoomBase):
    listeners: list[Listener] = field(default_factory=list)
    holder: Client | None = None
    holder_track: PacedTone | None = None
    leaker_track: PacedTone | None = None
    peers: list[LoadPeer] = field(default_factory=list)
    window: tuple[int, int] | None = None  # monotonic ns
    offers_ms: list[float] = field(default_factory=list)
    connect_ms: list[float] = field(default_factory=list)
    heard: asyncio.Event = field(default_factory=asyncio.Event)  # every listener heard the holder
    _unheard: int = 0

    def _listener_sink(self, listener_index: int) -> Any:
        holder = source_of(self.index, HOLDER)
        this_room = source_of(self.index, 0).partition(".")[0]

        def sink(marked: Mark, arrived: int) -> None:
            lst = self.listeners[listener_index]
            COUNTERS.packets += 1
            if marked.source == holder:
                if not lst.arrivals:
                    self._unheard -= 1
                    if self._unheard <= 0:
                        self.heard.set()
                lst.arrivals.append((marked.seq, marked.sent_ns, arrived))
            elif marked.source.partition(".")[0] != this_room:
                lst.foreign += 1
            else:
                lst.leaked += 1
                COUNTERS.leaked += 1
        return sink

    async def connect_media(self, client: Client, track: PacedTone | None, listens: bool) -> LoadPeer:
        if listens:
            index = len(self.listeners)
            peer = LoadPeer(self._listener_sink(index), track=track)
            self.listeners.append(Listener(client, peer))
            self._unheard += 1
        else:
            peer = LoadPeer(lambda *a: None, track=track)
        self.peers.append(peer)
        sdp = await peer.offer()
        answer, sent, at = await client.command("offer", timeout=JOIN_TIMEOUT, sdp=sdp)
        if answer["type"] != "answer":
            raise Closed(f"offer refused: {answer}")
        self.offers_ms.append((at - sent) * 1000)
        await peer.accept(answer["sdp"])
        await asyncio.wait_for(peer.connected.wait(), JOIN_TIMEOUT)
        self.connect_ms.append((time.perf_counter() - sent) * 1000)
        return peer

    async def setup(self, names: list[str]) -> None:
        await self.join_all(names)
        assert self.moderator is not None
        holder, leaker, *others = self.inside
        self.holder = holder
        self.holder_track = PacedTone(source_of(self.index, HOLDER))
        self.leaker_track = PacedTone(source_of(self.index, LEAKER))
        await self.connect_media(self.moderator, None, listens=True)
        await self.connect_media(holder, self.holder_track, listens=False)
        await self.connect_media(leaker, self.leaker_track, listens=True)
        for client in others:
            await self.connect_media(client, None, listens=True)

    async def start_audio(self) -> None:
        """Floor to the holder, who unmutes; the leaker unmutes without the floor. Returns
        once every listener heard the holder (or after FIRST_AUDIO_TIMEOUT)."""
        assert self.moderator is not None and self.holder is not None
        self.phase = "steady"
        everyone = self.everyone()
        leaker = self.inside[1]
        await self.command(self.moderator, "give_floor", "floor_given", everyone, member_id=self.holder.member_id)
        await self.command(self.holder, "unmute_self", "unmuted", everyone)
        await self.command(leaker, "unmute_self", "unmuted", everyone)
        try:
            await asyncio.wait_for(self.heard.wait(), FIRST_AUDIO_TIMEOUT)
        except TimeoutError:
            pass  # measured anyway: a listener that hears nothing shows as 100 % loss

    def media_record(self) -> dict[str, Any]:
        assert self.holder_track is not None and self.window is not None
        start, end = self.window
        expected = {seq for seq, sent in self.holder_track.log if start <= sent <= end}
        listeners = []
        for i, lst in enumerate(self.listeners):
            in_window = [(seq, sent, arrived) for seq, sent, arrived in lst.arrivals if start <= sent <= end]
            got = {seq for seq, _, _ in in_window}
            latencies = [(arrived - sent) / 1e6 for _, sent, arrived in in_window]
            loss = (1 - len(got & expected) / len(expected)) if expected else None
            listeners.append({
                "listener": i, "role": lst.client.role or "member",
                "latency_ms": latencies, "sent_s": [sent / 1e9 for _, sent, _ in in_window],
                "received": len(in_window), "expected": len(expected),
                "duplicates": len(in_window) - len(got), "loss": loss,
                "jitter_ms": rfc3550_jitter((sent, arrived) for _, sent, arrived in in_window),
                "leaked_from_non_holder": lst.leaked, "foreign": lst.foreign,
                "unmarked": lst.peer.unmarked,
            })
        return {
            "window_s": (end - start) / 1e9, "holder_sent_in_window": len(expected),
            "leaker_sent": self.leaker_track.sent if self.leaker_track else 0,
            "forwarded_streams": len(self.listeners),
            "listeners": listeners,
            "leaked_from_non_holder": sum(lst.leaked for lst in self.listeners),
            "offer_answer_ms": self.offers_ms, "media_connect_ms": self.connect_ms,
        }

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.peers), return_exceptions=True)
        await super().close()


async def _main(cfg: dict[str, Any], queue: Any, go: Any) -> None:
    from loadtest.signaling import member_names

    stop = asyncio.Event()
    progress = asyncio.create_task(report_progress(queue, "media", stop))
    rooms = [MediaRoom(r["index"], r["circle_id"], cfg["ws_url"], r["moderator"], r["member"], cfg["members"])
             for r in cfg["rooms"]]
    names = member_names(cfg["members"])
    try:
        joined = await asyncio.gather(*(asyncio.wait_for(room.setup(names), cfg["join_timeout"])
                                        for room in rooms), return_exceptions=True)
        failed = [r for r in joined if isinstance(r, BaseException)]
        queue.put(("joined", "media", {"failed": len(failed), "reasons": sorted({repr(f)[:120] for f in failed})}))
        if not await wait_go(go, cfg["join_timeout"] + 60):
            raise RuntimeError("no go signal")
        ok = [room for room, r in zip(rooms, joined, strict=True) if not isinstance(r, BaseException)]
        direct: DirectPair | None = DirectPair(65535)
        try:
            await asyncio.wait_for(direct.connect(), JOIN_TIMEOUT)
        except Exception:  # noqa: BLE001 - the baseline is optional
            await direct.close()
            direct = None
        cpu0 = self_cpu()
        lag_stop = asyncio.Event()
        lag = asyncio.create_task(watch_loop_lag(lag_stop))
        server_pid = cfg.get("server_pid")
        started = await asyncio.gather(*(asyncio.wait_for(room.start_audio(), FIRST_AUDIO_TIMEOUT + 30)
                                         for room in ok), return_exceptions=True)
        ok = [room for room, r in zip(ok, started, strict=True) if not isinstance(r, BaseException)]
        # One window for all rooms, with the server's CPU time read at both ends.
        queue.put(("media_window", "start", time.monotonic()))
        start, srv0 = time.monotonic_ns(), cpu_seconds(server_pid) if server_pid else None
        await asyncio.sleep(cfg["duration"])
        end, srv1 = time.monotonic_ns(), cpu_seconds(server_pid) if server_pid else None
        queue.put(("media_window", "end", time.monotonic()))
        for room in ok:
            room.window = (start, end)
        await asyncio.sleep(TAIL_SECONDS)
        await asyncio.sleep(DRAIN_SECONDS)
        cpu1 = self_cpu()
        lag_stop.set()
        await lag
        records = room_records(rooms, joined, "media")
        for room, rec in zip(rooms, records, strict=True):
            if "join_failed" not in rec and room.window is not None:
                rec["media"] = room.media_record()
        server_window = {"seconds": (end - start) / 1e9,
                         "server_cpu_s": None if srv0 is None or srv1 is None else srv1 - srv0}
        baseline = direct.window(start, end) if direct is not None else []
        if direct is not None:
            await direct.close()
        queue.put(("result", "media", {"rooms": records, "direct_baseline_ms": baseline, "generator_cpu_s": cpu1 - cpu0, "loop_lag_ms": LOOP_LAG,
                                       "generator_pid": os.getpid(), "server_window": server_window,
                                       "errors": [repr(w)[:200] for w in started if isinstance(w, BaseException)]}))
    finally:
        stop.set()
        await progress
        await asyncio.gather(*(room.close() for room in rooms), return_exceptions=True)


def run_process(cfg: dict[str, Any], queue: Any, go: Any) -> None:
    """Entry point of the media generator process."""
    run_generator("media", _main, cfg, queue, go)
