"""What the load test starts and watches: a `lingkar serve` subprocess, a throwaway
`redis-server`, and /proc readings of a process's CPU time and memory.

Everything listens on 127.0.0.1 on a free port, every wait is bounded, and `stop()` is
safe to call twice (the caller stops both in a `finally`, so Ctrl-C and errors clean up).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A free loopback TCP port (never 6379, where a developer's own Redis may live)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379:
            return port


# --- /proc ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (its threads included) in seconds, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (not idle or iowait) since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` in bytes, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --- HTTP -------------------------------------------------------------------------------


def http(method: str, url: str, body: Any = None, key: str | None = None,
         timeout: float = 10.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw) if raw else None
        except ValueError:
            return err.code, raw.decode(errors="replace")


def create_circle(base_url: str, key: str, title: str, capacity: int) -> dict[str, Any]:
    body = {"title": title, "language": "en", "capacity": capacity, "floor_mode": "hands",
            "lobby": True, "turn_seconds": 1800}
    for attempt in range(5):
        status, circle = http("POST", base_url + "/api/circles", body, key)
        if status == 201:
            return dict(circle)
        if status in (401, 422):
            break
        time.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"POST /api/circles answered {status}: {circle}")


def end_circle(base_url: str, key: str, circle_id: str) -> None:
    try:
        http("DELETE", f"{base_url}/api/circles/{circle_id}", key=key, timeout=5)
    except OSError:
        pass


def wait_ready(base_url: str, timeout: float, alive: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError("the server exited while starting")
        try:
            status, _ = http("GET", base_url + "/readyz", timeout=1)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{base_url}/readyz was not 200 within {timeout:.0f} s")


# --- processes ----------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class RedisProcess:
    """A `redis-server` of our own: free loopback port, no persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="lingkar-loadtest-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING in time")

    def stop(self) -> None:
        _stop(self.proc, 5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class ServerProcess:
    """`lingkar serve` in a subprocess (never inside the load generator). `module` is what
    `python -m` runs with the argument `serve` (a wrapper such as `loadtest.tracemem` that
    sets something up and then runs `server.cli`); `env` is added to the environment."""

    def __init__(self, store: str, log_path: Path, *, module: str = "server.cli",
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.store = store
        self.api_key = secrets.token_urlsafe(24)
        self.log_path = log_path
        self.module = module
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ,
               "LINGKAR_HOST": "127.0.0.1", "LINGKAR_PORT": str(self.port),
               "LINGKAR_STORE": self.store, "LINGKAR_SECRET": secrets.token_urlsafe(48),
               "LINGKAR_API_KEY": self.api_key, "LINGKAR_MAX_CONNECTIONS_PER_ADDRESS": "0",
               "LINGKAR_LOG_LEVEL": "WARNING", **self.extra_env}
        env.pop("LINGKAR_PUBLIC_URL", None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "serve"], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        wait_ready(self.url, timeout, alive=lambda: self.proc is not None and self.proc.poll() is None)

    def stop(self) -> None:
        _stop(self.proc, 10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
