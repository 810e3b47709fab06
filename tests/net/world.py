"""A small internet of network namespaces for the network tests, and the processes in it.

    member (home ns) ─veth─ [delay line ns] ─veth─ router ns (nftables NAT, loss, UDP drop)
                                                        │ wan 10.77.0.1x
    direct member ns 10.77.0.1xx ──┐                    │
    coturn ns 10.77.0.2 ───────────┴── br0 10.77.0.1 ───┘   public ns: the Lingkar server

The public side is a bridge in the public namespace with nothing but our veths on it: no
namespace has a route anywhere else, so no packet can leave for the host's networks.
Homes are 192.168.77.0/24, 192.168.78.0/24, … behind their router's masquerade.

Every process (server, coturn, delay line, members) runs inside a namespace through
``ip netns exec`` and is awaited on its own output (a log line, a JSON reply); `World.close`
stops them all by pid and deletes the namespaces, also when a test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit.procs import cpu_seconds

from . import netlab
from .netlab import PUBLIC_NET, SERVER_ADDRESS, TURN_ADDRESS, Lab

ROOT = Path(__file__).resolve().parents[2]
PORT = 8000
SERVER_URL = f"http://{SERVER_ADDRESS}:{PORT}"
API_KEY = "net-test-organizer-key-0123456789"
SECRET = "net-test-signing-secret-0123456789abcdef-0123"
TURN_SECRET = "net-test-turn-secret-0123456789"
TURN_URL = f"turn:{TURN_ADDRESS}:3478?transport=tcp"
PYTHON = sys.executable


class ProcessFailed(AssertionError):
    pass


class Proc:
    """A process inside a namespace; every line it prints is kept (and logged to a file)
    and can be awaited."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []
        self.on_line: Callable[[str], None] | None = None

    async def start(self, ns: str, argv: list[str], env: dict[str, str] | None = None,
                    *, stdin: bool = False, stdout_lines: bool = True) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, *argv, cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=1 << 22)
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [asyncio.create_task(self._read(self.process.stdout, stdout_lines)),
                         asyncio.create_task(self._read(self.process.stderr, True))]

    async def _read(self, stream: asyncio.StreamReader, keep: bool) -> None:
        with self.log.open("a") as log:
            while line := await stream.readline():
                text = line.decode(errors="replace").rstrip("\n")
                log.write(text + "\n")
                log.flush()
                if self.on_line is not None:
                    self.on_line(text)
                if keep:
                    self.lines.append(text)
                self._changed.set()
        self._changed.set()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exited(self) -> bool:
        return self.process is None or self.process.returncode is not None or all(
            r.done() for r in self._readers)

    async def line(self, match: Callable[[str], bool], limit: float = 30.0, start: int = 0) -> str:
        """The first line from line `start` on that `match`es; fails if the process exits first."""
        async with asyncio.timeout(limit):
            seen = start
            while True:
                for text in self.lines[seen:]:
                    if match(text):
                        return text
                seen = len(self.lines)
                if self.exited():
                    raise ProcessFailed(f"{self.name} exited before a matching line; see {self.log}")
                self._changed.clear()
                await self._changed.wait()

    async def stop(self, grace: float = 5.0) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for reader in self._readers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(reader, grace)

    def cpu_seconds(self) -> float:
        """utime + stime of the process in seconds (/proc/<pid>/stat)."""
        return cpu_seconds(self.pid)


class Member:
    """A member's phone (tests/net/agent.py) inside its namespace, driven over JSON lines."""

    def __init__(self, name: str, ns: str, proc: Proc) -> None:
        self.name = name
        self.ns = ns
        self.proc = proc
        self.member_id = ""
        self.source = name
        self.last_media: dict[str, Any] = {}  # what the last `media` call returned
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.ready = asyncio.get_running_loop().create_future()
        proc.on_line = self._on_line

    def _on_line(self, text: str) -> None:
        if not text.startswith("{"):
            return
        try:
            message = json.loads(text)
        except ValueError:
            return
        if message.get("ready") and not self.ready.done():
            self.ready.set_result(None)
        future = self._pending.pop(message.get("id", -1), None)
        if future is not None and not future.done():
            if "error" in message:
                future.set_exception(AssertionError(f"{self.name}: {message['error']}"))
            else:
                future.set_result(message["ok"])

    async def call(self, op: str, limit: float = 60.0, **fields: Any) -> Any:
        process = self.proc.process
        assert process is not None and process.stdin is not None
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        process.stdin.write((json.dumps({"id": rid, "op": op, **fields}) + "\n").encode())
        await process.stdin.drain()
        exited = asyncio.ensure_future(process.wait())
        try:
            async with asyncio.timeout(limit):
                done, _ = await asyncio.wait({future, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if future not in done:
            raise ProcessFailed(f"{self.name} exited during {op}; see {self.proc.log}")
        return future.result()

    # -- the usual calls ---------------------------------------------------------------

    async def join(self, link: str, listen_only: bool = False) -> dict[str, Any]:
        first: dict[str, Any] = await self.call("join", link=link, name=self.name, listen_only=listen_only)
        self.member_id = first["member_id"]
        return first

    async def media(self) -> dict[str, Any]:
        info: dict[str, Any] = await self.call("media")
        self.source = info["source"]
        self.last_media = info
        return info

    async def ack(self, type_: str, **fields: Any) -> dict[str, Any]:
        answer: dict[str, Any] = await self.call("cmd", type=type_, **fields)
        assert answer["type"] == "ack", answer
        return answer

    async def heard(self, source: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("heard", source=source)
        return result

    async def wait_heard(self, source: str, n: int, limit: float = 30.0) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("wait_heard", limit=limit + 10, source=source, n=n,
                                                 within=limit)
        return result

    async def exit(self) -> None:
        process = self.proc.process
        if process is None or process.returncode is not None or process.stdin is None:
            return
        with contextlib.suppress(Exception):
            process.stdin.write(b'{"op": "exit"}\n')
            await process.stdin.drain()
            await asyncio.wait_for(process.wait(), 8)


@dataclass
class Router:
    ns: str
    wan: str  # its address on the public side
    index: int
    wired: bool = False  # its one LAN port is taken


@dataclass
class Home:
    """A member's namespace and its uplinks (one per router it can reach; one is up)."""

    ns: str
    uplinks: list[tuple[str, str, str]] = field(default_factory=list)  # (interface, address/24, gateway)
    current: int | None = None


class Net:
    """The topology (synchronous `ip`/`nft` calls on a Lab)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.public = lab.netns("public")
        lab.ip(self.public, "link add name br0 type bridge",
               f"addr add {SERVER_ADDRESS}/24 dev br0", "link set dev br0 up")
        self._ports = itertools.count(1)
        self._routers = itertools.count(1)
        self._directs = itertools.count(101)
        self.cloud_router: Router | None = None

    def attach(self, ns: str, interface: str, address: str) -> None:
        """Plug `ns` into the public bridge with `address`."""
        port = f"p{next(self._ports)}"
        self.lab.veth(ns, interface, self.public, port)
        self.lab.ip(self.public, f"link set dev {port} master br0", f"link set dev {port} up")
        self.lab.ip(ns, f"addr add {address}/24 dev {interface}", f"link set dev {interface} up")

    def direct(self, role: str) -> str:
        """A namespace on the public side itself (no NAT), e.g. the moderator's."""
        ns = self.lab.netns(role)
        self.attach(ns, "eth0", f"{PUBLIC_NET}.{next(self._directs)}")
        return ns

    def turn(self) -> str:
        ns = self.lab.netns("turn")
        self.attach(ns, "eth0", TURN_ADDRESS)
        return ns

    def router(self, *, loss_percent: int = 0, drop_udp: bool = False) -> Router:
        """A home router: masquerade NAT from its LANs to the public side, optionally
        dropping `loss_percent` % of the packets it forwards (nft numgen) or all UDP."""
        index = next(self._routers)
        ns = self.lab.netns(f"router{index}")
        wan = f"{PUBLIC_NET}.{10 + index}"
        self.attach(ns, "wan", wan)
        self.lab.sh(ns, "sysctl -qw net.ipv4.ip_forward=1")
        impair = ""
        if drop_udp:
            impair += "        meta l4proto udp counter name udp_dropped drop\n"
        if loss_percent:
            impair += f"        numgen random mod 100 < {loss_percent} counter name lost drop\n"
        self.lab.nft(ns, f"""
table inet lk_filter {{
    counter udp_dropped {{}}
    counter lost {{}}
    counter udp_out {{}}
    counter udp_in {{}}
    counter udp_natted {{}}
    chain forward {{
        type filter hook forward priority filter; policy accept;
{impair}        oifname "wan" meta l4proto udp counter name udp_out
        iifname "wan" meta l4proto udp counter name udp_in
    }}
    chain after_nat {{
        type filter hook postrouting priority srcnat + 100; policy accept;
        oifname "wan" ip saddr {wan} meta l4proto udp counter name udp_natted
    }}
}}
table ip lk_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }}
}}
""")
        return Router(ns, wan, index)

    def counters(self, router: Router) -> dict[str, int]:
        """The router's nft counters: udp_out/udp_in (UDP it forwarded through the NAT),
        udp_natted (UDP that left with the router's address as its source: translated),
        lost (dropped by the loss rule), udp_dropped (dropped by the UDP rule)."""
        ruleset = json.loads(self.lab.nft_json(router.ns))
        return {item["counter"]["name"]: int(item["counter"]["packets"])
                for item in ruleset["nftables"] if "counter" in item}

    def cloud(self, public: str, *, media_ports: tuple[int, int], private: str = "192.168.100.10") -> str:
        """A server's host behind 1:1 NAT, as on most clouds: a namespace with only the
        private address `private`, behind a router that maps `public` (on the public side)
        to it both ways and lets in nothing but TCP 8000 and UDP `media_ports` (a stateful
        firewall: replies to what the host sent pass). Returns the host's namespace; the
        router's nft counters (`counters`) say what came in: `media_in` (UDP to the range),
        `refused` (anything else, dropped)."""
        gateway = private.rsplit(".", 1)[0] + ".1"
        router_ns = self.lab.netns("cloud-nat")
        host_ns = self.lab.netns("cloud-host")
        self.attach(router_ns, "wan", public)
        self.lab.veth(router_ns, "lan", host_ns, "eth0")
        self.lab.ip(router_ns, f"addr add {gateway}/24 dev lan", "link set dev lan up")
        self.lab.ip(host_ns, f"addr add {private}/24 dev eth0", "link set dev eth0 up",
                    f"route add default via {gateway}")
        self.lab.sh(router_ns, "sysctl -qw net.ipv4.ip_forward=1")
        low, high = media_ports
        self.lab.nft(router_ns, f"""
table inet lk_filter {{
    counter media_in {{}}
    counter refused {{}}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        iifname "wan" udp dport {low}-{high} counter name media_in
        ct state established,related accept
        iifname "lan" accept
        iifname "wan" tcp dport {PORT} accept
        iifname "wan" udp dport {low}-{high} accept
        counter name refused
    }}
}}
table ip lk_nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "wan" ip daddr {public} dnat to {private}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" ip saddr {private} snat to {public}
    }}
}}
""")
        self.cloud_router = Router(router_ns, public, 0, wired=True)
        return host_ns

    def home(self, role: str) -> Home:
        return Home(self.lab.netns(role))

    def _lan(self, router: Router) -> tuple[str, str]:
        """The router's one LAN port: (home address, gateway) in 192.168.(76 + index).0/24."""
        assert not router.wired, "one home per router"
        router.wired = True
        subnet = f"192.168.{76 + router.index}"
        return f"{subnet}.2", f"{subnet}.1"

    def _router_lan(self, router: Router, gateway: str) -> None:
        self.lab.ip(router.ns, f"addr add {gateway}/24 dev lan", "link set dev lan up")

    def uplink(self, home: Home, router: Router) -> None:
        """A cable from `home` to `router` (left down until `use`)."""
        address, gateway = self._lan(router)
        interface = f"up{len(home.uplinks)}"
        self.lab.veth(home.ns, interface, router.ns, "lan")
        self._router_lan(router, gateway)
        home.uplinks.append((interface, address, gateway))

    def line_uplink(self, home: Home, router: Router, line_ns: str) -> tuple[str, str]:
        """Like `uplink`, through a delay-line namespace (two bare veth ends, `la` towards
        the home and `lb` towards the router); returns those names. Offloads are off on the
        ends that send into it, so every frame it reads is complete (netlab.offloads_off)."""
        address, gateway = self._lan(router)
        interface = f"up{len(home.uplinks)}"
        self.lab.veth(home.ns, interface, line_ns, "la")
        self.lab.veth(line_ns, "lb", router.ns, "lan")
        self.lab.ip(line_ns, "link set dev la up", "link set dev lb up",
                    "link set dev la promisc on", "link set dev lb promisc on")
        self._router_lan(router, gateway)
        for ns, dev in ((home.ns, interface), (router.ns, "lan")):
            netlab.run("ip", "netns", "exec", ns, PYTHON, "-m", "tests.net.netlab", "offloads-off", dev)
        home.uplinks.append((interface, address, gateway))
        return "la", "lb"

    def use(self, home: Home, index: int, *, overlap: bool = False) -> None:
        """Switch the home to uplink `index`: the old interface loses its address and goes
        down (Wi-Fi gone), the new one comes up with its own address and default route, in
        one `ip` batch. `overlap`: the new one is up with its address and the default route
        first, and only then does the old one go (a phone whose mobile data was up all along):
        the host is never without an address."""
        old = home.uplinks[home.current][0] if home.current is not None else None
        interface, address, gateway = home.uplinks[index]
        new = [f"link set dev {interface} up", f"addr add {address}/24 dev {interface}",
               f"route replace default via {gateway} dev {interface}"]
        gone = [f"addr flush dev {old}", f"link set dev {old} down"] if old else []
        if overlap:
            self.lab.ip(home.ns, *new)
            if gone:
                self.lab.ip(home.ns, *gone)
        else:
            self.lab.ip(home.ns, *gone, *new)
        home.current = index


class World:
    """One test's network, its Lingkar server (and coturn), and its members."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.lab = Lab()
        try:
            self.net = Net(self.lab)
        except BaseException:
            self.lab.close()
            raise
        self.procs: list[Proc] = []
        self.members: list[Member] = []
        self.server: Proc | None = None
        self.server_url = SERVER_URL
        self.coturn: Proc | None = None
        self.circle: dict[str, Any] = {}

    def _proc(self, name: str) -> Proc:
        proc = Proc(name, self.logs / f"{name}.log")
        self.procs.append(proc)
        return proc

    async def start_server(self, *, turn: bool = False, ns: str | None = None, host: str = SERVER_ADDRESS,
                           url: str = SERVER_URL, **settings: str) -> Proc:
        """`lingkar serve` on the memory store, in the public namespace unless `ns` is given,
        listening on `host`, reached at `url`; `settings` are more LINGKAR_* variables."""
        self.server_url = url
        env = {"LINGKAR_HOST": host, "LINGKAR_PORT": str(PORT), "LINGKAR_STORE": "memory",
               "LINGKAR_SECRET": SECRET, "LINGKAR_API_KEY": API_KEY, "LINGKAR_PUBLIC_URL": url,
               "LINGKAR_ICE_SERVERS": "[]", "LINGKAR_LOG_LEVEL": "INFO",
               **{f"LINGKAR_{name.upper()}": value for name, value in settings.items()}}
        if turn:
            env |= {"LINGKAR_TURN_URLS": TURN_URL, "LINGKAR_TURN_SECRET": TURN_SECRET,
                    "LINGKAR_TURN_TTL": "3600"}
        server = self._proc("server")
        await server.start(ns or self.net.public, [PYTHON, "-m", "server.cli", "serve"], env)
        await server.line(lambda text: "Uvicorn running on" in text, 60)
        self.server = server
        return server

    async def start_coturn(self) -> Proc:
        ns = self.net.turn()
        conf = self.logs / "turnserver.conf"
        conf.write_text("\n".join([
            f"listening-ip={TURN_ADDRESS}", f"relay-ip={TURN_ADDRESS}", "listening-port=3478",
            "min-port=49152", "max-port=49999", "realm=lingkar.test", "use-auth-secret",
            f"static-auth-secret={TURN_SECRET}", "no-tls", "no-dtls", "no-cli",
            # coturn refuses loopback and multicast peers by default; private ranges are
            # allowed unless denied: say so explicitly for our public side only
            f"allowed-peer-ip={PUBLIC_NET}.0-{PUBLIC_NET}.255", "no-multicast-peers",
            "log-file=stdout", "simple-log", "verbose",
            f"pidfile={self.logs / 'turnserver.pid'}", f"userdb={self.logs / 'turndb'}", ""]))
        coturn = self._proc("coturn")
        # -c: our file only (never /etc/turnserver.conf)
        await coturn.start(ns, ["turnserver", "-c", str(conf)])
        await coturn.line(lambda text: "TCP listener opened on" in text, 30)
        self.coturn = coturn
        return coturn

    async def start_delay_line(self, ns: str, a: str, b: str, delay_ms: float, jitter_ms: float,
                               name: str = "delayline") -> Proc:
        line = self._proc(name)
        await line.start(ns, [PYTHON, "-m", "tests.net.delayline", "--a", a, "--b", b,
                              "--delay", str(delay_ms), "--jitter", str(jitter_ms)], stdin=True)
        await line.line(lambda text: text == "ready", 30)
        return line

    async def line_stats(self, line: Proc) -> dict[str, int]:
        """Frames a delay line forwarded so far, each way."""
        process = line.process
        assert process is not None and process.stdin is not None
        seen = len(line.lines)
        process.stdin.write(b"stats\n")
        await process.stdin.drain()
        text = await line.line(lambda t: t.startswith("{"), 10, start=seen)
        return dict(json.loads(text)["forwarded"])

    async def member(self, name: str, ns: str) -> Member:
        proc = self._proc(f"member-{name}")
        await proc.start(ns, [PYTHON, "-m", "tests.net.agent", "--server", self.server_url],
                         stdin=True, stdout_lines=False)
        member = Member(name, ns, proc)
        self.members.append(member)
        exited = asyncio.ensure_future(proc.process.wait())  # type: ignore[union-attr]
        try:
            async with asyncio.timeout(60):
                done, _ = await asyncio.wait({member.ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if member.ready not in done:
            raise ProcessFailed(f"{name} exited before it was ready; see {proc.log}")
        return member

    async def create_circle(self, organizer: Member, **settings: Any) -> dict[str, Any]:
        body = {"title": "Lingkar Jaringan", "lobby": False, **settings}
        reply = await organizer.call("api", method="POST", path="/api/circles", key=API_KEY, body=body)
        assert reply["status"] == 201, reply
        self.circle = dict(reply["body"])
        return self.circle

    async def moderator(self, ns: str, *, listen_only: bool = False) -> Member:
        """The moderator in `ns`: makes the circle, joins it through the moderator link and
        connects to the media."""
        mod = await self.member("Pendamping", ns)
        await self.create_circle(mod)
        await mod.join(self.link("moderator"), listen_only=listen_only)
        await mod.media()
        return mod

    def link(self, role: str) -> str:
        return str(self.circle["links"][role])

    async def close(self) -> None:
        try:
            await asyncio.gather(*(m.exit() for m in self.members), return_exceptions=True)
            await asyncio.gather(*(p.stop() for p in self.procs), return_exceptions=True)
        finally:
            self.lab.close()
