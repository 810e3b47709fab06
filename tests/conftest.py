"""Fixtures shared by every test package."""

from __future__ import annotations

from server import compiled

# First, before any test imports the rules or the session: the suite runs what `lingkar serve`
# runs (the compiled signaling path where `make setup` built it; LINGKAR_COMPILED=off: Python).
SIGNALING_PATH = compiled.activate()

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from testkit.redis_cluster import LocalRedisCluster  # noqa: E402
from testkit.redis_server import RedisServer  # noqa: E402


def pytest_report_header() -> str:
    return f"signaling path: {SIGNALING_PATH}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server on a free loopback port for the whole session."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for fault tests that stop and restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """One real Redis Cluster (3 masters, a replica each) on free loopback ports for the
    whole session. Tests must not kill its nodes: the failover test has its own."""
    with LocalRedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: LocalRedisCluster) -> str:
    return redis_cluster.url


@pytest.fixture
def own_redis_cluster() -> Iterator[LocalRedisCluster]:
    """A Redis Cluster of this test's own, for fault tests that kill a master."""
    with LocalRedisCluster() as cluster:
        yield cluster
