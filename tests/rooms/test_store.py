"""The store contract, on both stores (see conftest: `make_store` is parametrized)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from rooms.events import EVERYONE, MODERATORS, Event, Name
from rooms.model import CircleSettings, RoomState
from storage.clock import FakeClock
from storage.codec import CorruptState, decode_event, decode_state, encode_event, encode_state
from storage.memory_store import MemoryStore
from storage.redis_cluster import RedisClusterStore
from storage.redis_store import RedisStore
from storage.store import (
    CircleExists,
    NoSuchCircle,
    NotReplicated,
    Owner,
    ReplayGap,
    Store,
    VersionConflict,
)
from testkit.redis_cluster import LocalRedisCluster
from testkit.redis_server import RedisServer, everything_in, key_expiry
from tests.rooms.conftest import MakeStore


def blob(circle_id: str, version: int) -> bytes:
    state = RoomState.new(CircleSettings(id=circle_id, title="t"))
    state.version = version
    return encode_state(state)


def event(version: int, n: int = 0) -> bytes:
    return encode_event(Event(Name.HAND_RAISED, {"n": n}, EVERYONE, version))


async def save_versions(store: Store, circle_id: str, upto: int, start: int = 0) -> None:
    for v in range(start + 1, upto + 1):
        await store.save(circle_id, v - 1, blob(circle_id, v), [event(v, 0), event(v, 1)], v)


class Wakes:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, int, list[bytes] | None]] = asyncio.Queue()
        self.ephemeral: asyncio.Queue[bytes] = asyncio.Queue()

    def on_wake(self, circle_id: str, version: int, events: Sequence[bytes] | None) -> None:
        self.queue.put_nowait((circle_id, version, None if events is None else list(events)))

    def on_ephemeral(self, circle_id: str, event: bytes) -> None:
        self.ephemeral.put_nowait(event)

    async def next_carrying(self) -> tuple[int, list[bytes]]:
        """The next wake-up that carries events (skipping catch-up calls)."""
        while True:
            _, version, events = await asyncio.wait_for(self.queue.get(), 10)
            if events is not None or version < 0:
                return version, events or []


async def test_created_circle_loads_back(make_store: MakeStore, circle_id: str) -> None:
    store = make_store()
    await store.create(circle_id, blob(circle_id, 0))
    assert decode_state(await store.load(circle_id)).circle.id == circle_id


async def test_create_twice_is_refused_and_keeps_the_first(make_store: MakeStore,
                                                           circle_id: str) -> None:
    store = make_store()
    await store.create(circle_id, blob(circle_id, 0))
    await save_versions(store, circle_id, 2)
    with pytest.raises(CircleExists):
        await store.create(circle_id, blob(circle_id, 0))
    assert decode_state(await store.load(circle_id)).version == 2


async def test_missing_circle_raises_no_such_circle(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(NoSuchCircle):
        await store.load("nope")
    with pytest.raises(NoSuchCircle):
        await store.save("nope", 0, blob("nope", 1), [], 1)
    with pytest.raises(NoSuchCircle):
        await store.events_since("nope", 0)


async def test_save_compares_the_version_and_refuses_a_stale_writer(make_store: MakeStore,
                                                                     circle_id: str) -> None:
    store = make_store()
    await store.create(circle_id, blob(circle_id, 0))
    await store.save(circle_id, 0, blob(circle_id, 1), [event(1)], 1)
    other = RoomState.new(CircleSettings(id=circle_id, title="another writer"))
    other.version = 1
    with pytest.raises(VersionConflict):
        await store.save(circle_id, 0, encode_state(other), [event(1, 9)], 1)
    with pytest.raises(VersionConflict):
        await store.save(circle_id, 5, blob(circle_id, 6), [], 6)
    assert decode_state(await store.load(circle_id)).version == 1
    assert [decode_event(e).data for e in await store.events_since(circle_id, 0)] == [{"n": 0}]


async def test_a_save_retried_after_it_landed_succeeds_once(make_store: MakeStore,
                                                            circle_id: str) -> None:
    store = make_store()
    await store.create(circle_id, blob(circle_id, 0))
    await store.save(circle_id, 0, blob(circle_id, 1), [event(1)], 1)
    await store.save(circle_id, 0, blob(circle_id, 1), [event(1)], 1)
    assert len(await store.events_since(circle_id, 0)) == 1


async def test_corrupt_blob_is_a_typed_error_and_is_not_reset(make_store: MakeStore,
                                                              circle_id: str) -> None:
    store = make_store()
    await store.create(circle_id, blob(circle_id, 0))
    await store.save(circle_id, 0, b"\xc1garbage", [], 1)
    stored = await store.load(circle_id)
    with pytest.raises(CorruptState):
        decode_state(stored)
    assert await store.load(circle_id) == b"\xc1garbage"
    with pytest.raises(CorruptState):
        await store.create("other", b"not msgpack \xc1")


async def test_a_redis_key_of_the_wrong_type_is_corrupt_state(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    try:
        with redis_server.client() as c:
            c.set("lk:{wrongtype}:state", b"x")
        with pytest.raises(CorruptState):
            await store.load("wrongtype")
    finally:
        await store.close()


async def test_events_since_replays_in_order_after_a_version(make_store: MakeStore,
                                                             circle_id: str) -> None:
    store = make_store()
    await store.create(circle_id, blob(circle_id, 0))
    await save_versions(store, circle_id, 3)
    await store.save(circle_id, 3, blob(circle_id, 4), [], 4)  # a version without events
    await store.save(circle_id, 4, blob(circle_id, 5), [event(5)], 5)
    got = [decode_event(e) for e in await store.events_since(circle_id, 0)]
    assert [(e.version, e.data["n"]) for e in got] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
                                                         (3, 1), (5, 0)]
    assert [decode_event(e).version for e in await store.events_since(circle_id, 2)] == [3, 3, 5]
    assert await store.events_since(circle_id, 5) == []
    assert await store.events_since(circle_id, 9) == []


async def test_events_no_longer_kept_raise_replay_gap(make_store: MakeStore,
                                                      circle_id: str) -> None:
    store = make_store(max_versions=5)
    await store.create(circle_id, blob(circle_id, 0))
    await save_versions(store, circle_id, 300)
    with pytest.raises(ReplayGap):
        await store.events_since(circle_id, 0)
    recent = [decode_event(e).version for e in await store.events_since(circle_id, 295)]
    assert recent == [296, 296, 297, 297, 298, 298, 299, 299, 300, 300]


async def test_delete_removes_the_circle_and_wakes_subscribers(make_store: MakeStore,
                                                               circle_id: str) -> None:
    store = make_store()
    await store.create(circle_id, blob(circle_id, 0))
    await save_versions(store, circle_id, 2)
    wakes = Wakes()
    store.subscribe(circle_id, wakes.on_wake, wakes.on_ephemeral)
    assert (await asyncio.wait_for(wakes.queue.get(), 10))[1:] == (2, None)  # catch-up
    await store.delete(circle_id)
    assert await wakes.next_carrying() == (-1, [])
    with pytest.raises(NoSuchCircle):
        await store.load(circle_id)
    assert circle_id not in await store.circle_ids()


async def test_delete_leaves_no_key_of_the_circle_in_redis(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    try:
        await store.create("gone", blob("gone", 0))
        await save_versions(store, "gone", 3)
        with redis_server.client() as c:
            assert c.keys("lk:{gone}:*")
            await store.delete("gone")
            assert c.keys("lk:{gone}:*") == []
            assert not c.sismember("lk:circles", "gone")
    finally:
        await store.close()


async def test_every_key_of_a_saved_circle_has_the_idle_ttl(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, idle_seconds=3600)
    try:
        await store.create("idle", blob("idle", 0))
        await save_versions(store, "idle", 1)
        with redis_server.client() as c:
            keys = c.keys("lk:{idle}:*")
            assert sorted(keys) == [b"lk:{idle}:events", b"lk:{idle}:state"]
            for key in keys:
                assert 0 < c.pttl(key) <= 3600_000
    finally:
        await store.close()


async def test_memory_circles_expire_when_idle(fake_clock: FakeClock) -> None:
    from storage.memory_store import MemoryStore

    store = MemoryStore(idle_seconds=60, clock=fake_clock.now)
    await store.create("a", blob("a", 0))
    await store.create("b", blob("b", 0))
    await fake_clock.advance(50_000)
    await save_versions(store, "b", 1)  # a save keeps "b" alive
    await fake_clock.advance(20_000)
    assert await store.circle_ids() == ["b"]
    with pytest.raises(NoSuchCircle):
        await store.load("a")
    await store.create("a", blob("a", 0))  # the id is free again


async def test_an_idle_memory_circle_nobody_lists_goes_at_the_next_creation(
        fake_clock: FakeClock) -> None:
    from storage.memory_store import MemoryStore

    store = MemoryStore(idle_seconds=60, clock=fake_clock.now)
    await store.create("a", blob("a", 0))
    await fake_clock.advance(61_000)
    assert store.keeps("a")  # nobody asked since
    await store.create("b", blob("b", 0))
    assert not store.keeps("a") and store.keeps("b")


async def test_circle_ids_lists_live_circles(make_store: MakeStore) -> None:
    store = make_store()
    for cid in ("x1", "x2", "x3"):
        await store.create(cid, blob(cid, 0))
    await store.delete("x2")
    assert sorted(await store.circle_ids()) == ["x1", "x3"]


async def test_subscribers_get_every_save_in_order_with_its_events(make_store: MakeStore,
                                                                    circle_id: str) -> None:
    store = make_store()
    await store.create(circle_id, blob(circle_id, 0))
    wakes = Wakes()
    unsubscribe = store.subscribe(circle_id, wakes.on_wake, wakes.on_ephemeral)
    assert (await asyncio.wait_for(wakes.queue.get(), 10))[1:] == (0, None)  # active now
    await save_versions(store, circle_id, 20)
    for v in range(1, 21):
        assert await wakes.next_carrying() == (v, [event(v, 0), event(v, 1)])
    witness = Wakes()  # still subscribed: once it hears version 21, so would have `wakes`
    store.subscribe(circle_id, witness.on_wake, witness.on_ephemeral)
    unsubscribe()
    await save_versions(store, circle_id, 21, start=20)
    while (await witness.next_carrying())[0] != 21:
        pass
    assert wakes.queue.empty()


async def test_ephemeral_events_are_delivered_and_never_kept(make_store: MakeStore,
                                                             circle_id: str) -> None:
    store = make_store()
    await store.create(circle_id, blob(circle_id, 0))
    wakes = Wakes()
    store.subscribe(circle_id, wakes.on_wake, wakes.on_ephemeral)
    await asyncio.wait_for(wakes.queue.get(), 10)
    note = encode_event(Event(Name.PRIVATE_NOTE, {"text": "help"}, MODERATORS, 0))
    await store.publish_ephemeral(circle_id, note)
    assert await asyncio.wait_for(wakes.ephemeral.get(), 10) == note
    await save_versions(store, circle_id, 1)
    kept = [decode_event(e).name for e in await store.events_since(circle_id, 0)]
    assert Name.PRIVATE_NOTE not in kept and kept


async def test_two_stores_on_one_backend_see_each_others_saves(make_store: MakeStore,
                                                               circle_id: str) -> None:
    a, b = make_store(), make_store()
    await a.create(circle_id, blob(circle_id, 0))
    wakes = Wakes()
    b.subscribe(circle_id, wakes.on_wake, wakes.on_ephemeral)
    await asyncio.wait_for(wakes.queue.get(), 10)
    await save_versions(a, circle_id, 1)
    assert (await wakes.next_carrying())[0] == 1
    assert decode_state(await b.load(circle_id)).version == 1


async def test_ping_answers_when_reachable(make_store: MakeStore) -> None:
    await make_store().ping()


async def test_a_fenced_save_wakes_its_own_process_and_publishes_nothing(
        make_store: MakeStore, store_kind: str, circle_id: str) -> None:
    """The home's own saves reach its subscribers at once and cost no pub/sub message; a
    save without a lease (a timer, the organizer API) still wakes every process."""
    if store_kind == "memory":
        pytest.skip("one memory store is one process")
    home, other = make_store(), make_store()
    await home.create(circle_id, blob(circle_id, 0))
    lease = await home.acquire(circle_id, "home", "http://home", 5000)
    assert not isinstance(lease, Owner)
    here, there = Wakes(), Wakes()
    home.subscribe(circle_id, here.on_wake, here.on_ephemeral)
    other.subscribe(circle_id, there.on_wake, there.on_ephemeral)
    await asyncio.wait_for(there.queue.get(), 10)  # subscribed (its catch-up call)
    await home.save(circle_id, 0, blob(circle_id, 1), [event(1)], 1, fence=lease.token)
    assert (await here.next_carrying())[0] == 1
    await home.save(circle_id, 1, blob(circle_id, 2), [event(2)], 2)
    # pub/sub keeps order: had version 1 been published, it would come first
    assert (await there.next_carrying())[0] == 2
    assert [decode_event(e).version for e in await other.events_since(circle_id, 0)] == [1, 2]


async def test_saves_at_once_across_circles_each_get_their_own_answer(make_store: MakeStore,
                                                                      circle_id: str) -> None:
    """Many saves in one turn of the loop (on Redis: one pipelined batch): each is answered on
    its own, a conflict refuses only its own save, and every saved version is kept."""
    store = make_store()
    ids = [f"{circle_id}-{i}" for i in range(30)]
    for cid in ids:
        await store.create(cid, blob(cid, 0))
    racing = ids[0]
    other = RoomState.new(CircleSettings(id=racing, title="another"))
    other.version = 1
    outcomes = await asyncio.gather(
        *(store.save(cid, 0, blob(cid, 1), [event(1)], 1) for cid in ids),
        store.save(racing, 0, encode_state(other), [event(1, 9)], 1),  # another version 1
        return_exceptions=True)
    assert outcomes[:-1] == [None] * len(ids)
    assert isinstance(outcomes[-1], VersionConflict)
    for cid in ids:
        assert decode_state(await store.load(cid)).version == 1
        assert [decode_event(e).data for e in await store.events_since(cid, 0)] == [{"n": 0}]


def test_the_save_path_packs_commands_as_redis_py_does() -> None:
    from redis.asyncio.connection import Connection

    from storage.redis_scripts import resp_command

    args = ("EVALSHA", "ab" * 20, 4, "lk:{c}:state", b"\x00\xffblob" * 100, 0, 7, "", "é", b"")
    assert resp_command(*args) == b"".join(Connection().pack_command(*args))


async def test_renewing_leases_survives_redis_forgetting_its_scripts(make_store: MakeStore, store_kind: str,
                                                                   circle_id: str) -> None:
    """Renewals go out in one write; after Redis lost its script cache (a restart) they are
    loaded again and the same renewals answered, not failed."""
    if store_kind == "memory":
        pytest.skip("Redis only")
    store = make_store()
    assert isinstance(store, RedisStore)
    ids = [f"{circle_id}-{i}" for i in range(5)]
    leases = []
    for cid in ids:
        await store.create(cid, blob(cid, 0))
        lease = await store.acquire(cid, "p1", "http://one", 5000)
        assert not isinstance(lease, Owner)
        leases.append(lease)
    assert await store.renew(leases, 5000) == [True] * 5
    await store._redis.script_flush()
    assert await store.renew(leases, 5000) == [True] * 5
    stranger = await store.acquire(ids[0], "p2", "http://two", 5000)
    assert stranger == Owner("http://one")  # still held by the first process


# ---- privacy at rest (DESIGN §12): events are kept for replays, not for history ---------------


def joined(version: int, name: str) -> bytes:
    member = {"id": f"m{version}", "name": name, "role": "member"}
    return encode_event(Event(Name.MEMBER_JOINED, {"member": member}, EVERYONE, version))


async def test_events_past_the_horizon_are_trimmed_at_the_next_save(
        make_store: MakeStore, fake_clock: FakeClock, circle_id: str) -> None:
    store = make_store(keep_events_ms=10_000)
    await store.create(circle_id, blob(circle_id, 0))
    await store.save(circle_id, 0, blob(circle_id, 1), [joined(1, "MawarRahasia")], 1)
    await save_versions(store, circle_id, 2, start=1)
    assert len(await store.events_since(circle_id, 0)) == 3  # a replay has what it needs
    await fake_clock.advance(10_000)
    await save_versions(store, circle_id, 3, start=2)
    with pytest.raises(ReplayGap):  # a replay from that far back gets a snapshot instead
        await store.events_since(circle_id, 0)
    assert await store.events_since(circle_id, 2) == [event(3, 0), event(3, 1)]


async def test_a_quiet_memory_circle_forgets_its_events_on_time() -> None:
    clock = FakeClock()
    store = MemoryStore(keep_events_ms=5_000, clock=clock.now, timers=clock)
    await store.create("quiet", blob("quiet", 0))
    await store.save("quiet", 0, blob("quiet", 1), [joined(1, "MawarRahasia")], 1)
    await clock.advance(4_999)
    assert await store.events_since("quiet", 0) == [joined(1, "MawarRahasia")]
    await clock.advance(1)  # no save came: the timer trims
    with pytest.raises(ReplayGap):
        await store.events_since("quiet", 0)
    assert decode_state(await store.load("quiet")).version == 1  # the state stays
    assert clock.pending == 0  # and nothing is left armed for an empty log
    await store.close()


async def test_a_quiet_redis_circle_keeps_no_pseudonym_in_its_stream(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, keep_events_ms=300)
    try:
        await store.create("quiet", blob("quiet", 0))
        async with key_expiry(redis_server.url, "lk:{quiet}:events") as expired:
            await store.save("quiet", 0, blob("quiet", 1), [joined(1, "MawarRahasia")], 1)
            assert b"MawarRahasia" in b"".join(everything_in(redis_server.url).values())
            await asyncio.wait_for(expired, 10)  # no save came: Redis drops the whole stream
        assert not [k for k, v in everything_in(redis_server.url).items() if b"MawarRahasia" in v]
        assert decode_state(await store.load("quiet")).version == 1
        with pytest.raises(ReplayGap):
            await store.events_since("quiet", 0)
    finally:
        await store.close()



# ---- Redis Cluster only ----------------------------------------------------------------------


async def test_a_cluster_write_no_replica_confirms_is_not_acknowledged(
        redis_cluster: LocalRedisCluster) -> None:
    """Acked means kept (DESIGN §8): a save that its master's replica does not confirm in
    time (WAIT) is answered NotReplicated, an `unavailable`; once the replica answers, the
    save retried finds its own write and is acknowledged."""
    store = RedisClusterStore(redis_cluster.url, wait_ms=200)
    try:
        await store.create("unkept", blob("unkept", 0))
        [replica] = redis_cluster.replicas_of(redis_cluster.master_of("lk:{unkept}:state"))
        redis_cluster.node(replica).pause()  # attached, silent: WAIT gets no answer from it
        try:
            with pytest.raises(NotReplicated):
                await store.save("unkept", 0, blob("unkept", 1), [event(1)], 1)
        finally:
            redis_cluster.node(replica).resume()
        await store.save("unkept", 0, blob("unkept", 1), [event(1)], 1)
        assert decode_state(await store.load("unkept")).version == 1
        assert len(await store.events_since("unkept", 0)) == 1
    finally:
        await store.close()
        await asyncio.to_thread(redis_cluster.wait_ok)


async def test_a_cluster_subscription_sent_to_a_former_master_follows_the_slot(
        redis_cluster: LocalRedisCluster) -> None:
    """Right after a failover the slot map is stale: an SSUBSCRIBE sent to a master that no
    longer serves the slot is answered MOVED, and the subscription moves to the one that
    does, which confirms it (catch-up) and delivers what is published there."""
    store, other = RedisClusterStore(redis_cluster.url), RedisClusterStore(redis_cluster.url)
    try:
        await store.create("moving", blob("moving", 0))  # the store has a slot map now
        slot = store._redis.keyslot("lk:{moving}:wake")
        right = store._redis.nodes_manager.slots_cache[slot][0]
        wrong = next(n for n in store._redis.get_primaries() if n.name != right.name)
        store._redis.nodes_manager.slots_cache[slot] = [wrong]
        wakes = Wakes()
        store.subscribe("moving", wakes.on_wake, wakes.on_ephemeral)
        assert (await asyncio.wait_for(wakes.queue.get(), 10))[1:] == (0, None)
        await save_versions(other, "moving", 1)
        assert await wakes.next_carrying() == (1, [event(1, 0), event(1, 1)])
    finally:
        await store.close()
        await other.close()
