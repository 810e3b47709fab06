"""Settings from environment variables (DESIGN §10) and the browser ``Origin`` check (§5).

:func:`load_settings` turns ``LINGKAR_*`` variables (and CLI overrides) into a frozen
:class:`Settings`, or raises :class:`ConfigError` whose message is one line naming the
variable, fit to print instead of a traceback. Secret values are never echoed.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import msgspec

BUILTIN_HELPLINES: Final = Path(__file__).with_name("helplines.json")
MIN_SECRET_BYTES: Final = 32
MIN_API_KEY_CHARS: Final = 24
MIN_TURN_SECRET_CHARS: Final = 16
MIN_MEDIA_PORT: Final = 1024
DEFAULT_TRUSTED_PROXIES: Final = ("127.0.0.1", "::1")
LOG_LEVELS: Final = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_ICE_SCHEMES: Final = ("stun:", "stuns:", "turn:", "turns:")
_HOST_PATTERN: Final = re.compile(r"^[A-Za-z0-9._\-]+$|^\[?[0-9A-Fa-f:.]+\]?$")

# Setting name (as a CLI override) → environment variable.
ENV_NAMES: Final = {
    "host": "LINGKAR_HOST",
    "port": "LINGKAR_PORT",
    "store": "LINGKAR_STORE",
    "secret": "LINGKAR_SECRET",
    "api_key": "LINGKAR_API_KEY",
    "public_url": "LINGKAR_PUBLIC_URL",
    "process_url": "LINGKAR_PROCESS_URL",
    "ice_servers": "LINGKAR_ICE_SERVERS",
    "helplines": "LINGKAR_HELPLINES",
    "exit_url": "LINGKAR_EXIT_URL",
    "log_level": "LINGKAR_LOG_LEVEL",
    "slots": "LINGKAR_SLOTS",
    "grace_seconds": "LINGKAR_GRACE_SECONDS",
    "max_per_address": "LINGKAR_MAX_CONNECTIONS_PER_ADDRESS",
    "lease_ms": "LINGKAR_LEASE_MS",
    "trusted_proxies": "LINGKAR_TRUSTED_PROXIES",
    "turn_urls": "LINGKAR_TURN_URLS",
    "turn_secret": "LINGKAR_TURN_SECRET",
    "turn_ttl": "LINGKAR_TURN_TTL",
    "media_gc_interval": "LINGKAR_MEDIA_GC_INTERVAL",
    "media_native": "LINGKAR_MEDIA_NATIVE",
    "media_address": "LINGKAR_MEDIA_ADDRESS",
    "media_ports": "LINGKAR_MEDIA_PORTS",
}


class ConfigError(Exception):
    """A setting has a wrong value; ``str()`` is one line naming the variable."""


class Localized(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A text in both languages of the web client."""

    id: str
    en: str


class Helpline(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One safety resource shown in the room's help panel (F13).

    ``source`` is the URL of the organisation's own (or an official government) page that
    confirms the contact, ``checked`` the ISO date it was checked against that page. Every
    built-in line carries both; a deployment's own LINGKAR_HELPLINES file may omit them."""

    name: str
    contact: str
    description: Localized
    hours: str | None = None
    note: Localized | None = None
    source: str | None = None
    checked: str | None = None


class IceServer(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """An ``RTCIceServer`` as the browser and aiortc take it."""

    urls: str | list[str]
    username: str | None = None
    credential: str | None = None

    @property
    def url_list(self) -> list[str]:
        return [self.urls] if isinstance(self.urls, str) else list(self.urls)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    store: str = "memory"
    """``memory``, a ``redis://``/``rediss://`` URL, or ``redis-cluster://host:port`` (any node)."""
    secret: str = ""
    secret_generated: bool = False
    api_key: str = ""
    api_key_generated: bool = False
    """True when the key was generated at start, so the CLI must print it."""
    public_url: str = "http://127.0.0.1:8000"
    """Scheme, host, port and optional path prefix; no trailing slash. The deployment's one
    public URL: pages, links and the ``Origin`` check, the same for every process."""
    process_url: str = ""
    """This process's own URL (DESIGN §8), what a ``redirect`` to it names (its ``/ws`` under
    it): behind a proxy, e.g. ``https://circle.example.org/p/2``; "": the public URL."""
    ice_servers: tuple[IceServer, ...] = ()
    helplines: tuple[Helpline, ...] = ()
    exit_url: str = "/bye"
    log_level: str = "INFO"
    slots: int = 3
    grace_seconds: int = 30
    max_per_address: int = 32
    """Open WebSockets allowed from one address, an IPv6 /64 counted as one (0: no cap)."""
    lease_ms: int = 3000
    """TTL of a circle's lease on its home process (DESIGN §8), renewed every third of it."""
    trusted_proxies: tuple[str, ...] = DEFAULT_TRUSTED_PROXIES
    """Addresses and networks whose ``X-Forwarded-For`` is believed (the client's address
    for the per-address limits); everyone else's is ignored."""
    turn_urls: tuple[str, ...] = ()
    """``turn:``/``turns:`` URLs of a coturn with ``use-auth-secret`` (none: no TURN)."""
    turn_secret: str = ""
    """coturn's ``static-auth-secret``: each member's credentials are minted with it."""
    turn_ttl: int = 4 * 3600
    """How long minted TURN credentials are valid, in seconds (fresh ones on every resume)."""
    media_gc_interval: float | None = 10.0
    """Seconds between the relay's full collections after connections close at least
    (server.media.gcpace); None (``off``): never."""
    media_native: bool = True
    """The relay's compiled fan-out (server.media.native), ``on`` where it builds, or ``off``:
    its Python path. Read by server.media.native when it is imported; checked here so that
    a wrong value stops the start."""
    media_address: str | None = None
    """The one address the media relay announces (the public one of a host behind 1:1 NAT);
    None: the addresses of this host's interfaces."""
    media_ports: tuple[int, int] | None = None
    """(low, high), both included: the UDP ports every media socket is bound in (None: any)."""

    @property
    def uses_redis(self) -> bool:
        return self.store != "memory"


def load_settings(env: Mapping[str, str], overrides: Mapping[str, object] | None = None) -> Settings:
    """Read the settings from ``env`` (``LINGKAR_*``); ``overrides`` (CLI flags, keyed by
    setting name, ``None`` meaning "not given") win over the environment."""
    values = {name: env[var] for name, var in ENV_NAMES.items() if var in env}
    for name, value in (overrides or {}).items():
        if name not in ENV_NAMES:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = str(value)

    host = _host(values.get("host", "127.0.0.1"))
    port = _int(values, "port", 8000, 1, 65535)
    store = _store(values.get("store", "memory"))
    secret, secret_generated = _secret(values.get("secret"), store)
    api_key, api_key_generated = _api_key(values.get("api_key"))
    default_public = f"http://{_url_host(host)}:{port}"
    return Settings(
        host=host,
        port=port,
        store=store,
        secret=secret,
        secret_generated=secret_generated,
        api_key=api_key,
        api_key_generated=api_key_generated,
        public_url=(public_url := _public_url(values.get("public_url", default_public))),
        process_url=_public_url(values["process_url"], "LINGKAR_PROCESS_URL")
        if values.get("process_url") else public_url,
        ice_servers=_ice_servers(values.get("ice_servers", "[]")),
        helplines=_helplines(values.get("helplines")),
        exit_url=_exit_url(values.get("exit_url", "/bye")),
        log_level=_log_level(values.get("log_level", "INFO")),
        slots=_int(values, "slots", 3, 1, 8),
        grace_seconds=_int(values, "grace_seconds", 30, 0, 600),
        max_per_address=_int(values, "max_per_address", 32, 0, 1_000_000),
        lease_ms=_int(values, "lease_ms", 3000, 300, 60_000),
        trusted_proxies=_trusted_proxies(values.get("trusted_proxies")),
        **_turn(values),
        media_gc_interval=_gc_interval(values.get("media_gc_interval", "10")),
        media_native=_on_off(values.get("media_native", "on"), "LINGKAR_MEDIA_NATIVE"),
        media_address=_media_address(values.get("media_address")),
        media_ports=_media_ports(values.get("media_ports")),
    )


def origin_allowed(settings: Settings, origin: str | None) -> bool:
    """May a WebSocket upgrade with this ``Origin`` header proceed? (DESIGN §5)

    No header (not a browser) is allowed: the join token authorises. Otherwise scheme,
    host and port must match the public URL's; when the public host is a loopback name,
    ``localhost``, ``127.0.0.1`` and ``[::1]`` are interchangeable.
    """
    if origin is None:
        return True
    theirs, ours = _origin_parts(origin), _origin_parts(settings.public_url)
    if theirs is None or ours is None:
        return False
    (scheme, host, port), (our_scheme, our_host, our_port) = theirs, ours
    if scheme != our_scheme or port != our_port:
        return False
    return host == our_host or (host in LOOPBACK_HOSTS and our_host in LOOPBACK_HOSTS)


def _origin_parts(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    return scheme, host.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def _shown(value: str) -> str:
    """A value quoted safely for a one-line message."""
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _int(values: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = values.get(name)
    if raw is None:
        return default
    try:
        number = int(raw.strip())
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ConfigError(f"{ENV_NAMES[name]} must be an integer from {low} to {high}, got {_shown(raw)}")
    return number


def _host(raw: str) -> str:
    host = raw.strip()
    if not _HOST_PATTERN.match(host):
        raise ConfigError(f"LINGKAR_HOST must be a host name or IP address, got {_shown(raw)}")
    return host.strip("[]")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _store(raw: str) -> str:
    store = raw.strip()
    if store == "memory":
        return store
    problem = "LINGKAR_STORE must be 'memory', redis://host:port/db or redis-cluster://host:port"
    try:
        parts = urlsplit(store)
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError:
        raise ConfigError(problem) from None
    if parts.scheme not in ("redis", "rediss", "redis-cluster") or not parts.hostname:
        raise ConfigError(problem)
    if parts.scheme == "redis-cluster":  # any node of a Redis Cluster (DESIGN §8)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{problem} (a cluster has no database number nor options)")
        return store
    if parts.path not in ("", "/") and not re.fullmatch(r"/\d{1,5}", parts.path):
        raise ConfigError(f"{problem} (the database is a number)")
    if parts.fragment:
        raise ConfigError(problem)
    return store


def _secret(raw: str | None, store: str) -> tuple[str, bool]:
    if raw is None:
        if store != "memory":
            raise ConfigError("LINGKAR_SECRET is required with a Redis store (every process must share it)")
        return secrets.token_urlsafe(32), True
    if len(raw.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"LINGKAR_SECRET must be at least {MIN_SECRET_BYTES} bytes")
    return raw, False


def _api_key(raw: str | None) -> tuple[str, bool]:
    if raw is None:
        return secrets.token_urlsafe(24), True
    if not raw or raw != raw.strip() or any(not char.isprintable() or char.isspace() for char in raw):
        raise ConfigError("LINGKAR_API_KEY must be printable text without spaces")
    if len(raw) < MIN_API_KEY_CHARS:
        raise ConfigError(f"LINGKAR_API_KEY must be at least {MIN_API_KEY_CHARS} characters "
                          "(python3 -c 'import secrets; print(secrets.token_urlsafe(24))' makes one)")
    return raw, False


def _turn(values: Mapping[str, str]) -> dict[str, object]:
    urls = tuple(url.strip() for url in values.get("turn_urls", "").split(",") if url.strip())
    secret = values.get("turn_secret", "")
    ttl = _int(values, "turn_ttl", 4 * 3600, 60, 7 * 24 * 3600)
    if any(not url.startswith(("turn:", "turns:")) or any(c.isspace() for c in url) for url in urls):
        raise ConfigError("LINGKAR_TURN_URLS must be a comma-separated list of turn: or turns: URLs")
    if urls and len(secret) < MIN_TURN_SECRET_CHARS:
        raise ConfigError(f"LINGKAR_TURN_SECRET (coturn's static-auth-secret, at least "
                          f"{MIN_TURN_SECRET_CHARS} characters) is required with LINGKAR_TURN_URLS")
    if secret and not urls:
        raise ConfigError("LINGKAR_TURN_SECRET is set but LINGKAR_TURN_URLS is not")
    return {"turn_urls": urls, "turn_secret": secret, "turn_ttl": ttl}


def _media_address(raw: str | None) -> str | None:
    if raw is None or not raw.strip():
        return None
    try:
        address = ipaddress.ip_address(raw.strip())
    except ValueError:
        address = None
    if (address is None or address.is_unspecified or address.is_multicast or address.is_link_local
            or getattr(address, "scope_id", None)):
        raise ConfigError("LINGKAR_MEDIA_ADDRESS must be the IP address clients reach the media at "
                          f"(the public one of a host behind 1:1 NAT), got {_shown(raw)}")
    return str(address)


def _media_ports(raw: str | None) -> tuple[int, int] | None:
    if raw is None or not raw.strip():
        return None
    match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", raw, re.ASCII)
    low, high = (int(match[1]), int(match[2])) if match else (0, -1)
    if not MIN_MEDIA_PORT <= low <= high <= 65535:
        raise ConfigError(f"LINGKAR_MEDIA_PORTS must be a UDP port range low-high within {MIN_MEDIA_PORT}-65535 "
                          f"(e.g. 40000-40999), got {_shown(raw)}")
    return low, high


def _on_off(raw: str, variable: str) -> bool:
    if raw.strip() not in ("on", "off"):
        raise ConfigError(f"{variable} must be 'on' or 'off', got {_shown(raw)}")
    return raw.strip() == "on"


def _gc_interval(raw: str) -> float | None:
    if raw.strip() == "off":
        return None
    try:
        seconds = float(raw.strip())
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise ConfigError(f"LINGKAR_MEDIA_GC_INTERVAL must be seconds from 0 to 3600 or 'off', got {_shown(raw)}")
    return seconds


def _trusted_proxies(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return DEFAULT_TRUSTED_PROXIES
    entries = tuple(entry.strip() for entry in raw.split(",") if entry.strip())
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError("LINGKAR_TRUSTED_PROXIES must be a comma-separated list of IP "
                              f"addresses or networks (CIDR), got {_shown(entry)}") from None
    return entries


def _public_url(raw: str, name: str = "LINGKAR_PUBLIC_URL") -> str:
    url = raw.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError:
        raise ConfigError(f"{name} has a bad port: {_shown(raw)}") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(
            f"{name} must be an http(s) URL like https://host[:port][/path], got {_shown(raw)}"
        )
    return url


def _ice_servers(raw: str) -> tuple[IceServer, ...]:
    try:
        servers = msgspec.json.decode(raw, type=list[IceServer])
    except msgspec.DecodeError as exc:
        raise ConfigError(
            f"LINGKAR_ICE_SERVERS must be a JSON list of RTCIceServer: {_one_line(exc)}"
        ) from None
    for server in servers:
        urls = server.url_list
        if not urls or any(not url.startswith(_ICE_SCHEMES) for url in urls):
            raise ConfigError("LINGKAR_ICE_SERVERS: every url must start with stun:, stuns:, turn: or turns:")
        # These go to every visitor of /client-config: a credential there makes the TURN
        # server an open relay. TURN credentials are minted per member (DESIGN §7, §10).
        if any(url.startswith(("turn:", "turns:")) for url in urls):
            raise ConfigError("LINGKAR_ICE_SERVERS is for STUN only: configure TURN with "
                              "LINGKAR_TURN_URLS and LINGKAR_TURN_SECRET")
        if server.username is not None or server.credential is not None:
            raise ConfigError("LINGKAR_ICE_SERVERS must carry no username or credential (it is public)")
    return tuple(servers)


def _helplines(raw: str | None) -> tuple[Helpline, ...]:
    path = BUILTIN_HELPLINES if raw is None else Path(raw.strip())
    try:
        helplines = msgspec.json.decode(path.read_bytes(), type=list[Helpline])
    except OSError as exc:
        raise ConfigError(f"LINGKAR_HELPLINES: cannot read {str(path)!r}: {exc.strerror}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(
            f"LINGKAR_HELPLINES: {str(path)!r} is not a list of help lines: {_one_line(exc)}"
        ) from None
    if not helplines:
        raise ConfigError(f"LINGKAR_HELPLINES: {str(path)!r} lists no help lines")
    return tuple(helplines)


def _exit_url(raw: str) -> str:
    url = raw.strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    local = url.startswith("/") and not url.startswith("//") and parts is not None and not parts.scheme
    remote = parts is not None and parts.scheme in _DEFAULT_PORTS and bool(parts.netloc)
    if not (local or remote) or any(char.isspace() for char in url):
        raise ConfigError(f"LINGKAR_EXIT_URL must be a path like /bye or an http(s) URL, got {_shown(raw)}")
    return url


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"LINGKAR_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {_shown(raw)}")
    return level


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]
