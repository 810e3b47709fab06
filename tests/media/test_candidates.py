"""Which client candidates the relay checks (server/media/candidates.py): pure, no packets."""

from __future__ import annotations

import pytest
from aiortc import sdp

from server.media import candidates
from server.media.candidates import (
    AddressKind,
    address_allowed,
    classify_address,
    filter_candidates,
    own_address_kinds,
    refusal,
)

PUBLIC = frozenset({AddressKind.PUBLIC})
LAN = frozenset({AddressKind.PRIVATE})
PUBLIC_WITH_LAN = frozenset({AddressKind.PUBLIC, AddressKind.PRIVATE})
LOOPBACK = frozenset({AddressKind.LOOPBACK})


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("8.8.8.8", AddressKind.PUBLIC),
        ("2a00:1450:4001::1", AddressKind.PUBLIC),
        ("10.0.0.5", AddressKind.PRIVATE),
        ("172.16.0.1", AddressKind.PRIVATE),
        ("172.31.255.254", AddressKind.PRIVATE),
        ("172.32.0.1", AddressKind.PUBLIC),
        ("192.168.1.1", AddressKind.PRIVATE),
        ("100.64.0.1", AddressKind.PRIVATE),  # RFC 6598: carrier-grade NAT
        ("100.127.255.254", AddressKind.PRIVATE),
        ("100.128.0.1", AddressKind.PUBLIC),
        ("192.0.2.2", AddressKind.PRIVATE),  # documentation (this test machine's own address)
        ("198.18.0.1", AddressKind.PRIVATE),  # benchmarking
        ("fd00::2", AddressKind.PRIVATE),  # ULA
        ("fc00::1", AddressKind.PRIVATE),
        ("2001:db8::1", AddressKind.PRIVATE),
        ("127.0.0.1", AddressKind.LOOPBACK),
        ("127.1.2.3", AddressKind.LOOPBACK),
        ("::1", AddressKind.LOOPBACK),
        ("169.254.169.254", AddressKind.LINK_LOCAL),  # the clouds' metadata service
        ("fe80::1", AddressKind.LINK_LOCAL),
        ("fe80::1%eth0", AddressKind.LINK_LOCAL),
        ("::ffff:10.0.0.5", AddressKind.PRIVATE),  # IPv4-mapped: the IPv4 address counts
        ("::ffff:127.0.0.1", AddressKind.LOOPBACK),
        ("::ffff:169.254.169.254", AddressKind.LINK_LOCAL),
        ("64:ff9b::a9fe:a9fe", AddressKind.LINK_LOCAL),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", AddressKind.PUBLIC),
        ("0.0.0.0", AddressKind.UNUSABLE),
        ("0.1.2.3", AddressKind.UNUSABLE),
        ("255.255.255.255", AddressKind.UNUSABLE),
        ("240.0.0.1", AddressKind.UNUSABLE),
        ("224.0.0.251", AddressKind.UNUSABLE),  # mDNS multicast
        ("::", AddressKind.UNUSABLE),
        ("ff02::fb", AddressKind.UNUSABLE),
        ("::10.0.0.5", AddressKind.UNUSABLE),  # IPv4-compatible (deprecated)
        ("100::1", AddressKind.UNUSABLE),  # discard-only
        ("2f1b4c55-8f5c-4b2e-9d1c-3e6a1b2c3d4e.local", AddressKind.HOSTNAME),  # mDNS
        ("metadata.google.internal", AddressKind.HOSTNAME),
        ("010.0.0.5", AddressKind.HOSTNAME),  # no octal, hex or integer spellings
        ("0x0a000005", AddressKind.HOSTNAME),
        ("167772165", AddressKind.HOSTNAME),
        ("", AddressKind.HOSTNAME),
    ],
)
def test_addresses_are_classified_by_where_they_reach(host: str, kind: AddressKind) -> None:
    assert classify_address(host) is kind


def test_a_public_server_checks_public_candidates_only() -> None:
    for own in (PUBLIC, PUBLIC_WITH_LAN, PUBLIC | LOOPBACK):
        allowed = {k for k in AddressKind if address_allowed(k, own)}
        assert allowed == {AddressKind.PUBLIC}, own


def test_a_server_without_a_public_address_also_checks_the_kinds_it_has_itself() -> None:
    assert {k for k in AddressKind if address_allowed(k, LAN)} == {AddressKind.PUBLIC, AddressKind.PRIVATE}
    assert {k for k in AddressKind if address_allowed(k, LOOPBACK)} == {
        AddressKind.PUBLIC,
        AddressKind.LOOPBACK,
    }
    assert {k for k in AddressKind if address_allowed(k, frozenset())} == {AddressKind.PUBLIC}


def test_link_local_unusable_and_hostname_candidates_are_never_checked() -> None:
    every = frozenset(AddressKind)
    for own in (PUBLIC, LAN, LOOPBACK, LAN | LOOPBACK, every - {AddressKind.PUBLIC}):
        for kind in (AddressKind.LINK_LOCAL, AddressKind.UNUSABLE, AddressKind.HOSTNAME):
            assert not address_allowed(kind, own), (kind, own)


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        ("1 1 udp 2130706431 8.8.8.8 50000 typ host", None),
        ("1 1 UDP 1694498815 8.8.8.8 1024 typ srflx raddr 10.0.0.5 rport 50000", None),
        ("1 1 udp 16777215 8.8.8.8 65535 typ relay raddr 8.8.4.4 rport 3478", None),
        ("1 1 tcp 1518280447 8.8.8.8 9 typ host tcptype active", "transport"),
        ("1 1 tcp 1518280447 8.8.8.8 50000 typ host tcptype passive", "transport"),
        ("1 1 udp 1845501695 8.8.8.8 50000 typ prflx", "type"),
        ("1 1 udp 2130706431 8.8.8.8 0 typ host", "port"),
        ("1 1 udp 2130706431 8.8.8.8 53 typ host", "port"),  # DNS
        ("1 1 udp 2130706431 8.8.8.8 1023 typ host", "port"),
        ("1 1 udp 2130706431 8.8.8.8 65536 typ host", "port"),
        ("1 1 udp 2130706431 8.8.8.8 -5 typ host", "port"),
        ("1 1 udp 2130706431 10.0.0.5 6379 typ host", "private"),
        ("1 1 udp 2130706431 169.254.169.254 8080 typ host", "link-local"),
        ("1 1 udp 2130706431 127.0.0.1 50000 typ host", "loopback"),
        ("1 1 udp 2130706431 a3c1e2d4-0b1f-4a6e-9c2d-5f7e8a9b0c1d.local 50000 typ host", "hostname"),
        ("1 1 udp 2130706431 8.8.8.8 50000", "unparsable"),
        ("1 1 udp 2130706431 8.8.8.8 port typ host", "unparsable"),
        ("", "unparsable"),
    ],
)
def test_candidates_a_public_server_refuses_and_why(candidate: str, reason: str | None) -> None:
    assert refusal(candidate, PUBLIC) == reason


def test_a_lan_server_keeps_private_candidates_and_still_refuses_odd_ports() -> None:
    assert refusal("1 1 udp 2130706431 10.0.0.5 50000 typ host", LAN) is None
    assert refusal("1 1 udp 2130706431 fd00::5 50000 typ host", LAN) is None
    assert refusal("1 1 udp 2130706431 10.0.0.5 161 typ host", LAN) == "port"  # SNMP
    assert refusal("1 1 udp 2130706431 127.0.0.1 50000 typ host", LAN) == "loopback"


OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=audio 9 UDP/TLS/RTP/SAVPF 96",
        "c=IN IP4 0.0.0.0",
        "a=mid:0",
        "a=sendrecv",
        "a=rtpmap:96 opus/48000/2",
        "a=candidate:1 1 udp 2130706431 10.0.0.5 50000 typ host",
        "a=candidate:2 1 udp 1694498815 8.8.8.8 50001 typ srflx raddr 10.0.0.5 rport 50000",
        "a=end-of-candidates",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "m=audio 9 UDP/TLS/RTP/SAVPF 96",
        "c=IN IP4 0.0.0.0",
        "a=mid:1",
        "a=recvonly",
        "a=rtpmap:96 opus/48000/2",
        "a=candidate:1 1 udp 2130706431 10.0.0.5 50000 typ host",
        "a=end-of-candidates",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
    ]
) + "\r\n"


def parsed_candidates(offer: str) -> list[list[str]]:
    return [[c.ip for c in m.ice_candidates] for m in sdp.SessionDescription.parse(offer).media]


def test_filtering_leaves_out_refused_candidates_and_keeps_every_other_line() -> None:
    filtered, removed = filter_candidates(OFFER, PUBLIC)

    assert removed == 2
    assert parsed_candidates(filtered) == [["8.8.8.8"], []]
    lines = OFFER.split("\r\n")
    assert [lines[i] for i in (10, 20, 21)] == [
        "a=candidate:1 1 udp 2130706431 10.0.0.5 50000 typ host",
        "a=candidate:1 1 udp 2130706431 10.0.0.5 50000 typ host",
        "a=end-of-candidates",  # the second section's: it has no candidate left
    ]
    assert filtered.split("\r\n") == [line for i, line in enumerate(lines) if i not in (10, 20, 21)]


def test_a_section_left_without_candidates_waits_for_the_clients_own_checks() -> None:
    filtered, _ = filter_candidates(OFFER, PUBLIC)
    media = sdp.SessionDescription.parse(filtered).media
    assert [m.ice_candidates_complete for m in media] == [True, False]


def test_filtering_an_offer_the_relay_serves_whole_changes_nothing() -> None:
    filtered, removed = filter_candidates(OFFER, LAN)
    assert (filtered, removed) == (OFFER, 0)


@pytest.mark.parametrize("separator", ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028"])
def test_a_candidate_hidden_behind_a_line_break_aiortc_splits_on_is_still_refused(separator: str) -> None:
    rtpmap = "a=rtpmap:96 opus/48000/2\r\n"
    hidden = OFFER.replace(
        rtpmap, rtpmap[:-2] + separator + "a=candidate:9 1 udp 2130706431 169.254.169.254 50000 typ host\r\n", 1
    )
    assert parsed_candidates(hidden)[0] == ["169.254.169.254", "10.0.0.5", "8.8.8.8"]  # aiortc reads it

    filtered, removed = filter_candidates(hidden, PUBLIC)

    assert removed == 3
    assert parsed_candidates(filtered) == [["8.8.8.8"], []]


def test_the_servers_own_kinds_are_those_of_the_addresses_aioice_gathers_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def gathered(addresses: list[str]) -> frozenset[AddressKind]:
        monkeypatch.setattr(candidates, "get_host_addresses", lambda use_ipv4, use_ipv6: addresses)
        return own_address_kinds()

    assert gathered(["8.8.8.8", "172.17.0.1", "fd00::1"]) == PUBLIC_WITH_LAN  # public, with docker
    assert gathered(["10.1.2.3", "169.254.1.1"]) == LAN  # link-local makes no LAN server
    assert gathered([]) == frozenset()
    # a cloud VM sees only its private address; the one announced to clients makes it public
    monkeypatch.setattr(candidates, "get_host_addresses", lambda use_ipv4, use_ipv6: ["10.1.2.3"])
    assert own_address_kinds(["8.8.8.8"]) == PUBLIC_WITH_LAN
