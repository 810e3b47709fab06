"""deploy/Caddyfile as an operator runs it, on loopback: Caddy with `tls internal` in front of
`lingkar serve`, both as child processes whose output is read line by line as it comes, so a
test awaits what they say (a ready line) instead of sleeping, and stops both at the end."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from testkit.ports import free_port
from tests.live import API_KEY, SECRET

ROOT = Path(__file__).resolve().parents[2]
CADDYFILE = ROOT / "deploy" / "Caddyfile"
CADDY = Path(os.environ.get("LINGKAR_CADDY", "/usr/bin/caddy"))
HOST = "127.0.0.1"


@dataclass
class Child:
    """A child process; `lines` is everything it wrote (stdout and stderr together) so far."""

    name: str
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _new: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> Child:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        child = cls(name, proc)
        child._reader = asyncio.create_task(child._read())  # also keeps the pipe from filling
        return child

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            async with self._new:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._new.notify_all()
        await self.proc.wait()
        async with self._new:
            self._new.notify_all()

    async def said(self, match: Callable[[str], bool], what: str, timeout: float = 30.0) -> str:
        """The first line that matches, awaited line by line; fails if the process exits first."""
        async def find() -> str:
            async with self._new:
                seen = 0
                while True:
                    for line in self.lines[seen:]:
                        if match(line):
                            return line
                    seen = len(self.lines)
                    if self.proc.returncode is not None:
                        raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before {what}:\n"
                                             + self.output())
                    await self._new.wait()

        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {what} within {timeout} s:\n{self.output()}") from None

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after 15 s."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def caddy_said(msg: str, **fields: str) -> Callable[[str], bool]:
    """Matches one of Caddy's JSON log lines by its message (and fields)."""
    def match(line: str) -> bool:
        try:
            entry = json.loads(line)
        except ValueError:
            return False
        return (isinstance(entry, dict) and entry.get("msg") == msg
                and all(entry.get(k) == v for k, v in fields.items()))

    return match


@dataclass
class Stack:
    url: str
    """The public URL: https://127.0.0.1:<Caddy's port>."""
    http_url: str
    """Caddy's plain HTTP listener, which only redirects."""
    lingkar: Child
    caddy: Child
    ca_dir: Path
    """Caddy's local CA (root.crt, intermediate.crt) in the test's own data directory."""

    @property
    def ws_url(self) -> str:
        return self.url.replace("https://", "wss://") + "/ws"

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies Caddy's certificate for real: against its root, name checked."""
        return ssl.create_default_context(cafile=str(self.ca_dir / "root.crt"))

    def intermediate_spki(self) -> str:
        """base64(SHA-256(SubjectPublicKeyInfo)) of the CA that signs Caddy's certificate,
        for Chromium's --ignore-certificate-errors-spki-list."""
        cert = x509.load_pem_x509_certificate((self.ca_dir / "intermediate.crt").read_bytes())
        der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(hashlib.sha256(der).digest()).decode()


@contextlib.asynccontextmanager
async def caddy_in_front(home: Path, **lingkar_env: str) -> AsyncIterator[Stack]:
    """`lingkar serve` on a free loopback port and Caddy (deploy/Caddyfile, `tls internal`) in
    front of it on another; Caddy's data, config and home under `home` (a directory). Both are stopped at
    the end, also when the body fails (their output is then in the failure)."""
    https_port, http_port, lingkar_port = free_port(), free_port(), free_port()
    url = f"https://{HOST}:{https_port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("LINGKAR_")}
    caddy_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # Nothing of Caddy's (its CA, certificates, autosave.json, ~/.step) lands in a real home.
        "HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
        "LINGKAR_DOMAIN": f"{HOST}:{https_port}",
        "LINGKAR_TLS": "internal",
        "LINGKAR_UPSTREAM": f"{HOST}:{lingkar_port}",
        "LINGKAR_CADDY_BIND": HOST,
        "LINGKAR_CADDY_HTTP_PORT": str(http_port),
        "LINGKAR_CADDY_ADMIN": "off",
    }
    server_env = {
        **base,
        "LINGKAR_HOST": HOST, "LINGKAR_PORT": str(lingkar_port), "LINGKAR_PUBLIC_URL": url,
        "LINGKAR_SECRET": SECRET, "LINGKAR_API_KEY": API_KEY, **lingkar_env,
    }
    children: list[Child] = []
    try:
        lingkar = await Child.start("lingkar serve", [sys.executable, "-m", "server.cli", "serve"],
                                    server_env, ROOT)
        children.append(lingkar)
        caddy = await Child.start("caddy", [str(CADDY), "run", "--config", str(CADDYFILE),
                                            "--adapter", "caddyfile"], caddy_env, home)
        children.append(caddy)
        await lingkar.said(lambda line: "Uvicorn running on" in line, "ready line")
        await caddy.said(caddy_said("serving initial configuration"), "configuration served")
        await caddy.said(caddy_said("certificate obtained successfully", identifier=HOST),
                         "certificate from its internal CA")
        stack = Stack(url, f"http://{HOST}:{http_port}", lingkar, caddy,
                      home / "data" / "caddy" / "pki" / "authorities" / "local")
        try:
            yield stack
        except BaseException:
            for child in children:
                print(f"--- {child.name} ---\n{child.output()}")
            raise
    finally:
        for child in reversed(children):
            await child.stop()
