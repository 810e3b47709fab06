"""A circle lives on one process at a time (DESIGN §8): leases, fencing, redirect, takeover.

Two `live_server(redis_url)` in one test are two processes (each has its own process id and
public URL). The killed process is a real `lingkar serve` subprocess, killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets

from rooms.model import CircleSettings, RoomState
from server.app import drain
from storage.codec import encode_state
from storage.memory_store import MemoryStore
from storage.redis_store import RedisStore
from storage.store import Lease, Owner, StaleOwner
from testkit.ports import free_port
from testkit.redis_server import key_expiry
from tests.live import API_KEY, SECRET, Client, Live, join, live_server, token_of
from tests.server.conftest import ack_of, settle

REPO = Path(__file__).resolve().parents[2]


def home_of(redis_url: str, circle_id: str) -> dict[bytes, bytes]:
    with redis.Redis.from_url(redis_url) as r:
        return r.hgetall(f"lk:{{{circle_id}}}:home")  # type: ignore[return-value]


def drop_home(redis_url: str, circle_id: str) -> None:
    """The lease vanishes as if it had expired (the owner is still alive)."""
    with redis.Redis.from_url(redis_url) as r:
        r.delete(f"lk:{{{circle_id}}}:home")


async def connect_to(url: str) -> Client:
    """A client socket to a URL as a `redirect` gives it (http… → ws…)."""
    ws = await websockets.connect(url.replace("http", "ws", 1), max_size=2**20, compression=None)
    client = Client(ws)
    client._reader = asyncio.create_task(client._read())
    return client


async def hello_at(url: str, token: str, name: str = "Melati", resume: str | None = None
                   ) -> tuple[Client, dict[str, Any] | None]:
    """Send one `hello`; the client and its first answer (None when closed without one)."""
    client = await connect_to(url)
    frame: dict[str, Any] = {"type": "hello", "token": token, "name": name, "listen_only": False}
    if resume is not None:
        frame["resume"] = resume
    await client.send(frame)
    try:
        first = await client.wait(lambda fr: fr.get("type") in ("welcome", "lobby", "redirect"))
    except AssertionError:  # closed first
        return client, None
    return client, first


def lease_expiry(redis_url: str, circle_id: str) -> AbstractAsyncContextManager[asyncio.Future[None]]:
    """A future set when Redis expires the circle's lease key."""
    return key_expiry(redis_url, f"lk:{{{circle_id}}}:home")


# ---- the store's lease scripts --------------------------------------------------------------


def _blob(circle_id: str) -> bytes:
    return encode_state(RoomState.new(CircleSettings(id=circle_id, title="t")))


async def test_lease_is_taken_once_renewed_by_its_owner_and_fences_a_stale_owner(
        redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        cid = "lease-store"
        with redis.Redis.from_url(redis_url) as r:
            r.delete(*(f"lk:{{{cid}}}:{k}" for k in ("state", "events", "home", "fence")))
        await store.create(cid, _blob(cid))
        first = await store.acquire(cid, "p1", "http://one", 5000)
        assert isinstance(first, Lease) and first.taken_over
        again = await store.acquire(cid, "p1", "http://one", 5000)
        assert again == Lease(cid, "p1", first.token, taken_over=False)  # ours: same token
        assert await store.acquire(cid, "p2", "http://two", 5000) == Owner("http://one")
        assert await store.renew([first], 5000) == [True]

        drop_home(redis_url, cid)  # p1's lease expires; p2 takes it
        second = await store.acquire(cid, "p2", "http://two", 5000)
        assert isinstance(second, Lease) and second.taken_over and second.token > first.token
        assert await store.renew([first, second], 5000) == [False, True]

        state = RoomState.new(CircleSettings(id=cid, title="t"))
        state.version = 1
        with pytest.raises(StaleOwner):  # p1's write is refused, nothing is written
            await store.save(cid, 0, encode_state(state), [b"e"], 1, fence=first.token)
        assert await store.events_since(cid, 0) == []
        await store.save(cid, 0, encode_state(state), [b"e"], 1, fence=second.token)
        state.version = 2
        await store.save(cid, 1, encode_state(state), [], 2)  # no token: compare-and-set only

        await store.release(first)  # not p1's any more: nothing happens
        assert home_of(redis_url, cid)[b"owner"] == b"p2"
        await store.release(second)
        assert home_of(redis_url, cid) == {}
        with pytest.raises(StaleOwner):  # no lease at all is nobody's token
            await store.save(cid, 2, encode_state(state), [], 3, fence=second.token)
        await store.delete(cid)
        with redis.Redis.from_url(redis_url) as r:
            assert r.keys(f"lk:{{{cid}}}:*") == []
    finally:
        await store.close()


async def test_the_memory_store_lease_is_always_ours() -> None:
    store = MemoryStore()
    await store.create("m", _blob("m"))
    lease = await store.acquire("m", "p1", "http://one", 600)
    assert isinstance(lease, Lease) and not lease.taken_over
    assert await store.acquire("m", "p2", "http://two", 600) == Lease("m", "p2", 0, False)
    assert await store.renew([lease], 600) == [True]
    state = RoomState.new(CircleSettings(id="m", title="t"))
    state.version = 1
    await store.save("m", 0, encode_state(state), [], 1, fence=12345)  # nothing to fence


# ---- two processes -----------------------------------------------------------------------------


async def test_a_hello_at_another_process_is_redirected_to_the_home(redis_url: str) -> None:
    async with live_server(redis_url) as a, live_server(redis_url) as b:
        assert a.parts.homes.owner_id != b.parts.homes.owner_id
        circle = await a.create_circle()
        links = circle["links"]
        mod = await join(a, links["moderator"], "Pendamping")  # A is the home now
        assert home_of(redis_url, circle["id"])[b"owner"] == a.parts.homes.owner_id.encode()
        assert home_of(redis_url, circle["id"])[b"url"] == a.url.encode()

        client, first = await hello_at(b.url + "/ws", token_of(links["member"]))
        assert first == {"type": "redirect", "url": a.url + "/ws"}
        assert await client.closed() == 4300
        assert b.parts.circles.sessions() == []
        assert not b.parts.ws.behind_proxy  # its URL is the public one: it asks no hand-over

        followed, welcome = await hello_at(first["url"], token_of(links["member"]))
        assert welcome is not None and welcome["type"] == "welcome"
        await mod.event("member_joined")
        assert await ack_of(followed, "raise_hand")
        await mod.event("hand_raised", member_id=welcome["member_id"])
        # a resume through the wrong process is redirected too, and keeps the seat
        await followed.close()
        await mod.event("presence", member_id=welcome["member_id"], connected=False)
        again, first = await hello_at(b.url + "/ws", token_of(links["member"]), resume=welcome["resume"])
        assert first == {"type": "redirect", "url": a.url + "/ws"}
        back, resumed = await hello_at(first["url"], token_of(links["member"]), resume=welcome["resume"])
        assert resumed is not None and resumed["member_id"] == welcome["member_id"]
        assert resumed["state"]["queue"] == [welcome["member_id"]]


async def test_a_stale_owner_writes_nothing_and_its_sessions_move(redis_url: str) -> None:
    # A long lease: no renewal round runs during the test, so A learns of the loss only
    # from its refused save.
    async with live_server(redis_url, lease_ms=60_000) as a, \
            live_server(redis_url, lease_ms=60_000) as b:
        circle = await a.create_circle()
        links = circle["links"]
        mod = await join(a, links["moderator"], "Pendamping")
        m = await join(a, links["member"], "Melati")
        await mod.event("member_joined", timeout=10)
        before = (await settle(m))["state"]

        drop_home(redis_url, circle["id"])  # A's lease expired (A did not notice yet) ...
        taken = await b.parts.homes.claim(circle["id"])  # ... and B took the circle
        assert isinstance(taken, Lease) and taken.taken_over
        version = (await b.parts.manager.load(circle["id"])).version

        answer = await m.command("raise_hand")
        assert answer["type"] == "error" and answer["code"] == "unavailable", answer
        state = await b.parts.manager.load(circle["id"])
        assert state.version == version and state.queue == []  # nothing was written
        assert before["queue"] == []

        # A finds out who holds the lease now and closes its sessions; they come back at B.
        assert await m.closed() == 1013 and await mod.closed() == 1013
        client, first = await hello_at(a.url + "/ws", token_of(links["member"]), resume=m.resume)
        assert first == {"type": "redirect", "url": b.url + "/ws"}
        moved, welcome = await hello_at(first["url"], token_of(links["member"]), resume=m.resume)
        assert welcome is not None and welcome["member_id"] == m.member_id
        await ack_of(moved, "raise_hand")


async def test_a_renewal_that_finds_the_lease_taken_moves_the_sessions(redis_url: str) -> None:
    async with live_server(redis_url, lease_ms=60_000) as a, \
            live_server(redis_url, lease_ms=60_000) as b:
        circle = await a.create_circle()
        m = await join(a, circle["links"]["member"], "Melati")
        drop_home(redis_url, circle["id"])
        assert isinstance(await b.parts.homes.claim(circle["id"]), Lease)
        await a.parts.homes.renew_once()  # one round of A's renewal loop, without waiting
        assert await m.closed() == 1013
        assert not a.parts.homes.holds(circle["id"])


async def test_a_lease_left_by_an_earlier_run_at_the_same_url_is_waited_out(
        redis_url: str) -> None:
    async with live_server(redis_url) as a:
        circle = await a.create_circle()
        with redis.Redis.from_url(redis_url) as r:
            key = f"lk:{{{circle['id']}}}:home"
            r.hset(key, mapping={"owner": "an-earlier-run", "token": 999, "url": a.url})
            r.pexpire(key, 60_000)
        client, first = await hello_at(a.url + "/ws", token_of(circle["links"]["member"]))
        assert first is None and await client.closed() == 1013  # no redirect to itself
        drop_home(redis_url, circle["id"])  # the old lease runs out
        client, first = await hello_at(a.url + "/ws", token_of(circle["links"]["member"]))
        assert first is not None and first["type"] == "welcome"


async def test_drain_sends_the_members_to_another_live_process_in_their_seats(redis_url: str) -> None:
    async with live_server(redis_url) as a, live_server(redis_url) as b:
        circle = await a.create_circle()
        links = circle["links"]
        mod = await join(a, links["moderator"], "Pendamping")
        m = await join(a, links["member"], "Melati")
        await ack_of(m, "raise_hand")
        await settle(mod)
        await a.parts.homes.renew_once()  # one round of A's loop: it has seen B announce itself
        assert list(a.parts.homes.peers.values()) == [b.url]
        await drain(a.parts)
        assert await asyncio.gather(mod.closed(), m.closed()) == [4300, 4300]
        for client in (mod, m):
            assert client.frames[-1] == {"type": "redirect", "url": b.url + "/ws"}
        assert home_of(redis_url, circle["id"]) == {}  # given up before the members were sent
        # the very first hello at B is welcomed: no lease left to wait for
        back, welcome = await hello_at(b.url + "/ws", token_of(links["member"]), resume=m.resume)
        assert welcome is not None and welcome["type"] == "welcome", welcome
        assert welcome["member_id"] == m.member_id and welcome["state"]["queue"] == [m.member_id]
        assert home_of(redis_url, circle["id"])[b"owner"] == b.parts.homes.owner_id.encode()
        status, _ = await a.api("GET", "/healthz")
        assert status == 503  # out of a proxy's ring


async def test_a_circle_is_handed_over_to_the_process_a_proxy_sends_its_hellos_to(redis_url: str) -> None:
    public = "http://127.0.0.1:9"  # one public URL (a proxy's); each process has its own URL too
    async with live_server(redis_url, public_url=public) as a, \
            live_server(redis_url, public_url=public) as b:
        circle = await a.create_circle()
        cid, links = circle["id"], circle["links"]
        mod = await join(b, links["moderator"], "Pendamping")  # B is the home
        # A hello the proxy routed to A (`/ws?c=`): redirected to B, and B is asked to hand over.
        client, first = await hello_at(f"{a.ws_url}?c={cid}", token_of(links["member"]))
        assert first == {"type": "redirect", "url": b.url + "/ws"}
        await client.closed()
        await b.parts.homes.renew_once()  # the circle came to B a moment ago: it stays (no bouncing)
        assert mod.close_code is None and home_of(redis_url, cid)[b"url"] == b.url.encode()
        client, first = await hello_at(f"{a.ws_url}?c={cid}", token_of(links["member"]))
        assert first is not None and first["type"] == "redirect"
        await client.closed()
        b.parts.homes.settle_seconds = 0.0  # as if it had been there for a while
        await b.parts.homes.renew_once()
        assert await mod.closed() == 4300 and mod.frames[-1] == {"type": "redirect", "url": a.url + "/ws"}
        back, welcome = await hello_at(a.url + "/ws", token_of(links["moderator"]), "x", mod.resume)
        assert welcome is not None and welcome["member_id"] == mod.member_id, welcome
        client, first = await hello_at(f"{a.ws_url}?c={cid}", token_of(links["member"]), "Melati")
        assert first is not None and first["type"] == "welcome"  # straight in: no redirect now
        assert home_of(redis_url, cid)[b"url"] == a.url.encode()


async def test_a_drain_with_no_other_process_closes_with_1001_and_gives_the_leases_up(
        redis_url: str) -> None:
    async with live_server(redis_url) as a:
        circle = await a.create_circle()
        mod = await join(a, circle["links"]["moderator"], "Pendamping")
        await drain(a.parts)
        assert await mod.closed() == 1001
        assert home_of(redis_url, circle["id"]) == {}


async def test_a_process_that_stops_leaves_the_live_ones(redis_url: str) -> None:
    async with live_server(redis_url) as a:
        async with live_server(redis_url) as b:
            await a.parts.homes.renew_once()
            assert list(a.parts.homes.peers) == [b.parts.homes.owner_id]
        await a.parts.homes.renew_once()
        assert a.parts.homes.peers == {}


# ---- a killed process ---------------------------------------------------------------------------


@asynccontextmanager
async def serve_process(redis_url: str, lease_ms: int
                        ) -> AsyncIterator[tuple[Live, asyncio.subprocess.Process]]:
    """`lingkar serve` in a process of its own, so that it can really be killed."""
    port = free_port()
    env = {**os.environ, "LINGKAR_STORE": redis_url, "LINGKAR_SECRET": SECRET,
           "LINGKAR_API_KEY": API_KEY, "LINGKAR_PORT": str(port), "LINGKAR_HOST": "127.0.0.1",
           "LINGKAR_LEASE_MS": str(lease_ms), "LINGKAR_LOG_LEVEL": "INFO"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "serve", cwd=REPO, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    drain: asyncio.Task[None] | None = None
    try:
        assert proc.stderr is not None
        await asyncio.wait_for(_until_listening(proc.stderr), 30)
        drain = asyncio.create_task(_drain(proc.stderr))  # its pipe must never fill up
        yield Live(url, None, None), proc  # type: ignore[arg-type]  # only the URL is used
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
        if drain is not None:
            await asyncio.wait_for(drain, 10)


async def _until_listening(log: asyncio.StreamReader) -> None:
    """Read the server's log up to uvicorn's line saying it listens (an event, not a poll)."""
    while True:
        line = await log.readline()
        assert line, "lingkar serve exited before listening"
        if b"Uvicorn running on" in line:
            return


async def _drain(log: asyncio.StreamReader) -> None:
    while await log.readline():
        pass


async def test_sigterm_sends_the_members_to_a_live_process_before_it_stops(redis_url: str) -> None:
    # B is up first: A, starting, already sees it among the live processes.
    async with live_server(redis_url) as b, serve_process(redis_url, lease_ms=3000) as (a, proc):
        circle = await a.create_circle()
        links = circle["links"]
        mod = await join(a, links["moderator"], "Pendamping")
        m = await join(a, links["member"], "Melati")
        await ack_of(m, "raise_hand")
        await settle(mod)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.gather(mod.closed(), m.closed()) == [4300, 4300]  # not uvicorn's 1012
        for old, link in ((mod, links["moderator"]), (m, links["member"])):
            assert old.frames[-1] == {"type": "redirect", "url": b.url + "/ws"}
            client, welcome = await hello_at(old.frames[-1]["url"], token_of(link), "x", old.resume)
            assert welcome is not None and welcome["member_id"] == old.member_id, welcome
            assert welcome["state"]["queue"] == [m.member_id]
        # uvicorn raises the signal again once it has shut down: the status says SIGTERM
        assert await asyncio.wait_for(proc.wait(), 15) == -signal.SIGTERM


async def test_a_killed_process_circles_come_back_on_another_with_nothing_lost(
        redis_url: str) -> None:
    async with serve_process(redis_url, lease_ms=600) as (a, proc), \
            live_server(redis_url, lease_ms=600) as b:
        circle = await a.create_circle()
        links = circle["links"]
        status, personal = await a.api("POST", f"/api/circles/{circle['id']}/invites", {"role": "member"})
        assert status == 201
        mod = await join(a, links["moderator"], "Pendamping")
        m1 = await join(a, links["member"], "Melati")
        m2 = await join(a, links["member"], "Kenanga")
        victim = await join(a, personal["link"], "Dahlia")
        await ack_of(mod, "remove", member_id=victim.member_id)
        assert await victim.closed() == 4403
        await ack_of(m1, "raise_hand")
        await ack_of(m2, "raise_hand")
        await ack_of(mod, "give_floor", member_id=m1.member_id)
        await ack_of(m1, "unmute_self")
        before = (await settle(mod))["state"]
        assert before["floor"]["holder"] == m1.member_id and before["queue"] == [m2.member_id]

        async with lease_expiry(redis_url, circle["id"]) as expired:
            # While its lease lives, B sends members to the (now dead) home.
            client, first = await hello_at(b.url + "/ws", token_of(links["moderator"]), "x", mod.resume)
            assert first is not None and first["type"] == "redirect", first
            assert await client.closed() == 4300
            proc.send_signal(signal.SIGKILL)  # no drain, no release, no goodbye
            await asyncio.wait_for(proc.wait(), 10)
            for old in (mod, m1, m2):
                await old.closed()
            await asyncio.wait_for(expired, 10)

        # Everyone resumes at B now that the dead process's lease has expired.
        back: dict[str, Client] = {}
        welcomes: dict[str, dict[str, Any]] = {}
        for old, link in ((mod, links["moderator"]), (m1, links["member"]), (m2, links["member"])):
            client, welcome = await hello_at(b.url + "/ws", token_of(link), "x", old.resume)
            assert welcome is not None and welcome["type"] == "welcome", welcome
            assert welcome["member_id"] == old.member_id
            back[old.member_id], welcomes[old.member_id] = client, welcome
            if old is mod:  # B took the circle over: those the dead process showed as
                #             connected are in their grace period until they resume
                away = {m["id"] for m in welcome["state"]["members"] if not m["connected"]}
                assert away == {m1.member_id, m2.member_id}
        after = (await settle(back[mod.member_id]))["state"]

        def seats(state: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
            return {m["id"]: (m["seat"], m["role"], m["muted"], m["name"]) for m in state["members"]}

        assert seats(after) == seats(before)
        assert after["floor"]["holder"] == m1.member_id
        assert after["queue"] == [m2.member_id]
        assert after["moderator_present"] is True
        assert all(m["connected"] for m in after["members"])
        assert victim.member_id not in seats(after)
        assert home_of(redis_url, circle["id"])[b"owner"] == b.parts.homes.owner_id.encode()

        # the removed member's personal invite is still refused, and the circle carries on
        refused, first = await hello_at(b.url + "/ws", token_of(personal["link"]), "Dahlia")
        assert first is None and await refused.closed() == 4403
        await ack_of(back[mod.member_id], "next")
        await back[m2.member_id].event("floor_given", member_id=m2.member_id)
