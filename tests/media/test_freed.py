"""What the relay keeps of a closed member is freed by reference counting (issue 17).

`server.gctune` makes full collections rare, so anything of a closed connection that is
part of a reference cycle stays in memory until one runs (~110 KB per connection). aiortc,
aioice and pyOpenSSL have cycles of their own (`server.media.gcpace` collects those); these
tests hold the relay's own objects to reference counting: with the collector disabled,
each is gone as soon as the close completed.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from server.media import fastpath, gcpace, ports, tap

from .conftest import CIRCLE, Room
from .peers import wait_until

ENOUGH = 25  # packets: half a second of audio


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic collector off for the test (restored after): only reference counting frees."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _ours(room: Room, name: str) -> list[weakref.ref[Any]]:
    """Weak references to the relay's objects for member `name`: its peer record, its
    slots' `RtpOut`s, its listener entry and the tap's sink on its microphone."""
    relay = room.relay
    peer = relay._peers[(CIRCLE, name)]
    refs: list[weakref.ref[Any]] = [weakref.ref(peer), weakref.ref(relay._circles[CIRCLE].listeners[name])]
    refs += [weakref.ref(out) for out in peer.outs]
    if peer.tapped is not None:
        refs.append(weakref.ref(vars(peer.tapped)["_handle_rtp_packet"]))
    return refs


@pytest.mark.parametrize("listen_only", [False, True], ids=["speaker", "listen-only"])
async def test_a_closed_member_leaves_nothing_of_ours_in_a_cycle(no_collector: None, listen_only: bool) -> None:
    room = Room(full_collection_interval=None)
    try:
        await room.join("mod")
        leaving = await room.join("m1", listen_only=listen_only)
        room.relay.set_audible(CIRCLE, ["mod", "m1"])
        # connected both ways, the fast path bound and the slots' RTCP loops running
        await wait_until(lambda: leaving.received_from("mod") >= ENOUGH)
        if not listen_only:
            await wait_until(lambda: room.peers["mod"].received_from("m1") >= ENOUGH)

        refs = _ours(room, "m1")
        assert len(refs) == (5 if listen_only else 6)  # peer, listener, 3 slots (+ the tap)
        pc = weakref.ref(room.relay._peers[(CIRCLE, "m1")].pc)
        await room.relay.close_member(CIRCLE, "m1")

        assert [r for r in refs if r() is not None] == []
        # what is left of the connection is aiortc's and aioice's own cycles: a collection frees it
        gc.collect()
        assert pc() is None
    finally:
        await room.aclose()


async def test_a_closed_circle_leaves_nothing_of_ours_in_a_cycle(no_collector: None) -> None:
    room = Room(full_collection_interval=None)
    try:
        await room.join("mod")
        await room.join("m1", listen_only=True)
        room.relay.set_audible(CIRCLE, ["mod"])
        await wait_until(lambda: room.peers["m1"].received_from("mod") >= ENOUGH)
        refs = _ours(room, "mod") + _ours(room, "m1")
        await room.relay.close_circle(CIRCLE)
        assert [r for r in refs if r() is not None] == []
    finally:
        await room.aclose()


class _Connection:
    """Stands in for an ``aioice.Connection`` / ``RTCRtpReceiver``."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def data_received(self, data: bytes, component: int) -> None:
        self.received.append(data)

    async def _handle_rtp_packet(self, packet: Any, arrival_time_ms: int) -> None:
        pass

    async def receive(self, parameters: Any) -> None:
        pass


def test_ignore_rtcp_does_not_hold_the_connection(no_collector: None) -> None:
    connection = _Connection()
    fastpath.ignore_rtcp(connection)
    connection.data_received(b"\x80\xc8rtcp", 1)
    connection.data_received(b"\x80\x6frtp", 1)
    assert connection.received == [b"\x80\x6frtp"]
    ref = weakref.ref(connection)
    del connection
    assert ref() is None


def test_the_tap_does_not_hold_the_receiver(no_collector: None) -> None:
    receiver = _Connection()
    tap.install_tap(receiver, lambda packet, arrival: None)  # type: ignore[arg-type]
    ref = weakref.ref(receiver)
    del receiver
    assert ref() is None


def test_gathering_does_not_hold_the_connection(no_collector: None) -> None:
    connection = _Connection()
    ports.Gathering(ports=(40000, 40010))._install(connection)  # type: ignore[arg-type]
    ref = weakref.ref(connection)
    del connection
    assert ref() is None


async def test_full_collections_run_once_after_closes_and_never_without(monkeypatch: pytest.MonkeyPatch) -> None:
    collected = asyncio.Event()
    calls: list[int] = []

    def collect() -> int:
        calls.append(1)
        collected.set()
        return 0

    monkeypatch.setattr(gcpace, "BATCH", 0.0)
    monkeypatch.setattr(gcpace.gc, "collect", collect)
    never = gcpace.FullCollections(None)
    never.closed()
    pacer = gcpace.FullCollections(0.0)
    pacer.closed()
    pacer.closed()  # armed already: the same collection
    await collected.wait()
    assert (calls, pacer.collections, never.collections) == ([1], 1, 0)
    pacer.closed()
    pacer.cancel()  # the relay's close() cancels one that is armed
    assert pacer.collections == 1
