"""Bad input with hypothesis (DESIGN §12 "Frames"): random bytes, random msgpack values, text
frames, known types with wrong fields, deep nesting and huge declared lengths.

One live server and one circle serve every example: the server runs in an event loop of its
own thread (hypothesis drives plain functions), and each example talks to it from the test.
Each example is sent twice: as the first frame of a fresh connection (closed with a code,
nothing answered) and by an admitted member (an `error`, the socket stays open). The other
members of the circle must see nothing: no event, no version change. No traceback is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from signaling import frames as f
from signaling.session import Limits
from tests.live import Client, Live, join, live_server

T = TypeVar("T")

FIELDS = ["ref", "member_id", "seconds", "mode", "text", "need_support", "sdp", "token", "name",
          "resume", "listen_only", "type", "zz"]

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.integers(-(2**63), 2**64 - 1), inner, max_size=4),
                      max_leaves=12)
SPECIAL = [
    b"\x91" * 60_000 + b"\xc0",  # arrays nested 60 000 deep
    b"\x81\xa1a" * 20_000 + b"\xc0",  # maps nested 20 000 deep
    b"\xdd\xff\xff\xff\xff",  # an array declaring 4 G elements
    b"\xdf\xff\xff\xff\xff",  # a map declaring 4 G entries
    b"\xdb\xff\xff\xff\xff" + b"x" * 10,  # a string declaring 4 GiB
    b"\xc6\x7f\xff\xff\xff",  # bin32 declaring 2 GiB
    msgpack.packb({"type": "raise_hand", "ref": 1}) + b"\x00",  # trailing bytes
    msgpack.packb({"type": b"raise_hand"}),  # type as bytes
    b"\x82\xa4type\xaaraise_hand\xa3ref\xc1",  # reserved byte
    b"\x81\xa4type\xa5\xff\xfe\xfd\xfc\xfb",  # bad UTF-8 in the type
    msgpack.packb({"type": "private_note", "text": "x" * 501}),
    msgpack.packb({"type": "private_note", "text": b"\xff\xfe"}),
    msgpack.packb({"type": "extend_turn", "seconds": 2**70 // 2**7}),
    msgpack.packb({"type": "mute", "member_id": "x" * 65}),
    msgpack.packb({"type": "mute", "member_id": ""}),
    msgpack.packb({"type": "give_floor", "member_id": None}),
]
wrong_fields = st.builds(
    lambda t, extra: msgpack.packb({"type": t, **extra}),
    st.sampled_from(sorted(f.CLIENT_FRAME_TYPES - {"hello"})),
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=3),
)
frames = (st.binary(max_size=300) | st.text(max_size=40) | values.map(msgpack.packb)
          | wrong_fields | st.sampled_from(SPECIAL))


def acceptable(data: bytes | str) -> bool:
    """A frame the server would carry out (a valid command) is not bad input."""
    if isinstance(data, str):
        return False
    try:
        frame = f.decode_client_frame(data)
    except f.FrameError:
        return False
    return not isinstance(frame, f.Hello)


class Harness:
    """A live server with one circle (a moderator and two members watching, one member
    sending the bad input) in its own thread's event loop."""

    def __init__(self, store_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._stack = contextlib.AsyncExitStack()
        self.store_url = store_url
        self.run(self._start())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def _start(self) -> None:
        # No rate limit here: the frames are what is tested, not the pace.
        limits = Limits(rate=10_000.0, burst=10_000)
        self.live: Live = await self._stack.enter_async_context(live_server(self.store_url, limits=limits))
        circle = await self.live.create_circle()
        links = circle["links"]
        self.mod = await join(self.live, links["moderator"], "Pendamping")
        self.watcher = await join(self.live, links["member"], "Kenanga")
        self.fuzzer = await join(self.live, links["member"], "Acak")
        self.member_link = links["member"]
        snapshots = [await self.sync(c) for c in (self.mod, self.watcher, self.fuzzer)]
        self.version = snapshots[0]["version"]
        self.seen = {id(c): len(c.events()) for c in (self.mod, self.watcher)}

    async def sync(self, client: Client) -> dict[str, Any]:
        start = len(client.frames)
        await client.send({"type": "sync"})
        return await client.wait(lambda fr: fr.get("type") == "snapshot", start=start)

    async def example(self, data: bytes | str) -> None:
        # 1. as the first frame of a fresh connection: closed with a code, nothing answered
        fresh = await Client.connect(self.live)
        await fresh.ws.send(data)
        code = await fresh.closed()
        assert code in (4400, 4401), (code, data[:80])
        assert fresh.frames == []
        # 2. from an admitted member: an `error`, and the socket stays open
        start = len(self.fuzzer.frames)
        await self.fuzzer.ws.send(data)
        snap = await self.sync(self.fuzzer)
        answers = [fr for fr in self.fuzzer.frames[start:] if fr.get("type") != "snapshot"]
        assert [fr["type"] for fr in answers] == ["error"], (answers, data[:80])
        assert answers[0]["code"] in {c.value for c in f.ErrorCode}
        assert snap["version"] == self.version
        # 3. the others saw nothing
        for client in (self.mod, self.watcher):
            snap = await self.sync(client)
            assert snap["version"] == self.version
            assert len(client.events()) == self.seen[id(client)], client.events()[-3:]

    async def _stop(self) -> None:
        await self._stack.aclose()

    def close(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


_HARNESSES: dict[str, Harness] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_harnesses() -> Iterator[None]:
    yield
    while _HARNESSES:
        _HARNESSES.popitem()[1].close()


def harness(store_url: str) -> Harness:
    if store_url not in _HARNESSES:
        _HARNESSES[store_url] = Harness(store_url)
    return _HARNESSES[store_url]


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not bad, [(r.name, r.getMessage()) for r in bad]


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=frames)
def test_bad_frames_get_an_error_or_a_close_and_nobody_else_notices(
        store_url: str, caplog: pytest.LogCaptureFixture, data: bytes | str) -> None:
    assume(not acceptable(data))
    caplog.set_level(logging.DEBUG)
    h = harness(store_url)
    h.run(h.example(data))
    assert_no_traceback(caplog)


@pytest.mark.parametrize("data", SPECIAL, ids=range(len(SPECIAL)))
def test_each_special_frame(store_url: str, caplog: pytest.LogCaptureFixture, data: bytes) -> None:
    caplog.set_level(logging.DEBUG)
    h = harness(store_url)
    h.run(h.example(data))
    assert_no_traceback(caplog)
