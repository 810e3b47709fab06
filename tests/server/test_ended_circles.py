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

import pytest

from signaling import session as session_module
from signaling.close import CloseCode
from signaling.session import Session
from storage.subscription import CircleHub, Closed, Item, Subscription
from tests.live import Client, Live, token_of
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


def kept_anywhere(live: Live, circle_id: str) -> dict[str, bool]:
    parts = live.parts
    return {"manager": parts.manager.keeps(circle_id), "circles": parts.circles.keeps(circle_id),
            "store": parts.store.keeps(circle_id), "homes": parts.homes.keeps(circle_id),
            "relay": parts.relay.stats()["circles"] > 0}


async def end_through_the_api(live: Live, circle_id: str, moderator: Client) -> None:
    """DELETE the circle and await every step of its end: the moderator closed with 4000,
    the manager's subscribers told `Closed` (the hub is gone then), no session left here."""
    parts = live.parts
    state = await parts.manager.load(circle_id)
    closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def heard(item: Item) -> None:
        if isinstance(item, Closed) and not closed.done():
            closed.set_result(None)

    parts.manager.subscribe(circle_id, state.version).listen(heard)
    status, _ = await live.api("DELETE", f"/api/circles/{circle_id}")
    assert status == 204
    assert await moderator.closed() == CloseCode.ENDED
    await asyncio.wait_for(closed, 10)  # the circle is deleted
    await asyncio.wait_for(parts.circles.idle.wait(), 10)


async def test_an_ended_circle_is_forgotten_everywhere(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    circle_id = circle["id"]
    assert kept_anywhere(live, circle_id) == {"manager": True, "circles": True, "store": True,
                                              "homes": True, "relay": True}
    await ack_of(a, "raise_hand")
    await ack_of(a, "leave")
    await ack_of(b, "leave_quietly")
    assert await a.closed() == await b.closed() == CloseCode.LEFT

    await end_through_the_api(live, circle_id, mod)

    assert kept_anywhere(live, circle_id) == {"manager": False, "circles": False, "store": False,
                                              "homes": False, "relay": False}
    # The frames encoded once for every member are kept for one delivery only (by its
    # circle's hub): no module keeps the pseudonyms of those who left while the server is
    # quiet, and no hub of a live circle holds a frame between deliveries.
    assert not hasattr(session_module, "_ENCODED")
    assert all(k.hub._made is None for k in live.parts.manager._known.values())


async def test_knocking_on_an_ended_or_made_up_circle_leaves_no_lock_behind(live: Live) -> None:
    """A lock per circle id used to be made on first use and kept for good: one for every
    ended circle, and one for every id a hello or an API call named, made up or not."""
    circle, mod, _, _ = await circle_of(live)
    circle_id = circle["id"]
    await end_through_the_api(live, circle_id, mod)

    late = await Client.connect(live)  # a valid member link of the ended circle
    await late.send({"type": "hello", "token": token_of(circle["links"]["member"]), "name": "Melati"})
    assert await late.closed() == CloseCode.NO_SUCH_CIRCLE
    for method, path, body in [("DELETE", f"/api/circles/{circle_id}", None),
                               ("POST", f"/api/circles/{circle_id}/invites", {"role": "member"}),
                               ("DELETE", "/api/circles/made-up-circle", None),
                               ("POST", "/api/circles/made-up-circle/invites", {"role": "member"})]:
        status, _ = await live.api(method, path, body)
        assert status == 404, (method, path)

    for cid in (circle_id, "made-up-circle"):
        assert kept_anywhere(live, cid) == {"manager": False, "circles": False, "store": False,
                                            "homes": False, "relay": False}


async def test_closed_connections_and_the_hub_are_freed_by_reference_counting(
        live: Live, no_cycle_collector: None) -> None:
    circle, mod, a, b = await circle_of(live)
    circle_id = circle["id"]
    sessions = live.parts.circles.sessions()
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
