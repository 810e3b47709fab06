"""Every command and event of DESIGN §5 over real sockets, with each event's audience checked
from every role's socket. Absence is checked after a barrier: a later event that the same
socket must receive (events reach a socket in version order)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.live import Client, Live, join, live_server, token_of
from tests.server.conftest import (
    SkipClock,
    ack_of,
    circle_of,
    error_of,
    hello_close,
    names,
    settle,
)


async def barrier(mod: Client, *observers: Client) -> None:
    """The moderator locks and unlocks; every observer (admitted) sees both. Whatever was
    caused before has reached the observers by then."""
    ack = await ack_of(mod, "lock")
    await asyncio.gather(*(o.event("locked", locked=True) for o in (mod, *observers)))
    ack = await ack_of(mod, "unlock")
    await asyncio.gather(*(o.wait(lambda fr, v=ack["version"]: fr.get("type") == "event"
                                  and fr.get("name") == "locked" and fr["version"] == v)
                           for o in (mod, *observers)))


def event_names_between(client: Client, start: int) -> list[str]:
    return [n for n in names(client.frames[start:]) if n != "locked"]


# --- join, lobby, admit, decline ----------------------------------------------------------


async def test_welcome_snapshot_shape_and_roles(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    welcome = mod.frames[0]
    assert welcome["type"] == "welcome" and welcome["role"] == "moderator"
    assert set(welcome) == {"type", "member_id", "role", "resume", "now", "state", "ice_servers"}
    assert welcome["ice_servers"] == []  # no STUN or TURN configured
    state = welcome["state"]
    assert set(state["circle"]) == {"id", "title", "topic", "language", "floor_mode", "turn_seconds",
                                    "capacity", "locked"}
    assert state["circle"]["id"] == circle["id"] and state["me"] == mod.member_id
    assert "lobby" in state and "airtime" in state  # moderators only
    member_welcome = a.frames[0]
    assert member_welcome["role"] == "member"
    assert "lobby" not in member_welcome["state"] and "airtime" not in member_welcome["state"]
    me = [m for m in member_welcome["state"]["members"] if m["id"] == a.member_id][0]
    assert me["muted"] is True and me["role"] == "member"  # members enter muted
    mod_entry = [m for m in member_welcome["state"]["members"] if m["id"] == mod.member_id][0]
    assert mod_entry["muted"] is False  # moderators enter unmuted
    assert set(me) == {"id", "name", "role", "seat", "listen_only", "muted", "hand", "connected"}
    joined = await mod.event("member_joined")
    assert set(joined) == {"type", "version", "name", "data"}
    assert joined["data"]["member"]["name"] in ("Melati", "Kenanga")


async def test_sync_answers_a_snapshot_and_ack_carries_ref_and_version(live: Live) -> None:
    _, mod, a, b = await circle_of(live)
    snap = await settle(a)
    assert set(snap) == {"type", "version", "state"} and snap["state"]["me"] == a.member_id
    await a.send({"type": "raise_hand", "ref": 77})
    ack = await a.wait(lambda fr: fr.get("type") == "ack" and fr.get("ref") == 77)
    assert ack["version"] == snap["version"] + 1
    raised = await b.event("hand_raised", member_id=a.member_id)
    assert raised["version"] == ack["version"] and raised["data"]["queue"] == [a.member_id]
    # a command without ref: the ack says ref None
    start = len(a.frames)
    await a.send({"type": "lower_hand"})
    ack = await a.wait(lambda fr: fr.get("type") == "ack", start=start)
    assert ack["ref"] is None and ack["version"] == raised["version"] + 1
    snap = await settle(mod)
    assert snap["version"] == ack["version"] and snap["state"]["queue"] == []


async def test_lobby_member_receives_nothing_but_lobby_then_admitted(live: Live) -> None:
    circle = await live.create_circle(lobby=True)
    links = circle["links"]
    mod = await join(live, links["moderator"], "Pendamping")
    waiting = await join(live, links["member"], "Melati", expect="lobby")
    first = waiting.frames[0]
    assert set(first) == {"type", "member_id", "resume", "now", "circle"}
    assert first["circle"] == {"title": "Lingkar Uji", "language": "id"}
    lw = await mod.event("lobby_waiting")
    assert lw["data"]["member"] == {"id": waiting.member_id, "name": "Melati", "role": "member"}
    snap = await settle(mod)
    assert [m["id"] for m in snap["state"]["lobby"]] == [waiting.member_id]
    assert waiting.member_id not in [m["id"] for m in snap["state"]["members"]]
    # a lot happens inside while one waits
    other = await join(live, links["member"], "Kenanga", expect="lobby")
    await ack_of(mod, "admit", member_id=other.member_id)
    admitted = await other.wait(lambda fr: fr.get("type") == "admitted")
    assert admitted["state"]["me"] == other.member_id
    await mod.event("member_joined")
    await ack_of(other, "raise_hand")
    await ack_of(other, "private_note", text="halo", need_support=False)
    await ack_of(mod, "give_floor", member_id=other.member_id)
    await ack_of(mod, "mute_all")
    await ack_of(mod, "set_mode", mode="open")
    await ack_of(other, "unmute_self")
    await barrier(mod, other)
    assert [fr["type"] for fr in waiting.frames] == ["lobby"]
    # admission: `admitted {state}`, then events like everyone
    await ack_of(mod, "admit", member_id=waiting.member_id)
    admitted = await waiting.wait(lambda fr: fr.get("type") == "admitted")
    assert set(admitted) == {"type", "state", "ice_servers"}
    assert waiting.member_id in [m["id"] for m in admitted["state"]["members"]]
    assert [fr["type"] for fr in waiting.frames] == ["lobby", "admitted"]
    await mod.event("lobby_left", member_id=waiting.member_id)
    await other.event("member_joined")
    assert not [fr for fr in other.events() if fr["name"] in ("lobby_waiting", "lobby_left")]
    await barrier(mod, other, waiting)
    assert "locked" in names(waiting.frames)


async def test_decline_closes_4403_and_guests_always_wait(live: Live) -> None:
    circle = await live.create_circle(lobby=False)
    links = circle["links"]
    mod = await join(live, links["moderator"], "Pendamping")
    a = await join(live, links["member"], "Melati")  # lobby off: straight in
    guest = await join(live, links["guest"], "Tamu", expect="lobby")
    await mod.event("lobby_waiting")
    assert await error_of(a, "decline", member_id=guest.member_id) == "forbidden"
    await ack_of(mod, "decline", member_id=guest.member_id)
    assert await guest.closed() == 4403
    left = await mod.event("lobby_left", member_id=guest.member_id)
    await barrier(mod, a)
    assert not [fr for fr in a.events() if fr["version"] == left["version"]]
    assert await error_of(mod, "admit", member_id=guest.member_id) == "no_such_member"


# --- leaving --------------------------------------------------------------------------------


def _normalized(frames: list[dict[str, Any]], who: str, base: int) -> list[Any]:
    out = []
    for fr in frames:
        if fr.get("type") != "event" or fr["name"] == "locked":
            continue
        data = {k: ("<who>" if v == who else v) for k, v in fr["data"].items()}
        out.append((fr["name"], fr["version"] - base, data))
    return out


async def test_members_cannot_tell_a_quiet_leave_from_a_plain_one(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    plain = await join(live, circle["links"]["member"], "Anggrek")
    quiet = await join(live, circle["links"]["member"], "Teratai")
    await barrier(mod, a, b)
    seen: dict[str, dict[str, list[Any]]] = {"plain": {}, "quiet": {}}
    for kind, leaver in (("plain", plain), ("quiet", quiet)):
        starts = {id(c): len(c.frames) for c in (mod, a, b)}
        if kind == "plain":
            ack = await ack_of(leaver, "leave")
        else:
            ack = await ack_of(leaver, "leave_quietly", need_support=True)
        assert await leaver.closed() == 4001
        await barrier(mod, a, b)
        for name, c in (("mod", mod), ("a", a), ("b", b)):
            seen[kind][name] = _normalized(c.frames[starts[id(c)]:], leaver.member_id, ack["version"])
    assert seen["plain"]["a"] == seen["quiet"]["a"] == [("member_left", 0, {"member_id": "<who>"})]
    assert seen["plain"]["b"] == seen["quiet"]["b"]
    assert seen["plain"]["mod"] == [("member_left", 0, {"member_id": "<who>"})]
    assert seen["quiet"]["mod"] == [("member_left", 0, {"member_id": "<who>"}),
                                    ("member_left_quietly", 0, {"member_id": "<who>", "need_support": True})]
    snap = await settle(a)
    assert {m["id"] for m in snap["state"]["members"]} == {mod.member_id, a.member_id, b.member_id}


async def test_quiet_leave_of_the_floor_holder_releases_it_silently(live: Live) -> None:
    _, mod, a, b = await circle_of(live)
    await ack_of(b, "raise_hand")
    await ack_of(a, "raise_hand")
    await ack_of(mod, "give_floor", member_id=a.member_id)
    await b.event("floor_given", member_id=a.member_id)
    start = len(b.frames)
    await ack_of(a, "leave_quietly", need_support=False)
    notice = await mod.event("member_left_quietly", member_id=a.member_id)
    assert notice["data"]["need_support"] is False
    await barrier(mod, b)
    assert event_names_between(b, start) == ["member_left"]
    snap = await settle(b)
    assert snap["state"]["floor"]["holder"] is None and snap["state"]["queue"] == [b.member_id]


# --- floor, hands, round, timer --------------------------------------------------------------


async def test_hands_floor_next_release_and_extend(live: Live) -> None:
    _, mod, a, b = await circle_of(live)
    assert await error_of(a, "give_floor", member_id=b.member_id) == "forbidden"
    assert await error_of(a, "next") == "forbidden"
    assert await error_of(mod, "next") == "not_allowed"  # nobody waits
    assert await error_of(mod, "raise_hand") == "forbidden"  # moderators may always speak
    await ack_of(a, "raise_hand")
    await ack_of(b, "raise_hand")
    raised = await mod.event("hand_raised", member_id=b.member_id)
    assert raised["data"]["queue"] == [a.member_id, b.member_id]
    await ack_of(mod, "next")
    given = await b.event("floor_given", member_id=a.member_id)
    lowered = await b.event("hand_lowered", member_id=a.member_id)
    assert lowered["data"]["queue"] == [b.member_id] and given["data"]["deadline"] > 0
    assert await error_of(b, "release_floor") == "forbidden"
    ext = await ack_of(mod, "extend_turn", seconds=60)
    extended = await a.wait(lambda fr: fr.get("name") == "floor_given" and fr["version"] == ext["version"])
    assert extended["data"]["deadline"] == given["data"]["deadline"] + 60_000
    assert await error_of(mod, "extend_turn", seconds=0) == "bad_frame"
    assert await error_of(mod, "extend_turn", seconds=601) == "bad_frame"
    assert await error_of(a, "extend_turn", seconds=10) == "forbidden"
    await ack_of(a, "release_floor")
    await b.event("floor_released", member_id=a.member_id)
    await ack_of(mod, "give_floor", member_id=b.member_id)
    await a.event("floor_given", member_id=b.member_id)
    await ack_of(mod, "release_floor")
    await a.event("floor_released", member_id=b.member_id)
    assert await error_of(mod, "give_floor", member_id="nobody-here") == "no_such_member"
    assert await error_of(mod, "give_floor", member_id=mod.member_id) == "not_allowed"
    assert await error_of(a, "pass") == "not_allowed"  # not the round mode


async def test_round_mode_pass_and_set_mode(live: Live) -> None:
    _, mod, a, b = await circle_of(live, floor_mode="round")
    assert await error_of(a, "raise_hand") == "not_allowed"
    assert await error_of(a, "set_mode", mode="open") == "forbidden"
    assert await error_of(mod, "set_mode", mode="loud") == "bad_frame"
    await ack_of(mod, "next")
    first = await a.event("floor_given")
    holder = first["data"]["member_id"]
    holder_client, other = (a, b) if holder == a.member_id else (b, a)
    assert await error_of(other, "pass") == "not_allowed"
    await ack_of(holder_client, "pass")
    await mod.event("floor_given", member_id=other.member_id)
    await ack_of(mod, "set_mode", mode="hands")
    changed = await a.event("mode_changed", mode="hands")
    await b.event("mode_changed", mode="hands")
    released = [fr for fr in a.events() if fr["name"] == "floor_released" and fr["version"] == changed["version"]]
    assert released and released[0]["data"]["member_id"] == other.member_id
    await ack_of(mod, "set_mode", mode="open")
    await b.event("mode_changed", mode="open")
    assert await error_of(mod, "next") == "not_allowed"


async def test_turn_warning_to_holder_and_moderators_turn_over_to_moderators(store_url: str) -> None:
    clock = SkipClock()
    async with live_server(store_url, clock=clock) as live:
        _, mod, a, b = await circle_of(live, turn_seconds=30)
        start = {id(c): len(c.frames) for c in (mod, a, b)}
        await ack_of(mod, "give_floor", member_id=a.member_id)
        warning = await a.event("turn_warning", member_id=a.member_id)
        assert warning["data"]["remaining"] in (29, 30)  # whole seconds, rounded down
        await mod.event("turn_warning", member_id=a.member_id)
        await barrier(mod, a, b)
        assert "turn_warning" not in names(b.frames[start[id(b)]:])
        clock.skip(31_000)
        await mod.event("turn_over", member_id=a.member_id)
        await barrier(mod, a, b)
        assert "turn_over" not in names(a.frames[start[id(a)]:]) + names(b.frames[start[id(b)]:])
        assert names(a.frames[start[id(a)]:]).count("turn_warning") == 1


# --- mutes ----------------------------------------------------------------------------------


async def test_mutes_and_unmute_requests(live: Live) -> None:
    _, mod, a, b = await circle_of(live)
    await ack_of(a, "unmute_self")
    await b.event("unmuted", member_id=a.member_id)
    await ack_of(a, "mute_self")
    muted = await b.event("muted", member_id=a.member_id)
    assert muted["data"]["by"] == "self"
    await ack_of(a, "unmute_self")
    await ack_of(b, "unmute_self")
    await mod.event("unmuted", member_id=b.member_id)
    assert await error_of(a, "mute", member_id=b.member_id) == "forbidden"
    await ack_of(mod, "mute", member_id=a.member_id)
    by_mod = await b.event("muted", member_id=a.member_id, by="moderator")
    assert by_mod["data"] == {"member_id": a.member_id, "by": "moderator"}
    await ack_of(mod, "mute_all")
    await a.event("muted", member_id=b.member_id, by="moderator")
    snap = await settle(mod)
    assert {m["id"]: m["muted"] for m in snap["state"]["members"]} == {
        mod.member_id: False, a.member_id: True, b.member_id: True}
    # nobody unmutes anyone: a moderator can only ask, and only the asked member hears it
    start = {id(c): len(c.frames) for c in (mod, a, b)}
    assert await error_of(a, "ask_unmute", member_id=b.member_id) == "forbidden"
    await ack_of(mod, "ask_unmute", member_id=a.member_id)
    asked = await a.event("unmute_requested")
    assert asked["data"] == {}
    await barrier(mod, a, b)
    assert "unmute_requested" not in names(b.frames[start[id(b)]:]) + names(mod.frames[start[id(mod)]:])
    snap = await settle(a)
    assert [m["muted"] for m in snap["state"]["members"] if m["id"] == a.member_id] == [True]
    assert await error_of(mod, "ask_unmute", member_id="nobody-here") == "no_such_member"


async def test_private_note_reaches_moderators_only(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    status, inv = await live.api("POST", f"/api/circles/{circle['id']}/invites", {"role": "moderator"})
    assert status == 201
    mod2 = await join(live, inv["link"], "Pendamping Dua")
    await mod.event("member_joined")
    start = {id(c): len(c.frames) for c in (mod, mod2, a, b)}
    await ack_of(a, "private_note", text="aku butuh bicara", need_support=True)
    for m in (mod, mod2):
        note = await m.event("private_note", member_id=a.member_id)
        assert note["data"] == {"member_id": a.member_id, "text": "aku butuh bicara", "need_support": True}
    await barrier(mod, a, b)
    assert "private_note" not in names(a.frames[start[id(a)]:]) + names(b.frames[start[id(b)]:])
    assert await error_of(a, "private_note", text="x" * 501) == "too_long"


# --- remove, lock, full, end ---------------------------------------------------------------


async def test_remove_closes_4403_and_the_personal_invite_is_refused(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    status, inv = await live.api("POST", f"/api/circles/{circle['id']}/invites",
                                 {"role": "member", "personal": True})
    assert status == 201 and "#t=" in inv["link"]
    person = await join(live, inv["link"], "Dahlia")
    await mod.event("member_joined")
    assert await error_of(a, "remove", member_id=person.member_id) == "forbidden"
    assert await error_of(mod, "remove", member_id=mod.member_id) == "not_allowed"
    await ack_of(mod, "remove", member_id=person.member_id)
    assert await person.closed() == 4403
    removed = await a.event("member_removed", member_id=person.member_id)
    await b.event("member_removed", member_id=person.member_id)
    assert "member_left" not in [fr["name"] for fr in a.events() if fr["version"] == removed["version"]]
    assert await hello_close(live, token_of(inv["link"]), "Dahlia") == 4403
    # the removed member's resume secret died with the seat
    assert await hello_close(live, token_of(inv["link"]), "Dahlia", resume=person.resume) == 4401
    # after a removal, shared links go through the lobby even with the lobby off
    late = await join(live, circle["links"]["member"], "Seruni", expect="lobby")
    await mod.event("lobby_waiting")
    await late.close()


async def test_lock_refuses_joins_4403_and_unlock_allows(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    assert await error_of(a, "lock") == "forbidden"
    await ack_of(mod, "lock")
    await a.event("locked", locked=True)
    assert await hello_close(live, token_of(circle["links"]["member"])) == 4403
    await ack_of(mod, "unlock")
    await b.event("locked", locked=False)
    c = await join(live, circle["links"]["member"], "Seruni")
    await a.event("member_joined")
    await c.close()


async def test_full_circle_refuses_with_4409(live: Live) -> None:
    circle = await live.create_circle(capacity=2, lobby=False)
    mod = await join(live, circle["links"]["moderator"], "Pendamping")
    await join(live, circle["links"]["member"], "Melati")
    await join(live, circle["links"]["member"], "Kenanga")  # capacity counts members, not moderators
    assert await hello_close(live, token_of(circle["links"]["member"]), "Mawar") == 4409
    await mod.event("member_joined")
    second = await live.api("POST", f"/api/circles/{circle['id']}/invites", {"role": "moderator"})
    await join(live, second[1]["link"], "Pendamping2")  # a moderator is never refused for capacity


async def test_end_closes_everyone_4000_and_the_circle_is_gone(live: Live) -> None:
    circle = await live.create_circle(lobby=True)
    links = circle["links"]
    mod = await join(live, links["moderator"], "Pendamping")
    a = await join(live, links["member"], "Melati", expect="lobby")
    await ack_of(mod, "admit", member_id=a.member_id)
    waiting = await join(live, links["member"], "Kenanga", expect="lobby")
    await mod.event("lobby_waiting", member={"id": waiting.member_id, "name": "Kenanga", "role": "member"})
    assert await error_of(a, "end") == "forbidden"
    await ack_of(mod, "end")
    assert await asyncio.gather(mod.closed(), a.closed(), waiting.closed()) == [4000, 4000, 4000]
    status, _ = await live.api("GET", f"/api/circles/{circle['id']}")
    assert status == 404
    assert await hello_close(live, token_of(links["member"])) == 4404
    assert await hello_close(live, token_of(links["moderator"])) == 4404


async def test_organizer_delete_ends_the_circle_for_everyone(live: Live) -> None:
    circle, mod, a, b = await circle_of(live)
    status, _ = await live.api("DELETE", f"/api/circles/{circle['id']}")
    assert status == 204
    assert await asyncio.gather(mod.closed(), a.closed(), b.closed()) == [4000, 4000, 4000]
    assert await hello_close(live, token_of(circle["links"]["member"])) == 4404


async def test_offer_refusals_do_not_break_the_session(live: Live) -> None:
    circle = await live.create_circle(lobby=True)
    mod = await join(live, circle["links"]["moderator"], "Pendamping")
    waiting = await join(live, circle["links"]["member"], "Melati", expect="lobby")
    assert await error_of(waiting, "offer", sdp="v=0") == "forbidden"
    assert await error_of(mod, "offer", sdp="this is not sdp") == "bad_frame"
    await ack_of(mod, "lock")
    assert (await settle(mod))["state"]["circle"]["locked"] is True


async def test_unknown_and_malformed_commands_get_errors(live: Live) -> None:
    _, mod, a, b = await circle_of(live)
    assert await error_of(a, "fly") == "unknown_type"
    assert await error_of(a, "give_floor") == "bad_frame"  # missing member_id
    assert await error_of(a, "mute_self", extra=1) == "bad_frame"
    assert await error_of(mod, "mute", member_id=5) == "bad_frame"
    assert await error_of(a, "hello", token="x", name="y") == "bad_frame"  # already joined
    await ack_of(a, "mute_self")  # a no-op is acked too
