"""`lingkar cluster` (make cluster, DESIGN §8): real `lingkar serve` processes behind Debian's
Caddy with deploy/cluster/Caddyfile, one real redis-server with AOF, all on free loopback ports,
the supervisor a subprocess as a developer runs it.

Through the proxy only: a circle made with the organizer API; members whose hellos carry
`?c={circle}` all reach the circle's home (no `redirect`), while hellos without it may reach
another process and follow its `redirect` to `/p/K/ws`. The home is killed with SIGKILL: every
member resumes through the proxy into the same seat (same id, floor and queue). Then a rolling
restart (`lingkar cluster restart`) while the members reconnect as the web client does (each
draining process redirects them to another, under the proxy): nobody loses their seat. Ctrl-C
(SIGINT) stops everything, nothing is left behind, and a second start on the same data
directory keeps the circle (AOF) and the links (the keys kept in keys.json). A child that
fails to start stops the others, in one line and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets

from server.cluster import CADDYFILE, caddyfile, default_hosts
from testkit.http import call
from testkit.ports import free_port
from testkit.procs import cluster_leftovers
from tests.deploy.stack import CADDY, ROOT, Child
from tests.live import Client, token_of

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(not CADDY.exists(), reason=f"{CADDY} is missing (`make system` installs Debian's caddy)"),
]

HOST = "127.0.0.1"
RETRY = 0.2  # seconds between a client's attempts to get back in, as the web client waits


# ---- the supervisor --------------------------------------------------------------------------

@dataclass
class Cluster:
    url: str
    data: Path
    key: str
    supervisor: Child

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.data / "cluster.json").read_text()))

    def pid_of(self, k: int) -> int:
        return int(self.state()["processes"][str(k)]["pid"])

    def home_of(self, circle_id: str) -> int:
        """The process K whose lease the circle is on (its URL is the public one + /p/K)."""
        with redis.Redis.from_url(self.state()["redis"]["url"]) as r:
            url = (r.hget(f"lk:{{{circle_id}}}:home", "url") or b"").decode()
        prefix = self.url + "/p/"
        assert url.startswith(prefix), url
        return int(url[len(prefix):])

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await asyncio.to_thread(call, method, self.url + path, body, self.key)


def supervisor_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("LINGKAR_")}, **extra}


async def start_supervisor(data: Path, port: int, env: dict[str, str], *args: str) -> Child:
    return await Child.start("lingkar cluster", [
        sys.executable, "-m", "server.cli", "cluster", "-n", "3", "--port", str(port),
        "--data-dir", str(data), *args], env, ROOT)


def leftovers(data: Path, port: int) -> list[str]:
    return cluster_leftovers(data, f"http://{HOST}:{port}/p/")


def kill_leftovers(data: Path, port: int) -> None:
    for line in leftovers(data, port):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


@contextlib.asynccontextmanager
async def running_cluster(data: Path, *args: str) -> AsyncIterator[Cluster]:
    """The supervisor with three processes, until it printed the organizer link (all ready).
    Stopped (SIGTERM) at the end if the body did not stop it; on a failure its output is shown
    and anything it left behind is killed."""
    port = free_port()
    supervisor = await start_supervisor(data, port, supervisor_env(), *args)
    try:
        await supervisor.said(lambda line: line.startswith("Lingkar is running at"), "its banner", timeout=90)
        link = await supervisor.said(lambda line: line.startswith("Organizer link"), "the organizer link")
        url = f"http://{HOST}:{port}"
        assert f"{url}/organizer#key=" in link, link
        yield Cluster(url, data, link.split("#key=", 1)[1].strip(), supervisor)
    except BaseException:
        print(f"--- lingkar cluster ---\n{supervisor.output()}")
        raise
    finally:
        await supervisor.stop()
        kill_leftovers(data, port)


async def stop_with_sigint(cluster: Cluster) -> None:
    """Ctrl-C: the supervisor stops everything and exits 0; nothing of it is left."""
    port = int(cluster.state()["port"])
    pids = [cluster.state()["redis"]["pid"], cluster.state()["caddy"]["pid"],
            *(p["pid"] for p in cluster.state()["processes"].values())]
    cluster.supervisor.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(cluster.supervisor.proc.wait(), 60) == 0, cluster.supervisor.output()
    await cluster.supervisor.said(lambda line: line == "stopped", "its last line")
    assert nothing_left(cluster.data, port, pids) == []


def nothing_left(data: Path, port: int, pids: list[int]) -> list[str]:
    """What is still there of a stopped cluster: processes, its pid file, its control socket."""
    left = leftovers(data, port) + [f"pid {pid}" for pid in pids if Path(f"/proc/{pid}").exists()]
    return left + [name for name in ("supervisor.pid", "control.sock", "cluster.json") if (data / name).exists()]


# ---- a member as the web client behaves -------------------------------------------------------

@dataclass
class Member:
    """Joins through the proxy (`/ws?c={circle}`, or plain `/ws` with `with_c=False`), follows
    a `redirect`, and resumes with its secret; `redirects` counts the ones it got."""

    cluster: Cluster
    circle_id: str
    token: str
    name: str
    with_c: bool = True
    member_id: str = ""
    resume: str = ""
    client: Client | None = None
    welcomes: list[dict[str, Any]] = field(default_factory=list)
    redirects: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    """`redirect`s received while in the circle (a draining process moving its members)."""
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ws_url(self) -> str:
        url = self.cluster.url.replace("http://", "ws://") + "/ws"
        return url + f"?c={self.circle_id}" if self.with_c else url

    async def _hello(self, url: str) -> tuple[Client | None, dict[str, Any] | None]:
        """One attempt: the socket and its first answer; (None, None) when the upgrade is refused
        (a process gone: 502) and (client, None) when it closed without an answer (1013, 1001)."""
        try:
            ws = await websockets.connect(url.replace("http", "ws", 1), max_size=2**20, compression=None,
                                          proxy=None, open_timeout=10)
        except (OSError, websockets.InvalidHandshake, TimeoutError):
            return None, None
        client = Client(ws)
        client._reader = asyncio.create_task(client._read())
        frame: dict[str, Any] = {"type": "hello", "token": self.token, "name": self.name, "listen_only": False}
        if self.resume:
            frame["resume"] = self.resume
        await client.send(frame)
        try:
            first = await client.wait(lambda fr: fr.get("type") in ("welcome", "lobby", "redirect"))
        except (AssertionError, TimeoutError):
            await client.close()
            return client, None
        return client, first

    async def join(self, timeout: float = 45.0, at: str | None = None) -> dict[str, Any]:
        """Until a `welcome`: through the proxy (first at `at`, when given), then where a
        `redirect` says; a refused upgrade or a close without an answer is tried again through
        the proxy."""
        async def attempt() -> dict[str, Any]:
            url = at
            while True:
                client, first = await self._hello(url or self.ws_url)
                url = None
                if first is not None and first["type"] == "redirect":
                    self.redirects.append(first["url"])
                    await client.close()  # type: ignore[union-attr]
                    client, first = await self._hello(first["url"])
                if first is not None:
                    assert first["type"] == "welcome", first
                    assert client is not None
                    return self._welcomed(client, first)
                if client is not None:
                    await client.close()
                await asyncio.sleep(RETRY)

        return await asyncio.wait_for(attempt(), timeout)

    def _welcomed(self, client: Client, welcome: dict[str, Any]) -> dict[str, Any]:
        self.client = client
        self.welcomes.append(welcome)
        self.member_id = self.member_id or welcome["member_id"]
        self.resume = welcome["resume"]
        self.connected.set()
        return welcome

    async def keep(self) -> None:
        """As the web client: whenever the socket closes, resume where a `redirect` before the
        close said (a draining process names the circle's next home), else through the proxy."""
        while True:
            client = self.client
            assert client is not None
            await client.closed(timeout=None)  # type: ignore[arg-type]
            self.connected.clear()
            moved = [fr["url"] for fr in client.frames if fr.get("type") == "redirect"]
            self.moved += moved
            await self.join(at=moved[-1] if moved else None)

    async def sync(self) -> dict[str, Any]:
        assert self.client is not None
        start = len(self.client.frames)
        await self.client.send({"type": "sync"})
        return await self.client.wait(lambda fr: fr.get("type") == "snapshot", start=start)


def seats(state: dict[str, Any]) -> dict[str, int]:
    return {m["id"]: m["seat"] for m in state["members"]}


# ---- the tests -------------------------------------------------------------------------------

async def test_cluster_routes_by_circle_survives_a_kill_and_a_rolling_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_cluster(data) as cluster:
        keys = data / "keys.json"
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        assert json.loads(keys.read_text())["api_key"] == cluster.key

        # -- a circle through the proxy; everyone joins with ?c= and reaches its home at once --
        status, circle = await cluster.api("POST", "/api/circles", {"title": "Lingkar Uji", "lobby": False})
        assert status == 201, circle
        cid, links = circle["id"], circle["links"]
        assert links["member"].startswith(f"{cluster.url}/c/{cid}")
        mod = Member(cluster, cid, token_of(links["moderator"]), "Pendamping Sari")
        members = [Member(cluster, cid, token_of(links["member"]), name) for name in ("Melati", "Anggrek", "Kenanga")]
        for m in [mod, *members]:
            await m.join()
        assert [m.redirects for m in [mod, *members]] == [[]] * 4  # consistent hashing on `c`
        home = cluster.home_of(cid)
        holder, waiting = members[0], members[1]
        assert mod.client is not None and holder.client is not None and waiting.client is not None
        assert (await mod.client.command("give_floor", member_id=holder.member_id))["type"] == "ack"
        assert (await waiting.client.command("raise_hand"))["type"] == "ack"

        # -- without ?c= a hello may land anywhere: round robin puts two of three elsewhere,
        #    and the redirect they get names the home under the proxy, /p/K/ws, which works --
        guests = [Member(cluster, cid, token_of(links["member"]), f"Tamu {i}", with_c=False) for i in range(3)]
        for g in guests:
            await g.join()
        followed = [url for g in guests for url in g.redirects]
        assert followed and set(followed) == {f"{cluster.url}/p/{home}/ws"}, followed
        everyone = [mod, *members, *guests]
        state = (await mod.sync())["state"]
        before = seats(state)
        assert set(before) == {m.member_id for m in everyone}

        # -- the home dies (SIGKILL): everyone resumes through the proxy, same seat, floor, queue --
        os.kill(cluster.pid_of(home), signal.SIGKILL)
        for m in everyone:
            assert m.client is not None
            await m.client.closed(timeout=30)
        await cluster.supervisor.said(lambda line: line.startswith(f"process {home} exited (signal SIGKILL)"),
                                      "the report of the killed process")
        welcomes = await asyncio.gather(*(m.join() for m in everyone))
        for m, welcome in zip(everyone, welcomes, strict=True):
            assert welcome["member_id"] == m.member_id
        state = welcomes[0]["state"]
        assert seats(state) == before
        assert state["floor"]["holder"] == holder.member_id and state["queue"] == [waiting.member_id]
        assert cluster.home_of(cid) != home

        # -- `revive` starts the dead process only: the healthy ones and their circles stay --
        revive = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "cluster", "revive", "--data-dir", str(data),
            cwd=ROOT, env=supervisor_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(revive.communicate(), 120))[0].decode()
        assert revive.returncode == 0, out
        assert f"not running: {home}\n" in out and f"process {home}: ready" in out, out
        assert "stopping" not in out and out.rstrip().endswith("revive done"), out
        assert all(m.client is not None and m.client.close_code is None for m in everyone)

        # -- a rolling restart while the members reconnect as the web client does --
        keepers = [asyncio.create_task(m.keep()) for m in everyone]
        try:
            restart = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.cli", "cluster", "restart", "--data-dir", str(data),
                cwd=ROOT, env=supervisor_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out = (await asyncio.wait_for(restart.communicate(), 120))[0].decode()
            assert restart.returncode == 0, out
            assert out.rstrip().endswith("rolling restart done"), out
            for k in (1, 2, 3):
                assert f"process {k}: stopping" in out and f"process {k}: ready" in out, out
            for m in everyone:
                await asyncio.wait_for(m.connected.wait(), 45)
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        assert all(w["member_id"] == m.member_id for m in everyone for w in m.welcomes)
        assert all(len(m.welcomes) >= 3 for m in everyone)  # each was moved by the restart, and came back
        # ... by the draining processes' `redirect`, which names another process under the proxy
        assert all(m.moved for m in everyone)
        assert {url for m in everyone for url in m.moved} <= {f"{cluster.url}/p/{k}/ws" for k in (1, 2, 3)}
        state = (await mod.sync())["state"]
        assert seats(state) == before  # nobody lost their seat
        assert all(member["connected"] for member in state["members"]), state["members"]
        assert state["floor"]["holder"] == holder.member_id and state["queue"] == [waiting.member_id]
        for m in everyone:
            assert m.client is not None
            await m.client.close()

        await stop_with_sigint(cluster)

    # -- started again on the same data directory: the circle is still there (AOF), the key
    #    and the links are the same (keys.json) --
    async with running_cluster(data) as again:
        assert again.key == cluster.key
        status, got = await again.api("GET", f"/api/circles/{cid}")
        assert status == 200 and got["id"] == cid, got
        newcomer = Member(again, cid, token_of(links["member"]), "Dahlia")
        await newcomer.join()
        assert newcomer.client is not None
        await newcomer.client.close()
        await stop_with_sigint(again)


async def test_a_child_that_fails_to_start_stops_the_rest_in_one_line(tmp_path: Path) -> None:
    """Caddy cannot start (here: a binary that exits at once): Redis and the three processes,
    already running, are stopped; one line on stderr; a non-zero exit; nothing left."""
    data, port = tmp_path / "data", free_port()
    supervisor = await start_supervisor(data, port, supervisor_env(LINGKAR_CADDY="/bin/false"))
    try:
        assert await asyncio.wait_for(supervisor.proc.wait(), 90) == 1
        await supervisor.stop()
        errors = [line for line in supervisor.lines if line.startswith("lingkar cluster:")]
        assert errors == ["lingkar cluster: caddy exited (status 1) before it was ready: (no output)"], \
            supervisor.output()
        assert any(line.startswith("p3 | ") for line in supervisor.lines)  # the processes had started
        assert leftovers(data, port) == []
    finally:
        await supervisor.stop()
        kill_leftovers(data, port)


def test_a_wrong_setting_stops_before_anything_starts(tmp_path: Path) -> None:
    env = supervisor_env(LINGKAR_API_KEY="pendek-sekali")
    done = subprocess.run([sys.executable, "-m", "server.cli", "cluster", "--port", str(free_port()),
                           "--data-dir", str(tmp_path / "data")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("lingkar cluster: LINGKAR_API_KEY")
    assert "pendek-sekali" not in done.stderr


def test_the_checked_in_caddyfile_is_the_one_for_three_processes_and_caddy_takes_others(tmp_path: Path) -> None:
    assert caddyfile(default_hosts(3)) == CADDYFILE.read_text()
    five = tmp_path / "Caddyfile"
    five.write_text(caddyfile([f"10.0.0.{k}:8000" for k in range(1, 6)]))
    adapted = subprocess.run([str(CADDY), "adapt", "--config", str(five), "--adapter", "caddyfile"],
                             capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    assert adapted.returncode == 0, adapted.stderr
    config = json.loads(adapted.stdout)
    text = json.dumps(config)
    assert all(f'"10.0.0.{k}:8000"' in text for k in range(1, 6)) and '"/p/5/*"' in text
    assert '"policy": "header"' in text and '"uri": "/healthz"' in text


async def test_the_cluster_runs_on_a_redis_cluster_given_with_store(tmp_path: Path, redis_cluster_url: str) -> None:
    async with running_cluster(tmp_path / "data", "--store", redis_cluster_url) as cluster:
        assert cluster.state()["redis"] == {"pid": None, "url": redis_cluster_url}  # no Redis of its own
        status, circle = await cluster.api("POST", "/api/circles", {"title": "Lingkar Gugus", "lobby": False})
        assert status == 201, circle
        members = [Member(cluster, circle["id"], token_of(circle["links"][role]), name)
                   for role, name in (("moderator", "Pendamping"), ("member", "Melati"), ("member", "Kenanga"))]
        for member in members:
            await member.join()
        assert [m.redirects for m in members] == [[], [], []]  # `?c=` reached the home each time
        mod, melati, _ = members
        assert mod.client is not None and melati.client is not None
        assert (await melati.client.command("raise_hand"))["type"] == "ack"
        assert (await mod.sync())["state"]["queue"] == [melati.member_id]
        for member in members:
            assert member.client is not None
            await member.client.close()
