"""Which of a client's ICE candidates the relay sends connectivity checks to (issue 16).

aioice sends STUN binding requests, from the relay's own sockets, to every remote candidate
it is given: a client listing ``10.0.0.5 6379`` or ``169.254.169.254 80`` as its candidates
makes the server probe its own network. So the relay takes out of the offer, before aiortc
and aioice see it, every candidate of a kind it cannot serve:

- A server with a public address (any one of its own) checks public candidates only.
- A server without one (a LAN deployment, a test network) also checks candidates of the
  kinds it has itself: private ones if it has a private address, loopback ones if it has a
  loopback address (aioice never gathers 127.0.0.1 nor ::1, so only when told so).
- Never link-local (169.254.169.254 is the clouds' metadata service; fe80:: needs a scope),
  unusable addresses (unspecified, multicast, broadcast, reserved) or hostnames. mDNS
  ``.local`` names included: aioice would resolve one by multicast on the server's network
  and check whatever address the answer names, unchecked.
- Only UDP (aioice has no ICE-TCP: a browser's ``tcp … 9 typ host tcptype active`` never
  pairs), only the types aioice accepts (host, srflx, relay), only ports 1024-65535: port 0
  is no port, and below 1024 live DNS, NTP, SNMP, syslog… A browser's sockets, their NAT
  mappings (RFC 4787 §4.2.1 keeps them above 1023) and TURN relayed ports are all above.

A real client loses nothing by this: it sends checks of its own to the relay's candidates,
and the relay checks back wherever an authenticated check came from (a peer-reflexive
candidate, RFC 8445 §7.3.1.3). That is also why a media section left without candidates
loses its ``a=end-of-candidates``: aioice then waits for those checks instead of failing at
once on an empty check list (as it does for browsers, which do not send that line).

Everything here is pure except `own_address_kinds`, which reads the host's addresses.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable

from aioice.ice import get_host_addresses
from aiortc import sdp


class AddressKind(enum.StrEnum):
    PUBLIC = "public"
    # RFC 1918, RFC 6598 shared address space (carrier-grade NAT), fc00::/7 ULA, fec0::/10,
    # and the other unicast ranges that are not global (documentation, benchmarking, …)
    PRIVATE = "private"
    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"
    UNUSABLE = "unusable"  # no unicast address: unspecified, multicast, broadcast, reserved
    HOSTNAME = "hostname"  # not an IP address literal: mDNS .local names and anything else


_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
_IPV4_KINDS: tuple[tuple[ipaddress.IPv4Network, AddressKind], ...] = (
    (_V4("0.0.0.0/8"), AddressKind.UNUSABLE),  # "this network"
    (_V4("224.0.0.0/4"), AddressKind.UNUSABLE),  # multicast
    (_V4("240.0.0.0/4"), AddressKind.UNUSABLE),  # reserved, and the broadcast address
    (_V4("127.0.0.0/8"), AddressKind.LOOPBACK),
    (_V4("169.254.0.0/16"), AddressKind.LINK_LOCAL),
    (_V4("10.0.0.0/8"), AddressKind.PRIVATE),
    (_V4("172.16.0.0/12"), AddressKind.PRIVATE),
    (_V4("192.168.0.0/16"), AddressKind.PRIVATE),
    (_V4("100.64.0.0/10"), AddressKind.PRIVATE),  # RFC 6598: carrier-grade NAT
    (_V4("192.0.0.0/24"), AddressKind.PRIVATE),  # IETF protocol assignments
    (_V4("192.0.2.0/24"), AddressKind.PRIVATE),  # documentation (TEST-NET-1) …
    (_V4("198.51.100.0/24"), AddressKind.PRIVATE),
    (_V4("203.0.113.0/24"), AddressKind.PRIVATE),
    (_V4("198.18.0.0/15"), AddressKind.PRIVATE),  # benchmarking
)
_IPV6_KINDS: tuple[tuple[ipaddress.IPv6Network, AddressKind], ...] = (
    (_V6("::1/128"), AddressKind.LOOPBACK),
    (_V6("fe80::/10"), AddressKind.LINK_LOCAL),
    (_V6("fc00::/7"), AddressKind.PRIVATE),  # unique local addresses
    (_V6("fec0::/10"), AddressKind.PRIVATE),  # site-local (deprecated)
    (_V6("2001:db8::/32"), AddressKind.PRIVATE),  # documentation
    (_V6("2000::/3"), AddressKind.PUBLIC),  # global unicast; everything else is not unicast
)
_NAT64 = _V6("64:ff9b::/96")  # RFC 6052: IPv4 behind the host's NAT64, if it has one


def classify_address(host: str) -> AddressKind:
    """The kind of an address as written in a candidate (no DNS, no mDNS lookup)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return AddressKind.HOSTNAME
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:10.0.0.1 is 10.0.0.1
            address = address.ipv4_mapped
        elif address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        else:
            for network6, kind in _IPV6_KINDS:
                if address in network6:
                    return kind
            return AddressKind.UNUSABLE  # ::, multicast, discard, reserved …
    for network4, kind in _IPV4_KINDS:
        if address in network4:
            return kind
    return AddressKind.PUBLIC


# The kinds a server's own addresses count as; link-local ones do not make it a LAN server.
_SERVING = frozenset({AddressKind.PUBLIC, AddressKind.PRIVATE, AddressKind.LOOPBACK})


def own_address_kinds(extra: Iterable[str] = ()) -> frozenset[AddressKind]:
    """The kinds of the relay's own addresses: those aioice gathers host candidates on
    (`aioice.ice.get_host_addresses`: every interface address but 127.0.0.1, ::1 and
    scoped IPv6), plus `extra`, e.g. the public address announced for a host behind
    1:1 NAT (a cloud VM sees only its private address)."""
    addresses = [*get_host_addresses(use_ipv4=True, use_ipv6=True), *extra]
    return frozenset(classify_address(a) for a in addresses) & _SERVING


def address_allowed(kind: AddressKind, own: frozenset[AddressKind]) -> bool:
    """Whether a server whose own addresses are of the kinds `own` checks a candidate of
    kind `kind`: public ones always; private and loopback ones only if it has no public
    address and has one of that kind itself; nothing else, ever."""
    if kind is AddressKind.PUBLIC:
        return True
    if kind in (AddressKind.PRIVATE, AddressKind.LOOPBACK):
        return AddressKind.PUBLIC not in own and kind in own
    return False


CANDIDATE_TYPES = ("host", "srflx", "relay")
MIN_PORT = 1024


def refusal(candidate: str, own: frozenset[AddressKind]) -> str | None:
    """Why the relay will not check this candidate (the value of an ``a=candidate:``
    line), or None if it will: "unparsable", "transport", "type", "port" or the kind of
    its address."""
    try:
        parsed = sdp.candidate_from_sdp(candidate)  # exactly as aiortc will read it
    except Exception:  # aiortc's parser raises whatever it trips on (an assert, int())
        return "unparsable"
    if parsed.protocol.lower() != "udp":
        return "transport"
    if parsed.type not in CANDIDATE_TYPES:
        return "type"
    if not MIN_PORT <= parsed.port <= 65535:
        return "port"
    kind = classify_address(parsed.ip)
    return None if address_allowed(kind, own) else kind.value


def _attribute(line: str) -> str | None:
    return sdp.parse_attr(line)[0] if line.startswith("a=") else None


def filter_candidates(offer_sdp: str, own: frozenset[AddressKind]) -> tuple[str, int]:
    """The offer without the candidates the relay will not check, and how many those were.

    Lines are split and read exactly as aiortc's parser splits and reads them (its
    `grouplines`, `parse_attr`, `candidate_from_sdp`), so no candidate can hide from this
    filter in a line aiortc would read differently. A media section left without any
    candidate loses its ``a=end-of-candidates`` (see the module's docstring).
    """
    session, media = sdp.grouplines(offer_sdp)
    removed = 0

    def keep(lines: list[str]) -> list[str]:
        nonlocal removed
        kept = []
        for line in lines:
            if _attribute(line) == "candidate" and refusal(sdp.parse_attr(line)[1] or "", own):
                removed += 1
            else:
                kept.append(line)
        return kept

    out = keep(session)
    for section in media:
        lines = keep(section)
        if not any(_attribute(line) == "candidate" for line in lines):
            lines = [line for line in lines if _attribute(line) != "end-of-candidates"]
        out += lines
    return "\r\n".join(out) + "\r\n", removed
