"""One suite, three stores: every test taking `make_store` runs on MemoryStore, RedisStore and
RedisClusterStore (a real Redis Cluster of three masters with a replica each)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from storage.clock import FakeClock
from storage.memory_store import MemoryStore
from storage.redis_cluster import RedisClusterStore
from storage.redis_store import RedisStore
from storage.store import Store
from testkit.redis_cluster import LocalRedisCluster
from testkit.redis_server import RedisServer

MakeStore = Callable[..., Store]
_ids = itertools.count(1)


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def make_store(request: pytest.FixtureRequest, fake_clock: FakeClock
                     ) -> AsyncIterator[MakeStore]:
    """A factory of stores sharing one backend (one dict, or one Redis), so several
    "processes" can be simulated; options like `max_versions` pass through."""
    made: list[Store] = []
    if request.param == "memory":
        shared: dict[str, Any] = {}

        def make(**options: Any) -> Store:
            if "store" not in shared:  # one MemoryStore stands for one shared backend
                shared["store"] = MemoryStore(clock=fake_clock.now, **options)
                made.append(shared["store"])
            return shared["store"]  # type: ignore[no-any-return]
    elif request.param == "redis-cluster":
        cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
        with cluster.client() as c:
            c.flushall(target_nodes=c.PRIMARIES)

        def make(**options: Any) -> Store:
            store = RedisClusterStore(cluster.url, **{"clock": fake_clock.now, **options})
            made.append(store)
            return store
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        with server.client() as c:
            c.flushall()

        def make(**options: Any) -> Store:
            store = RedisStore(server.url, **{"clock": fake_clock.now, **options})
            made.append(store)
            return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
def store_kind(make_store: MakeStore, request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["make_store"])


@pytest.fixture
def circle_id() -> str:
    return f"c{next(_ids)}"
