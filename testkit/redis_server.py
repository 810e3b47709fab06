"""A throwaway `redis-server` on a free loopback port, for the tests, the benches and the
load test.

Never port 6379 (a developer's own Redis may live there) and never a fake: the stores are
tested against the real thing. No persistence unless asked: `stop(save=True)` writes a
snapshot into the server's temporary directory so that `start()` brings the data back, which
is how the fault tests restart Redis mid-circle.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from testkit.ports import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _make_certificates(directory: Path) -> None:
    """A CA and a certificate for 127.0.0.1 that it signed, with Debian's openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=lingkar-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.ext", "-out", "server.crt")


class RedisServer:
    """With `tls`, the server speaks only TLS (a certificate for 127.0.0.1 signed by a CA
    made for it in its directory), and `url` is a `rediss://` URL that trusts that CA."""

    def __init__(self, port: int | None = None, *, tls: bool = False) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="lingkar-redis-"))
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None
        if tls:
            _make_certificates(self.dir)

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.dir / 'ca.crt'}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        if self.tls:
            return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, ssl=True,
                               ssl_ca_certs=str(self.dir / "ca.crt"), retry=Retry(NoBackoff(), 0))
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5,
                           retry=Retry(NoBackoff(), 0))

    def _listen(self) -> list[str]:
        if not self.tls:
            return ["--port", str(self.port)]
        return ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                "--tls-cert-file", str(self.dir / "server.crt"),
                "--tls-key-file", str(self.dir / "server.key"),
                "--tls-ca-cert-file", str(self.dir / "ca.crt")]

    def start(self, timeout: float = 10.0) -> None:
        assert self._proc is None, "already running"
        # It logs to stdout; we read up to the line saying it is ready (or its exit), then a
        # thread keeps draining the pipe so the server never blocks on a full one.
        self._proc = subprocess.Popen(
            [REDIS_SERVER, *self._listen(), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--logfile", "",
             "--notify-keyspace-events", "Ex"],  # tests can await a key's expiry
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self._proc.stdout is not None
        out = self._proc.stdout
        lines: list[bytes] = []
        ready = threading.Event()

        def read() -> None:
            for line in out:
                if not ready.is_set():
                    lines.append(line)
                    if b"Ready to accept connections" in line:
                        ready.set()
            ready.set()  # EOF: it exited

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout):
            raise RuntimeError("redis-server did not become ready in time")
        if self._proc.poll() is not None or not any(b"Ready to accept" in ln for ln in lines):
            self._proc.wait(timeout)
            text = b"".join(lines[-5:]).decode(errors="replace")
            raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {text}")

    def stop(self, save: bool = False) -> None:
        """Stop the server; with `save`, snapshot first so the next `start` has the data."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            with self.client() as c:
                c.shutdown(save=save, nosave=not save)
        except redis.exceptions.ConnectionError:
            pass  # the server closes the connection as it exits
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """Stop the server answering (SIGSTOP): its sockets stay open, nothing comes back."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop(save=True)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.asynccontextmanager
async def key_expiry(url: str, key: str) -> AsyncIterator[asyncio.Future[None]]:
    """A future set when Redis expires `key` (a keyspace event; the test servers publish
    them). Listening starts before the block runs, so no expiry is missed."""
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe("__keyevent@0__:expired")
    expired: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message" and message["data"] == key.encode():
                expired.set_result(None)
                return

    listener = asyncio.create_task(listen())
    try:
        yield expired
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await pubsub.aclose()
        await client.aclose()


def everything_in(url: str) -> dict[bytes, bytes]:
    """Every key in the Redis at `url` with all it holds, whatever its type, as bytes: for
    scanning what is at rest (a pseudonym must not be, once its owner is gone)."""
    out: dict[bytes, bytes] = {}
    with redis.Redis.from_url(url) as client:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                parts = [client.get(key) or b""]
            elif kind == "hash":
                parts = [b for pair in client.hgetall(key).items() for b in pair]
            elif kind == "stream":
                parts = [b for _id, fields in client.xrange(key) for pair in fields.items() for b in pair]
            elif kind == "set":
                parts = list(client.smembers(key))
            elif kind == "list":
                parts = client.lrange(key, 0, -1)
            elif kind == "zset":
                parts = client.zrange(key, 0, -1)
            else:
                raise AssertionError(f"a key of an unexpected type: {key!r} is a {kind}")
            out[key] = b"\0".join(parts)
    return out
