"""The RTCIceServer list a member's PeerConnection gets in `welcome` and `admitted` (DESIGN §5,
§7): the deployment's STUN servers, and TURN credentials minted for this member alone.

Credentials follow the TURN REST scheme that coturn's `use-auth-secret` checks (RFC 8489
long-term credentials): username `expiry:member_id` (expiry in Unix seconds), password
base64(HMAC-SHA1(secret, username)). They are handed over only to an admitted member, over
its own socket, never on a public endpoint, and minted afresh on every resume; the TURN
server refuses them once `expiry` has passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def credential(secret: str, username: str) -> str:
    """coturn's `use-auth-secret` password for `username`."""
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


@dataclass(frozen=True, slots=True)
class IceServers:
    """What the deployment configured: STUN entries (public, no credentials) as given, and
    the TURN URLs with the secret shared with coturn (none: no TURN)."""

    stun: Sequence[dict[str, Any]] = ()
    turn_urls: Sequence[str] = ()
    turn_secret: str = ""
    turn_ttl: int = 4 * 3600

    def for_member(self, member_id: str, now_s: int) -> list[dict[str, Any]]:
        servers = [dict(server) for server in self.stun]
        if self.turn_urls and self.turn_secret:
            username = f"{now_s + self.turn_ttl}:{member_id}"
            servers.append({"urls": list(self.turn_urls), "username": username,
                            "credential": credential(self.turn_secret, username)})
        return servers
