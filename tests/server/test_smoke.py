"""A first walk through a circle over real sockets: create, join, floor, quiet leave, end."""

from __future__ import annotations

from tests.live import join, live_server


async def test_a_circle_runs_end_to_end_over_real_sockets() -> None:
    async with live_server() as live:
        circle = await live.create_circle()
        links = circle["links"]
        mod = await join(live, links["moderator"], "Pendamping")
        a = await join(live, links["member"], "Melati")
        b = await join(live, links["member"], "Kenanga")
        await mod.event("member_joined")
        assert (await a.command("raise_hand"))["type"] == "ack"
        await mod.event("hand_raised", member_id=a.member_id)
        assert (await mod.command("next"))["type"] == "ack"
        await b.event("floor_given", member_id=a.member_id)
        assert (await a.command("leave_quietly", need_support=True))["type"] == "ack"
        assert await a.closed() == 4001
        await b.event("member_left", member_id=a.member_id)
        notice = await mod.event("member_left_quietly", member_id=a.member_id)
        assert notice["data"]["need_support"] is True
        assert not [fr for fr in b.events() if fr["name"] == "member_left_quietly"]
        assert (await mod.command("end"))["type"] == "ack"
        assert await b.closed() == 4000
        assert await mod.closed() == 4000
