"""HTTPS in front (issue 13): deploy/Caddyfile, run by Debian's caddy with `tls internal`, in
front of `lingkar serve`. A circle is created through the API over https; a moderator and a
member join in Chromium over https and wss; the member gets the floor and the moderator hears
them. The server counts each client by the address Caddy puts in X-Forwarded-For, and its
Origin check holds against the https origin. Everything stays on 127.0.0.1; no ACME.

Chromium trusts Caddy's certificate through --ignore-certificate-errors-spki-list pinned to
the key of this run's freshly made intermediate CA (the one that signs the site certificate and
is sent with it): any other certificate is still refused, unlike --ignore-certificate-errors.
Python's clients verify the certificate for real, against Caddy's root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from playwright.async_api import expect

from tests.deploy.stack import CADDY, Stack, caddy_in_front
from tests.e2e.conftest import ARGS, CHROMIUM, PHONE, SCREENSHOTS
from tests.e2e.helpers import INSTRUMENT, fill_join, hear, my_id, screen, shot
from tests.live import API_KEY

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (`make system` installs it)"),
    pytest.mark.skipif(not CADDY.exists(), reason=f"{CADDY} is missing (`make system` installs Debian's caddy)"),
]

# Per-address socket cap for this test: the two browsers (one address, through Caddy) and three
# sockets from another address already add up to more than this.
CAP = 3

# Bytes of RTP the moderator's PeerConnection received on the receiver that plays `memberId`.
BYTES_RECEIVED = """
async (memberId) => {
  const el = document.querySelector(`audio[data-slot][data-member-id="${CSS.escape(memberId)}"]`);
  const track = el && el.srcObject && el.srcObject.getAudioTracks()[0];
  let bytes = 0;
  for (const pc of window.__pcs) for (const r of pc.getReceivers()) {
    if (r.track !== track) continue;
    (await r.getStats()).forEach((st) => { if (st.type === 'inbound-rtp') bytes += st.bytesReceived; });
  }
  return bytes;
}
"""


async def https_request(stack: Stack, method: str, path: str, body: Any = None,
                        base: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request, certificate verified against Caddy's root; redirects are not followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect,
                                         urllib.request.HTTPSHandler(context=stack.ssl_context()))
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request((base or stack.url) + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {API_KEY}")
    if data is not None:
        req.add_header("Content-Type", "application/json")

    def call() -> tuple[int, dict[str, str], bytes]:
        try:
            with opener.open(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    return await asyncio.to_thread(call)


async def socket_from(stack: Stack, source: str, *, origin: str | None = None,
                      headers: dict[str, str] | None = None) -> websockets.ClientConnection:
    """A WebSocket to /ws through Caddy, from `source` (a loopback address of its own)."""
    return await websockets.connect(
        stack.ws_url, ssl=stack.ssl_context(), local_addr=(source, 0), proxy=None, compression=None,
        origin=origin, additional_headers=headers)


async def refused_status(stack: Stack, source: str, **kwargs: Any) -> int | None:
    """The HTTP status that refused the upgrade, or None when it was accepted."""
    try:
        ws = await socket_from(stack, source, **kwargs)
    except websockets.InvalidStatus as err:
        return err.response.status_code
    await ws.close()
    return None


@contextlib.asynccontextmanager
async def chromium_trusting(stack: Stack) -> AsyncIterator[Any]:
    """Headless Chromium that accepts certificates of this Caddy's CA and of no other."""
    from playwright.async_api import async_playwright

    pin = f"--ignore-certificate-errors-spki-list={stack.intermediate_spki()}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=[*ARGS, pin], headless=True)
        try:
            yield browser
        finally:
            await browser.close()


async def phone(browser: Any) -> Any:
    ctx = await browser.new_context(viewport=PHONE)
    ctx.set_default_timeout(15_000)
    page = await ctx.new_page()
    page.on("pageerror", lambda err: print(f"[pageerror] {err}"))
    await page.add_init_script(INSTRUMENT)
    return page


async def test_a_circle_over_https_behind_caddy(tmp_path: Path) -> None:
    async with (caddy_in_front(tmp_path, LINGKAR_MAX_CONNECTIONS_PER_ADDRESS=str(CAP)) as stack,
                chromium_trusting(stack) as browser):
        await circle_over_https(stack, browser)


async def circle_over_https(stack: Stack, browser: Any) -> None:
    # -- Caddy's own part: HSTS and no Server header on the pages, plain HTTP redirects ------
    status, headers, _ = await https_request(stack, "GET", "/")
    assert status == 200
    assert headers.get("Strict-Transport-Security") == "max-age=31536000"
    assert "Server" not in headers and "Alt-Svc" not in headers, headers
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]  # Lingkar's, through
    status, headers, _ = await https_request(stack, "GET", "/c/abc?x=1", base=stack.http_url)
    assert status == 308 and headers["Location"] == f"{stack.url}/c/abc?x=1"

    # -- the organizer API over https: links name the https origin ---------------------------
    status, _, raw = await https_request(stack, "POST", "/api/circles",
                                         {"title": "Lingkar Aman", "lobby": False})
    assert status == 201, raw
    links = json.loads(raw)["links"]
    assert links["member"].startswith(f"{stack.url}/c/") and "#t=" in links["member"]

    # -- a moderator and a member join in Chromium over https and wss ------------------------
    mod = await phone(browser)
    await fill_join(mod, links["moderator"], "Pendamping Sari")
    assert await mod.evaluate("[location.protocol, isSecureContext]") == ["https:", True]
    await mod.click("button#join")
    await screen(mod, "room")
    member = await phone(browser)
    await fill_join(member, links["member"], "Melati")
    await member.click("button#join")
    await screen(member, "room")
    member_id = await my_id(member)
    # The join opened /ws with the page's Origin, https://127.0.0.1:<port>; a wrong scheme
    # (the same host and port over http) is refused at the upgrade: the check is against https.
    assert await refused_status(stack, "127.0.0.4", origin=stack.url) is None
    assert await refused_status(stack, "127.0.0.4", origin=stack.url.replace("https:", "http:")) == 403

    # -- the member gets the floor, unmutes, and the moderator hears them --------------------
    await mod.click(f"#roster [data-member-id='{member_id}'] [data-action=give-floor]")
    await expect(member.locator("#turn-prompt")).to_have_attribute("data-kind", "floor")
    await member.click("#prompt-unmute")
    await expect(member.locator("button#mute-self")).to_have_attribute("aria-pressed", "false")
    heard = await hear(mod, member_id)
    assert heard["ms"] is not None, f"the member was not heard (best RMS {heard['rms']:.4f})"
    assert await mod.evaluate(BYTES_RECEIVED, member_id) > 0
    await expect(mod.locator(f"#roster [data-member-id='{member_id}']")).to_have_attribute(
        "data-speaking", "true")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await shot(mod, SCREENSHOTS, "deploy-https-moderator", top=True)

    # -- the server counts each client by the address Caddy forwards -------------------------
    # Every socket reaches Lingkar from Caddy's 127.0.0.1. The two browsers' sockets come from
    # 127.0.0.1 too; CAP more from 127.0.0.2 are accepted although the server then holds more
    # than CAP sockets from Caddy, and one past CAP from 127.0.0.2 is refused.
    held = [await socket_from(stack, "127.0.0.2") for _ in range(CAP)]
    try:
        assert await refused_status(stack, "127.0.0.2") == 403
        # A client's own X-Forwarded-For does not make it count as another address (Caddy 2.6
        # replaces the header with the address it sees unless the client is a trusted proxy).
        assert await refused_status(stack, "127.0.0.3", headers={"X-Forwarded-For": "127.0.0.2"}) is None
    finally:
        for ws in held:
            await ws.close()
    # ... and the browsers were never pushed out by it.
    for page in (mod, member):
        await expect(page.locator("#roster [data-member-id]")).to_have_count(2)
