"""Close codes, error codes and the per-connection limits of DESIGN §5 and §12."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import websockets

from server.app import drain
from signaling import tokens
from signaling.session import Limits
from tests.live import Client, Live, join, live_server, token_of
from tests.server.conftest import ack_of, circle_of, error_of, settle


async def first_frame_close(live: Live, message: bytes | str) -> int:
    client = await Client.connect(live)
    await client.ws.send(message)
    code = await client.closed()
    assert client.frames == []
    return code


async def test_before_hello_anything_but_a_hello_closes_4400(live: Live) -> None:
    circle = await live.create_circle()
    token = token_of(circle["links"]["member"])
    assert await first_frame_close(live, "hello") == 4400  # a text frame
    assert await first_frame_close(live, b"\xc1\xff garbage") == 4400
    assert await first_frame_close(live, msgpack.packb([1, 2, 3])) == 4400
    assert await first_frame_close(live, msgpack.packb({"type": "sync"})) == 4400
    assert await first_frame_close(live, msgpack.packb({"type": "hello", "token": token})) == 4400
    for bad_name in ("", "   ", "x" * 33, "a\x00b", "a\u202eb"):
        hello = {"type": "hello", "token": token, "name": bad_name}
        assert await first_frame_close(live, msgpack.packb(hello)) == 4400, bad_name


async def test_no_hello_in_time_closes_4408(store_url: str) -> None:
    async with live_server(store_url, limits=Limits(hello_seconds=0.5)) as live:
        client = await Client.connect(live)
        assert await client.closed() == 4408


async def test_a_frame_over_64_kib_closes_1009(live: Live) -> None:
    _, mod, a, b = await circle_of(live)
    await a.ws.send(msgpack.packb({"type": "private_note", "text": "x" * (65 * 1024)}))
    assert await a.closed() == 1009
    await mod.event("presence", member_id=a.member_id, connected=False)
    await ack_of(b, "raise_hand")  # the circle carries on
    # before the hello, too
    assert await first_frame_close(live, b"\x00" * (64 * 1024 + 1)) == 1009


async def test_a_frame_of_exactly_64_kib_is_read(live: Live) -> None:
    _, mod, a, b = await circle_of(live)
    frame = msgpack.packb({"type": "private_note", "text": "x" * 70_000})[: 64 * 1024]
    await a.ws.send(frame)
    err = await a.wait(lambda fr: fr.get("type") == "error")
    assert err["code"] == "bad_frame"  # truncated msgpack, but read and answered
    await settle(a)


async def test_text_and_malformed_frames_after_hello_get_errors_and_stay_open(live: Live) -> None:
    _, mod, a, b = await circle_of(live)
    start = len(a.frames)
    await a.ws.send("raise_hand")
    await a.ws.send(b"\xc1")
    await a.ws.send(msgpack.packb([1, 2]))
    await a.ws.send(msgpack.packb({"type": 5}))
    await a.ws.send(msgpack.packb({"type": "raise_hand", "ref": 9, "extra": True}))
    await a.wait(lambda fr: len([e for e in a.frames[start:] if e.get("type") == "error"]) == 5)
    errors = [e for e in a.frames[start:] if e.get("type") == "error"]
    assert [e["code"] for e in errors] == ["bad_frame", "bad_frame", "unknown_type", "unknown_type", "bad_frame"]
    assert errors[-1]["ref"] == 9
    assert set(errors[0]) == {"type", "ref", "code", "message"}
    await ack_of(a, "raise_hand")
    assert a.close_code is None


async def test_rate_limit_refuses_then_closes_4429(store_url: str) -> None:
    limits = Limits(rate=1.0, burst=10)  # flood: 3/s, burst 30
    async with live_server(store_url, limits=limits) as live:
        circle = await live.create_circle()
        a = await join(live, circle["links"]["member"], "Melati")
        for i in range(15):
            await a.send({"type": "lower_hand", "ref": i})
        limited = await a.wait(lambda fr: fr.get("type") == "error" and fr["code"] == "rate_limited")
        assert limited["ref"] is None
        await a.wait(lambda fr: fr.get("type") == "ack" and fr["ref"] == 0)
        assert a.close_code is None
        for i in range(60):
            try:
                await a.send({"type": "lower_hand", "ref": 100 + i})
            except websockets.ConnectionClosed:
                break
        assert await a.closed() == 4429
        acks = [fr for fr in a.frames if fr.get("type") == "ack"]
        assert 1 <= len(acks) <= 12  # the burst and perhaps a refill


async def test_default_rate_limit_is_burst_40(live: Live) -> None:
    circle = await live.create_circle()
    a = await join(live, circle["links"]["member"], "Melati")
    for i in range(60):
        await a.send({"type": "lower_hand", "ref": i})
    await a.wait(lambda fr: fr.get("type") == "error" and fr["code"] == "rate_limited")
    await a.wait(lambda fr: fr.get("type") == "ack" and fr["ref"] == 0)
    # 60 frames: within the flood limit (120), so the socket stays open
    await a.wait(lambda fr: len([f for f in a.frames if f.get("type") in ("ack", "error")]) == 60)
    assert 40 <= len([fr for fr in a.frames if fr.get("type") == "ack"]) <= 45
    assert a.close_code is None


async def test_origin_check_at_the_upgrade(live: Live) -> None:
    port = live.url.rsplit(":", 1)[1]
    for origin in ("http://evil.example", f"http://evil.example:{port}", "http://127.0.0.1:1",
                   f"https://127.0.0.1:{port}", "null"):
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(live.ws_url, origin=origin)  # type: ignore[arg-type]
        assert info.value.response.status_code == 403, origin
    circle = await live.create_circle()
    for origin in (f"http://localhost:{port}", f"http://127.0.0.1:{port}", None):
        client = await Client.connect(live, origin=origin)
        await client.send({"type": "hello", "token": token_of(circle["links"]["member"]), "name": "Melati"})
        welcome = await client.wait(lambda fr: fr.get("type") == "welcome")
        assert welcome["role"] == "member", origin
        await client.close()


async def test_drain_closes_sockets_with_1001_and_keeps_seats(live: Live) -> None:
    _, mod, a, b = await circle_of(live)
    await drain(live.parts)
    assert await asyncio.gather(mod.closed(), a.closed(), b.closed()) == [1001, 1001, 1001]
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(live.ws_url)
    live.parts.ws.draining = False  # as a restarted process would
    circle_id = a.frames[0]["state"]["circle"]["id"]
    for old in (mod, a, b):
        role = "moderator" if old is mod else "member"
        state = await live.parts.manager.load(circle_id)  # the circle is still there
        assert old.member_id in state.members
        client = await Client.connect(live)
        invite = [i for i in state.invites.values() if i.role.value == role][0]
        await client.send({"type": "hello", "name": "x", "resume": old.resume,
                           "token": tokens.issue(live.parts.settings.secret, circle_id, role, invite.id, 60)})
        welcome = await client.wait(lambda fr: fr.get("type") == "welcome")
        assert welcome["member_id"] == old.member_id  # the seat was kept


async def test_error_codes_for_wrong_roles_and_members(live: Live) -> None:
    _, mod, a, b = await circle_of(live)
    for cmd, fields in [("give_floor", {"member_id": b.member_id}), ("next", {}), ("mute", {"member_id": b.member_id}),
                        ("mute_all", {}), ("ask_unmute", {"member_id": b.member_id}),
                        ("admit", {"member_id": b.member_id}), ("decline", {"member_id": b.member_id}),
                        ("remove", {"member_id": b.member_id}), ("lock", {}), ("unlock", {}), ("end", {}),
                        ("extend_turn", {"seconds": 5}), ("set_mode", {"mode": "open"})]:
        assert await error_of(a, cmd, **fields) == "forbidden", cmd
    for cmd in ("mute", "ask_unmute", "remove", "give_floor", "admit", "decline"):
        assert await error_of(mod, cmd, member_id="not-a-member") == "no_such_member", cmd
    assert await error_of(a, "private_note", text="x" * 501) == "too_long"
    assert await error_of(a, "nope") == "unknown_type"
    snap = await settle(mod)
    assert snap["state"]["version"] == 3  # nothing changed: mod, a, b joined
