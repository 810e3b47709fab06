"""What the load test starts: a `lingkar serve` subprocess (never the server inside the
load generator) on its own store, and the HTTP calls it makes to set circles up. The
throwaway `redis-server` is `testkit.redis_server.RedisServer`; /proc readings are
`testkit.procs`.

Everything listens on 127.0.0.1 on a free port, every wait is bounded, and `stop()` is
safe to call twice (the caller stops both in a `finally`, so Ctrl-C and errors clean up).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testkit import procs
from testkit.http import call
from testkit.ports import free_port
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
