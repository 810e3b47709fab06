"""TURN credentials (DESIGN §5, §7): minted per member, only in `welcome` and `admitted`,
fresh on every resume, never on a public endpoint."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import urllib.request

from signaling.turn import IceServers, credential
from tests.live import Client, Live, join, live_server, token_of
from tests.server.conftest import ack_of

TURN_SECRET = "coturn-static-auth-secret-for-tests"
TURN_URLS = "turn:127.0.0.1:3478?transport=udp,turn:127.0.0.1:3478?transport=tcp"


def test_the_credential_is_coturns_rest_scheme() -> None:
    # coturn (use-auth-secret): password = base64(HMAC-SHA1(static-auth-secret, username))
    expected = base64.b64encode(hmac.new(b"s3cret", b"1700000600:m1", hashlib.sha1).digest()).decode()
    assert credential("s3cret", "1700000600:m1") == expected
    servers = IceServers(stun=[{"urls": "stun:stun.example.org"}], turn_urls=["turn:t.example.org"],
                         turn_secret="s3cret", turn_ttl=600).for_member("m1", 1_700_000_000)
    assert servers == [{"urls": "stun:stun.example.org"},
                       {"urls": ["turn:t.example.org"], "username": "1700000600:m1", "credential": expected}]
    assert IceServers(stun=[{"urls": "stun:s"}]).for_member("m1", 0) == [{"urls": "stun:s"}]


def _check_minted(ice_servers: list[dict[str, object]], member_id: str) -> int:
    (turn,) = [s for s in ice_servers if "username" in s]
    assert turn["urls"] == TURN_URLS.split(",")
    expiry, who = str(turn["username"]).split(":")
    assert who == member_id
    assert turn["credential"] == credential(TURN_SECRET, str(turn["username"]))
    assert 0 < int(expiry) - time.time() <= 600 + 5
    return int(expiry)


async def _client_config(live: Live) -> str:
    def call() -> str:
        with urllib.request.urlopen(live.url + "/client-config", timeout=10) as resp:
            return str(resp.read().decode())

    return await asyncio.to_thread(call)


async def test_members_get_their_own_turn_credentials_and_the_public_endpoint_none(store_url: str) -> None:
    async with live_server(store_url, turn_urls=TURN_URLS, turn_secret=TURN_SECRET, turn_ttl=600,
                           ice_servers='[{"urls": "stun:127.0.0.1:3478"}]') as live:
        circle = await live.create_circle(lobby=True)
        links = circle["links"]
        mod = await join(live, links["moderator"], "Pendamping")
        welcome = mod.frames[0]
        assert {"urls": "stun:127.0.0.1:3478"} in welcome["ice_servers"]
        _check_minted(welcome["ice_servers"], mod.member_id)
        waiting = await join(live, links["member"], "Melati", expect="lobby")
        assert "ice_servers" not in waiting.frames[0]  # a lobby member has no media
        await ack_of(mod, "admit", member_id=waiting.member_id)
        admitted = await waiting.wait(lambda fr: fr.get("type") == "admitted")
        first = _check_minted(admitted["ice_servers"], waiting.member_id)
        # A resume mints them again, for the same member.
        waiting.ws.transport.abort()
        back = await join_resume(live, token_of(links["member"]), waiting.resume)
        assert back["member_id"] == waiting.member_id
        assert _check_minted(back["ice_servers"], waiting.member_id) >= first
        config = await _client_config(live)
        assert TURN_SECRET not in config and "credential" not in config and "username" not in config
        assert json.loads(config)["ice_servers"] == [{"urls": "stun:127.0.0.1:3478"}]


async def join_resume(live: Live, token: str, resume: str) -> dict[str, object]:
    client = await Client.connect(live)
    await client.send({"type": "hello", "token": token, "name": "Melati", "resume": resume})
    return await client.wait(lambda fr: fr.get("type") == "welcome")
