"""A hostile holder of a link, over real sockets on both stores (DESIGN §5 "Who gets in",
F10): lobby floods, declined knocks coming back, removed moderators, revoked invites."""

from __future__ import annotations

import asyncio

import websockets

from testkit.redis_server import everything_in, key_expiry
from tests.live import Client, Live, join, live_server, token_of
from tests.server.conftest import ack_of, hello_close, settle


async def test_a_lobby_flood_cannot_keep_a_moderator_out(live: Live) -> None:
    circle = await live.create_circle(capacity=3, lobby=True)
    links = circle["links"]
    waiting = [await join(live, links["guest"], f"Tamu{n}", expect="lobby") for n in range(3)]
    assert await hello_close(live, token_of(links["guest"]), "Tamu3") == 4409  # the lobby is full
    mod = await join(live, links["moderator"], "Pendamping")  # not kept out, not kept waiting
    snap = await settle(mod)
    assert [m["id"] for m in snap["state"]["lobby"]] == [w.member_id for w in waiting]
    await ack_of(mod, "admit", member_id=waiting[0].member_id)  # the moderator decides
    member = await join(live, links["member"], "Melati", expect="lobby")
    await ack_of(mod, "admit", member_id=member.member_id)
    await member.wait(lambda fr: fr.get("type") == "admitted")


async def test_the_lobby_takes_ten_knocks_a_minute_then_4429(live: Live) -> None:
    circle = await live.create_circle(capacity=50, lobby=True)
    guest = circle["links"]["guest"]
    for n in range(10):
        await join(live, guest, f"Tamu{n}", expect="lobby")
    assert await hello_close(live, token_of(guest), "Tamu10") == 4429
    mod = await join(live, circle["links"]["moderator"], "Pendamping")
    await settle(mod)


async def test_a_declined_knock_does_not_come_straight_back(live: Live) -> None:
    circle = await live.create_circle(lobby=True)
    links = circle["links"]
    mod = await join(live, links["moderator"], "Pendamping")
    knocker = await join(live, links["guest"], "Pengganggu", expect="lobby")
    await mod.event("lobby_waiting")
    start = len(mod.frames)
    await ack_of(mod, "decline", member_id=knocker.member_id)
    assert await knocker.closed() == 4403
    # A fresh socket and a fresh pseudonym from the same address: refused, and the
    # moderators are not shown the name again.
    assert await hello_close(live, token_of(links["guest"]), "NamaLain") == 4403
    await settle(mod)
    assert not [fr for fr in mod.frames[start:] if fr.get("name") == "lobby_waiting"]


async def test_a_removed_moderators_link_is_dead(live: Live) -> None:
    circle = await live.create_circle()
    status, second = await live.api("POST", f"/api/circles/{circle['id']}/invites",
                                    {"role": "moderator", "personal": False, "label": "Bu Sari"})
    assert status == 201 and second["personal"] is True
    boss = await join(live, circle["links"]["moderator"], "Pendamping")
    other = await join(live, second["link"], "Pendamping2")
    member = await join(live, circle["links"]["member"], "Melati")
    await settle(boss)
    await ack_of(boss, "remove", member_id=other.member_id)
    assert await other.closed() == 4403
    assert await hello_close(live, token_of(second["link"]), "Pendamping2") == 4403
    # The circle carries on: the moderator still leads it.
    await ack_of(boss, "give_floor", member_id=member.member_id)
    await member.event("floor_given", member_id=member.member_id)


async def test_a_revoked_invite_closes_its_holder(live: Live) -> None:
    circle = await live.create_circle()
    cid = circle["id"]
    status, invite = await live.api("POST", f"/api/circles/{cid}/invites", {"role": "member"})
    assert status == 201
    mod = await join(live, circle["links"]["moderator"], "Pendamping")
    holder = await join(live, invite["link"], "Kenanga")
    other = await join(live, circle["links"]["member"], "Melati")
    await mod.event("member_joined")
    await settle(mod)
    status, _ = await live.api("DELETE", f"/api/circles/{cid}/invites/{invite['id']}")
    assert status == 204
    assert await holder.closed() == 4403
    await other.event("member_removed", member_id=holder.member_id)
    assert await hello_close(live, token_of(invite["link"]), "Kenanga") == 4403
    status, listed = await live.api("GET", f"/api/circles/{cid}/invites")
    assert status == 200
    by_id = {i["id"]: i for i in listed["invites"]}
    assert by_id[invite["id"]]["revoked"] is True and by_id[invite["id"]]["holders"] == 0
    assert by_id[circle["invites"]["member"]]["holders"] == 1
    assert "Melati" not in str(listed)  # counts and labels only, never a member's name
    status, _ = await live.api("DELETE", f"/api/circles/{cid}/invites/no-such-invite")
    assert status == 404


async def test_revoking_the_moderator_link_ends_a_borrowed_phones_access(live: Live) -> None:
    circle = await live.create_circle()
    cid = circle["id"]
    borrowed = await join(live, circle["links"]["moderator"], "Pendamping")
    await settle(borrowed)
    status, _ = await live.api("DELETE", f"/api/circles/{cid}/invites/{circle['invites']['moderator']}")
    assert status == 204
    assert await borrowed.closed() == 4403
    status, fresh = await live.api("POST", f"/api/circles/{cid}/invites", {"role": "moderator"})
    assert status == 201
    mod = await join(live, fresh["link"], "Pendamping")
    assert (await settle(mod))["state"]["moderator_present"] is True


async def test_a_moderator_link_is_for_one_person(live: Live) -> None:
    circle = await live.create_circle()
    first = await join(live, circle["links"]["moderator"], "Pendamping")
    await settle(first)
    second = await join(live, circle["links"]["moderator"], "Penyusup")
    assert second.member_id == first.member_id  # the same seat, taken over: never two
    assert await first.closed() == 4001
    await asyncio.gather(settle(second))
    await Client.close(second)


async def _upgrade(live: Live, forwarded_for: str) -> Client | int:
    """A socket as the trusted (loopback) proxy forwards it for `forwarded_for`: the client,
    or the HTTP status of a refused upgrade."""
    try:
        return await Client.connect(live, additional_headers={"X-Forwarded-For": forwarded_for})
    except websockets.InvalidStatus as refused:
        return refused.response.status_code


async def test_an_ipv6_64_shares_one_cap(store_url: str) -> None:
    async with live_server(store_url, max_connections_per_address=3) as live:
        held = [await _upgrade(live, f"2001:db8:1:2::{n}") for n in (1, 2, 3)]
        assert all(isinstance(c, Client) for c in held)
        assert await _upgrade(live, "2001:db8:1:2:ffff::9") == 403  # another address, the same /64
        assert isinstance(await _upgrade(live, "2001:db8:1:3::1"), Client)  # the next /64 is served
        assert isinstance(await _upgrade(live, "192.0.2.7"), Client)
        assert isinstance(await _upgrade(live, "192.0.2.8"), Client)  # IPv4: one address each


async def test_members_behind_one_proxy_do_not_share_its_cap(store_url: str) -> None:
    """Behind a proxy everyone arrives from the proxy's address: its X-Forwarded-For (from a
    trusted address) tells them apart, so a circle of 4 fits under a cap of 2 per address."""
    async with live_server(store_url, max_connections_per_address=2) as live:
        circle = await live.create_circle(lobby=False)
        token = token_of(circle["links"]["member"])
        for n in range(4):
            client = await _upgrade(live, f"198.51.100.{n}")
            assert isinstance(client, Client)
            await client.send({"type": "hello", "token": token, "name": f"Anggota{n}"})
            await client.wait(lambda fr: fr.get("type") == "welcome")


async def test_after_the_grace_period_redis_holds_no_pseudonym_of_a_member_who_left(redis_url: str) -> None:
    """Privacy at rest (DESIGN §12): a scan of every Redis key — strings, hashes, streams —
    once the grace period has passed finds no pseudonym of anyone who left, quietly or not,
    was declined or was removed; an ended circle leaves no key at all."""
    async with live_server(redis_url, grace_seconds=1) as live:
        circle = await live.create_circle(lobby=True)
        cid, links = circle["id"], circle["links"]
        mod = await join(live, links["moderator"], "Pendamping")
        gone: list[str] = []
        for name, way in (("MawarPergi", "leave_quietly"), ("MelatiPergi", "leave"), ("KenangaDikeluarkan", "remove")):
            member = await join(live, links["member"], name, expect="lobby")
            await ack_of(mod, "admit", member_id=member.member_id)
            if way == "remove":
                await ack_of(mod, "remove", member_id=member.member_id)
            else:
                await ack_of(member, way)
            await member.closed()
            gone.append(name)
        knocker = await join(live, links["guest"], "TamuDitolak", expect="lobby")
        await ack_of(mod, "decline", member_id=knocker.member_id)
        gone.append("TamuDitolak")
        stays = await join(live, links["member"], "SerunTetap", expect="lobby", source="127.0.0.2")
        await ack_of(mod, "admit", member_id=stays.member_id)
        at_rest = b"".join(everything_in(redis_url).values())
        assert b"SerunTetap" in at_rest and b"MawarPergi" in at_rest  # the scan sees what is there
        async with key_expiry(redis_url, f"lk:{{{cid}}}:events") as expired:
            await asyncio.wait_for(expired, 15)  # the grace period passed with no save
        await ack_of(stays, "raise_hand")  # the circle goes on: a new stream begins
        leftovers = {key: [n for n in gone if n.encode() in value]
                     for key, value in everything_in(redis_url).items()}
        assert not {k: v for k, v in leftovers.items() if v}, leftovers
        assert b"SerunTetap" in b"".join(everything_in(redis_url).values())  # still in the circle
        status, _ = await live.api("DELETE", f"/api/circles/{cid}")
        assert status == 204
        await stays.closed()
        assert not [key for key in everything_in(redis_url) if cid.encode() in key]
