"""`lingkar cluster`: several `lingkar serve` behind Caddy on one Redis, on one machine (DESIGN §8).

`lingkar cluster [-n N] [--port 8000] [--data-dir .cluster]` (what `make cluster` runs) starts,
in this order, as children of its own:

- `redis-server` on a free loopback port with AOF (appendonly yes, appendfsync everysec), its
  files in DATA/redis: circles outlive a restart of the whole cluster;
- N `lingkar serve` on free loopback ports, each with LINGKAR_STORE naming that Redis, the same
  LINGKAR_SECRET and LINGKAR_API_KEY (from the environment, or generated once and kept in
  DATA/keys.json, mode 0600, so links stay valid across restarts), the deployment's one
  LINGKAR_PUBLIC_URL (http://127.0.0.1:PORT) and its own LINGKAR_PROCESS_URL (that + /p/K);
- Caddy on 127.0.0.1:PORT with deploy/cluster/Caddyfile (its routing is described there).

Once every process answers /readyz through its own path on the proxy it prints the web address
and the organizer link. SIGINT (Ctrl-C) or SIGTERM stops everything: the processes with SIGTERM
(they drain), then Caddy, then Redis; so does a child that fails to start (one line on stderr,
exit status 1), or Redis or Caddy dying. A `lingkar serve` that dies is reported; the proxy
routes around it and the next rolling restart starts it again. The children run in sessions of
their own (a Ctrl-C in the terminal reaches the supervisor only, which stops them in order) and
get SIGTERM from the kernel should the supervisor itself die.

`lingkar cluster restart` (`make cluster-restart`) restarts the processes one by one, printing
progress: SIGTERM one, wait for it to exit, start it again, wait until its /readyz answers 200
through its own path on the proxy, then the next. It asks the supervisor through DATA/control.sock;
SIGHUP to the pid in DATA/supervisor.pid does the same (progress in the supervisor's output).

`lingkar cluster --print-caddyfile [--hosts h1:port,h2:port,…]` prints the Caddyfile for those
hosts (the checked-in one for three loopback processes is exactly that for 127.0.0.1:8001-8003).
DATA/cluster.json says what runs where (pids, ports, URLs) while the supervisor runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from server.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
CADDYFILE = ROOT / "deploy" / "cluster" / "Caddyfile"
DEFAULT_DATA = ROOT / ".cluster"
HOST = "127.0.0.1"
REDIS_DEFAULT_PORT = 6379  # never ours: a developer's own Redis may live there
READY_SECONDS = 60.0  # a child that is not ready by then failed to start
STOP_SECONDS = 15.0  # SIGTERM, then SIGKILL after this long (a process drains in about 2-7 s)
SETTLE_SECONDS = 2.0
"""After a restarted process is ready: the Caddyfile's `fail_duration` (a process marked down
while it was away is back in the hashing ring by then; its active check takes 1 s)."""
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
_BANNERS = ("Lingkar is running at", "Organizer page:", "Organizer link")
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


class StartError(Exception):
    """A child did not start; `str()` is one line."""


# ---- the Caddyfile ---------------------------------------------------------------------------

def default_hosts(n: int) -> list[str]:
    return [f"{HOST}:{8000 + k}" for k in range(1, n + 1)]


def caddyfile(hosts: Sequence[str], template: str | None = None) -> str:
    """deploy/cluster/Caddyfile with its `processes:` regions written for `hosts` (process K is
    hosts[K-1]), each address an environment placeholder whose default is that host."""
    for host in hosts:
        if not _HOST_PORT.match(host):
            raise ValueError(f"not a host:port: {host!r}")
    text = CADDYFILE.read_text() if template is None else template
    out: list[str] = []
    region: str | None = None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if region is not None:
            if stripped == "# end of processes":
                out.append(line)
                region = None
            continue
        out.append(line)
        if stripped.startswith("# processes:"):
            region = line[: len(line) - len(line.lstrip("\t"))]
            out.extend(_pool(region, hosts) if "every process once" in stripped else _routes(region, hosts))
    if region is not None:
        raise ValueError("a `# processes:` region of the Caddyfile has no `# end of processes`")
    return "".join(out)


def _placeholder(k: int, host: str) -> str:
    return f"{{$LINGKAR_PROCESS_{k}:{host}}}"


def _pool(indent: str, hosts: Sequence[str]) -> list[str]:
    return [indent + "to " + " ".join(_placeholder(k, h) for k, h in enumerate(hosts, 1)) + "\n"]


def _routes(indent: str, hosts: Sequence[str]) -> list[str]:
    lines = []
    for k, host in enumerate(hosts, 1):
        lines += [f"{indent}handle_path /p/{k}/* {{\n",
                  f"{indent}\treverse_proxy {_placeholder(k, host)}\n",
                  f"{indent}}}\n"]
    return lines


# ---- small helpers ---------------------------------------------------------------------------

def free_port() -> int:
    """A loopback TCP port that nothing held a moment ago (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port != REDIS_DEFAULT_PORT:
            return port


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Caddy's listener does
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def describe(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
    return f"status {returncode}"


def last_words(lines: Sequence[str]) -> str:
    """A child's last line, for a one-line error (Caddy's JSON logs: their message and error)."""
    for line in reversed(lines):
        text = line.strip()
        if not text:
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(text)
            if isinstance(entry, dict) and "msg" in entry:
                return ": ".join(str(entry[k]) for k in ("msg", "error") if k in entry)
        return text
    return "(no output)"


async def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status of `GET path` at 127.0.0.1:port, or None when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
        status = (await asyncio.wait_for(reader.readline(), timeout)).split()
        return int(status[1]) if len(status) >= 2 and status[1].isdigit() else None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by its owner only (0600)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_keys(data: Path, env: dict[str, str]) -> tuple[str, str, bool]:
    """(secret, organizer key, whether the key is a generated one rather than configured).
    LINGKAR_SECRET and LINGKAR_API_KEY from the environment win; what is missing is generated
    once and kept in DATA/keys.json (0600), so a restart keeps links and the key valid."""
    path = data / "keys.json"
    stored: dict[str, str] = {}
    if path.exists():
        try:
            stored = dict(json.loads(path.read_text()))
        except (ValueError, TypeError):
            raise StartError(f"{path} is not the JSON this command writes; move it away") from None
    before = dict(stored)
    if "LINGKAR_SECRET" not in env:
        stored.setdefault("secret", secrets.token_urlsafe(32))
    if "LINGKAR_API_KEY" not in env:
        stored.setdefault("api_key", secrets.token_urlsafe(24))
    if stored != before:
        write_private(path, json.dumps(stored, indent=2) + "\n")
    elif path.exists():
        os.chmod(path, 0o600)
    secret = env.get("LINGKAR_SECRET", stored.get("secret", ""))
    key = env.get("LINGKAR_API_KEY", stored.get("api_key", ""))
    return secret, key, "LINGKAR_API_KEY" not in env


def _child_setup(parent: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: SIGTERM from the kernel when the supervisor
    dies (whatever kills it), so nothing is left behind."""
    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before the line above
            os._exit(1)

    return setup


# ---- one child -------------------------------------------------------------------------------

class Child:
    """A child process: started and restarted with the same command, its output forwarded
    line by line with a prefix, the last lines kept for an error message."""

    def __init__(self, name: str, label: str, argv: list[str], env: dict[str, str], cwd: Path,
                 ready_line: str | None = None) -> None:
        self.name = name
        self.label = label
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.ready_line = ready_line
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: deque[str] = deque(maxlen=20)
        self.said_ready = asyncio.Event()
        self.expected_exit = False  # a stop we asked for
        self.starting = False  # its exit is reported by whoever waits for it to be ready
        self._reader: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self, on_exit: Callable[[Child], None]) -> None:
        self.expected_exit = False
        self.starting = True
        self.said_ready = asyncio.Event()
        self.tail.clear()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, limit=1 << 20,
            start_new_session=True, preexec_fn=_child_setup(os.getpid()))
        self._reader = asyncio.create_task(self._read(self.proc))
        self._watch = asyncio.create_task(self._watch_exit(self.proc, on_exit))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line longer than the limit: skip what is buffered
                continue
            if not raw:
                return
            text = raw.decode(errors="replace").rstrip()
            self.tail.append(text)
            if self.ready_line is not None and self.ready_line in text:
                self.said_ready.set()
            if not text.startswith(_BANNERS):  # the supervisor prints the deployment's own
                print(f"{self.label} | {text}", flush=True)

    async def _watch_exit(self, proc: asyncio.subprocess.Process, on_exit: Callable[[Child], None]) -> None:
        await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if not self.expected_exit and not self.starting:
            on_exit(self)

    async def until_ready(self, check: Callable[[], Awaitable[bool]] | None = None,
                          timeout: float = READY_SECONDS) -> None:
        """Until its ready line (or `check()` is true, tried every 0.1 s); StartError when it
        exits first or takes longer than `timeout`."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            while True:
                if check is None:
                    waiter = asyncio.ensure_future(self.said_ready.wait())
                    await asyncio.wait({exited, waiter}, timeout=max(0.0, deadline - loop.time()),
                                       return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    ready = self.said_ready.is_set()
                else:
                    ready = await check()
                if exited.done():
                    if self._reader is not None:
                        await asyncio.gather(self._reader, return_exceptions=True)
                    raise StartError(f"{self.name} exited ({describe(self.proc.returncode)}) before it was "
                                     f"ready: {last_words(self.tail)}")
                if ready:
                    self.starting = False
                    return
                if loop.time() >= deadline:
                    raise StartError(f"{self.name} was not ready within {timeout:.0f} s: {last_words(self.tail)}")
                if check is not None:
                    await asyncio.wait({exited}, timeout=0.1)
        finally:
            exited.cancel()

    async def stop(self, grace: float = STOP_SECONDS) -> None:
        """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
        proc = self.proc
        if proc is None:
            return
        self.expected_exit = True
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                print(f"{self.name} did not stop within {grace:.0f} s; killing it", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await asyncio.gather(*(t for t in (self._reader, self._watch) if t is not None), return_exceptions=True)


# ---- the supervisor --------------------------------------------------------------------------

class Supervisor:
    def __init__(self, n: int, port: int, data: Path, env: dict[str, str], store: str | None = None) -> None:
        self.n = n
        self.store = store  # a store of the operator's (e.g. a Redis Cluster): no Redis of ours
        self.port = port
        self.data = data
        self.env = env
        self.public_url = env.get("LINGKAR_PUBLIC_URL", f"http://{HOST}:{port}").strip().rstrip("/")
        self.redis: Child | None = None
        self.redis_url = ""
        self.caddy: Child | None = None
        self.processes: list[Child] = []
        self.code = 0
        self.stopping = asyncio.Event()
        self.running = False
        self.restarting: asyncio.Task[bool] | None = None
        self.control: asyncio.AbstractServer | None = None
        self.key_generated = False
        self.api_key = ""

    # -- files in the data directory --

    @property
    def pid_file(self) -> Path:
        return self.data / "supervisor.pid"

    @property
    def state_file(self) -> Path:
        return self.data / "cluster.json"

    @property
    def control_path(self) -> Path:
        return self.data / "control.sock"

    def write_state(self) -> None:
        redis = self.redis
        state = {
            "supervisor": os.getpid(),
            "public_url": self.public_url,
            "port": self.port,
            "redis": {"pid": redis.pid if redis and redis.running else None, "url": self.redis_url},
            "caddy": {"pid": self.caddy.pid if self.caddy and self.caddy.running else None},
            "processes": {str(k): {"pid": p.pid if p.running else None, "port": int(p.env["LINGKAR_PORT"]),
                                   "url": p.env["LINGKAR_PROCESS_URL"]}
                          for k, p in enumerate(self.processes, 1)},
        }
        write_private(self.state_file, json.dumps(state, indent=2) + "\n")

    def claim_data_dir(self) -> None:
        self.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.pid_file.exists():
            try:
                pid = int(self.pid_file.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (ValueError, OSError):
                pid, cmdline = 0, b""
            if pid and pid != os.getpid() and b"cluster" in cmdline:
                raise StartError(f"a cluster is already running from {self.data} (pid {pid})")
        self.pid_file.write_text(f"{os.getpid()}\n")

    def release_data_dir(self) -> None:
        for path in (self.pid_file, self.state_file, self.control_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- children --

    def build(self) -> None:
        if self.store is not None:
            self.redis_url = redis_url = self.store
        else:
            redis_port = free_port()
            self.redis_url = redis_url = f"redis://{HOST}:{redis_port}/0"
            redis_dir = self.data / "redis"
            redis_dir.mkdir(mode=0o700, exist_ok=True)
            redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
            self.redis = Child("redis-server", "redis", [
                redis_server, "--bind", HOST, "--port", str(redis_port), "--protected-mode", "yes",
                "--dir", str(redis_dir), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--logfile", "", "--daemonize", "no"],
                {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, self.data,
                ready_line="Ready to accept connections")

        secret, self.api_key, self.key_generated = load_keys(self.data, self.env)
        lingkar = Path(sys.executable).with_name("lingkar")
        serve = [str(lingkar), "serve"] if lingkar.exists() else [sys.executable, "-m", "server.cli", "serve"]
        base = dict(self.env)
        for k in range(1, self.n + 1):
            port = free_port()
            env = {**base, "LINGKAR_HOST": HOST, "LINGKAR_PORT": str(port), "LINGKAR_STORE": redis_url,
                   "LINGKAR_SECRET": secret, "LINGKAR_API_KEY": self.api_key,
                   "LINGKAR_PUBLIC_URL": self.public_url, "LINGKAR_PROCESS_URL": f"{self.public_url}/p/{k}"}
            self.processes.append(Child(f"process {k}", f"p{k}", serve, env, ROOT))
        try:  # a wrong setting stops here, in one line, before anything starts
            load_settings(self.processes[0].env)
        except ConfigError as err:
            raise StartError(str(err)) from None

        hosts = [f"{HOST}:{p.env['LINGKAR_PORT']}" for p in self.processes]
        config = CADDYFILE
        if len(hosts) != 3:  # the checked-in file is written for three; the same for N
            config = self.data / "Caddyfile"
            config.write_text(caddyfile(hosts))
        home = self.data / "caddy"  # nothing of Caddy's (autosave.json, its data) in a real home
        caddy_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                     "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
                     "LINGKAR_SITE": f"http://:{self.port}", "LINGKAR_CADDY_BIND": HOST,
                     "LINGKAR_CADDY_ADMIN": "off",
                     **{f"LINGKAR_PROCESS_{k}": h for k, h in enumerate(hosts, 1)}}
        self.caddy = Child("caddy", "caddy", [caddy_binary(), "run", "--config", str(config),
                                              "--adapter", "caddyfile"], caddy_env, self.data,
                           ready_line='"msg":"serving initial configuration"')

    def on_exit(self, child: Child) -> None:
        """A child exited that we did not stop (and not while it was starting)."""
        returncode = child.proc.returncode if child.proc else None
        if child in self.processes:
            print(f"{child.name} exited ({describe(returncode)}); the proxy routes its circles to the "
                  f"others; `lingkar cluster restart` starts it again", flush=True)
            with contextlib.suppress(OSError):
                self.write_state()
            return
        if not self.stopping.is_set():
            print(f"lingkar cluster: {child.name} exited ({describe(returncode)}): "
                  f"{last_words(child.tail)}; stopping", file=sys.stderr, flush=True)
            self.code = 1
            self.stopping.set()

    def readyz_through_proxy(self, k: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return await http_status(self.port, f"/p/{k}/readyz") == 200
        return check

    def readyz_direct(self, child: Child) -> Callable[[], Awaitable[bool]]:
        port = int(child.env["LINGKAR_PORT"])

        async def check() -> bool:
            return await http_status(port, "/readyz") == 200
        return check

    async def start_all(self) -> None:
        assert self.caddy is not None
        if self.redis is not None:
            await self.redis.start(self.on_exit)
            await self.redis.until_ready()
        for p in self.processes:
            await p.start(self.on_exit)
        await asyncio.gather(*(p.until_ready(self.readyz_direct(p)) for p in self.processes))
        # Caddy last: its first health checks find every process up.
        await self.caddy.start(self.on_exit)
        await self.caddy.until_ready()
        for k, p in enumerate(self.processes, 1):
            p.starting = True
            await p.until_ready(self.readyz_through_proxy(k))
        self.write_state()
        self.control = await asyncio.start_unix_server(self._control, path=str(self.control_path))
        os.chmod(self.control_path, 0o600)
        self.running = True

    async def stop_all(self) -> None:
        if self.restarting is not None:
            self.restarting.cancel()
            await asyncio.gather(self.restarting, return_exceptions=True)
        if self.control is not None:
            self.control.close()
        await asyncio.gather(*(p.stop() for p in self.processes))  # they drain: SIGTERM
        for child in (self.caddy, self.redis):  # then the proxy, then the store (AOF fsynced)
            if child is not None:
                await child.stop()

    def banner(self) -> list[str]:
        store = (f"Redis with AOF in {self.data / 'redis'}" if self.redis is not None
                 else "the store given with --store")
        lines = [f"Lingkar is running at {self.public_url}/ ({self.n} processes behind Caddy; {store})"]
        if self.key_generated:
            lines.append(f"Organizer link (its key was generated once and is kept in {self.data / 'keys.json'}): "
                         f"{self.public_url}/organizer#key={self.api_key}")
        else:
            lines.append(f"Organizer page: {self.public_url}/organizer (the key is LINGKAR_API_KEY)")
        lines.append("Rolling restart: `make cluster-restart` (lingkar cluster restart). Stop: Ctrl-C.")
        return lines

    # -- the rolling restart --

    async def rolling_restart(self, say: Callable[[str], None], *, only_dead: bool = False) -> bool:
        """Every process in turn (`restart`), or only those that are not running (`revive`:
        the healthy ones, and their circles, are left alone)."""
        if only_dead:
            dead = [k for k, p in enumerate(self.processes, 1) if not p.running]
            say(f"starting the processes that are not running: {', '.join(map(str, dead)) or 'none'}")
        else:
            say(f"rolling restart of {self.n} processes, one at a time")
        for k, p in enumerate(self.processes, 1):
            if only_dead and p.running:
                continue
            if p.running:
                say(f"process {k}: stopping (pid {p.pid}; it drains)")
                await p.stop()
                say(f"process {k}: stopped ({describe(p.proc.returncode if p.proc else None)})")
            else:
                say(f"process {k}: was not running")
            await p.start(self.on_exit)
            say(f"process {k}: started (pid {p.pid}); waiting for {self.public_url}/p/{k}/readyz")
            try:
                await p.until_ready(self.readyz_through_proxy(k))
            except StartError as err:
                say(f"rolling restart failed: {err}")
                return False
            self.write_state()
            say(f"process {k}: ready")
            if k < self.n and not only_dead:
                await asyncio.sleep(SETTLE_SECONDS)  # back in the proxy's ring before the next stops
        say("revive done" if only_dead else "rolling restart done")
        return True

    def begin_restart(self, say: Callable[[str], None], *, only_dead: bool = False) -> asyncio.Task[bool] | None:
        if not self.running or self.stopping.is_set():
            say("the cluster is not running (yet); no restart")
            return None
        if self.restarting is not None and not self.restarting.done():
            say("a rolling restart is already running")
            return None
        self.restarting = asyncio.create_task(self.rolling_restart(say, only_dead=only_dead))
        return self.restarting

    def on_hup(self) -> None:
        self.begin_restart(lambda line: print(line, flush=True))

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def say(line: str) -> None:
            print(line, flush=True)
            if not writer.is_closing():
                writer.write(line.encode() + b"\n")

        try:
            command = (await asyncio.wait_for(reader.readline(), 5)).strip()
            if command not in (b"restart", b"revive"):
                writer.write(b"unknown command (this socket knows `restart` and `revive`)\n")
                return
            task = self.begin_restart(say, only_dead=command == b"revive")
            if task is not None:
                await asyncio.gather(asyncio.shield(task), return_exceptions=True)
        except (OSError, TimeoutError):
            pass
        finally:
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()

    # -- the whole life --

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            print("stopping: the processes drain, then Caddy and Redis stop", flush=True)
        self.stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.on_hup)
        try:
            self.claim_data_dir()
            try:
                self.build()
                starting = asyncio.ensure_future(self.start_all())
                stop = asyncio.ensure_future(self.stopping.wait())
                await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not starting.done():
                    starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                if starting.cancelled():
                    pass
                elif (exc := starting.exception()) is not None:
                    raise exc
                else:
                    for line in self.banner():
                        print(line, flush=True)
                    await stop
            finally:
                await self.stop_all()
                self.release_data_dir()
        except StartError as err:
            print(f"lingkar cluster: {err}", file=sys.stderr, flush=True)
            return 1
        if self.code == 0:
            print("stopped", flush=True)
        return self.code


def caddy_binary() -> str:
    return os.environ.get("LINGKAR_CADDY") or shutil.which("caddy") or "/usr/bin/caddy"


def restart(data: Path, command: str = "restart") -> int:
    """`lingkar cluster restart` (or `revive`: only the processes that are not running): ask
    the running supervisor and print its progress; 0 once it is done."""
    path = data / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            print(f"lingkar cluster: no cluster is running from {data} (nothing listens on {path})",
                  file=sys.stderr)
            return 1
        s.sendall(command.encode() + b"\n")
        last = ""
        with s.makefile("r", encoding="utf-8", errors="replace") as answers:
            for line in answers:
                print(line, end="", flush=True)
                last = line.strip()
    return 0 if last in ("rolling restart done", "revive done") else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lingkar cluster",
        description="Several `lingkar serve` behind Caddy on one Redis, on this machine (DESIGN §8).")
    p.add_argument("action", nargs="?", choices=("run", "restart", "revive"), default="run",
                   help="run the cluster (default); restart the running one's processes one by one; "
                        "or revive: start only those that are not running (after a crash)")
    p.add_argument("-n", "--processes", type=int, default=3, help="how many `lingkar serve` (3)")
    p.add_argument("--port", type=int, default=8000, help="the port Caddy serves on 127.0.0.1 (8000)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                   help="Redis's AOF, the generated keys, the pid file (.cluster in the repository)")
    p.add_argument("--store", help="a store of your own for every process (redis://…, rediss://… or "
                   "redis-cluster://host:port) instead of the Redis with AOF started here")
    p.add_argument("--print-caddyfile", action="store_true",
                   help="print the Caddyfile for --hosts (or N loopback ones) and exit")
    p.add_argument("--hosts", help="h1:port,h2:port,…: the processes' addresses, for --print-caddyfile")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.print_caddyfile:
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts else default_hosts(args.processes)
        try:
            sys.stdout.write(caddyfile(hosts))
        except ValueError as err:
            print(f"lingkar cluster: {err}", file=sys.stderr)
            return 2
        return 0
    if args.hosts:
        parser.error("--hosts goes with --print-caddyfile")
    data = args.data_dir.resolve()
    if args.action in ("restart", "revive"):
        return restart(data, args.action)
    if not 1 <= args.processes <= 64:
        parser.error("-n must be between 1 and 64")
    if not 1 <= args.port <= 65535:
        parser.error("--port must be between 1 and 65535")
    needed = [("caddy", caddy_binary())]
    if args.store is None:
        needed.append(("redis-server", shutil.which("redis-server") or "/usr/bin/redis-server"))
    elif not args.store.startswith(("redis://", "rediss://", "redis-cluster://")):
        parser.error("--store must be a redis://, rediss:// or redis-cluster:// URL (processes share it)")
    missing = [name for name, path in needed if not os.access(path, os.X_OK)]
    if missing:
        print(f"lingkar cluster: {' and '.join(missing)} not found (`make system` installs the Debian packages)",
              file=sys.stderr)
        return 1
    if not port_is_free(args.port):
        print(f"lingkar cluster: port {args.port} on {HOST} is in use (--port picks another)", file=sys.stderr)
        return 1
    if len(str(data / "control.sock")) > 100:
        print(f"lingkar cluster: the data directory's path is too long for its control socket: {data}",
              file=sys.stderr)
        return 2
    env: dict[str, Any] = dict(os.environ)
    return asyncio.run(Supervisor(args.processes, args.port, data, env, args.store).run())


if __name__ == "__main__":
    sys.exit(main())
