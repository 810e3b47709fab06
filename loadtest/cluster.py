"""The numbers of a multi-process deployment (DESIGN §8): reported, never asserted.

    python -m loadtest.cluster failover  [--kills 20] [--client fixed|web]
    python -m loadtest.cluster redirects [--circles 100] [--members 4]
    python -m loadtest.cluster acked     [--restarts 5]
    python -m loadtest.cluster fanout    [--processes 1,2,4] [--rooms 400,800] [--members 8] [--seconds 10]
    (each also takes --out FILE.json)

Each subcommand starts what it measures and stops it at the end (also on an error or Ctrl-C):
`lingkar cluster` (`python -m server.cli cluster -n K --port <free> --data-dir <tmp>`, as `make
cluster` runs it: K `lingkar serve`, Caddy, a redis-server with AOF), ready once it printed its
organizer link, stopped with SIGINT, after which nothing it started may be left (named in the
output when something was). `acked` runs one `lingkar serve` on a redis-server with AOF of its
own (or on testkit's Redis Cluster) instead, so that it can kill Redis.

- failover: per round a circle with a moderator and three members, all joined through the
  proxy as the web client does (`/ws?c=`, `redirect` followed, resume with the secret on a
  close); the floor given to one member, another in the queue; the circle's home (its lease in
  Redis, `lk:{circle}:home`) killed with SIGKILL; the failover time is from the kill until every
  member has a `welcome` again and a command (`raise_hand` by the third member) is acked. Then
  the seats, the floor holder and the queue are compared with before (a round where anything
  differs counts as lost), and the killed process is started again by `lingkar cluster restart`
  (the supervisor restarts no dead process by itself; the rolling restart starts the dead one
  and restarts the others one by one: that is the only way it has).
- redirects: circles × members joined through the proxy with `?c=` and without; the share of
  hellos answered `redirect` in each case; then a rolling restart while the `?c=` members stay
  (following the draining processes' `redirect`), and the share again for new members at once
  after it.
- acked: a writer member alternating raise_hand/lower_hand as fast as the acks come; Redis
  (appendonly yes, appendfsync everysec) killed with SIGKILL mid-stream, started again on the
  same port and directory; then the state (a moderator's `sync`, read from the store) must hold
  every acked version (version ≥ the last acked one, the last acked change visible), and the
  writer's next ack must carry a higher version.
- fanout: loadtest.fanout's loop (a command per circle every 200 ms, the time to every member)
  through the proxy with `?c=`, for K processes on one Redis, and on testkit's Redis Cluster
  (`lingkar cluster --store redis-cluster://…`), as ratios to K=1; with the processes',
  Caddy's, Redis's and the generator's CPU, and how late the generator ran its schedule.

The machine is shared: the numbers move with whatever else runs (the load average before and
after each subcommand is in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.client import Client, Closed
from loadtest.fanout import Target, measure
from loadtest.procs import AofRedis, ClusterProcess, ServerProcess, pids_working_in
from testkit.http import call
from testkit.loop import run as run_loop
from testkit.procs import machine_busy_seconds
from testkit.redis_cluster import LocalRedisCluster
from testkit.stats import percentile

RETRY = 0.2  # seconds between a member's attempts to get back in (as tests/deploy's members)
WEB_BASE, WEB_MAX = 0.5, 10.0  # the web client's backoff (web/js/protocol.js): 0.5 s × 2^n, jittered
SETTLE = 2.0  # after a rolling restart: the last process back in Caddy's ring (fail_duration)


def _quiet(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """A future whose exception (a close) nobody may read: not reported as never retrieved."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


def token_of(link: str) -> str:
    return link.split("#t=", 1)[1]


def pcts(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"n": len(s), "p50": round(percentile(s, 50), 3), "p95": round(percentile(s, 95), 3),
            "max": round(s[-1], 3) if s else math.nan}


async def api(base: str, key: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return await asyncio.to_thread(call, method, base + path, body, key)


async def new_circle(base: str, key: str, title: str, capacity: int = 16) -> dict[str, Any]:
    for attempt in range(20):  # a process restarting behind the proxy: try again
        try:
            status, circle = await api(base, key, "POST", "/api/circles",
                                       {"title": title, "lobby": False, "capacity": capacity,
                                        "floor_mode": "hands", "turn_seconds": 1800})
        except OSError as err:
            status, circle = 0, str(err)
        if status == 201:
            return dict(circle)
        await asyncio.sleep(0.25 * (attempt + 1))
    raise RuntimeError(f"POST /api/circles answered {status}: {circle}")


def seats(state: dict[str, Any]) -> dict[str, int]:
    return {m["id"]: m["seat"] for m in state["members"]}


# ---- a member as the web client behaves -------------------------------------------------------

@dataclass
class Member:
    """Joins through the proxy (`/ws?c={circle}`, or `/ws` with `with_c=False`), follows a
    `redirect` once to the URL it names, and resumes with its secret. `backoff` "fixed" tries
    again every RETRY s (the first time at once); "web" waits as web/js/protocol.js does
    (0.5 s × 2^attempt, jittered, at most 10 s; reset by a welcome).

    Counted: `hellos` sent to the proxy that were answered (welcome, lobby or redirect),
    `redirected` of those answered `redirect`, `failed` attempts (refused upgrade, a close
    without an answer: 502, 1013, …), `moved` redirects received while in the circle."""

    base: str  # the proxy's http URL
    circle_id: str
    token: str
    name: str
    with_c: bool = True
    backoff: str = "fixed"
    member_id: str = ""
    resume: str = ""
    client: Client | None = None
    hellos: int = 0
    redirected: int = 0
    followed: int = 0
    failed: int = 0
    moved: int = 0
    welcomes: list[dict[str, Any]] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _moved_to: asyncio.Future[Any] | None = None

    @property
    def entry(self) -> str:
        url = self.base.replace("http://", "ws://", 1) + "/ws"
        return f"{url}?c={self.circle_id}" if self.with_c else url

    async def _hello(self, url: str) -> tuple[Client | None, dict[str, Any] | None]:
        client = Client(url, self.name)
        try:
            await client.connect(timeout=10)
        except Exception:  # noqa: BLE001 - refused upgrade (502), reset, timeout: try again
            return None, None
        answer = _quiet(client.expect("welcome", "lobby", "redirect"))
        frame: dict[str, Any] = {"type": "hello", "token": self.token, "name": self.name, "listen_only": False}
        if self.resume:
            frame["resume"] = self.resume
        try:
            await client.send(frame)
            first, _ = await asyncio.wait_for(answer, 10)
        except Exception:  # noqa: BLE001 - closed without an answer (1013, 1001, …), a timeout
            await client.close()
            return None, None
        return client, first

    async def join(self, at: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """Until a `welcome` (TimeoutError after `timeout` s)."""
        async def attempt() -> dict[str, Any]:
            tries = 0
            url = at
            while True:
                to_proxy = url is None
                client, first = await self._hello(url or self.entry)
                url = None
                if first is not None and to_proxy:
                    self.hellos += 1
                if first is not None and first["type"] == "redirect":
                    if to_proxy:
                        self.redirected += 1
                    self.followed += 1
                    assert client is not None
                    await client.close()
                    client, first = await self._hello(str(first["url"]).replace("http", "ws", 1))
                if first is not None and first["type"] == "welcome":
                    assert client is not None
                    return self._welcomed(client, first)
                if client is not None:
                    await client.close()
                self.failed += 1
                await asyncio.sleep(self._delay(tries))
                tries += 1

        return await asyncio.wait_for(attempt(), timeout)

    def _delay(self, tries: int) -> float:
        if self.backoff == "web":
            return float(min(WEB_MAX, WEB_BASE * 2.0 ** tries) * (0.75 + random.random() / 2))
        return RETRY

    def _welcomed(self, client: Client, welcome: dict[str, Any]) -> dict[str, Any]:
        self.client = client
        self.welcomes.append(welcome)
        self.member_id = self.member_id or str(welcome["member_id"])
        self.resume = welcome["resume"]
        self._moved_to = _quiet(client.expect("redirect"))  # a draining process names the next home
        self.connected.set()
        return welcome

    async def gone(self, timeout: float | None = None) -> str | None:
        """Until the socket closes; the URL a `redirect` before the close named, if any."""
        assert self.client is not None
        await self.client.closed(timeout=timeout)  # type: ignore[arg-type]
        self.connected.clear()
        fut = self._moved_to
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            self.moved += 1
            return str(fut.result()[0]["url"]).replace("http", "ws", 1)
        return None

    async def back_in(self, moved_to: str | None) -> dict[str, Any]:
        """Resume after a close, as the web client: where a `redirect` said at once, else
        through the proxy (after the first delay of the web client's backoff)."""
        if moved_to is None and self.backoff == "web":
            await asyncio.sleep(self._delay(0))
        return await self.join(at=moved_to)

    async def keep(self) -> None:
        """Stay in: whenever the socket closes, resume."""
        while True:
            await self.back_in(await self.gone())

    async def command(self, type_: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        assert self.client is not None
        answer, _, _ = await self.client.command(type_, timeout=timeout, **fields)
        return answer

    async def sync(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.client is not None
        snapshot = _quiet(self.client.expect("snapshot"))
        await self.client.send({"type": "sync"})
        frame, _ = await asyncio.wait_for(snapshot, timeout)
        return dict(frame["state"])

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def members_of(base: str, circle: dict[str, Any], names: list[str], *, moderator: bool = True,
               **kw: Any) -> list[Member]:
    """With `moderator`, the first one joins with the moderator link; the others (all of them
    without it) with the member link."""
    links = circle["links"]
    return [Member(base, circle["id"], token_of(links["moderator" if i == 0 and moderator else "member"]), name, **kw)
            for i, name in enumerate(names)]


# ---- running something, and what is left afterwards -----------------------------------------

def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "busy_seconds": round(machine_busy_seconds(), 1)}


class Cluster:
    """A `lingkar cluster` of its own in a temporary data directory, for `async with`."""

    def __init__(self, n: int, env: dict[str, str] | None = None, store: str | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="lk-bench-"))  # short: the control socket's path
        self.proc = ClusterProcess(n, self.tmp / "data", env=env, store=store)
        self.left: list[str] = []

    async def __aenter__(self) -> ClusterProcess:
        try:
            await self.proc.start()
        except BaseException:
            await self.__aexit__()
            raise
        return self.proc

    async def __aexit__(self, *exc: object) -> None:
        self.left = await self.proc.stop()
        if self.left:
            print(f"LEFT BEHIND by lingkar cluster (killed now): {self.left}", flush=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---- failover ----------------------------------------------------------------------------------

async def failover_round(cl: ClusterProcess, i: int, backoff: str) -> dict[str, Any]:
    circle = await new_circle(cl.url, cl.api_key, f"failover {i}")
    mod, holder, waiting, actor = everyone = members_of(
        cl.url, circle, ["Pendamping", "Melati", "Anggrek", "Kenanga"], backoff=backoff)
    out: dict[str, Any] = {"round": i, "circle": circle["id"]}
    try:
        for m in everyone:
            await m.join()
        assert (await mod.command("give_floor", member_id=holder.member_id))["type"] == "ack"
        assert (await waiting.command("raise_hand"))["type"] == "ack"
        before = seats(await mod.sync())
        home = cl.home_of(circle["id"])
        pid = cl.pid_of(home) if home else None
        if home is None or pid is None:
            raise RuntimeError(f"no live home for circle {circle['id']} (lease on {home}, pid {pid})")
        out.update(home=home, redirects_at_join=sum(m.redirected for m in everyone))
        failed_before = sum(m.failed for m in everyone)

        killed = time.perf_counter()
        os.kill(pid, signal.SIGKILL)

        async def back(m: Member) -> dict[str, float]:
            moved_to = await m.gone(timeout=30)
            if m.client is not None and m.client.close_code is None:
                raise RuntimeError(f"{m.name}'s socket stayed open 30 s after the kill")
            closed = time.perf_counter() - killed
            await m.back_in(moved_to)
            times = {"closed": closed, "welcome": time.perf_counter() - killed}
            if m is actor:
                answer = await m.command("raise_hand")
                if answer["type"] != "ack":
                    raise RuntimeError(f"raise_hand after the failover answered {answer}")
                times["acked"] = time.perf_counter() - killed
            return times

        times = await asyncio.gather(*(back(m) for m in everyone))
        failover = max(max(t.values()) for t in times)
        state = await mod.sync()
        new_home = cl.home_of(circle["id"])
        checks = {
            "same_member_ids": all(w["member_id"] == m.member_id for m in everyone for w in m.welcomes),
            "seats_kept": seats(state) == before,
            "floor_holder_kept": state["floor"]["holder"] == holder.member_id,
            "queue_kept": state["queue"] == [waiting.member_id, actor.member_id],
            "moved_home": new_home not in (None, home),
        }
        out.update(failover_s=round(failover, 3),
                   all_closed_s=round(max(t["closed"] for t in times), 3),
                   first_welcome_s=round(min(t["welcome"] for t in times), 3),
                   last_welcome_s=round(max(t["welcome"] for t in times), 3),
                   acked_s=round(times[3]["acked"], 3),
                   failed_attempts=sum(m.failed for m in everyone) - failed_before,
                   new_home=new_home, checks=checks, lost=not all(checks.values()))
    except (Exception, TimeoutError) as err:  # noqa: BLE001 - a round that failed is reported
        out.update(error=f"{type(err).__name__}: {err}", lost=True)
    finally:
        await asyncio.gather(*(m.close() for m in everyone), return_exceptions=True)
        try:
            await api(cl.url, cl.api_key, "DELETE", f"/api/circles/{circle['id']}")
        except OSError:
            pass
    return out


async def failover(kills: int, backoff: str) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    restarts: list[float] = []
    cluster = Cluster(3)
    async with cluster as cl:
        print(f"cluster of 3 up in {cl.started_seconds:.1f} s at {cl.url}", flush=True)
        for i in range(1, kills + 1):
            r = await failover_round(cl, i, backoff)
            rc, took, text = await cl.rolling_restart()
            revived = r.get("home") is not None and f"process {r['home']}: was not running" in text
            r.update(restart_ok=rc == 0, restart_s=round(took, 1), restart_started_the_dead_one=revived)
            if rc != 0:
                r["restart_output"] = text[-2000:]
            restarts.append(took)
            rounds.append(r)
            print(f"  round {i}: " + (f"failover {r['failover_s']:.2f} s (all closed {r['all_closed_s']:.2f}, "
                                      f"welcomes {r['first_welcome_s']:.2f}–{r['last_welcome_s']:.2f}, "
                                      f"ack {r['acked_s']:.2f}); lost {r['lost']}"
                                      if "failover_s" in r else f"ERROR {r.get('error')}")
                  + f"; rolling restart {took:.1f} s ({'ok' if rc == 0 else 'FAILED'})", flush=True)
            if rc != 0:
                break
            await asyncio.sleep(SETTLE)
    times = [r["failover_s"] for r in rounds if "failover_s" in r]
    return {"kills": kills, "client": backoff, "rounds": rounds,
            "failover_s": pcts(times), "acked_s": pcts([r["acked_s"] for r in rounds if "acked_s" in r]),
            "rounds_lost": sum(1 for r in rounds if r["lost"]),
            "rounds_failed": sum(1 for r in rounds if "error" in r),
            "rolling_restart_s": pcts(restarts),
            "restart_started_the_dead_one": all(r["restart_started_the_dead_one"] for r in rounds),
            "left_behind": cluster.left}


def failover_summary(r: dict[str, Any]) -> str:
    f = r["failover_s"]
    return (f"failover ({r['client']} client retries), {f['n']} kills of the home: p50 {f['p50']:.2f} s, "
            f"p95 {f['p95']:.2f} s, max {f['max']:.2f} s; rounds where seat, floor or queue was lost: "
            f"{r['rounds_lost']} (of them failed outright: {r['rounds_failed']}); each kill followed by "
            f"`lingkar cluster restart` ({r['rolling_restart_s']['p50']:.1f} s median; it started the "
            f"dead one every time: {r['restart_started_the_dead_one']})")


# ---- redirects ---------------------------------------------------------------------------------

async def join_all(members: list[Member], concurrency: int = 32) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def one(m: Member) -> None:
        async with limit:
            await m.join()

    await asyncio.gather(*(one(m) for m in members))


def share(members: list[Member]) -> dict[str, Any]:
    hellos = sum(m.hellos for m in members)
    redirected = sum(m.redirected for m in members)
    return {"hellos": hellos, "redirected": redirected,
            "share": round(redirected / hellos, 4) if hellos else math.nan,
            "failed_attempts": sum(m.failed for m in members)}


async def redirects(circles_n: int, members_n: int, later: float) -> dict[str, Any]:
    out: dict[str, Any] = {"circles": circles_n, "members": members_n}
    cluster = Cluster(3, env={"LINGKAR_MAX_CONNECTIONS_PER_ADDRESS": "0"})
    async with cluster as cl:
        print(f"cluster of 3 up in {cl.started_seconds:.1f} s at {cl.url}", flush=True)
        circles = await asyncio.gather(*(new_circle(cl.url, cl.api_key, f"redirects {i}", 4 * members_n + 2)
                                         for i in range(circles_n)))
        names = [f"m{k}" for k in range(members_n)]
        with_c = [m for c in circles for m in members_of(cl.url, c, names)]
        await join_all(with_c)
        out["with_c"] = share(with_c)
        print(f"  ?c=: {out['with_c']}", flush=True)
        without = [m for c in circles
                   for m in members_of(cl.url, c, ["x" + n for n in names], moderator=False, with_c=False)]
        await join_all(without)
        out["without_c"] = share(without)
        print(f"  without ?c=: {out['without_c']}", flush=True)
        await asyncio.gather(*(m.close() for m in without))

        # a rolling restart while the ?c= members stay in (following the drains' redirects)
        for m in with_c:
            m.hellos = m.redirected = m.failed = 0
        keepers = [asyncio.create_task(m.keep()) for m in with_c]
        try:
            rc, took, text = await cl.rolling_restart()
            out["rolling_restart"] = {"ok": rc == 0, "seconds": round(took, 1)}
            await asyncio.wait_for(asyncio.gather(*(m.connected.wait() for m in with_c)), 60)
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        out["during_restart_resumes"] = {**share(with_c), "moved_by_drain": sum(m.moved for m in with_c),
                                         "still_connected": sum(m.connected.is_set() for m in with_c)}
        print(f"  resumes during the rolling restart: {out['during_restart_resumes']}", flush=True)
        after = [m for c in circles for m in members_of(cl.url, c, ["y" + n for n in names], moderator=False)]
        await join_all(after)
        out["with_c_after_restart"] = share(after)
        print(f"  ?c= right after the rolling restart: {out['with_c_after_restart']}", flush=True)
        homes = [cl.home_of(c["id"]) for c in circles]
        out["homes_after_restart"] = {str(k): homes.count(k) for k in sorted(set(homes), key=str)}
        await asyncio.sleep(later)  # does it settle while the circles stay in use?
        again = [m for c in circles for m in members_of(cl.url, c, ["z" + n for n in names], moderator=False)]
        await join_all(again)
        out["with_c_later"] = {**share(again), "seconds_after_restart": later}
        print(f"  ?c= {later:.0f} s later, the circles still in use: {out['with_c_later']}", flush=True)
        await asyncio.gather(*(m.close() for m in with_c + after + again))
    out["left_behind"] = cluster.left
    return out


def redirects_summary(r: dict[str, Any]) -> str:
    def pct(s: dict[str, Any]) -> str:
        return f"{100 * s['share']:.1f} % of {s['hellos']}"

    return (f"redirects, {r['circles']} circles × {r['members']}: hellos answered `redirect` with ?c= "
            f"{pct(r['with_c'])}, without ?c= {pct(r['without_c'])}; resumes during a rolling restart "
            f"{pct(r['during_restart_resumes'])} ({r['during_restart_resumes']['moved_by_drain']} moved by a "
            f"drain's redirect); with ?c= right after it {pct(r['with_c_after_restart'])}, "
            f"{r['with_c_later']['seconds_after_restart']:.0f} s later {pct(r['with_c_later'])}")


# ---- acked writes over a Redis kill ----------------------------------------------------------

@dataclass
class Writer:
    """A member toggling its hand as fast as the acks come, keeping every acked version, but
    never faster than WRITE_RATE a second: the server takes at most 20 frames a second from one
    connection (burst 40) and answers the rest `error rate_limited` with no `ref` (the frame is
    not read), which a client cannot tie to its command. Several writers write more often."""

    member: Member
    acked: list[tuple[int, bool]] = field(default_factory=list)  # (version, hand after)
    hand: bool = False  # what it believes (the next command follows it)
    since_ack: list[str] = field(default_factory=list)  # outcomes of commands after the last ack
    unavailable: int = 0
    other_errors: int = 0
    unknown: int = 0  # no answer (a close or a timeout): the outcome is not known
    resumes: int = 0
    last_answer: tuple[str, float] = ("", 0.0)  # the last command's outcome and when it came
    sent_at: float = 0.0
    go: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: pause after the command in flight
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    acked_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        m = self.member
        while True:
            if not self.go.is_set():
                self.idle.set()
                await self.go.wait()
                self.idle.clear()
            if not m.connected.is_set():
                try:
                    welcome = await m.join(timeout=60)
                except TimeoutError:
                    continue
                self.resumes += 1
                me = next(x for x in welcome["state"]["members"] if x["id"] == m.member_id)
                self.hand = bool(me["hand"])
                continue
            kind = "lower_hand" if self.hand else "raise_hand"
            await asyncio.sleep(max(0.0, self.sent_at + 1 / WRITE_RATE - time.perf_counter()))
            self.sent_at = time.perf_counter()
            try:
                answer = await m.command(kind, timeout=COMMAND_TIMEOUT)
            except Closed:
                self.unknown += 1
                self.since_ack.append("unknown")
                self.last_answer = ("no answer", time.perf_counter())
                if m.client is not None and m.client.close_code is not None:
                    m.connected.clear()
                continue
            self.last_answer = (str(answer.get("code", answer["type"])), time.perf_counter())
            if answer["type"] == "ack":
                self.hand = not self.hand
                self.acked.append((int(answer["version"]), self.hand))
                self.since_ack = []
                self.acked_event.set()
            elif answer.get("code") == "unavailable":
                self.unavailable += 1
                self.since_ack.append("unavailable")
                await asyncio.sleep(0.05)
            else:  # not_allowed: the hand was not where it thought (after an unknown outcome)
                self.other_errors += 1
                self.since_ack.append(str(answer.get("code")))
                self.hand = not self.hand


COMMAND_TIMEOUT = 30.0
WRITE_RATE = 19.0  # commands a second per writer, under the server's 20 frames/s


async def synced(m: Member, timeout: float = 60.0) -> dict[str, Any]:
    """The state from the store (a `sync`), resuming first if the socket closed."""
    async def attempt() -> dict[str, Any]:
        while True:
            if m.client is None or m.client.close_code is not None:
                await m.join(timeout=60)
            try:
                return await m.sync(timeout=5)
            except Exception:  # noqa: BLE001 - closed, timed out, store unavailable: again
                await asyncio.sleep(0.1)

    return await asyncio.wait_for(attempt(), timeout)


def check_writer(w: Writer, state: dict[str, Any], acked_now: list[tuple[int, bool]],
                 since_ack: list[str]) -> dict[str, Any]:
    """What the state after the restart says of one writer's acked writes."""
    me = next(x for x in state["members"] if x["id"] == w.member.member_id)
    last_hand = acked_now[-1][1] if acked_now else False
    visible = bool(me["hand"]) == last_hand
    return {"acked": len(acked_now), "last_acked_version": acked_now[-1][0] if acked_now else 0,
            "missing": sum(1 for v, _ in acked_now if v > state["version"]),
            "last_change_visible": visible, "after_last_ack": since_ack,
            # a command with no answer may have landed; one answered `unavailable` must not have
            "explained": visible or "unknown" in since_ack,
            "unavailable_yet_applied": not visible and bool(since_ack) and "unknown" not in since_ack}


class StandaloneOutage:
    """One redis-server with AOF: killed with SIGKILL, started again on its port and files."""

    label = "redis-server (appendonly yes, appendfsync everysec), one lingkar serve"

    def __init__(self, tmp: Path, down: float) -> None:
        self.redis = AofRedis(tmp / "redis")
        self.down = down
        self.killed = 0.0

    @property
    def url(self) -> str:
        return self.redis.url

    def start(self) -> None:
        self.redis.start()

    def fail(self, circle_id: str) -> dict[str, Any]:
        self.redis.kill()
        self.killed = time.perf_counter()
        return {}

    def recover(self) -> dict[str, Any]:
        time.sleep(max(0.0, self.down - (time.perf_counter() - self.killed)))
        load = self.redis.start()
        return {"redis_down_s": round(time.perf_counter() - self.killed, 2), "aof_load_s": round(load, 2)}

    def close(self) -> None:
        self.redis.stop()


class ClusterOutage:
    """testkit's Redis Cluster (3 masters, a replica each, nothing persisted): the master of
    the circle's slot killed with SIGKILL; recovered once its replica is promoted, then the
    killed node started again (it comes back as the new master's replica: `WAIT 1`, which
    every acknowledged write waits for, can succeed again) and the cluster whole."""

    label = "Redis Cluster (3 masters + 3 replicas, WAIT 1 per acked write), one lingkar serve"

    def __init__(self, tmp: Path, down: float) -> None:
        self.cluster = LocalRedisCluster()
        self.master = 0
        self.killed = 0.0

    @property
    def url(self) -> str:
        return self.cluster.url

    def start(self) -> None:
        self.cluster.start()

    def fail(self, circle_id: str) -> dict[str, Any]:
        self.master = self.cluster.master_of(f"lk:{{{circle_id}}}:home")
        self.cluster.kill(self.master)
        self.killed = time.perf_counter()
        return {"killed_master": self.master}

    def recover(self) -> dict[str, Any]:
        new = self.cluster.wait_promoted(self.master, timeout=60)
        promoted = time.perf_counter() - self.killed
        self.cluster.node(self.master).start()
        self.cluster.wait_ok(timeout=60)
        return {"new_master": new, "promoted_s": round(promoted, 2),
                "whole_again_s": round(time.perf_counter() - self.killed, 2)}

    def close(self) -> None:
        self.cluster.close()


async def acked(restarts: int, interval: float, down: float, writers_n: int, store: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lk-acked-"))
    outage: StandaloneOutage | ClusterOutage = (ClusterOutage if store == "redis-cluster" else StandaloneOutage)(tmp, down)
    server: ServerProcess | None = None
    rounds: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[None]] = []
    everyone: list[Member] = []
    try:
        await asyncio.to_thread(outage.start)
        server = ServerProcess(outage.url, tmp / "serve.log")
        await asyncio.to_thread(server.start)
        circle = await new_circle(server.url, server.api_key, "acked", capacity=writers_n + 2)
        everyone = members_of(server.url, circle, ["Pendamping", *(f"Penulis {k}" for k in range(writers_n))],
                              with_c=False)
        mod = everyone[0]
        for m in everyone:
            await m.join()
        writers = [Writer(m) for m in everyone[1:]]
        for w in writers:
            w.go.set()
        tasks = [asyncio.create_task(w.run()) for w in writers]
        for i in range(1, restarts + 1):
            await asyncio.sleep(interval * (0.75 + random.random() / 2))  # mid-stream, anywhere
            info = await asyncio.to_thread(outage.fail, circle["id"])
            killed = time.perf_counter()
            for w in writers:
                w.go.clear()
            await asyncio.wait_for(asyncio.gather(*(w.idle.wait() for w in writers)), COMMAND_TIMEOUT + 10)
            in_flight = [(w.last_answer[0], round(w.last_answer[1] - killed, 2)) for w in writers]
            info.update(await asyncio.to_thread(outage.recover))
            up = time.perf_counter()
            snapshot = [(list(w.acked), list(w.since_ack)) for w in writers]
            state = await synced(mod)
            per_writer = [check_writer(w, state, a, s) for w, (a, s) in zip(writers, snapshot, strict=True)]
            last_version = max((p["last_acked_version"] for p in per_writer), default=0)
            counts = [len(w.acked) for w in writers]
            for w in writers:
                w.acked_event.clear()
                w.go.set()
            await asyncio.wait_for(asyncio.gather(*(w.acked_event.wait() for w in writers)), 60)
            next_versions = [w.acked[c][0] for w, c in zip(writers, counts, strict=True)]
            missing = sum(p["missing"] for p in per_writer)
            r = {"restart": i, "acked_so_far": sum(counts), "last_acked_version": last_version,
                 "version_after": state["version"], "acked_versions_missing": missing,
                 "last_changes_visible": all(p["last_change_visible"] for p in per_writer),
                 "unexplained": sum(not p["explained"] for p in per_writer),
                 "unavailable_yet_applied": sum(p["unavailable_yet_applied"] for p in per_writer),
                 "in_flight_at_kill": in_flight, "next_ack_versions": next_versions,
                 "next_acks_higher": all(v > last_version for v in next_versions),
                 **info, "writers_back_s": round(time.perf_counter() - up, 2), "writers": per_writer}
            r["lost"] = missing + r["unexplained"] + (0 if r["next_acks_higher"] else 1)
            rounds.append(r)
            print(f"  outage {i}: {sum(counts)} acked so far, last acked v{last_version}, state after "
                  f"v{state['version']}: acked versions missing {missing}, last changes visible "
                  f"{r['last_changes_visible']}; in flight at the kill (answer, s after it): {in_flight}; "
                  f"{ {k: v for k, v in info.items() if k.endswith('_s')} }; writers acked again "
                  f"{r['writers_back_s']:.2f} s after that", flush=True)
        for w in writers:
            w.go.clear()
        await asyncio.wait_for(asyncio.gather(*(w.idle.wait() for w in writers)), COMMAND_TIMEOUT + 10)
        return {"restarts": restarts, "store": store, "writers_n": writers_n, "rounds": rounds,
                "acked_total": sum(len(w.acked) for w in writers),
                "acked_writes_lost": sum(r["acked_versions_missing"] for r in rounds),
                "rounds_with_a_loss": sum(1 for r in rounds if r["lost"]),
                "unavailable_yet_applied": sum(r["unavailable_yet_applied"] for r in rounds),
                "writer": {"unavailable": sum(w.unavailable for w in writers),
                           "no_answer": sum(w.unknown for w in writers),
                           "other_errors": sum(w.other_errors for w in writers),
                           "resumes": sum(w.resumes for w in writers)},
                "setup": outage.label}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(m.close() for m in everyone), return_exceptions=True)
        if server is not None:
            await asyncio.to_thread(server.stop)
        await asyncio.to_thread(outage.close)
        shutil.rmtree(tmp, ignore_errors=True)


def acked_summary(r: dict[str, Any]) -> str:
    what = ("SIGKILLs of the slot's master of a Redis Cluster" if r["store"] == "redis-cluster"
            else "SIGKILLs of Redis (AOF everysec)")
    return (f"acked writes over {r['restarts']} {what}, {r['writers_n']} writers: "
            f"{r['acked_total']} acked, "
            f"lost {r['acked_writes_lost']}; restarts with anything wrong {r['rounds_with_a_loss']}; "
            f"writer saw {r['writer']['unavailable']} `unavailable`, {r['writer']['no_answer']} unanswered, "
            f"{r['writer']['resumes']} resumes")


# ---- fan-out over K processes ----------------------------------------------------------------

async def fanout_one(label: str, k: int, url: str, key: str, pids: dict[str, list[int]], rooms: list[int],
                     members: int, seconds: float) -> list[dict[str, Any]]:
    results = []
    for n in rooms:
        target = Target(label, url, key, by_circle=True, pids=pids)
        before = machine()
        try:
            r = await measure(target, n, members, seconds)
        except Exception as err:  # noqa: BLE001 - what happened is the result
            r = {"store": label, "rooms": n, "members": members, "error": f"{type(err).__name__}: {err}"}
        r.pop("per_room", None)
        r.update(processes=k, machine_before=before, machine_after=machine())
        results.append(r)
        print("  " + fanout_line(r), flush=True)
        await asyncio.sleep(2)  # the previous circles' sockets closed, their leases let go
    return results


async def fanout(processes: list[int], rooms: list[int], members: int, seconds: float,
                 stores: list[str]) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    left: list[str] = []
    if "redis" in stores:
        for k in processes:
            cluster = Cluster(k, env={"LINGKAR_MAX_CONNECTIONS_PER_ADDRESS": "0"})
            async with cluster as cl:
                print(f"lingkar cluster -n {k} up in {cl.started_seconds:.1f} s at {cl.url}", flush=True)
                pids = {"server": cl.pids("processes"), "proxy": cl.pids("caddy"), "redis": cl.pids("redis")}
                results += await fanout_one("redis", k, cl.url, cl.api_key, pids, rooms, members, seconds)
            left += cluster.left
    if "redis-cluster" in stores:
        rc = LocalRedisCluster()
        try:
            await asyncio.to_thread(rc.start)
            redis_pids = pids_working_in([node.dir for node in rc.nodes])
            for k in processes:
                cluster = Cluster(k, env={"LINGKAR_MAX_CONNECTIONS_PER_ADDRESS": "0"}, store=rc.url)
                async with cluster as cl:
                    print(f"lingkar cluster -n {k} --store {rc.url} up in {cl.started_seconds:.1f} s at {cl.url}",
                          flush=True)
                    pids = {"server": cl.pids("processes"), "proxy": cl.pids("caddy"), "redis": redis_pids}
                    results += await fanout_one("redis-cluster", k, cl.url, cl.api_key, pids, rooms, members, seconds)
                left += cluster.left
        finally:
            await asyncio.to_thread(rc.close)
    for store in stores:
        mine = [r for r in results if r["store"] == store]
        base = {r["rooms"]: r for r in mine if r["processes"] == processes[0] and "overall" in r}
        for r in mine:
            b = base.get(r["rooms"])
            if b is None or "overall" not in r:
                continue
            r["ratio_to_first"] = {
                key: round(r["overall"][key] / b["overall"][key], 2) if b["overall"][key] else math.nan
                for key in ("p50_ms", "p95_ms", "p99_ms")}
            r["ratio_to_first"]["deliveries_per_second"] = round(
                r["deliveries_per_second"] / b["deliveries_per_second"], 2) if b["deliveries_per_second"] else math.nan
    return {"processes": processes, "rooms": rooms, "members": members, "seconds": seconds, "stores": stores,
            "results": results, "left_behind": left}


def fanout_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['store']} K={r['processes']} {r['rooms']}×{r['members']}: ERROR {r['error']}"
    o, cpu = r["overall"], r["cpu_percent_of_one_core"]
    return (f"{r['store']} K={r['processes']} {r['rooms']}×{r['members']}: p50 {o['p50_ms']:.2f} / p95 {o['p95_ms']:.2f} / "
            f"p99 {o['p99_ms']:.2f} ms, {r['deliveries_per_second']:.0f} deliveries/s of "
            f"{r['events_per_second']:.0f}, missing {r['missing_deliveries']}, errors {r['command_errors']}, "
            f"redirects {r['redirects_at_join']}; CPU % of a core: processes {cpu.get('server')}, "
            f"caddy {cpu.get('proxy')}, redis {cpu.get('redis')}, generator {r['client_cpu_percent_of_one_core']} "
            f"(its schedule {r['generator_lag_seconds']:.1f} s late)")


def fanout_summary(r: dict[str, Any]) -> str:
    lines = ["fan-out through the proxy (?c=), K processes on one Redis (redis) or a Redis Cluster (redis-cluster):"]
    for x in r["results"]:
        ratio = x.get("ratio_to_first")
        tail = (f"  [×K={r['processes'][0]}: p50 {ratio['p50_ms']}, p95 {ratio['p95_ms']}, p99 {ratio['p99_ms']}, "
                f"deliveries/s {ratio['deliveries_per_second']}]") if ratio else ""
        lines.append("  " + fanout_line(x) + tail)
    return "\n".join(lines)


# ---- the command line --------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("failover", help="SIGKILL of a circle's home: time until everyone is back and acked")
    f.add_argument("--kills", type=int, default=20)
    f.add_argument("--client", choices=("fixed", "web"), default="fixed",
                   help=f"retry every {RETRY} s (fixed), or with the web client's backoff (0.5 s × 2^n)")
    r = sub.add_parser("redirects", help="share of hellos answered `redirect`, with ?c= and without")
    r.add_argument("--circles", type=int, default=100)
    r.add_argument("--members", type=int, default=4)
    r.add_argument("--later", type=float, default=10.0, help="seconds after the restart for the last look")
    a = sub.add_parser("acked", help="acked writes over SIGKILLs of Redis (AOF everysec)")
    a.add_argument("--restarts", type=int, default=5)
    a.add_argument("--interval", type=float, default=3.0, help="seconds of writing before each kill (±25 %%)")
    a.add_argument("--down", type=float, default=1.0, help="seconds Redis stays down (at least)")
    a.add_argument("--writers", type=int, default=4, help="members writing at once (each ≤ 20 frames/s)")
    a.add_argument("--store", choices=("redis", "redis-cluster"), default="redis",
                   help="one redis-server with AOF (killed and restarted), or a Redis Cluster (a master killed)")
    o = sub.add_parser("fanout", help="signaling fan-out through the proxy for K processes")
    o.add_argument("--processes", type=_ints, default=[1, 2, 4])
    o.add_argument("--rooms", type=_ints, default=[400, 800])
    o.add_argument("--members", type=int, default=8)
    o.add_argument("--seconds", type=float, default=10.0)
    o.add_argument("--stores", type=lambda t: [x for x in t.split(",") if x], default=["redis", "redis-cluster"],
                   help="redis (lingkar cluster's own redis-server), redis-cluster (testkit's, given to "
                        "`lingkar cluster --store`), or both, comma-separated")
    for s in (f, r, a, o):
        s.add_argument("--out", type=Path, help="write the JSON report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    jobs: dict[str, tuple[Callable[[], Any], Callable[[dict[str, Any]], str]]] = {
        "failover": (lambda: failover(args.kills, args.client), failover_summary),
        "redirects": (lambda: redirects(args.circles, args.members, args.later), redirects_summary),
        "acked": (lambda: acked(args.restarts, args.interval, args.down, args.writers, args.store), acked_summary),
        "fanout": (lambda: fanout(args.processes, args.rooms, args.members, args.seconds, args.stores), fanout_summary),
    }
    job, summarize = jobs[args.what]
    before, began = machine(), time.monotonic()
    result = run_loop(job())
    after = machine()
    result.update(what=args.what, wall_seconds=round(time.monotonic() - began, 1),
                  machine_before=before, machine_after=after,
                  machine_busy_share=round((after["busy_seconds"] - before["busy_seconds"])
                                           / max(1e-9, (time.monotonic() - began) * (os.cpu_count() or 1)), 2),
                  note="a shared, noisy machine: numbers move with whatever else runs")
    print(summarize(result), flush=True)
    print(f"({result['wall_seconds']} s; load average {before['loadavg_1m']} → {after['loadavg_1m']} on "
          f"{after['cores']} cores)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
