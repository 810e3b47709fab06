"""Real kernel networking for the network tests: namespaces, veth pairs, bridges, nftables.

Everything lives in network namespaces this process creates, named ``lknet-<pid>-<n>-<role>``,
with addresses of its own (10.77.0.0/24 for the "public" side, 192.168.77+ for homes): no
namespace has a route to the host's interfaces, and no veth has an end in the host's
namespace. `Lab.close` kills every process it started (by pid) and deletes its namespaces,
which takes their veths, bridges and nftables rules with them. `sweep_leftovers` removes the
namespaces of runs whose process is gone (a test run that was killed).

`unavailable()` says why namespaces cannot be made here (not root, no `ip`, `nft`), or None.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

PREFIX = "lknet"
PUBLIC_NET = "10.77.0"  # the "internet" of a test: a bridge in the public namespace
SERVER_ADDRESS = f"{PUBLIC_NET}.1"
TURN_ADDRESS = f"{PUBLIC_NET}.2"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-")


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH (iproute2, nftables)"
    try:
        probe = f"{PREFIX}-{os.getpid()}-probe"
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", probe], check=True, capture_output=True, timeout=10)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    return None


def run(*args: str, input: str | None = None) -> str:
    """Run a command; raise with its stderr when it fails."""
    done = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    out = run("ip", "netns", "list")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids_in(ns: str) -> list[int]:
    try:
        out = run("ip", "netns", "pids", ns)
    except RuntimeError:
        return []
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_and_delete(ns: str) -> None:
    # The processes in our namespaces are ours (members, servers, coturn, delay lines).
    for pid in pids_in(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(RuntimeError):
        run("ip", "netns", "del", ns)


def sweep_leftovers() -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone; return their names."""
    swept = []
    for ns in namespaces():
        match = _NAME.match(ns)
        if match and not _alive(int(match.group(1))):
            _kill_and_delete(ns)
            swept.append(ns)
    return swept


def sweep_own() -> list[str]:
    """Delete whatever namespaces of this process are left (a Lab that could not close)."""
    own = [ns for ns in namespaces() if ns.startswith(f"{PREFIX}-{os.getpid()}-")]
    for ns in own:
        _kill_and_delete(ns)
    return own


_counter = 0


@dataclass
class Lab:
    """The namespaces of one test, deleted by `close` (also when the test failed)."""

    names: list[str] = field(default_factory=list)

    def netns(self, role: str) -> str:
        global _counter
        _counter += 1
        name = f"{PREFIX}-{os.getpid()}-{_counter}-{role}"
        run("ip", "netns", "add", name)
        self.names.append(name)
        self.ip(name, "link set lo up")
        # No IPv6: nothing but our IPv4 addresses for ICE to gather or to talk over.
        self.sh(name, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        return name

    def ip(self, ns: str, *commands: str) -> None:
        """Run `ip` commands (batch syntax, one per argument) inside `ns`."""
        run("ip", "-n", ns, "-batch", "-", input="\n".join(commands) + "\n")

    def sh(self, ns: str, command: str) -> str:
        return run("ip", "netns", "exec", ns, *command.split())

    def nft(self, ns: str, ruleset: str) -> None:
        run("ip", "netns", "exec", ns, "nft", "-f", "-", input=ruleset)

    def nft_json(self, ns: str) -> str:
        return run("ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset")

    def veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        """A veth pair with one end in each namespace (never in the host's)."""
        self.ip(ns_a, f"link add name {name_a} type veth peer name {name_b} netns {ns_b}")

    def close(self) -> None:
        for ns in reversed(self.names):
            _kill_and_delete(ns)
        self.names.clear()


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.close()


# --- offloads -------------------------------------------------------------------------------

SIOCETHTOOL = 0x8946
# legacy ethtool commands (linux/ethtool.h): set tx checksumming, scatter-gather, TSO, GSO, GRO
_OFFLOADS = {"tx-checksum": 0x17, "sg": 0x19, "tso": 0x1F, "gso": 0x24, "gro": 0x2C}


def offloads_off(interface: str) -> None:
    """Turn off checksum and segmentation offloads on `interface` (in this process's
    namespace), as `ethtool -K <if> tx off sg off tso off gso off gro off` would: a frame
    that crosses a userspace delay line must be complete, with a checksum and at most
    one MTU long. Without ethtool installed: SIOCETHTOOL by hand."""
    import array
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for command in _OFFLOADS.values():
            value = array.array("B", struct.pack("II", command, 0))
            request = struct.pack("16sP", interface.encode(), value.buffer_info()[0])
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, request)


if __name__ == "__main__":  # python -m tests.net.netlab offloads-off IF… (inside a namespace)
    import sys

    if sys.argv[1:2] == ["offloads-off"]:
        for name in sys.argv[2:]:
            offloads_off(name)
