"""Real Chromium on real (namespaced) networks (DESIGN §7 "Real networks", §12 "Networks").

The member is Debian's Chromium running inside her own network namespace, behind an nftables
masquerade router (tests/net/browser.py: Playwright starts it through ``ip netns exec``); she
joins the page over http from the server's namespace address. The other members are aiortc
peers (tests/net/agent.py) that count what arrives in each slot. Everything is awaited on
events (page state, packets counted, STUN answers counted); nothing is timed here:
``python -m tests.net.measure --only browser_address_change`` reports how long things take.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import pytest
from playwright.async_api import expect

from tests.e2e.helpers import INSTRUMENT, WATCH_MEDIA, fill_join, screen

from .browser import ENOUGH, VOICE, Browsers, speaker_in_chromium
from .world import World

pytestmark = [pytest.mark.net, pytest.mark.e2e]

# The page's offer went unanswered (media.js rebuilt for 'offer': the 10 s wait for its answer ran
# out) after the switch, while the WebSocket from before the switch is still the page's latest and
# still OPEN: the signaling socket died with the old address and nobody noticed.
STUCK_ON_A_DEAD_SOCKET = """([since, sockets]) => {
  const ws = window.__sockets[window.__sockets.length - 1];
  return window.__netlog.slice(since).some(([what]) => what === 'recover:offer')
    && window.__sockets.length === sockets && ws.readyState === WebSocket.OPEN;
}"""
RECOVERED = """since => { const h = window.__media.slice(since);
  return h.includes('reconnecting') && h[h.length - 1] === 'connected'; }"""


async def test_chromium_whose_address_changes_mid_turn_gets_audio_back_and_keeps_the_floor(
        world: World, chromium: Browsers) -> None:
    """She holds the floor with her microphone on (the fake device beeps) and the moderator
    hears her. Then her phone moves from Wi-Fi to mobile data: her interface to router A
    (192.168.77.2) loses its address and goes down, her interface to router B (192.168.78.2)
    comes up (world.py's `Net.use`). Nothing tells the page: whatever happens is Chromium's and
    web/js/media.js's own doing. Awaited: the page goes through "reconnecting audio" and is
    connected again, the moderator gets her voice again (through router B), and she still holds
    the floor with her microphone on, in the same document (no reload).

    The signaling WebSocket died with the old address too, and Chromium leaves it OPEN for
    minutes (TCP from an address that is gone fails silently): when media.js reports the path
    lost, the page resumes on a new socket at once (protocol.js `reconnectNow`), or its new
    offer would wait on the dead one for nothing — the failure names that case."""
    net = world.net
    home = net.home("melati")
    wifi, mobile = net.router(), net.router()
    net.uplink(home, wifi)
    net.uplink(home, mobile)
    net.use(home, 0)
    await world.start_server()
    mod = await world.moderator(net.direct("moderator"))
    page, speaker = await speaker_in_chromium(world, chromium, home.ns, mod)
    await page.evaluate("window.__sameDocument = true")
    since = len(await page.evaluate("window.__media"))
    logged = len(await page.evaluate("window.__netlog"))
    sockets = await page.evaluate("window.__sockets.length")
    before = net.counters(mobile)["udp_out"]

    moved_at = time.monotonic()
    net.use(home, 1)  # Wi-Fi gone, mobile data up: a new address behind another NAT

    # the page notices by itself, rebuilds its PeerConnection and is connected again, or its
    # offer is left waiting on the socket from before the switch
    recovered = page.wait_for_function(RECOVERED, arg=since, timeout=90_000)
    stuck = page.wait_for_function(STUCK_ON_A_DEAD_SOCKET, arg=[logged, sockets], timeout=90_000)
    outcome = await first_of({"recovered": recovered, "stuck": stuck})
    if outcome == "stuck":
        netlog = (await page.evaluate("window.__netlog"))[logged:]
        pytest.fail("the page's offer waited on the signaling WebSocket from before the switch, still "
                     f"OPEN (Chromium keeps it; TCP from a vanished address fails silently); page: "
                     f"{[what for what, _ in netlog]}. Needs web/js/protocol.js + room.js to resume on a "
                     "new socket when media.js reports onPathLost")

    # the listener gets her voice again, and it came through router B
    back = await mod.call("wait_member", member_id=speaker, n=ENOUGH, since=moved_at, min_size=VOICE,
                          within=60, limit=70)
    assert net.counters(mobile)["udp_out"] - before >= ENOUGH
    # she still holds the floor, her microphone is on, in the same document
    snapshot = await mod.call("sync")
    assert snapshot["state"]["floor"]["holder"] == speaker, snapshot["state"]["floor"]
    released = [fr for fr in await mod.call("frames", type="event") if fr["name"] == "floor_released"]
    assert released == []
    me = page.locator(f"#roster [data-member-id='{speaker}']")
    await expect(me).to_have_attribute("data-speaking", "true")
    await expect(page.locator("button#mute-self")).to_have_attribute("aria-pressed", "false")
    assert await page.evaluate("window.__sameDocument === true"), "the page was reloaded"

    netlog = (await page.evaluate("window.__netlog"))[logged:]
    opened = await page.evaluate("window.__sockets.length") - sockets
    print(f"\nChromium address change: page {[what for what, _ in netlog]}, {opened} new WebSocket(s); "
          f"the moderator heard {back['count']} voice packets of hers in slot {back['slot']}")


# The first PeerConnection's selected candidate pair: the STUN answers to the browser's checks,
# and the transport's bytes (RTP, RTCP, DTLS), as Chromium counts them; how many were made.
PAIR = """async () => {
  const stats = await window.__pcs[0].getStats();
  let pair = null, bytes = 0, answers = 0;
  stats.forEach((r) => { if (r.type === 'transport') { bytes += r.bytesReceived; pair = r.selectedCandidatePairId; } });
  stats.forEach((r) => { if (r.id === pair) answers = r.responsesReceived; });
  return { answers, bytes, made: window.__pcs.length };
}"""
QUIET_SPAN = 8  # STUN answers to wait for: 17 s and more at Chromium's 2.5 s between checks


async def test_a_listener_in_a_quiet_circle_keeps_her_peer_connection(world: World, chromium: Browsers) -> None:
    """A listen-only member in Chromium behind NAT, and nobody heard (the moderator listens
    only): the relay sends her no RTP and no RTCP at all, only the STUN answers to her
    browser's checks come back. That is a live path: while eight more of those answers arrive
    (awaited, counted in her page's stats), her first PeerConnection stays, and the page never
    says "reconnecting audio". (Counting bytes alone, media.js took such a path for a dead one
    and rebuilt it every ~5 s.)"""
    net = world.net
    home = net.home("anggrek")
    router = net.router()
    net.uplink(home, router)
    net.use(home, 0)
    await world.start_server()
    await world.moderator(net.direct("moderator"), listen_only=True)
    page = await chromium.page_in(home.ns)
    for script in (INSTRUMENT, WATCH_MEDIA):
        await page.add_init_script(script)
    await fill_join(page, world.link("member"), "Anggrek", listen_only=True)
    await page.click("button#join")
    await screen(page, "room")
    await expect(page.locator("#connection-status")).to_have_attribute("data-media", "connected")
    start = await page.evaluate(PAIR)
    # until that many more answers came, or a second PeerConnection was made (the page reads its
    # stats into window.__pair as they change: wait_for_function takes no async predicate)
    await page.evaluate(f"""() => {{ const read = {PAIR};
      const again = async () => {{ window.__pair = await read(); setTimeout(again, 200); }}; again(); }}""")
    await page.wait_for_function(
        "n => window.__pair && (window.__pair.answers >= n || window.__pair.made > 1)",
        arg=start["answers"] + QUIET_SPAN, timeout=90_000)
    end = await page.evaluate(PAIR)
    assert end["made"] == 1, f"rebuilt: data-media {await page.evaluate('window.__media')}"
    assert end["bytes"] == start["bytes"], "not a quiet circle: media arrived"
    assert "reconnecting" not in await page.evaluate("window.__media")
    assert net.counters(router)["udp_in"] > 0


async def first_of(waits: dict[str, Awaitable[Any]]) -> str:
    """The name of the first awaitable in `waits` to finish (the others are cancelled); its
    exception, if it failed."""
    tasks = {asyncio.ensure_future(w): name for name, w in waits.items()}
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    task = done.pop()
    task.result()
    return tasks[task]
