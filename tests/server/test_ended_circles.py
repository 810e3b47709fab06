"""Issue 17: an ended circle leaves nothing behind in the server, on both stores.

A churn soak (`python -m loadtest.soak`) grew the server by about 23 KB per ended circle:
every closed connection (its session, the socket stack under it) and every circle's event
hub sat in a reference cycle, kept until a full collection, which the tuned collector
(`server.gctune`) all but never runs. These tests run with the collector off, so whatever a
cycle keeps stays kept and they fail, and never sleep: they await the events that mark each
step (a close, the subscription's `Closed`, the registry going idle, a finalizer).
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from rooms.subscription import CircleHub, Closed, Subscription
from signaling.close import CloseCode
from signaling.session import Session
from tests.live import Client, Live
from tests.server.conftest import ack_of, circle_of


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    """Only reference counting frees anything while the test runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def end_through_the_api(live: Live, circle_id: str, moderator: Client) -> None:
    """DELETE the circle and await every step of its end: the moderator closed with 4000,
    the manager's subscribers told `Closed` (the hub is gone then), no session left here."""
    parts = live.parts
    state = await parts.manager.load(circle_id)
    watch = parts.manager.subscribe(circle_id, state.version)
    status, _ = await live.api("DELETE", f"/api/circles/{circle_id}")
    assert status == 204
    assert await moderator.closed() == CloseCode.ENDED

    async def last_item() -> Any:
        items = [item async for item in watch]  # until the circle is deleted
        return items[-1] if items else None

    assert isinstance(await asyncio.wait_for(last_item(), 10), Closed)
    await asyncio.wait_for(parts.local.idle.wait(), 10)


async def test_closed_connections_and_the_hub_are_freed_by_reference_counting(
        live: Live, no_cycle_collector: None) -> None:
    circle, mod, a, b = await circle_of(live)
    circle_id = circle["id"]
    sessions = live.parts.local.sessions()
    assert len(sessions) == 3
    freed = asyncio.Event()
    alive = [len(sessions)]

    def one_freed() -> None:
        alive[0] -= 1
        if not alive[0]:
            freed.set()

    for session in sessions:
        weakref.finalize(session, one_freed)
    del session, sessions

    await ack_of(a, "leave")
    await ack_of(b, "leave_quietly")
    await end_through_the_api(live, circle_id, mod)
    try:
        await asyncio.wait_for(freed.wait(), 10)
    except TimeoutError:
        pytest.fail(f"{alive[0]} of 3 closed sessions are still alive: a reference cycle "
                    "keeps them (and their socket stack) until a full collection")

    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage
                  if isinstance(o, (Session, Subscription, CircleHub))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cyclic == []
