"""HTTP routes for the web client: pages, static files, the msgpack codec and /client-config.

Only the web client's own files are served: `web/` under /static and the one npm package the
client imports (`@msgpack/msgpack`) under /vendor — never the rest of node_modules.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Some systems' mime tables lack .mjs; with nosniff a wrong type would stop the module loading.
mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("application/json", ".json")
mimetypes.add_type("image/svg+xml", ".svg")

MSGPACK_PACKAGE = Path("node_modules") / "@msgpack" / "msgpack"

# page path -> file in web/
PAGES: Mapping[str, str] = {
    "/": "index.html",
    "/organizer": "organizer.html",
    "/c/{circle}": "circle.html",
    "/help": "help.html",
}
EXIT_PAGE = "bye.html"


def content_security_policy(request: Request, extra_connect_src: Sequence[str] = ()) -> str:
    """Self-only policy; WebSocket to this same host (older browsers do not map 'self' to ws:).

    `extra_connect_src` lists other origins the client may be redirected to (DESIGN §8), e.g.
    `wss://node2.example.org`.
    """
    host = request.headers.get("host", "")
    # A page served over https (directly, or as a trusted proxy says) never speaks plain ws.
    schemes = ("wss",) if request.url.scheme == "https" else ("ws", "wss")
    ws_sources = "".join(f" {scheme}://{host}" for scheme in schemes) if host and _is_plain_host(host) else ""
    ws_sources += "".join(f" {src}" for src in extra_connect_src)
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self'{ws_sources}; media-src 'self' blob:; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


def _is_plain_host(host: str) -> bool:
    # A Host header goes into a header value: refuse anything but host[:port] characters.
    return all(c.isalnum() or c in ".-:[]" for c in host)


def security_headers(request: Request, extra_connect_src: Sequence[str] = ()) -> dict[str, str]:
    return {
        "Content-Security-Policy": content_security_policy(request, extra_connect_src),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Permissions-Policy": "microphone=(self), camera=(self), geolocation=(), payment=()",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


def _page_headers(request: Request, extra_connect_src: Sequence[str] = ()) -> dict[str, str]:
    return {**security_headers(request, extra_connect_src), "Cache-Control": "no-store"}


class _WebFiles(StaticFiles):
    """web/ as static files, limited to the client's own folders (never node_modules, package.json)."""

    ALLOWED_TOP = frozenset({"css", "js", "i18n", "icon.svg"})

    async def get_response(self, path: str, scope: Scope) -> Response:
        top = Path(path).parts[0] if Path(path).parts else ""
        if top not in self.ALLOWED_TOP:
            return Response("Not Found", status_code=404, media_type="text/plain")
        return await super().get_response(path, scope)


class _WithHeaders:
    """Wraps an ASGI app (StaticFiles) and adds headers to every HTTP response it starts."""

    def __init__(self, app: ASGIApp, cache_control: str) -> None:
        self.app = app
        self.cache_control = cache_control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = security_headers(Request(scope))
        extra["Cache-Control"] = self.cache_control

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def page_routes(
    web_dir: Path,
    client_config: Callable[[], dict[str, Any]],
    *,
    extra_connect_src: Sequence[str] = (),
) -> list[BaseRoute]:
    """Routes for the pages, /static, /vendor/@msgpack/msgpack, /client-config and /bye.

    `client_config()` returns `{"ice_servers", "helplines", "exit_url", "slots"}`; it is called per
    request so TURN credentials can be time-limited. `extra_connect_src`: WebSocket origins of other
    processes a `redirect` may send the client to (the pages' CSP must allow them).
    """
    web_dir = Path(web_dir).resolve()
    extra = tuple(extra_connect_src)
    for src in extra:
        if not _is_plain_host(src.replace("wss://", "").replace("ws://", "")):
            raise ValueError(f"not a WebSocket origin: {src!r}")

    def page(filename: str) -> Callable[[Request], Any]:
        path = web_dir / filename

        async def endpoint(request: Request) -> Response:
            return FileResponse(
                path, media_type="text/html; charset=utf-8", headers=_page_headers(request, extra)
            )

        return endpoint

    async def exit_page(request: Request) -> Response:
        headers = _page_headers(request, extra)
        headers["Clear-Site-Data"] = '"cache", "cookies", "storage"'
        return FileResponse(web_dir / EXIT_PAGE, media_type="text/html; charset=utf-8", headers=headers)

    async def config(request: Request) -> Response:
        return JSONResponse(client_config(), headers=_page_headers(request))

    async def favicon(request: Request) -> Response:
        headers = {**security_headers(request), "Cache-Control": "public, max-age=86400"}
        return FileResponse(web_dir / "icon.svg", media_type="image/svg+xml", headers=headers)

    routes: list[BaseRoute] = [Route(p, page(f), methods=["GET", "HEAD"]) for p, f in PAGES.items()]
    routes += [
        Route("/bye", exit_page, methods=["GET", "HEAD"]),
        Route("/client-config", config, methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET", "HEAD"]),
        Mount(
            "/static",
            app=_WithHeaders(_WebFiles(directory=web_dir, check_dir=False), "no-cache"),
            name="static",
        ),
        Mount(
            "/vendor/@msgpack/msgpack",
            app=_WithHeaders(
                StaticFiles(directory=web_dir / MSGPACK_PACKAGE, check_dir=False), "public, max-age=3600"
            ),
            name="vendor-msgpack",
        ),
    ]
    return routes
