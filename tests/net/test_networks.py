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
import shutil

import pytest

from .world import Member, World

pytestmark = pytest.mark.net

ENOUGH = 50  # packets: a second of audio
SPEECH = 500  # packets counted under loss: 10 s (expected ~25 lost; 90 % leaves room for 4+ σ)


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

    mod = await world.moderator(mod_ns)
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

    # and all of it crossed the routers' NAT as UDP, both ways, translated on the way out
    for router in (router_a, router_b):
        counters = net.counters(router)
        assert counters["udp_in"] >= 2 * ENOUGH, counters
        assert counters["udp_natted"] == counters["udp_out"] >= ENOUGH, counters


def delivered(summary: dict[str, object]) -> float:
    """Distinct packets heard over the span of sequence numbers heard."""
    return int(summary["distinct"]) / max(1, int(summary["span"]))  # type: ignore[call-overload]


async def test_five_percent_loss_and_jitter_keep_speech_flowing(world: World) -> None:
    """The floor holder's link drops 5 % of the packets it forwards, both ways (nftables
    `numgen random mod 100 < 5 drop` in her router), and delays each frame by 40 ± 30 ms,
    drawn per frame (a userspace delay line between her and her router, tests/net/delayline.py:
    this kernel has no netem). Listeners count her packets by sequence number over 10 s: at
    least 90 % of those sent arrive, and no run of missing packets is longer than 10 (200 ms);
    the same holds for the moderator's packets at her end. Printed: the counts (run with -s)."""
    net = world.net
    home = net.home("melati")
    router = net.router(loss_percent=5)
    line_ns = world.lab.netns("line")
    a, b = net.line_uplink(home, router, line_ns)
    net.use(home, 0)
    mod_ns, ear_ns = net.direct("moderator"), net.direct("kenanga")
    await world.start_server()
    line = await world.start_delay_line(line_ns, a, b, delay_ms=40, jitter_ms=30)

    mod = await world.moderator(mod_ns)
    melati, kenanga = await seated(world, [("Melati", home.ns, "member"), ("Kenanga", ear_ns, "member")])
    await mod.ack("give_floor", member_id=melati.member_id)
    await melati.ack("unmute_self")

    # 500 packets (10 s of speech) of hers at two clean listeners; the moderator's at her end
    heard, at_mod, hers = await asyncio.gather(kenanga.wait_heard("Melati", SPEECH, limit=90),
                                               mod.wait_heard("Melati", SPEECH, limit=90),
                                               melati.wait_heard("Pendamping", SPEECH, limit=90))
    counters = net.counters(router)
    print(f"\nloss and jitter: Kenanga heard {heard['distinct']}/{heard['span']} of Melati's "
          f"(longest gap {heard['longest_gap']}), Melati heard {hers['distinct']}/{hers['span']} "
          f"of the moderator's (longest gap {hers['longest_gap']}); router dropped {counters['lost']}")
    for summary in (heard, at_mod, hers):
        assert delivered(summary) >= 0.90, summary
        assert summary["longest_gap"] <= 10, summary
    assert counters["lost"] > 0, counters  # the loss rule did drop packets
    forwarded = await world.line_stats(line)  # and her packets did cross the delay line
    assert all(count >= SPEECH for count in forwarded.values()), forwarded


async def test_a_member_whose_network_drops_udp_hears_through_turn_over_tcp(world: World) -> None:
    """Her router drops every UDP packet (nftables); the server hands each member TURN
    credentials for our coturn (LINGKAR_TURN_URLS turn:10.77.0.2:3478?transport=tcp,
    use-auth-secret), and her peer connection goes through it: the nominated pair's local
    candidate is a relayed one, and audio flows both ways."""
    if shutil.which("turnserver") is None:
        pytest.skip("no turnserver on PATH (Debian's coturn)")
    net = world.net
    home = net.home("melati")
    router = net.router(drop_udp=True)
    net.uplink(home, router)
    net.use(home, 0)
    mod_ns, ear_ns = net.direct("moderator"), net.direct("kenanga")
    await world.start_coturn()
    await world.start_server(turn=True)

    mod = await world.member("Pendamping", mod_ns)
    await world.create_circle(mod)
    welcome = await mod.join(world.link("moderator"))
    turn = [server for server in welcome["ice_servers"] if "username" in server]
    assert turn and turn[0]["urls"] == ["turn:10.77.0.2:3478?transport=tcp"], welcome["ice_servers"]
    await mod.media()
    melati, kenanga = await seated(world, [("Melati", home.ns, "member"), ("Kenanga", ear_ns, "member")])

    pair = await melati.call("pair")
    assert pair["local_type"] == "relay" and pair["local"][0] == "10.77.0.2", pair
    # coturn took the credentials Lingkar minted for her (username `expiry:member_id`)
    assert world.coturn is not None
    await world.coturn.line(lambda text: f":{melati.member_id}>: incoming packet ALLOCATE processed, success"
                            in text)
    await mod.ack("give_floor", member_id=melati.member_id)
    await melati.ack("unmute_self")
    await asyncio.gather(kenanga.wait_heard("Melati", ENOUGH), mod.wait_heard("Melati", ENOUGH),
                         melati.wait_heard("Pendamping", ENOUGH))
    counters = net.counters(router)
    assert counters["udp_dropped"] > 0 and counters["udp_out"] == counters["udp_in"] == 0, counters


async def test_a_member_whose_address_changes_mid_turn_gets_audio_back_and_keeps_the_floor(world: World) -> None:
    """The floor holder's phone moves from Wi-Fi to mobile data mid-turn: her interface to
    router A (192.168.77.2, NATed to 10.77.0.11) loses its address and goes down, and her
    interface to router B (192.168.78.2 behind 10.77.0.12) comes up. Her socket and her
    peer connection are bound to an address that is gone (aiortc has no ICE restart), so
    she does what the web client does: resume on a new socket with her resume secret, then
    a new PeerConnection and a new `offer`. Her new stream reaches the listener, and she
    still holds the floor: in the `welcome` of her resume, in everyone's snapshot, and
    nobody saw `floor_released`. A further offer on that same socket (only the media path
    broke) is answered as well: the server replaces a seated member's PeerConnection."""
    net = world.net
    home = net.home("melati")
    wifi, mobile = net.router(), net.router()
    net.uplink(home, wifi)
    net.uplink(home, mobile)
    net.use(home, 0)
    mod_ns, ear_ns = net.direct("moderator"), net.direct("kenanga")
    await world.start_server()

    mod = await world.moderator(mod_ns)
    melati, kenanga = await seated(world, [("Melati", home.ns, "member"), ("Kenanga", ear_ns, "member")])
    await mod.ack("give_floor", member_id=melati.member_id)
    await melati.ack("unmute_self")
    await asyncio.gather(kenanga.wait_heard("Melati", ENOUGH), mod.wait_heard("Melati", ENOUGH))

    net.use(home, 1)  # Wi-Fi gone, mobile data up: a new address behind another NAT
    moved = await melati.call("moved")
    assert moved["welcome"]["type"] == "welcome" and moved["welcome"]["member_id"] == melati.member_id
    assert moved["welcome"]["state"]["floor"]["holder"] == melati.member_id, moved["welcome"]["state"]
    assert moved["pair"]["local"][0] == home.uplinks[1][1], moved["pair"]
    source = moved["source"]
    assert source != "Melati"  # her new stream, told apart from the old one

    await asyncio.gather(kenanga.wait_heard(source, ENOUGH), mod.wait_heard(source, ENOUGH))
    assert net.counters(mobile)["udp_out"] >= ENOUGH

    # a new offer on the same socket (what a client does when only its media path broke)
    # is answered too: the server replaces her PeerConnection and she is heard again
    again = await melati.media()
    assert again["source"] != source
    await asyncio.gather(kenanga.wait_heard(again["source"], ENOUGH), mod.wait_heard(again["source"], ENOUGH))
    for member in (kenanga, mod):
        snapshot = await member.call("sync")
        assert snapshot["state"]["floor"]["holder"] == melati.member_id, snapshot
        released = [fr for fr in await member.call("frames", type="event")
                    if fr["name"] == "floor_released"]
        assert released == []


MEDIA_PORTS = (40000, 40099)
CLOUD_ADDRESS = "10.77.0.5"


async def test_a_server_behind_one_to_one_nat_is_reached_on_its_announced_address_and_ports(world: World) -> None:
    """The server's host has only a private address (192.168.100.10) behind a 1:1 NAT that
    maps 10.77.0.5 to it, as on most clouds, and a firewall that lets in TCP 8000 and the
    UDP range 40000-40099 and nothing else (nftables). With LINGKAR_MEDIA_ADDRESS=10.77.0.5
    and LINGKAR_MEDIA_PORTS=40000-40099 every answer announces that address only, on ports
    of that range, and a member on the public side and one behind her own NAT hear each other
    through it; nothing arrived that the firewall had to refuse."""
    from server.config import ENV_NAMES

    if not {"media_address", "media_ports"} <= ENV_NAMES.keys():
        pytest.skip("the server does not read LINGKAR_MEDIA_ADDRESS and LINGKAR_MEDIA_PORTS yet")
    net = world.net
    host_ns = net.cloud(CLOUD_ADDRESS, media_ports=MEDIA_PORTS)
    home = net.home("melati")
    router = net.router()
    net.uplink(home, router)
    net.use(home, 0)
    mod_ns = net.direct("moderator")
    await world.start_server(ns=host_ns, host="0.0.0.0", url=f"http://{CLOUD_ADDRESS}:8000",
                             media_address=CLOUD_ADDRESS, media_ports=f"{MEDIA_PORTS[0]}-{MEDIA_PORTS[1]}")

    mod = await world.moderator(mod_ns)
    [melati] = await seated(world, [("Melati", home.ns, "member")])
    for member in (mod, melati):
        candidates = member.last_media["answer_candidates"]
        assert candidates and all(c["address"] == CLOUD_ADDRESS for c in candidates), candidates
        assert all(MEDIA_PORTS[0] <= c["port"] <= MEDIA_PORTS[1] for c in candidates), candidates

    await mod.ack("give_floor", member_id=melati.member_id)
    await melati.ack("unmute_self")
    await asyncio.gather(mod.wait_heard("Melati", ENOUGH), melati.wait_heard("Pendamping", ENOUGH))
    assert net.cloud_router is not None
    counters = net.counters(net.cloud_router)
    assert counters["media_in"] >= ENOUGH and counters["refused"] == 0, counters
