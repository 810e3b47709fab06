"""The Starlette application: pages, organizer API, `/ws`, operations, and the media relay."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from server import logs, metrics
from server.api import OrganizerApi
from server.circles import Circles
from server.config import Settings
from server.media.candidates import own_address_kinds
from server.media.relay import LevelsCallback, MediaRelay, SlotsCallback
from server.pages import page_routes
from server.placement import Leases
from server.ws import WebSocketEndpoint, WritePath
from signaling.close import CloseCode
from signaling.session import DEFAULT_LIMITS, Limits
from signaling.turn import IceServers
from storage.clock import Clock
from storage.homes import Homes
from storage.layout import events_horizon_ms
from storage.manager import RoomManager
from storage.memory_store import MemoryStore
from storage.redis_cluster import SCHEME as CLUSTER_SCHEME
from storage.redis_cluster import RedisClusterStore
from storage.redis_store import RedisStore
from storage.store import Store, StoreError

log = logging.getLogger("lingkar.app")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


@dataclass
class Parts:
    """What a running app holds; tests reach in here for bookkeeping assertions."""

    settings: Settings
    store: Store
    manager: RoomManager
    relay: MediaRelay
    circles: Circles
    ws: WebSocketEndpoint
    homes: Homes


def make_store(settings: Settings) -> Store:
    keep = events_horizon_ms(settings.grace_seconds)  # privacy at rest (DESIGN §12)
    if settings.store.startswith(CLUSTER_SCHEME):
        return RedisClusterStore(settings.store, keep_events_ms=keep)
    if settings.uses_redis:
        return RedisStore(settings.store, keep_events_ms=keep)
    return MemoryStore(keep_events_ms=keep)


def build_app(settings: Settings, *, store: Store | None = None, clock: Clock | None = None,
              limits: Limits = DEFAULT_LIMITS) -> Starlette:
    logs.keep_addresses_out()
    store = store or make_store(settings)
    manager = RoomManager(store, clock=clock)
    ice = [msgspec.to_builtins(s) for s in settings.ice_servers]
    ice = [{k: v for k, v in s.items() if v is not None} for s in ice]
    # LINGKAR_MEDIA_ADDRESS: a host behind 1:1 NAT counts as public (DESIGN §7, §10)
    kinds = own_address_kinds([settings.media_address]) if settings.media_address else None

    def make_relay(on_slots: SlotsCallback, on_levels: LevelsCallback) -> MediaRelay:
        return MediaRelay(slots=settings.slots, ice_servers=ice, on_slots=on_slots, on_levels=on_levels,
                          address_kinds=kinds, media_address=settings.media_address,
                          media_ports=settings.media_ports,
                          full_collection_interval=settings.media_gc_interval)

    circles = Circles(manager, make_relay)
    relay = circles.relay
    # DESIGN §8: this process's id (unique per start) and own URL go into its leases.
    homes = Homes(store, uuid.uuid4().hex, settings.process_url or settings.public_url, ttl_ms=settings.lease_ms,
                  in_use=circles.in_use, on_takeover=circles.take_over, on_lost=circles.moved,
                  on_handover=circles.hand_over)
    manager.when_deleted(homes.deleted)  # its lease went with it: nothing to renew
    member_ice = IceServers(stun=ice, turn_urls=settings.turn_urls, turn_secret=settings.turn_secret,
                            turn_ttl=settings.turn_ttl)
    ws = WebSocketEndpoint(settings, manager, circles, Leases(homes), limits=limits,
                           max_per_address=settings.max_per_address, ice=member_ice)
    parts = Parts(settings, store, manager, relay, circles, ws, homes)
    api = OrganizerApi(settings, manager)

    def client_config() -> dict[str, Any]:
        return {"ice_servers": ice, "helplines": [msgspec.to_builtins(h) for h in settings.helplines],
                "exit_url": settings.exit_url, "slots": settings.slots}

    async def healthz(request: Request) -> Response:
        if ws.draining:  # a proxy takes this process out of its ring (DESIGN §8)
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await manager.ping()
        except StoreError:
            return JSONResponse({"status": "store unreachable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics_endpoint(request: Request) -> Response:
        # Behind the organizer key (DESIGN §10): counts of a small deployment say when
        # something happens in a circle.
        refused = api.authorized(request)
        if refused is not None:
            return refused
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        path = WritePath.name()
        for name in ("direct", "asgi"):
            metrics.WRITE_PATH.labels(name).set(1 if name == path else 0)
        log.info("WebSocket frames leave by the %s write path", path)
        await homes.start()
        yield
        await drain(parts)
        await homes.close()
        await relay.close()
        await manager.close()
        await store.close()

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *api.routes(),
            WebSocketRoute("/ws", ws.handle),
            *page_routes(WEB_DIR, client_config),
        ],
        lifespan=lifespan,
        # The client's address (the per-address limits) from X-Forwarded-For, when a trusted
        # proxy (LINGKAR_TRUSTED_PROXIES) says so; uvicorn's own copy is off (server.cli).
        middleware=[Middleware(ProxyHeadersMiddleware, trusted_hosts=list(settings.trusted_proxies))],
    )
    app.state.parts = parts
    return app


DRAIN_SECONDS = 2.0  # how long drain waits for the sockets it closed before it releases


def new_home(circle_id: str, peers: Iterable[str]) -> str | None:
    """The live process a draining one sends a circle to: rendezvous hashing over the others'
    URLs, so that each circle goes to one of them and the circles spread over all."""
    return max(peers, key=lambda url: hashlib.sha256(f"{circle_id}|{url}".encode()).digest(),
               default=None)


async def drain(parts: Parts) -> None:
    """Graceful shutdown (DESIGN §8): refuse new sockets; hand each circle to another live
    process — its lease given up, then its members sent there with `redirect` (4300), so they
    resume at once in their seats — or, with no other process, close the sockets with 1001;
    then give up what leases are left so another process takes those circles at once."""
    if parts.ws.draining:
        return
    parts.ws.draining = True
    peers = list(parts.homes.peers.values())
    moved = 0
    for runtime in parts.circles.runtimes():
        url = new_home(runtime.circle_id, peers)
        if url is None:
            runtime.close_sessions(CloseCode.GOING_AWAY, "server restarting")
            continue
        await parts.homes.release(runtime.circle_id)
        runtime.redirect_sessions(url + "/ws")
        moved += 1
    if moved:
        log.info("draining: %d circles sent to %d other processes", moved, len(peers))
    try:
        await asyncio.wait_for(parts.circles.idle.wait(), DRAIN_SECONDS)
    except TimeoutError:
        log.warning("sockets still open after the drain deadline; releasing leases anyway")
    await parts.homes.release_all()
