"""A browser sent to the wrong process follows `redirect` to the circle's home (DESIGN §8): two
processes on one Redis behind Caddy, one public URL for both and a path of its own for each
(`/p/K`), so the home accepts the page's Origin and the page's CSP lets it connect."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from testkit.ports import free_port
from testkit.redis_server import RedisServer
from tests import live
from tests.deploy.stack import CADDY, Child, caddy_said
from tests.e2e.conftest import NewPage
from tests.e2e.helpers import fill_join, my_id, screen

pytestmark = pytest.mark.e2e

CADDYFILE = """{{
	admin off
	auto_https off
}}
http://127.0.0.1:{port} {{
	bind 127.0.0.1
	handle_path /p/1/* {{
		reverse_proxy 127.0.0.1:{first}
	}}
	handle_path /p/2/* {{
		reverse_proxy 127.0.0.1:{second}
	}}
	handle {{
		reverse_proxy 127.0.0.1:{first}
	}}
}}
"""


@contextlib.asynccontextmanager
async def caddy(home: Path, port: int, first: str, second: str) -> AsyncIterator[None]:
    config = home / "Caddyfile"
    config.write_text(CADDYFILE.format(port=port, first=first.rsplit(":", 1)[1],
                                       second=second.rsplit(":", 1)[1]))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
           "XDG_CONFIG_HOME": str(home / "config")}
    child = await Child.start("caddy", [str(CADDY), "run", "--config", str(config), "--adapter", "caddyfile"],
                              env, home)
    try:
        await child.said(caddy_said("serving initial configuration"), "configuration served")
        yield
    finally:
        await child.stop()


async def test_a_browser_follows_a_redirect_to_the_home_on_the_same_origin(new_page: NewPage,
                                                                            tmp_path: Path) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    with RedisServer() as redis:
        async with live.live_server(redis.url, public_url=public, process_url=public + "/p/1") as entry, \
                live.live_server(redis.url, public_url=public, process_url=public + "/p/2") as home, \
                caddy(tmp_path, port, entry.url, home.url):
            circle = await entry.create_circle(title="Lingkar Dua Rumah")
            assert circle["links"]["member"].startswith(public + "/c/")
            # The moderator's socket makes `home` the circle's home (it holds the lease).
            moderator = await live.join(home, circle["links"]["moderator"], "Pendamping")
            page = await new_page()
            sockets: list[str] = []
            received: list[dict[str, Any]] = []

            def on_socket(ws: Any) -> None:
                sockets.append(ws.url)
                ws.on("framereceived", lambda payload: received.append(
                    msgpack.unpackb(payload) if isinstance(payload, bytes) else {"text": payload}))

            page.on("websocket", on_socket)
            await fill_join(page, circle["links"]["member"], "Melati")  # through the proxy, to `entry`
            await page.click("button#join")
            try:
                await screen(page, "room")
            except Exception:
                raise AssertionError(f"not in the room: sockets {sockets}, frames {received}") from None
            member_id = await my_id(page)
            await moderator.event("member_joined")
            ws_public = public.replace("http:", "ws:")
            assert sockets[0] == f"{ws_public}/ws?c={circle['id']}"
            assert {"type": "redirect", "url": public + "/p/2/ws"} in received
            assert sockets[-1] == f"{ws_public}/p/2/ws"
            runtime = home.parts.circles.runtime(circle["id"])
            assert runtime is not None and member_id in runtime.sessions
            assert entry.parts.circles.sessions() == []
            await moderator.close()
