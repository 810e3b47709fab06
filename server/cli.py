"""`lingkar serve`, `lingkar loadtest` and `lingkar cluster`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from server.config import ConfigError, Settings, load_settings
from server.gctune import tune_gc


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--host")
    p.add_argument("--port")
    p.add_argument("--store", help="memory, or redis://host:port/db")


def banner(settings: Settings) -> list[str]:
    """What `lingkar serve` prints at start. A key generated for this run is shown once, in
    the organizer link; a configured key never is (it would land in journald or a
    container's log): its holder knows it already."""
    lines = [f"Lingkar is running at {settings.public_url}/"]
    if settings.api_key_generated:
        lines.append(f"Organizer link (its key is generated for this run): "
                     f"{settings.public_url}/organizer#key={settings.api_key}")
    else:
        lines.append(f"Organizer page: {settings.public_url}/organizer (the key is LINGKAR_API_KEY)")
    return lines


class _Server:
    """uvicorn with a drain step before it stops: sockets get 1001 first (F18)."""

    @staticmethod
    def run(settings: Settings) -> None:
        import uvicorn

        from server import compiled, logs

        signaling_path = compiled.activate()  # before the app imports the rules and the session
        from server.app import build_app, drain

        log_config = logs.setup(settings.log_level)
        logging.getLogger("lingkar.serve").info("signaling path: %s", signaling_path)
        app = build_app(settings)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=log_config,
                                access_log=False, ws="websockets-sansio", ws_max_size=64 * 1024,
                                ws_per_message_deflate=False, lifespan="on",
                                timeout_graceful_shutdown=5, server_header=False,
                                proxy_headers=False)  # the app believes X-Forwarded-For (build_app)

        class Server(uvicorn.Server):
            """The first SIGTERM/SIGINT drains (members sent to another process, DESIGN §8)
            and then stops; uvicorn would close every WebSocket with 1012 first. A second
            signal stops at once."""

            draining: asyncio.Task[None] | None = None

            def handle_exit(self, sig: int, frame: Any) -> None:
                if self.draining is not None:
                    super().handle_exit(sig, frame)
                    return
                self.draining = asyncio.get_event_loop().create_task(drain(app.state.parts))
                self.draining.add_done_callback(lambda _: super(Server, self).handle_exit(sig, frame))

        server = Server(config)
        tune_gc()
        for line in banner(settings):
            print(line, flush=True)
        server.run()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadtest"]:  # its own flags, passed through untouched
        from loadtest.main import main as loadtest_main

        return loadtest_main(argv[1:])
    if argv[:1] == ["cluster"]:  # its own flags too; the supervisor loads only when it runs
        from server.cluster import main as cluster_main

        return cluster_main(argv[1:])
    parser = argparse.ArgumentParser(prog="lingkar", description="Lingkar: moderated peer-support circles")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    sub.add_parser("loadtest", help="drive many circles and measure latency (lingkar loadtest -h)")
    sub.add_parser("cluster", help="several `serve` behind Caddy on one Redis (lingkar cluster -h)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(os.environ, {"host": args.host, "port": args.port, "store": args.store})
    except ConfigError as err:
        print(f"lingkar: {err}", file=sys.stderr)
        return 2
    _Server.run(settings)
    return 0



if __name__ == "__main__":
    sys.exit(main())
