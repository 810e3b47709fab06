"""`rediss://`: the circles' state, events and private notes cross to Redis over TLS only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.redis_server import RedisServer, everything_in
from tests.live import join, live_server
from tests.server.conftest import ack_of, settle


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[RedisServer]:
    with RedisServer(tls=True) as server:
        yield server


async def test_a_circle_runs_on_redis_over_tls(tls_redis: RedisServer) -> None:
    assert tls_redis.url.startswith("rediss://")
    async with live_server(tls_redis.url) as live:
        circle = await live.create_circle(lobby=False)
        mod = await join(live, circle["links"]["moderator"], "Pendamping")
        member = await join(live, circle["links"]["member"], "Melati")
        await ack_of(member, "raise_hand")
        await ack_of(member, "private_note", text="Saya butuh bicara", need_support=True)
        await mod.event("private_note", member_id=member.member_id)  # pub/sub over TLS too
        await ack_of(mod, "give_floor", member_id=member.member_id)
        assert (await settle(member))["state"]["floor"]["holder"] == member.member_id
        assert any(circle["id"].encode() in key for key in everything_in(tls_redis.url))


def test_plain_redis_is_not_spoken_to_a_tls_only_server(tls_redis: RedisServer) -> None:
    plain = tls_redis.url.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(Exception):  # noqa: B017, PT011 - any failure: the point is no plaintext
        everything_in(plain)
