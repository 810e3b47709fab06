"""Real networks (DESIGN §7 "Real networks", §12 "Networks"), proven in network namespaces.

Each member is a real aiortc peer in a process of its own inside its own network namespace
(tests/net/agent.py), joined over the real WebSocket to a real `lingkar serve` in a "public"
namespace; packets cross real kernel forwarding, nftables masquerade NAT and filters, and
coturn. The topology is in tests/net/world.py; nothing in it can reach the host's networks.
Every wait is on an event (a reply, a log line, a packet count); no timing is asserted
(python -m tests.net.measure reports the timings).
"""

from __future__ import annotations

import asyncio

import pytest

from .world import Member, World

pytestmark = pytest.mark.net

ENOUGH = 50  # packets: a second of audio


async def seated(world: World, names_and_ns: list[tuple[str, str, str]]) -> list[Member]:
    """Start the members' processes together, then join them in order (role link) and
    negotiate their media together."""
    members = await asyncio.gather(*(world.member(name, ns) for name, ns, _ in names_and_ns))
    for member, (_, _, role) in zip(members, names_and_ns, strict=True):
        await member.join(world.link(role))
    await asyncio.gather(*(m.media() for m in members))
    return list(members)


async def test_a_member_behind_nat_hears_and_is_heard(world: World) -> None:
    """Two members behind nftables masquerade NAT (one router each, 192.168.77.0/24 and
    192.168.78.0/24 behind 10.77.0.11 and 10.77.0.12), the moderator on the public side.
    No STUN or TURN: the relay learns each NATed member's mapped address from its checks
    (a peer-reflexive candidate) and answers there, through the NAT."""
    net = world.net
    home_a, home_b = net.home("melati"), net.home("kenanga")
    router_a, router_b = net.router(), net.router()
    net.uplink(home_a, router_a)
    net.uplink(home_b, router_b)
    net.use(home_a, 0)
    net.use(home_b, 0)
    mod_ns = net.direct("moderator")
    await world.start_server()

    mod = await world.member("Pendamping", mod_ns)
    await world.create_circle(mod)
    await mod.join(world.link("moderator"))
    await mod.media()
    melati, kenanga = await seated(world, [("Melati", home_a.ns, "member"),
                                           ("Kenanga", home_b.ns, "member")])
    for member, home in ((melati, home_a), (kenanga, home_b)):
        pair = await member.call("pair")
        # the member's own address behind its NAT, to the server's: nothing relayed
        assert pair["local_type"] == "host" and pair["local"][0] == home.uplinks[0][1], pair
        assert pair["remote"][0] == "10.77.0.1", pair

    # the floor holder behind NAT A is heard by the member behind NAT B and the moderator
    await mod.ack("give_floor", member_id=melati.member_id)
    await melati.ack("unmute_self")
    await kenanga.call("wait_view", member_id=melati.member_id)
    await asyncio.gather(kenanga.wait_heard("Melati", ENOUGH), mod.wait_heard("Melati", ENOUGH),
                         melati.wait_heard("Pendamping", ENOUGH), kenanga.wait_heard("Pendamping", ENOUGH))

    # the floor moves to the member behind NAT B: heard behind NAT A
    await kenanga.ack("unmute_self")
    await mod.ack("give_floor", member_id=kenanga.member_id)
    await asyncio.gather(melati.wait_heard("Kenanga", ENOUGH), mod.wait_heard("Kenanga", ENOUGH))

    # and all of it crossed the routers' NAT as UDP, both ways
    for router in (router_a, router_b):
        counters = net.counters(router)
        assert counters["udp_out"] >= ENOUGH and counters["udp_in"] >= 2 * ENOUGH, counters
