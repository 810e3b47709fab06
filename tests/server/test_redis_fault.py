"""Redis stops mid-circle (DESIGN §12 "Faults"): fail closed, drop nobody, lose nothing acked."""

from __future__ import annotations

import asyncio

from testkit.redis_server import RedisServer
from tests.live import Client, join, live_server, token_of
from tests.server.conftest import ack_of, settle


async def until_acked(client: Client, type_: str, **fields: object) -> dict[str, object]:
    for _ in range(100):
        answer = await client.command(type_, **fields)
        if answer["type"] == "ack":
            return answer
        assert answer["code"] == "unavailable", answer
        await asyncio.sleep(0.05)  # the store reconnects on its own; nothing to await
    raise AssertionError(f"{type_} never acked after Redis came back")


async def test_redis_down_fails_closed_and_comes_back(own_redis: RedisServer) -> None:
    async with live_server(own_redis.url) as live:
        circle = await live.create_circle()
        links = circle["links"]
        mod = await join(live, links["moderator"], "Pendamping")
        a = await join(live, links["member"], "Melati")
        b = await join(live, links["member"], "Kenanga")
        victim = await join(live, links["member"], "Dahlia")
        await ack_of(a, "unmute_self")
        await ack_of(mod, "mute", member_id=a.member_id)
        await ack_of(mod, "remove", member_id=victim.member_id)
        assert await victim.closed() == 4403
        await ack_of(mod, "lock")
        await b.event("locked", locked=True)
        before = (await settle(b))["state"]

        await asyncio.to_thread(own_redis.stop, True)
        answer = await a.command("raise_hand")
        assert answer["type"] == "error" and answer["code"] == "unavailable", answer
        answer = await mod.command("unlock")  # fail closed: no unlock slips through
        assert answer["type"] == "error" and answer["code"] == "unavailable", answer
        newcomer = await Client.connect(live)
        await newcomer.send({"type": "hello", "token": token_of(links["moderator"]), "name": "Baru"})
        assert await newcomer.closed() == 1013
        assert (mod.close_code, a.close_code, b.close_code) == (None, None, None)

        await asyncio.to_thread(own_redis.start)
        ack = await until_acked(a, "raise_hand")
        raised = await b.event("hand_raised", member_id=a.member_id)
        assert raised["version"] == ack["version"] == before["version"] + 1
        after = (await settle(mod))["state"]
        assert after["circle"]["locked"] is True
        assert [m["muted"] for m in after["members"] if m["id"] == a.member_id] == [True]
        assert victim.member_id not in [m["id"] for m in after["members"]]
        assert (mod.close_code, a.close_code, b.close_code) == (None, None, None)
        status, inv = await live.api("POST", f"/api/circles/{circle['id']}/invites", {"role": "member"})
        assert status == 201
        refused = await Client.connect(live)
        await refused.send({"type": "hello", "token": token_of(inv["link"]), "name": "Baru"})
        assert await refused.closed() == 4403  # still locked
