"""Join tokens (DESIGN §5, §12) and resume within the grace period (F12)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from signaling import tokens
from tests.live import SECRET, Client, Live, join, live_server, token_of
from tests.server.conftest import ack_of, circle_of, hello_close, settle

OTHER_SECRET = "another-signing-secret-0123456789abcdef-0123456789"


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_bad_tokens_close_4401(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    good = token_of(circle["links"]["member"])
    cl = claims_of(good)
    header, payload, signature = good.split(".")
    now = int(time.time())
    forged_sig = f"{header}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    tampered = f"{header}.{b64({**cl, 'role': 'moderator'})}.{signature}"
    bad = {
        "forged signature": forged_sig,
        "tampered payload": tampered,
        "other key": tokens.issue(OTHER_SECRET, cl["sub"], "member", cl["inv"], 3600),
        "expired": tokens.issue(SECRET, cl["sub"], "member", cl["inv"], 10, now=now - 3600),
        "no exp": jwt.encode({k: v for k, v in cl.items() if k != "exp"}, SECRET, algorithm="HS256"),
        "alg none": jwt.encode(cl, None, algorithm="none"),
        "alg none by hand": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "HS512": jwt.encode(cl, SECRET + SECRET, algorithm="HS512"),
        "HS384": jwt.encode(cl, SECRET, algorithm="HS384"),
        "garbage": "garbage",
        "three dots of garbage": "a.b.c",
        "role not matching the invite": tokens.issue(SECRET, cl["sub"], "moderator", cl["inv"], 3600),
        "unknown invite": tokens.issue(SECRET, cl["sub"], "member", "no-such-invite", 3600),
    }
    for what, token in bad.items():
        assert await hello_close(live, token) == 4401, what
    await ack_of(a, "raise_hand")  # the circle carries on
    await mod.event("hand_raised", member_id=a.member_id)


async def test_a_token_for_circle_a_cannot_join_circle_b(live: Live) -> None:
    circle_a = await live.create_circle(title="A")
    circle_b = await live.create_circle(title="B")
    cl_a = claims_of(token_of(circle_a["links"]["member"]))
    # circle B named in a token carrying A's invite: signed with our key, still refused (4401)
    assert await hello_close(live, tokens.issue(SECRET, circle_b["id"], "member", cl_a["inv"], 3600)) == 4401
    # with another key: 4401
    assert await hello_close(live, tokens.issue(OTHER_SECRET, circle_b["id"], "member", cl_a["inv"], 3600)) == 4401
    # A's token joins A, and only A
    a = await join(live, circle_a["links"]["member"], "Melati")
    assert a.frames[0]["state"]["circle"]["id"] == circle_a["id"]


async def test_a_validly_signed_token_for_a_circle_that_does_not_exist_closes_4404(live: Live) -> None:
    """Documented choice: the signature is checked first (a forged one is 4401); a genuine
    token whose circle no longer exists (or never did) gets 4404 "no such circle"."""
    assert await hello_close(live, tokens.issue(SECRET, "no-such-circle", "member", "inv", 3600)) == 4404
    assert await hello_close(live, tokens.issue(OTHER_SECRET, "no-such-circle", "member", "inv", 3600)) == 4401


def drop(client: Client) -> None:
    """Cut the connection without a closing handshake, like a lost mobile network."""
    client.ws.transport.abort()


async def resume(live: Live, link: str, secret: str, name: str = "ignored") -> Client:
    client = await Client.connect(live)
    await client.send({"type": "hello", "token": token_of(link), "name": name, "resume": secret})
    first = await client.wait(lambda fr: fr.get("type") in ("welcome", "lobby"))
    client.member_id, client.resume = first["member_id"], first["resume"]
    return client


async def test_resume_within_grace_keeps_seat_floor_queue_and_mute(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    link = circle["links"]["member"]
    c = await join(live, link, "Anggrek")
    await ack_of(b, "raise_hand")
    await ack_of(a, "raise_hand")
    await ack_of(a, "unmute_self")
    await ack_of(mod, "give_floor", member_id=c.member_id)
    await mod.event("floor_given", member_id=c.member_id)
    before = (await settle(mod))["state"]
    drop(a)
    drop(c)
    await b.event("presence", member_id=a.member_id, connected=False)
    await b.event("presence", member_id=c.member_id, connected=False)
    a2 = await resume(live, link, a.resume)
    c2 = await resume(live, link, c.resume)
    assert (a2.member_id, c2.member_id) == (a.member_id, c.member_id)
    welcome = a2.frames[0]
    assert welcome["type"] == "welcome" and welcome["resume"] != a.resume
    await b.event("presence", member_id=a.member_id, connected=True)
    await mod.event("presence", member_id=c.member_id, connected=True)
    after = (await settle(mod))["state"]
    assert after["queue"] == before["queue"] == [b.member_id, a.member_id]
    assert after["floor"] == before["floor"] and after["floor"]["holder"] == c.member_id
    assert after["members"] == before["members"]  # seats, names, mutes, hands, connected
    # the old secret is single use
    assert await hello_close(live, token_of(link), resume=a.resume) == 4401
    # the new one works (and rotates again)
    drop(a2)
    await b.event("presence", member_id=a.member_id, connected=False)
    a3 = await resume(live, link, a2.resume)
    assert a3.member_id == a.member_id
    await ack_of(a3, "lower_hand")
    await b.event("hand_lowered", member_id=a.member_id)


async def test_a_moderator_who_drops_resumes_as_moderator(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    drop(mod)
    await a.event("presence", member_id=mod.member_id, connected=False)
    await a.event("moderator_present", present=False)
    mod2 = await resume(live, circle["links"]["moderator"], mod.resume)
    assert mod2.frames[0]["role"] == "moderator" and mod2.member_id == mod.member_id
    await a.event("moderator_present", present=True)
    await ack_of(mod2, "give_floor", member_id=a.member_id)


async def test_resume_with_another_invite_token_is_refused(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    drop(a)
    await b.event("presence", member_id=a.member_id, connected=False)
    assert await hello_close(live, token_of(circle["links"]["moderator"]), resume=a.resume) == 4401
    assert await hello_close(live, token_of(circle["links"]["member"]), resume="not-a-secret") == 4401


async def test_after_the_grace_the_seat_is_gone_and_the_secret_refused(store_url: str) -> None:
    async with live_server(store_url, grace_seconds=1) as live:
        circle, mod, a, b = await circle_of(live)
        drop(a)
        await b.event("presence", member_id=a.member_id, connected=False)
        left = await b.event("member_left", member_id=a.member_id)
        quietly = await mod.event("member_left_quietly", member_id=a.member_id)
        assert quietly["version"] == left["version"]
        assert await hello_close(live, token_of(circle["links"]["member"]), resume=a.resume) == 4401
        snap = await settle(b)
        assert a.member_id not in [m["id"] for m in snap["state"]["members"]]


async def test_a_personal_invite_joined_twice_keeps_one_seat(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    status, inv = await live.api("POST", f"/api/circles/{circle['id']}/invites",
                                 {"role": "member", "personal": True})
    assert status == 201
    first = await join(live, inv["link"], "Dahlia")
    await ack_of(first, "raise_hand")
    await ack_of(first, "unmute_self")
    second = await join(live, inv["link"], "Dahlia lagi")
    assert second.member_id == first.member_id
    assert await first.closed() == 4001
    snap = await settle(second)
    seats = [m for m in snap["state"]["members"] if m["id"] == first.member_id]
    assert len(seats) == 1 and seats[0]["muted"] is False and seats[0]["hand"] is True
    assert seats[0]["name"] == "Dahlia"
    assert len(snap["state"]["members"]) == 4
    await ack_of(second, "lower_hand")
    await mod.event("hand_lowered", member_id=first.member_id)
    snap = await settle(mod)
    assert [m["connected"] for m in snap["state"]["members"] if m["id"] == first.member_id] == [True]
