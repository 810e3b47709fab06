"""What the load test starts: a `lingkar serve` subprocess (never the server inside the
load generator) on its own store, and the HTTP calls it makes to set circles up. The
throwaway `redis-server` is `testkit.redis_server.RedisServer`; /proc readings are
`testkit.procs`.

Everything listens on 127.0.0.1 on a free port, every wait is bounded, and `stop()` is
safe to call twice (the caller stops both in a `finally`, so Ctrl-C and errors clean up).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

from testkit import procs
from testkit.http import call
from testkit.ports import free_port
from testkit.procs import cluster_leftovers
from testkit.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent


def create_circle(base_url: str, key: str, title: str, capacity: int) -> dict[str, Any]:
    body = {"title": title, "language": "en", "capacity": capacity, "floor_mode": "hands",
            "lobby": True, "turn_seconds": 1800}
    for attempt in range(5):
        status, circle = call("POST", base_url + "/api/circles", body, key)
        if status == 201:
            return dict(circle)
        if status in (401, 422):
            break
        time.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"POST /api/circles answered {status}: {circle}")


def end_circle(base_url: str, key: str, circle_id: str) -> None:
    try:
        call("DELETE", f"{base_url}/api/circles/{circle_id}", key=key, timeout=5)
    except OSError:
        pass


def wait_ready(base_url: str, timeout: float, alive: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError("the server exited while starting")
        try:
            status, _ = call("GET", base_url + "/readyz", timeout=1)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{base_url}/readyz was not 200 within {timeout:.0f} s")


class ServerProcess:
    """`lingkar serve` in a subprocess (never inside the load generator). `store` is
    "memory", "redis" (a throwaway `redis-server` of its own, started first and stopped
    last) or a Redis URL. `module` is what `python -m` runs with the argument `serve` (a
    wrapper such as `loadtest.tracemem` that sets something up and then runs `server.cli`);
    `env` is added to the environment."""

    def __init__(self, store: str, log_path: Path, *, module: str = "server.cli",
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.store = store
        self.api_key = secrets.token_urlsafe(24)
        self.log_path = log_path
        self.module = module
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.redis: RedisServer | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        store = self.store
        if store == "redis":
            self.redis = RedisServer()
            self.redis.start()
            store = self.redis.url
        env = {**os.environ,
               "LINGKAR_HOST": "127.0.0.1", "LINGKAR_PORT": str(self.port),
               "LINGKAR_STORE": store, "LINGKAR_SECRET": secrets.token_urlsafe(48),
               "LINGKAR_API_KEY": self.api_key, "LINGKAR_MAX_CONNECTIONS_PER_ADDRESS": "0",
               "LINGKAR_LOG_LEVEL": "WARNING", **self.extra_env}
        env.pop("LINGKAR_PUBLIC_URL", None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "serve"], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        wait_ready(self.url, timeout, alive=lambda: self.proc is not None and self.proc.poll() is None)

    def stop(self) -> None:
        procs.stop(self.proc, 10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.redis is not None:
            self.redis.close()
            self.redis = None


# ---- a redis-server with AOF that can be killed and brought back ------------------------------

REDIS_BIN = "redis-server"


class AofRedis:
    """A `redis-server` with AOF (`appendonly yes`, `appendfsync everysec`, no RDB snapshots)
    on a fixed free loopback port and a directory of its own, for killing with SIGKILL and
    starting again on the same port and files (testkit's RedisServer runs without AOF)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.dir = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._drain: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, timeout: float = 30.0) -> float:
        """Start it and wait until it accepts connections (its AOF loaded); the seconds that took."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.dir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--bind", "127.0.0.1", "--port", str(self.port), "--protected-mode", "yes",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--logfile", "", "--daemonize", "no"],
            cwd=self.dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ready = threading.Event()
        tail: list[bytes] = []
        out = self.proc.stdout
        assert out is not None

        def read() -> None:
            for line in out:
                if not ready.is_set():
                    tail.append(line)
                    if b"Ready to accept connections" in line:
                        ready.set()
            ready.set()

        self._drain = threading.Thread(target=read, daemon=True)
        self._drain.start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            text = b"".join(tail[-5:]).decode(errors="replace")
            self.kill()
            raise RuntimeError(f"redis-server on port {self.port} did not start: {text}")
        return time.monotonic() - began

    def kill(self) -> None:
        """SIGKILL (a crash: nothing flushed beyond what the kernel already has)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(timeout=10)

    def stop(self) -> None:
        procs.stop(self.proc, 10)
        self.proc = None


# ---- `lingkar cluster` as a subprocess -------------------------------------------------------

CLUSTER_READY_LINE = "Organizer link"


def _pdeathsig(sig: int) -> Any:
    """preexec_fn: `sig` to the child when this process dies (Linux), so a load test killed
    hard leaves no cluster behind (the supervisor's own children get SIGTERM when it goes)."""
    def setup() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    return setup


class ClusterProcess:
    """`python -m server.cli cluster -n N --port P --data-dir D [--store URL]` (what `make cluster` runs), as a
    developer starts it: ready once it printed its organizer link; stopped with SIGINT, after
    which nothing it started may be left. Its output is read all along (kept in `lines`).
    `env` is added to the supervisor's environment (the processes inherit it); LINGKAR_*
    variables of this environment are not passed on."""

    def __init__(self, n: int, data_dir: Path, *, env: dict[str, str] | None = None,
                 store: str | None = None) -> None:
        self.n = n
        self.data = data_dir
        self.store = store  # `--store URL`: the processes on a store of ours (a Redis Cluster), no Redis of its own
        self.port = free_port()
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("LINGKAR_")},
                    "LINGKAR_LOG_LEVEL": "WARNING", **(env or {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = ""
        self.proc: Any = None  # asyncio.subprocess.Process
        self.lines: list[str] = []
        self._new: Any = None  # asyncio.Event, set at each line
        self._reader: Any = None
        self._known: dict[str, Any] = {}  # the last cluster.json read (it is gone after a stop)
        self.started_seconds = 0.0

    # -- life --

    async def start(self, timeout: float = 120.0) -> None:
        began = time.monotonic()
        self._new = asyncio.Event()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "cluster", "-n", str(self.n), "--port", str(self.port),
            "--data-dir", str(self.data), *(["--store", self.store] if self.store else []), cwd=REPO, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, limit=1 << 20,
            start_new_session=True, preexec_fn=_pdeathsig(2))  # SIGINT: it stops in order
        self._reader = asyncio.create_task(self._read())
        line = await self.said(lambda text: text.startswith(CLUSTER_READY_LINE), timeout)
        self.api_key = line.split("#key=", 1)[1].strip()
        self.started_seconds = time.monotonic() - began
        self.state()

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            try:
                raw = await self.proc.stdout.readline()
            except ValueError:
                continue
            if not raw:
                break
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new.set()
        await self.proc.wait()
        self._new.set()

    async def said(self, match: Any, timeout: float, start: int = 0) -> str:
        """The first line from `start` on that matches, awaited; RuntimeError if it exits first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = start
        while True:
            for line in self.lines[seen:]:
                if match(line):
                    return line
            seen = len(self.lines)
            if self.proc.returncode is not None:
                raise RuntimeError(f"lingkar cluster exited ({self.proc.returncode}):\n" + self.tail())
            self._new.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise RuntimeError(f"lingkar cluster: nothing matching within {timeout:.0f} s:\n" + self.tail())
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except TimeoutError:
                pass

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    async def stop(self, timeout: float = 90.0) -> list[str]:
        """SIGINT (Ctrl-C), wait for its exit; then what of it is still running (each killed
        with SIGKILL, named in the answer: it must be empty)."""
        if self.proc is None:
            return []
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        left = self.leftovers()
        for entry in left:
            try:
                os.kill(int(entry.split(":", 1)[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        return left

    def leftovers(self) -> list[str]:
        """Processes still running that this cluster started: the pids it last wrote down,
        anything working in its data directory (Redis and Caddy do; Redis retitles itself)
        and any `lingkar serve` whose process URL is on its port."""
        return cluster_leftovers(self.data, f"{self.url}/p/", frozenset(int(p) for p in self._pids() if p))

    def _pids(self) -> list[int | None]:
        s = self._known
        if not s:
            return []
        return [s["supervisor"], s["redis"]["pid"], s["caddy"]["pid"],
                *(p["pid"] for p in s["processes"].values())]

    # -- what runs where --

    def state(self) -> dict[str, Any]:
        """DATA/cluster.json (pids, ports, URLs, the Redis URL), as written last."""
        self._known = dict(json.loads((self.data / "cluster.json").read_text()))
        return self._known

    def pid_of(self, k: int) -> int | None:
        pid = self.state()["processes"][str(k)]["pid"]
        return int(pid) if pid else None

    @property
    def redis_url(self) -> str:
        return str((self._known or self.state())["redis"]["url"])

    def home_of(self, circle_id: str) -> int | None:
        """The process K whose lease the circle is on (`lk:{circle}:home` field `url` is the
        public URL + /p/K), or None when no lease is held."""
        with redis.Redis.from_url(self.redis_url, socket_timeout=5) as r:
            url = (r.hget(f"lk:{{{circle_id}}}:home", "url") or b"").decode()
        prefix = self.url + "/p/"
        if not url.startswith(prefix):
            return None
        return int(url[len(prefix):])

    def pids(self, role: str) -> list[int]:
        """The running pids of "processes", "redis" or "caddy"."""
        s = self.state()
        if role == "processes":
            return [int(p["pid"]) for p in s["processes"].values() if p["pid"]]
        pid = s[role]["pid"]
        return [int(pid)] if pid else []

    async def rolling_restart(self, timeout: float = 300.0) -> tuple[int, float, str]:
        """`lingkar cluster restart` (make cluster-restart): (exit status, seconds, its output)."""
        began = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "cluster", "restart", "--data-dir", str(self.data),
            cwd=REPO, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out = (await asyncio.wait_for(proc.communicate(), timeout))[0].decode(errors="replace")
        except TimeoutError:
            proc.kill()
            out = (await proc.communicate())[0].decode(errors="replace") + "\n(timed out)"
        self.state()
        return int(proc.returncode if proc.returncode is not None else -1), time.monotonic() - began, out


def pids_working_in(directories: list[Path]) -> list[int]:
    """The live processes whose working directory is one of `directories` (a redis-server
    works in its --dir: that is how its pid is found without reaching into who started it)."""
    wanted = {str(d.resolve()) for d in directories}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "cwd") in wanted and "State:\tZ" not in (proc / "status").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found
