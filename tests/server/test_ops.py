"""Operations (F18): health, readiness, metrics, and logs without personal data."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request

import msgpack
import pytest

from server.logs import JsonFormatter
from testkit.redis_server import RedisServer
from tests.live import API_KEY, Client, Live, join, live_server, token_of
from tests.server.conftest import ack_of, hello_close, settle


async def get(live: Live, path: str, key: str | None = None, *,
              headers: dict[str, str] | None = None) -> tuple[int, str]:
    def call() -> tuple[int, str]:
        request = urllib.request.Request(live.url + path, headers=dict(headers or {}))
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    return await asyncio.to_thread(call)


async def test_healthz_and_readyz(live: Live) -> None:
    assert (await get(live, "/healthz"))[0] == 200
    status, body = await get(live, "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"


async def test_readyz_fails_while_redis_is_down_and_healthz_stays_up(own_redis: RedisServer) -> None:
    async with live_server(own_redis.url) as live:
        # /readyz pings the store on every request: each answer follows Redis at once (stop
        # returns once redis-server has exited, start once it logs that it is ready).
        assert (await get(live, "/readyz"))[0] == 200
        await asyncio.to_thread(own_redis.stop, True)
        assert (await get(live, "/readyz"))[0] == 503
        assert (await get(live, "/healthz"))[0] == 200
        await asyncio.to_thread(own_redis.start)
        assert (await get(live, "/readyz"))[0] == 200


def metric_value(text: str, metric: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(metric + " ")]
    return float(line.split()[1])


async def test_metrics_count_without_names_or_titles(live: Live) -> None:
    before = (await get(live, "/metrics", API_KEY))[1]  # the registry is the test process's
    circle = await live.create_circle(title="JudulRahasia", topic="TopikRahasia")
    mod = await join(live, circle["links"]["moderator"], "PendampingRahasia")
    a = await join(live, circle["links"]["member"], "MelatiRahasia")
    await ack_of(a, "private_note", text="CatatanRahasia")
    await a.command("fly")
    await ack_of(a, "raise_hand")
    await settle(mod)
    status, text = await get(live, "/metrics", API_KEY)
    assert status == 200
    for name in ("lingkar_connections", "lingkar_circles", "lingkar_frames_in_total", "lingkar_frames_out_total",
                 'lingkar_errors_total{code="unknown_type"}', "lingkar_command_seconds_bucket"):
        assert name in text, name
    def grew(metric: str) -> float:
        return metric_value(text, metric) - metric_value(before, metric)

    assert metric_value(text, "lingkar_connections") >= 2
    assert grew("lingkar_frames_in_total") >= 5  # two hellos, a note, "fly", raise_hand
    # welcomes, the note's ack, the error, the hand's ack and event at both members
    assert grew("lingkar_frames_out_total") >= 6
    assert grew("lingkar_command_seconds_count") >= 2  # the note and the hand, not told apart
    for secret in ("Rahasia", circle["id"], a.member_id, "127.0.0.1"):
        assert secret not in text, secret


async def test_metrics_without_the_key_are_refused(live: Live) -> None:
    assert (await get(live, "/metrics"))[0] == 401
    assert (await get(live, "/metrics", "not-the-organizer-key-at-all"))[0] == 401
    status, text = await get(live, "/metrics", API_KEY)
    assert status == 200 and "lingkar_connections" in text


def _series(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def test_metrics_never_tell_a_quiet_leave_a_note_or_a_removal_apart(live: Live) -> None:
    """Whoever polls /metrics of a small deployment must not see a panic leave, an "I need
    support" note or a removal the moment it happens: each moves exactly the series that an
    ordinary command and an ordinary leave move."""
    circle = await live.create_circle(lobby=False)
    links = circle["links"]
    mod = await join(live, links["moderator"], "Pendamping")
    members = [await join(live, links["member"], name) for name in ("Melati", "Kenanga", "Mawar", "Dahlia")]
    await settle(mod)

    async def moved_by(action: object) -> set[str]:
        before = _series((await get(live, "/metrics", API_KEY))[1])
        await action  # type: ignore[misc]
        await settle(mod)
        after = _series((await get(live, "/metrics", API_KEY))[1])
        return {name.split("{")[0] + ("{" + name.split("{")[1] if 'code="' in name else "")
                for name, value in after.items()
                if value != before.get(name) and not name.startswith(("process_", "python_"))}

    async def plain_leave() -> None:
        await ack_of(members[0], "leave")
        assert await members[0].closed() == 4001

    async def quiet_leave() -> None:
        await ack_of(members[1], "leave_quietly", need_support=True)
        assert await members[1].closed() == 4001

    async def removal() -> None:
        await ack_of(mod, "remove", member_id=members[2].member_id)
        assert await members[2].closed() == 4403

    left = await moved_by(plain_leave())
    assert left == await moved_by(quiet_leave())
    assert left == await moved_by(removal())
    hand = await moved_by(ack_of(members[3], "raise_hand"))
    assert hand == await moved_by(ack_of(members[3], "private_note", text="Tolong", need_support=True))
    status, text = await get(live, "/metrics", API_KEY)
    for word in ("quiet", "Quiet", "note", "Note", "remove", "Remove", "4403", "support"):
        assert word not in text, word


async def test_a_whole_session_logs_no_personal_data(store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("lingkar", "uvicorn", "uvicorn.error", "uvicorn.access", "rooms", "signaling", "server", ""):
        caplog.set_level(logging.DEBUG, logger=name)
    async with live_server(store_url, grace_seconds=1) as live:
        caplog.clear()  # from here on: what the session causes
        circle = await live.create_circle(title="JudulRahasia", topic="TopikRahasia", lobby=True)
        links = circle["links"]
        mod = await join(live, links["moderator"], "PendampingRahasia")
        a = await join(live, links["member"], "MelatiRahasia", expect="lobby")
        await ack_of(mod, "admit", member_id=a.member_id)
        b = await join(live, links["member"], "KenangaRahasia", expect="lobby")
        c = await join(live, links["member"], "SerunRahasia", expect="lobby")
        await ack_of(mod, "decline", member_id=b.member_id)  # its address may not knock for a while
        await ack_of(mod, "admit", member_id=c.member_id)
        await ack_of(a, "private_note", text="CatatanRahasia", need_support=True)
        await ack_of(a, "raise_hand")
        await ack_of(mod, "give_floor", member_id=a.member_id)
        await a.send({"type": "private_note", "text": "PanjangRahasia" * 40})  # too long
        await a.ws.send("TeksRahasia")
        await a.ws.send(msgpack.packb({"type": "RahasiaType", "text": "IsiRahasia"}))
        await settle(a)
        assert await hello_close(live, "RahasiaToken", "NamaRahasia") == 4401
        assert await hello_close(live, token_of(links["member"]), "\x00NamaRahasia") == 4400
        await ack_of(mod, "remove", member_id=c.member_id)
        await ack_of(a, "leave_quietly", need_support=True)
        await mod.event("member_left_quietly", member_id=a.member_id)
        d = await join(live, links["guest"], "TamuRahasia", expect="lobby", source="127.0.0.2")
        d.ws.transport.abort()
        await mod.event("lobby_left", member_id=d.member_id)  # grace over
        probe = await Client.connect(live)
        await probe.ws.send(b"\xc1RahasiaBytes")
        await probe.closed()
        await ack_of(mod, "end")
        await mod.closed()
    records = [r for r in caplog.records if not r.name.startswith("websockets.client")]  # the test client
    assert records, "nothing was logged at DEBUG: the capture is not working"
    formatter = JsonFormatter()
    # What is written (every record through the formatter), and what our own code puts in a
    # message before any filter: a third party's debug line may name Redis's address, which
    # the formatter blanks on the way out.
    ours = ("lingkar", "rooms", "signaling", "server", "uvicorn")
    lines = [formatter.format(r) for r in records] + [r.getMessage() for r in records if r.name.startswith(ours)]
    secrets = ["Rahasia", "127.0.0.1", "127.0.0.2", circle["links"]["member"].split("#t=")[1][:40], a.resume]
    leaks = [(secret, line[:300]) for line in lines for secret in secrets if secret in line]
    assert not leaks, leaks[:5]
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records if r.exc_info]
