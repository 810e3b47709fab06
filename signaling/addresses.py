"""Client addresses as limits count them: an IPv4 address is one client, an IPv6 /64 is one
(a phone or a home network gets a whole /64, and walks through it at will)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress


def prefix(address: str) -> str:
    """The unit a per-address limit counts: the IPv4 address itself (also when written as
    an IPv4-mapped IPv6 address), or the /64 of an IPv6 address. Anything that is not an IP
    address (a Unix socket, a test client) is its own unit."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def keyed(secret: str, scope: str, address: str) -> str:
    """An opaque tag for an address's `prefix` within `scope` (a circle): equal for equal
    prefixes, useless without the server's secret, and never the address itself (it may
    be kept in the room state for a few minutes, DESIGN §5 "Who gets in")."""
    mac = hmac.new(secret.encode(), f"{scope}\0{prefix(address)}".encode(), hashlib.sha256)
    return mac.hexdigest()[:24]
