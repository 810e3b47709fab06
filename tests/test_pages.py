"""server/pages.py: the pages, the web client's files and nothing else, with the headers that keep
a member's visit private (no referrer, no caching of pages, Clear-Site-Data on the exit page)."""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette

from server.pages import page_routes
from testkit.ports import listening_socket

WEB = Path(__file__).resolve().parent.parent / "web"
CONFIG = {"ice_servers": [], "helplines": [], "exit_url": "/bye", "slots": 3}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = Starlette(routes=page_routes(WEB, lambda: CONFIG))
    sock, port = listening_socket()  # connections wait in the backlog: no start-up race
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def get(url: str) -> tuple[int, Any, bytes]:
    try:
        with urllib.request.urlopen(url) as res:
            return res.status, res.headers, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


@pytest.mark.parametrize(
    ("path", "marker"),
    [
        ("/", b"index.p1"),
        ("/organizer", b'id="new-circle"'),
        ("/c/some-circle", b'id="leave-quietly"'),
        ("/help", b'id="helplines"'),
        ("/bye", b"bye.empty"),
    ],
)
def test_each_page_is_served_with_private_headers(base_url: str, path: str, marker: bytes) -> None:
    status, headers, body = get(base_url + path)
    assert status == 200
    assert marker in body
    assert headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Content-Type-Options"] == "nosniff"
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert f"ws://{base_url.removeprefix('http://')}" in csp


def test_exit_page_clears_what_the_site_stored(base_url: str) -> None:
    _, headers, _ = get(base_url + "/bye")
    assert headers["Clear-Site-Data"] == '"cache", "cookies", "storage"'


def test_circle_page_title_is_neutral(base_url: str) -> None:
    _, _, body = get(base_url + "/c/anything")
    assert b"<title>Catatan</title>" in body


def test_client_config_is_the_callables_answer(base_url: str) -> None:
    status, headers, body = get(base_url + "/client-config")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert b'"exit_url":"/bye"' in body


def test_modules_are_served_as_javascript(base_url: str) -> None:
    for path in ("/static/js/circle.js", "/vendor/@msgpack/msgpack/dist.esm/Encoder.mjs"):
        status, headers, _ = get(base_url + path)
        assert status == 200, path
        assert headers["Content-Type"].startswith("text/javascript"), path
        assert headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/static/package.json",
        "/static/node_modules/@msgpack/msgpack/package.json",
        "/vendor/other/x.js",
        "/static/../server/pages.py",
        "/static/%2e%2e/server/pages.py",
    ],
)
def test_only_the_clients_own_files_are_served(base_url: str, path: str) -> None:
    status, _, _ = get(base_url + path)
    assert status == 404


def test_the_join_form_cannot_put_a_name_in_a_url_before_its_script_runs(base_url: str) -> None:
    """Issue 16: a form submitted natively on a slow phone sent GET /c/{id}?pseudonym=…. The page
    as served (before any script) has a form whose method sends nothing ("dialog") and a disabled
    default button (which also stops Enter in the name field), saying "Memuat…"."""
    _, _, body = get(base_url + "/c/anything")
    html = body.decode()
    form = re.search(r'<form id="join-form"[^>]*>', html)
    assert form and 'method="dialog"' in form.group(0) and "action=" not in form.group(0), form
    assert 'aria-busy="true"' in form.group(0)
    button = re.search(r'<button type="submit" id="join"[^>]*>([^<]*)</button>', html)
    assert button and " disabled" in button.group(0), button
    assert button.group(1) == "Memuat…"


def test_a_page_served_over_https_allows_only_wss(base_url: str) -> None:
    # As a trusted proxy (loopback) reports a TLS front end: no plain ws:// in the policy.
    request = urllib.request.Request(base_url + "/c/some-circle", headers={"X-Forwarded-Proto": "https"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        csp = resp.headers["Content-Security-Policy"]
    host = base_url.removeprefix("http://")
    assert f"wss://{host}" in csp and "ws://" not in csp.replace("wss://", "")
