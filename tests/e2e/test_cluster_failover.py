"""Behind the proxy of `make cluster` (three processes, Caddy, Redis): a speaker and a listener
in Chromium, the circle's home killed with SIGKILL — both pages resume on another process
through the proxy, build a new PeerConnection there, and the listener hears the floor holder
again (DESIGN §8); then that home drains (SIGTERM) and sends them on with `redirect`. The times
from the kill and from the drain to the tone heard again are printed, not asserted."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from tests.deploy.test_cluster import Cluster, Member, running_cluster
from tests.e2e.conftest import NewPage
from tests.e2e.helpers import INSTRUMENT, fill_join, hear, my_id, screen
from tests.live import token_of

pytestmark = pytest.mark.e2e


async def new_connection(page: Page, before: int) -> None:
    """A PeerConnection built after the first `before` ones is connected."""
    await page.wait_for_function(
        "n => window.__pcs.length > n && window.__pcs.at(-1).connectionState === 'connected'",
        arg=before, timeout=45_000)


async def heard_again_after(cluster: Cluster, circle_id: str, sig: signal.Signals, speaker: Page,
                            listener: Page, speaker_id: str) -> float:
    """Send `sig` to the circle's home; once both pages have a new PeerConnection connected
    (elsewhere) and the listener hears the speaker again: the seconds since the signal."""
    home = cluster.home_of(circle_id)
    built = {page: await page.evaluate("window.__pcs.length") for page in (speaker, listener)}
    sent = time.monotonic()
    os.kill(cluster.pid_of(home), sig)
    await asyncio.gather(*(new_connection(page, n) for page, n in built.items()))
    again = await hear(listener, speaker_id, timeout_ms=30_000)
    took = time.monotonic() - sent
    assert again["ms"] is not None, f"not heard after {sig.name} (best RMS {again['rms']:.4f})"
    assert cluster.home_of(circle_id) != home
    return took


async def test_the_floor_holder_is_heard_again_after_the_home_is_killed_behind_the_proxy(
        new_page: NewPage, tmp_path: Path) -> None:
    async with running_cluster(tmp_path / "data") as cluster:
        status, circle = await cluster.api("POST", "/api/circles", {"title": "Lingkar Tiga Rumah", "lobby": False})
        assert status == 201, circle
        links = circle["links"]
        moderator = Member(cluster, circle["id"], token_of(links["moderator"]), "Pendamping")
        await moderator.join()
        keeping = asyncio.create_task(moderator.keep())  # back in after the kill, as the web client
        try:
            speaker = await new_page()
            await speaker.add_init_script(INSTRUMENT)
            await fill_join(speaker, links["member"], "Melati")  # the page, through the proxy
            await speaker.click("button#join")
            await screen(speaker, "room")
            speaker_id = await my_id(speaker)
            assert moderator.client is not None
            assert (await moderator.client.command("give_floor", member_id=speaker_id))["type"] == "ack"
            await speaker.click("#prompt-unmute")
            await expect(speaker.locator("button#mute-self")).to_have_attribute("aria-pressed", "false")
            listener = await new_page()
            await listener.add_init_script(INSTRUMENT)
            await fill_join(listener, links["member"], "Anggrek", listen_only=True)
            await listener.click("button#join")
            await screen(listener, "room")
            first = await hear(listener, speaker_id)
            assert first["ms"] is not None, f"not heard before the kill (best RMS {first['rms']:.4f})"

            took = await heard_again_after(cluster, circle["id"], signal.SIGKILL, speaker, listener, speaker_id)
            await moderator.connected.wait()
            state = (await moderator.sync())["state"]
            assert state["floor"]["holder"] == speaker_id
            me = listener.locator(f"#roster [data-member-id='{speaker_id}']")
            await expect(me).to_have_attribute("data-speaking", "true")
            print(f"\nhome killed → floor holder heard again through the proxy: {took:.1f} s")

            # A drain (SIGTERM) of the new home: it sends both pages `redirect` to a live
            # process, where they resume at once and build a new PeerConnection.
            took = await heard_again_after(cluster, circle["id"], signal.SIGTERM, speaker, listener, speaker_id)
            print(f"home drained → floor holder heard again: {took:.1f} s")
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
