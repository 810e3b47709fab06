"""A Redis Cluster master killed mid-circle (DESIGN §8, §12): answered like a Redis restart.

While its replica is promoted, a command is acked or answered `unavailable` (never a silent
loss), a new hello gets welcome or 1013, and nobody's socket is closed; afterwards the circle
carries on — on its home process, and through a wake-up that another process publishes — and
every acked change is in the state.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from server.config import ConfigError
from testkit.redis_cluster import LocalRedisCluster
from tests.live import Client, Live, join, live_server, settings_for, token_of
from tests.server.conftest import ack_of, settle

POLL_SECONDS = 0.05  # between two looks at a state the server does not announce


async def acked_or_unavailable(client: Client, type_: str, **fields: Any) -> bool:
    """Whether the command was acked; anything but an ack must be `error unavailable`."""
    answer = await client.command(type_, **fields)
    assert answer["type"] == "ack" or answer.get("code") == "unavailable", answer
    return bool(answer["type"] == "ack")


async def welcome_or_1013(live: Live, link: str, name: str) -> Client | None:
    """A hello: welcomed (the client) or closed with 1013 (None); nothing else."""
    client = await Client.connect(live)
    await client.send({"type": "hello", "token": token_of(link), "name": name})
    try:
        first = await client.wait(lambda fr: fr.get("type") in ("welcome", "lobby"))
    except AssertionError:  # closed before any welcome
        assert client.close_code == 1013, (client.close_code, client.frames)
        return None
    assert first["type"] == "welcome", first
    client.member_id = first["member_id"]
    return client


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> Any:
    """Poll a state that nothing announces (the store reachable again, the lease taken
    again) until `check()` answers something true; that answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await check()
        if answer:
            return answer
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(POLL_SECONDS)


async def test_a_master_killed_mid_circle_fails_over_and_loses_nothing_acked(
        own_redis_cluster: LocalRedisCluster) -> None:
    cluster = own_redis_cluster
    async with live_server(cluster.url) as home, live_server(cluster.url) as other:
        circle = await home.create_circle()
        cid, links = circle["id"], circle["links"]
        mod = await join(home, links["moderator"], "Pendamping")
        a = await join(home, links["member"], "Melati")
        b = await join(home, links["member"], "Kenanga")
        status, personal = await other.api("POST", f"/api/circles/{cid}/invites",
                                           {"role": "member", "personal": True})
        assert status == 201, personal
        c = await join(home, personal["link"], "Dahlia")
        await ack_of(a, "raise_hand")
        await ack_of(mod, "give_floor", member_id=a.member_id)
        await ack_of(b, "raise_hand")
        await ack_of(b, "unmute_self")
        await ack_of(mod, "mute", member_id=b.member_id)
        before = (await settle(mod))["state"]
        assert before["queue"] == [b.member_id] and before["floor"]["holder"] == a.member_id
        members = [mod, a, b, c]

        master = cluster.master_of(f"lk:{{{cid}}}:state")
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, master)
        # Killed, not noticed yet: the slot's commands find nobody there.
        acked = {"lock": await acked_or_unavailable(mod, "lock"),
                 "lower_hand": await acked_or_unavailable(b, "lower_hand")}
        if await asyncio.to_thread(cluster.wait_failing, master):
            # cluster_state:fail: every node refuses every command until the promotion.
            acked["unmute_self"] = await acked_or_unavailable(a, "unmute_self")
            during = await welcome_or_1013(home, links["member"], "Baru")
            if during is not None:
                members.append(during)
        new_master = await asyncio.to_thread(cluster.wait_promoted, master)
        print(f"\nfailover: 127.0.0.1:{master} killed, 127.0.0.1:{new_master} serving its "
              f"slots {time.monotonic() - killed_at:.2f} s later; acked meanwhile: {acked}")
        assert all(m.close_code is None for m in members), [m.close_code for m in members]

        # Afterwards the process finds the new master and its lease again, and carries on.
        await until(lambda: _ready(home), "/readyz 200 again")
        await until(lambda: _ready(other), "/readyz 200 again on the other process")
        if not acked["lock"]:  # (while unlocked, a newcomer is welcome)
            newcomer = await until(lambda: welcome_or_1013(home, links["member"], "Mawar"),
                                   "a hello welcomed after the failover")
            members.append(newcomer)
        for name, client in (("lock", mod), ("lower_hand", b)):
            if not acked[name]:
                await until(functools.partial(acked_or_unavailable, client, name),
                            f"{name} acked after the failover")
        # A wake-up that another process publishes on the new master reaches the home's
        # sessions: their subscription moved there.
        status, _ = await other.api("DELETE", f"/api/circles/{cid}/invites/{personal['id']}")
        assert status == 204, status
        assert await c.closed() == 4403
        await mod.event("member_removed", member_id=c.member_id)

        after = (await settle(mod))["state"]
        by_id = {m["id"]: m for m in after["members"]}
        assert after["floor"]["holder"] == a.member_id
        assert by_id[b.member_id]["muted"] is True
        assert after["circle"]["locked"] is True
        assert after["queue"] == []
        assert by_id[a.member_id]["muted"] is not acked.get("unmute_self", False)
        assert c.member_id not in by_id
        assert all(m.member_id in by_id for m in members if m is not c)
        assert all(m.close_code is None for m in members if m is not c), \
            [m.close_code for m in members]


async def _ready(live: Live) -> bool:
    status, _ = await live.api("GET", "/readyz")
    return bool(status == 200)


def test_the_config_takes_a_cluster_node_and_refuses_a_database_or_options() -> None:
    settings = settings_for("redis-cluster://10.0.0.7:7001")
    assert settings.store == "redis-cluster://10.0.0.7:7001" and settings.uses_redis
    for wrong in ("redis-cluster://", "redis-cluster://h:7001/2", "redis-cluster://h:7001?x=1",
                  "redis-cluster://:pw@h:notaport"):
        with pytest.raises(ConfigError) as info:
            settings_for(wrong)
        message = str(info.value)
        assert "LINGKAR_STORE" in message and "\n" not in message and "pw" not in message
