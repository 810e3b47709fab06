"""The room manager on both stores: CAS retries, fan-out to subscribers, ticks, faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from rooms import commands as c
from rooms.errors import Code, RoomError
from rooms.events import Event, Name
from rooms.model import CircleSettings, FloorMode, Invite, Role
from storage.clock import FakeClock
from storage.codec import CorruptState, decode_event
from storage.manager import RoomManager
from storage.memory_store import MemoryStore
from storage.redis_store import RedisStore
from storage.store import NoSuchCircle, Store, StoreUnavailable
from storage.subscription import Closed, Item, Resync, Subscription
from testkit.redis_server import RedisServer
from tests.rooms.conftest import MakeStore

INVITES = [Invite("inv-mod", Role.MODERATOR), Invite("inv-member", Role.MEMBER)]


def circle(circle_id: str, **settings: object) -> CircleSettings:
    options: dict[str, object] = dict(title="Lingkar", lobby=False, capacity=50)
    options.update(settings)
    return CircleSettings(id=circle_id, **options)  # type: ignore[arg-type]


def join(member_id: str, role: Role = Role.MEMBER) -> c.Join:
    invite = "inv-mod" if role is Role.MODERATOR else "inv-member"
    return c.Join(member_id=member_id, invite_id=invite, role=role, name=member_id,
                  listen_only=False, resume_hash="h-" + member_id)


@pytest.fixture
async def managers(make_store: MakeStore, fake_clock: FakeClock
                   ) -> AsyncIterator[Callable[..., RoomManager]]:
    """Managers on one shared backend, as if in several processes."""
    made: list[RoomManager] = []

    def make(**store_options: object) -> RoomManager:
        manager = RoomManager(make_store(**store_options), clock=fake_clock)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        await manager.close()


class Inbox:
    """What a subscription hands its listener, queued for the test to read."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self._items: asyncio.Queue[Item] = asyncio.Queue()
        sub.listen(self._items.put_nowait)

    async def get(self) -> Item:
        return await asyncio.wait_for(self._items.get(), 10)

    def get_nowait(self) -> Item | None:
        return None if self._items.empty() else self._items.get_nowait()

    async def ready(self) -> None:
        await asyncio.wait_for(self.sub.ready(), 10)

    def close(self) -> None:
        self.sub.close()


def follow(manager: RoomManager, circle_id: str, from_version: int) -> Inbox:
    return Inbox(manager.subscribe(circle_id, from_version))


async def take(inbox: Inbox, n: int) -> list[Item]:
    return [await inbox.get() for _ in range(n)]


async def take_until(inbox: Inbox, done: Callable[[Item], bool]) -> list[Item]:
    items: list[Item] = []
    while not items or not done(items[-1]):
        items.append(await inbox.get())
    return items


async def test_created_circle_loads_at_version_zero(managers: Callable[..., RoomManager],
                                                   circle_id: str) -> None:
    manager = managers()
    state = await manager.create(circle(circle_id), INVITES)
    loaded = await manager.load(circle_id)
    assert (state.version, loaded.version) == (0, 0)
    assert set(loaded.invites) == {"inv-mod", "inv-member"}
    assert [s.circle.id for s in await manager.circles()] == [circle_id]


async def test_missing_circle_raises_no_such_circle(managers: Callable[..., RoomManager]) -> None:
    manager = managers()
    with pytest.raises(NoSuchCircle):
        await manager.load("nope")
    with pytest.raises(NoSuchCircle):
        await manager.execute("nope", c.RaiseHand("m1"))


async def test_each_accepted_command_adds_one_version(managers: Callable[..., RoomManager],
                                                     circle_id: str) -> None:
    manager = managers()
    await manager.create(circle(circle_id), INVITES)
    await manager.execute(circle_id, join("mod", Role.MODERATOR))
    state, events = await manager.execute(circle_id, join("m1"))
    assert state.version == 2 and {e.version for e in events} == {2}
    state, events = await manager.execute(circle_id, c.RaiseHand("m1"))
    assert state.queue == ["m1"] and events[0].name is Name.HAND_RAISED
    again, none = await manager.execute(circle_id, c.RaiseHand("m1"))  # already raised
    assert (again.version, none) == (3, [])
    assert (await manager.load(circle_id)).version == 3


async def test_refused_command_raises_and_changes_nothing(managers: Callable[..., RoomManager],
                                                          circle_id: str) -> None:
    manager = managers()
    await manager.create(circle(circle_id), INVITES)
    await manager.execute(circle_id, join("m1"))
    with pytest.raises(RoomError) as refused:
        await manager.execute(circle_id, c.MuteAll("m1"))
    assert refused.value.code is Code.FORBIDDEN
    assert (await manager.load(circle_id)).version == 1


async def test_refusal_is_decided_on_the_latest_state_not_a_stale_cache(
        managers: Callable[..., RoomManager], circle_id: str) -> None:
    a, b = managers(), managers()
    await a.create(circle(circle_id), INVITES)
    await a.execute(circle_id, join("m1"))
    await a.execute(circle_id, c.RaiseHand("m1"))
    await b.execute(circle_id, c.LowerHand("m1"))  # `a` has not heard of it yet
    state, events = await a.execute(circle_id, c.RaiseHand("m1"))
    assert state.queue == ["m1"] and events and state.version == 4


async def test_corrupt_state_is_a_typed_error_and_stays(make_store: MakeStore,
                                                        managers: Callable[..., RoomManager],
                                                        circle_id: str) -> None:
    manager = managers()
    await manager.create(circle(circle_id), INVITES)
    store = make_store()
    await store.save(circle_id, 0, b"\x93\x01\x02", [], 1)
    with pytest.raises(CorruptState):
        await manager.execute(circle_id, join("m1"))
    with pytest.raises(CorruptState):
        await manager.load(circle_id)
    assert await store.load(circle_id) == b"\x93\x01\x02"


async def test_subscriber_gets_every_event_once_in_order(managers: Callable[..., RoomManager],
                                                         circle_id: str) -> None:
    a, b = managers(), managers()
    await a.create(circle(circle_id), INVITES)
    sub = follow(b, circle_id, 0)
    expected: list[Event] = []
    for command in [join("mod", Role.MODERATOR), join("m1"), c.RaiseHand("m1"),
                    c.GiveFloor("mod", "m1"), c.UnmuteSelf("m1"), c.MuteSelf("m1"),
                    c.ReleaseFloor("mod")]:
        expected += (await a.execute(circle_id, command))[1]
    assert await take(sub, len(expected)) == expected
    late = follow(b, circle_id, 3)  # replay from a version
    assert await take(late, len([e for e in expected if e.version > 3])) == [
        e for e in expected if e.version > 3]
    await a.execute(circle_id, c.RaiseHand("m1"))
    both = [await take(s, 1) for s in (sub, late)]
    assert both[0] == both[1] and both[0][0].name is Name.HAND_RAISED  # type: ignore[union-attr]
    assert sub.get_nowait() is None


async def test_subscribers_here_get_the_saved_events_themselves(circle_id: str) -> None:
    """On the memory store the process that saves hands its own subscribers the events it
    saved, not a decoding of their bytes (equal either way); another manager's subscribers
    (another process, on a shared store) decode them. (On Redis the first wake-up after
    subscribing may carry no events: then they are fetched, and decoded.)"""
    store = MemoryStore()
    a, b = RoomManager(store), RoomManager(store)
    try:
        await a.create(circle(circle_id), INVITES)
        await a.execute(circle_id, join("m1"))
        here, there = follow(a, circle_id, 1), follow(b, circle_id, 1)
        await asyncio.gather(here.ready(), there.ready())
        _, events = await a.execute(circle_id, c.RaiseHand("m1"))
        got_here, got_there = await take(here, 1), await take(there, 1)
        assert got_here == got_there == events
        assert got_here[0] is events[0] and got_there[0] is not events[0]
    finally:
        await a.close()
        await b.close()


async def test_lagging_subscriber_gets_a_resync(managers: Callable[..., RoomManager],
                                                circle_id: str) -> None:
    manager = managers(max_versions=3)
    await manager.create(circle(circle_id), INVITES)
    await manager.execute(circle_id, join("m1"))
    for _ in range(150):
        await manager.execute(circle_id, c.RaiseHand("m1"))
        await manager.execute(circle_id, c.LowerHand("m1"))
    sub = follow(manager, circle_id, 0)
    first = await take(sub, 1)
    assert isinstance(first[0], Resync) and first[0].state.version == 301


async def test_private_notes_reach_subscribers_and_are_never_stored(
        make_store: MakeStore, managers: Callable[..., RoomManager], circle_id: str) -> None:
    a, b = managers(), managers()
    await a.create(circle(circle_id), INVITES)
    await a.execute(circle_id, join("mod", Role.MODERATOR))
    await a.execute(circle_id, join("m1"))
    sub = follow(b, circle_id, 2)
    await sub.ready()
    state, events = await a.execute(circle_id, c.PrivateNote("m1", "aku butuh bantuan", True))
    assert state.version == 2 and [e.name for e in events] == [Name.PRIVATE_NOTE]
    note = (await take(sub, 1))[0]
    assert isinstance(note, Event) and note.data["text"] == "aku butuh bantuan"
    assert note.version == 2  # the current version: not a gap
    await a.execute(circle_id, c.RaiseHand("m1"))
    after = (await take(sub, 1))[0]
    assert isinstance(after, Event) and after.name is Name.HAND_RAISED
    kept = [decode_event(e).name for e in await make_store().events_since(circle_id, 0)]
    assert Name.PRIVATE_NOTE not in kept and Name.HAND_RAISED in kept


async def test_ending_delivers_the_final_events_then_closes_and_deletes(
        make_store: MakeStore, managers: Callable[..., RoomManager], circle_id: str) -> None:
    a, b = managers(), managers()
    await a.create(circle(circle_id), INVITES)
    await a.execute(circle_id, join("mod", Role.MODERATOR))
    subs = [follow(b, circle_id, 1), follow(a, circle_id, 1)]
    for sub in subs:
        await sub.ready()
    state, events = await a.execute(circle_id, c.End("mod"))
    assert state.ended and [e.name for e in events] == [Name.ENDED]
    for sub in subs:
        items = await take_until(sub, lambda i: isinstance(i, Closed))
        assert [getattr(i, "name", None) for i in items] == [Name.ENDED, None]
        assert sub.get_nowait() is None  # nothing after Closed
    with pytest.raises(NoSuchCircle):
        await make_store().load(circle_id)
    assert await a.circles() == []


async def test_an_ended_circle_is_kept_by_no_manager(
        managers: Callable[..., RoomManager], circle_id: str) -> None:
    """Issue 17: neither the manager that ended it nor another that followed it keeps
    anything of it, nor of an id it was asked about after it ended."""
    a, b = managers(), managers()
    await a.create(circle(circle_id), INVITES)
    await a.execute(circle_id, join("mod", Role.MODERATOR))
    sub = follow(b, circle_id, 1)
    await sub.ready()
    await a.execute(circle_id, c.End("mod"))
    await take_until(sub, lambda i: isinstance(i, Closed))
    for manager in (a, b):
        with pytest.raises(NoSuchCircle):
            await manager.execute(circle_id, c.RaiseHand("mod"))
    assert not a.keeps(circle_id) and not b.keeps(circle_id)


async def test_a_circle_left_without_ending_is_let_go_once_nobody_follows_it_and_nothing_is_due(
        make_store: MakeStore, fake_clock: FakeClock, circle_id: str) -> None:
    """Issue 17: everyone left and nobody ended the circle. It stays in the store until its
    idle TTL, but the manager keeps nothing of it (hub, store subscription, cached state)
    from when its last subscriber leaves and its last deadline has passed."""
    store = make_store()
    manager = RoomManager(store, clock=fake_clock)
    try:
        await _left_without_ending(manager, store, fake_clock, circle_id)
    finally:
        await manager.close()


async def _left_without_ending(manager: RoomManager, store: Store, fake_clock: FakeClock,
                               circle_id: str) -> None:
    await manager.create(circle(circle_id), INVITES)
    await manager.execute(circle_id, join("mod", Role.MODERATOR))
    assert not manager.keeps(circle_id)  # what the organizer API does keeps nothing
    await manager.load(circle_id)
    assert not manager.keeps(circle_id)

    sub = follow(manager, circle_id, 1)
    state, _ = await manager.execute(circle_id, join("m1"))
    await take_until(sub, lambda i: getattr(i, "name", None) is Name.MEMBER_JOINED)
    assert manager.keeps(circle_id)
    await manager.execute(circle_id, c.Leave("mod"))
    await manager.execute(circle_id, c.Disconnect("m1", state.members["m1"].session))  # grace
    sub.close()
    assert manager.keeps(circle_id)  # the grace period's timer
    await fake_clock.advance(30_000)  # the grace period runs out: the seat goes
    assert "m1" not in (await manager.load(circle_id)).members
    assert not manager.keeps(circle_id)
    if isinstance(store, RedisStore):  # no subscription, nor the last version it woke
        assert not store.keeps(circle_id)

    again = follow(manager, circle_id, (await manager.load(circle_id)).version)  # it comes back
    await manager.execute(circle_id, join("m2"))
    assert [getattr(i, "name", None) for i in await take(again, 1)] == [Name.MEMBER_JOINED]


async def test_a_failed_tick_is_retried_even_if_the_last_subscriber_left_meanwhile(
        fake_clock: FakeClock, circle_id: str) -> None:
    from storage.manager import TICK_RETRY_MS
    from storage.memory_store import MemoryStore

    class Flaky:
        """A memory store that fails the next save, after running `during` (someone leaving
        as it happens). It wraps the store rather than subclassing it: the compiled store
        (server/compiled.py) takes no subclass written in Python."""

        during: Callable[[], None] | None = None

        def __init__(self, store: MemoryStore) -> None:
            self.store = store

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

        async def save(self, *args: Any, **kwargs: Any) -> None:
            during, self.during = self.during, None
            if during is not None:
                during()
                raise StoreUnavailable("down for a moment")
            await self.store.save(*args, **kwargs)

    store = Flaky(MemoryStore(clock=fake_clock.now, timers=fake_clock))
    manager = RoomManager(store, clock=fake_clock)
    try:
        await manager.create(circle(circle_id), INVITES)
        await manager.execute(circle_id, join("mod", Role.MODERATOR))
        state, _ = await manager.execute(circle_id, join("m1"))
        sub = follow(manager, circle_id, state.version)
        await manager.execute(circle_id, c.Disconnect("m1", state.members["m1"].session))
        store.during = sub.close  # the grace tick fails as the last subscriber leaves
        await fake_clock.advance(30_000)
        assert "m1" in (await manager.load(circle_id)).members
        await fake_clock.advance(TICK_RETRY_MS)
        assert "m1" not in (await manager.load(circle_id)).members
        assert not manager.keeps(circle_id)
    finally:
        await manager.close()


async def test_concurrent_commands_from_several_managers_all_land(
        managers: Callable[..., RoomManager], circle_id: str) -> None:
    many = [managers() for _ in range(4)]
    members = [f"m{i}" for i in range(40)]
    await many[0].create(circle(circle_id), INVITES)
    for mid in members:
        await many[0].execute(circle_id, join(mid))
    watcher = follow(managers(), circle_id, len(members))
    toggles = 5

    async def toggle(mid: str, manager: RoomManager) -> int:
        accepted = 0
        for i in range(toggles):
            command = c.UnmuteSelf(mid) if i % 2 == 0 else c.MuteSelf(mid)
            _, events = await manager.execute(circle_id, command)
            accepted += bool(events)
        return accepted

    counts = await asyncio.gather(*(toggle(mid, many[i % 4]) for i, mid in enumerate(members)))
    assert sum(counts) == len(members) * toggles
    final = await many[1].load(circle_id)
    assert final.version == len(members) + len(members) * toggles
    seen = [e for e in await take(watcher, len(members) * toggles) if isinstance(e, Event)]
    assert [e.version for e in seen] == list(range(len(members) + 1, final.version + 1))


async def test_turn_warning_and_turn_over_fire_as_time_passes(
        managers: Callable[..., RoomManager], fake_clock: FakeClock, circle_id: str) -> None:
    manager = managers()
    await manager.create(circle(circle_id, turn_seconds=60, floor_mode=FloorMode.HANDS), INVITES)
    await manager.execute(circle_id, join("mod", Role.MODERATOR))
    await manager.execute(circle_id, join("m1"))
    sub = follow(manager, circle_id, 2)
    await manager.execute(circle_id, c.GiveFloor("mod", "m1"))
    given = await take_until(sub, lambda i: getattr(i, "name", None) is Name.FLOOR_GIVEN)
    assert len(given) == 1
    await fake_clock.advance(29_000)
    assert not (await manager.load(circle_id)).floor.warned  # type: ignore[union-attr]
    await fake_clock.advance(1_000)
    warned = await take(sub, 2)
    assert [getattr(i, "name", None) for i in warned] == [Name.TURN_WARNING] * 2
    await fake_clock.advance(30_000)
    over = await take(sub, 1)
    assert [getattr(i, "name", None) for i in over] == [Name.TURN_OVER]
    assert (await manager.load(circle_id)).floor.over  # type: ignore[union-attr]
    assert fake_clock.pending == 0


async def test_a_tick_armed_in_two_processes_fires_once(
        managers: Callable[..., RoomManager], fake_clock: FakeClock, circle_id: str) -> None:
    a, b = managers(), managers()
    await a.create(circle(circle_id, turn_seconds=60), INVITES)
    await a.execute(circle_id, join("mod", Role.MODERATOR))
    await a.execute(circle_id, join("m1"))
    sub = follow(b, circle_id, 2)
    await b.execute(circle_id, c.RaiseHand("m1"))  # b knows the circle too
    await a.execute(circle_id, c.GiveFloor("mod", "m1"))
    await take_until(sub, lambda i: getattr(i, "name", None) is Name.FLOOR_GIVEN)
    warning_at = fake_clock.now() + 60_000 - 30_000
    await asyncio.wait_for(fake_clock.wait_armed(warning_at, count=2), 10)  # a's and b's timers
    await fake_clock.advance(60_000)
    over = await take_until(sub, lambda i: getattr(i, "name", None) is Name.TURN_OVER)
    assert [getattr(i, "name", None) for i in over].count(Name.TURN_WARNING) == 2
    assert (await a.load(circle_id)).version == 6  # joins 2, hand 1, floor 1, warn 1, over 1


async def test_redis_restart_fails_closed_then_resumes(own_redis: RedisServer) -> None:
    store = RedisStore(own_redis.url, socket_timeout=2)
    manager = RoomManager(store, clock=FakeClock())
    try:
        await manager.create(circle("r1"), INVITES)
        await manager.execute("r1", join("m1"))
        sub = follow(manager, "r1", 1)
        await manager.execute("r1", c.RaiseHand("m1"))
        assert [getattr(i, "name", None) for i in await take(sub, 1)] == [Name.HAND_RAISED]

        own_redis.stop(save=True)
        with pytest.raises(StoreUnavailable):
            await manager.ping()
        with pytest.raises(StoreUnavailable):
            await manager.execute("r1", c.LowerHand("m1"))
        with pytest.raises(StoreUnavailable):
            await manager.load("r1")

        own_redis.start()
        await manager.ping()
        state, _ = await manager.execute("r1", c.LowerHand("m1"))
        assert state.version == 3
        assert [getattr(i, "name", None) for i in await take(sub, 1)] == [Name.HAND_LOWERED]
        await manager.execute("r1", c.RaiseHand("m1"))  # live wake-ups again, once each
        assert [getattr(i, "name", None) for i in await take(sub, 1)] == [Name.HAND_RAISED]
        assert sub.get_nowait() is None
    finally:
        await manager.close()
        await store.close()


async def test_a_redis_that_stops_answering_fails_the_save_in_time_then_recovers(
        own_redis: RedisServer) -> None:
    """A save waits for a silent Redis no longer than the store's timeout (its batch's one
    timer), answers StoreUnavailable, and the next save after Redis wakes goes through."""
    store = RedisStore(own_redis.url, socket_timeout=0.5)
    manager = RoomManager(store, clock=FakeClock())
    try:
        await manager.create(circle("p1"), INVITES)
        await manager.execute("p1", join("m1"))
        own_redis.pause()
        try:
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(manager.execute("p1", c.RaiseHand("m1")), 10)
        finally:
            own_redis.resume()
        # the save may have run before Redis froze: the state says which, and the next one works
        state = await manager.load("p1")
        state, _ = await manager.execute("p1", c.LowerHand("m1") if state.version == 2 else c.RaiseHand("m1"))
        assert state.version in (2, 3)
    finally:
        await manager.close()
        await store.close()
