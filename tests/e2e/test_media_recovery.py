"""Media that recovers (DESIGN §7 "Real networks", issue 13), in real Chromium against the real
server: the member's PeerConnection is built with the ICE servers its `welcome` carried (TURN
credentials minted for it), and when its media breaks — the server drops its PeerConnection, or
the path goes silent — the page says "Menyambungkan ulang audio…", builds a new PeerConnection on
the same signaling session, and the listener hears the floor holder again; the seat, the floor
and the mute are untouched. After a resume, the new PeerConnection takes the resume's fresh
credentials. Everything is awaited (page state, the relay's packet counts), nothing is timed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgpack
import pytest
from playwright.async_api import Page, expect

from signaling.turn import IceServers
from tests import live
from tests.e2e.conftest import NewPage
from tests.e2e.helpers import (
    CATALOGS,
    INSTRUMENT,
    WATCH_MEDIA,
    count_per_source,
    fill_join,
    hear,
    my_id,
    screen,
    shot,
)

pytestmark = pytest.mark.e2e

TITLE = "Lingkar Sabtu Pagi"
# A TURN server nobody listens on (TCP: refused at once, so gathering does not wait for it): the
# credentials are what the test looks at, the media goes host to host on loopback.
TURN: dict[str, Any] = {"turn_urls": "turn:127.0.0.1:9?transport=tcp", "turn_secret": "turn-secret-for-the-e2e-tests"}

# The current PeerConnection's ICE servers and state, read in the page.
PC_NOW = """() => {
  const pc = window.__pcs[window.__pcs.length - 1];
  return { count: window.__pcs.length, iceServers: pc.getConfiguration().iceServers,
           state: pc.connectionState };
}"""


class Frames:
    """The frames the server sent one page, decoded (Playwright sees the WebSocket traffic)."""

    def __init__(self, page: Page) -> None:
        self.seen: list[dict[str, Any]] = []
        self._new = asyncio.Event()
        page.on("websocket", lambda ws: ws.on("framereceived", self._received))

    def _received(self, payload: bytes | str) -> None:
        if isinstance(payload, bytes):
            frame = msgpack.unpackb(payload)
            if isinstance(frame, dict):
                self.seen.append(frame)
                self._new.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.seen if f.get("type") == kind]

    async def wait(self, kind: str, count: int) -> dict[str, Any]:
        """The `count`-th frame of `kind`, once it has come."""
        async with asyncio.timeout(15):
            while len(self.of(kind)) < count:
                self._new.clear()
                await self._new.wait()
        return self.of(kind)[count - 1]


def same_servers(in_page: list[dict[str, Any]], sent: list[dict[str, Any]]) -> bool:
    def norm(servers: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((tuple([s["urls"]] if isinstance(s["urls"], str) else s["urls"]),
                       s.get("username") or "", s.get("credential") or "") for s in servers)
    return norm(in_page) == norm(sent)


class Scene:
    """A moderator (a plain client), a speaker holding the floor with her microphone on, and a
    listener, both in Chromium; the relay's packet counts per source."""

    speaker: Page
    listener: Page
    speaker_id: str
    frames: Frames

    def __init__(self, server: live.Live) -> None:
        self.server = server

    async def open(self, new_page: NewPage) -> Scene:
        server = self.server
        circle = await server.create_circle(title=TITLE, floor_mode="hands")
        self.circle_id = circle["id"]
        self.moderator = await live.join(server, circle["links"]["moderator"], "Pendamping")
        self.speaker = await new_page()
        self.frames = Frames(self.speaker)
        await self.speaker.add_init_script(INSTRUMENT)
        await self.speaker.add_init_script(WATCH_MEDIA)
        await fill_join(self.speaker, circle["links"]["member"], "Melati")
        await self.speaker.click("button#join")
        await screen(self.speaker, "room")
        self.speaker_id = await my_id(self.speaker)
        assert (await self.moderator.command("give_floor", member_id=self.speaker_id))["type"] == "ack"
        await self.speaker.click("#prompt-unmute")
        await expect(self.speaker.locator("button#mute-self")).to_have_attribute("aria-pressed", "false")
        self.listener = await new_page()
        await self.listener.add_init_script(INSTRUMENT)
        await fill_join(self.listener, circle["links"]["member"], "Anggrek", listen_only=True)
        await self.listener.click("button#join")
        await screen(self.listener, "room")
        self.counts = await count_per_source(server.parts.relay, self.circle_id)
        await self.heard()
        await expect(self.speaker.locator("#connection-status")).to_have_attribute("data-media", "connected")
        return self

    async def heard(self) -> None:
        """The listener hears the speaker, and the relay forwards her packets (more than before)."""
        before = self.counts.forwarded[self.speaker_id]
        await self.counts.wait_until(lambda: self.counts.forwarded[self.speaker_id] > before + 50,
                                     what="the speaker's packets through the relay")
        result = await hear(self.listener, self.speaker_id)
        assert result["ms"] is not None, f"the speaker is not heard (best RMS {result['rms']:.4f})"

    async def media_history(self) -> list[str]:
        history: list[str] = await self.speaker.evaluate("window.__media")
        return history

    async def recovered(self, since: int) -> None:
        """The page showed "reconnecting audio" after `since` entries of its history, and is
        connected again; the seat, the floor and the microphone are as they were."""
        await self.speaker.wait_for_function(
            "since => window.__media.slice(since).includes('reconnecting')", arg=since)
        conn = self.speaker.locator("#connection-status")
        await expect(conn).to_have_attribute("data-media", "connected")
        await expect(conn).to_have_text("")
        await self.heard()
        state = await self.server.parts.manager.load(self.circle_id)
        assert state.floor is not None and state.floor.holder == self.speaker_id, state.floor
        me = self.speaker.locator(f"#roster [data-member-id='{self.speaker_id}']")
        await expect(me).to_have_attribute("data-speaking", "true")
        await expect(me).to_have_attribute("data-connected", "true")
        await expect(self.speaker.locator("button#mute-self")).to_have_attribute("aria-pressed", "false")


async def test_the_peer_connection_uses_the_ice_servers_minted_in_welcome(new_page: NewPage) -> None:
    async with live.live_server(**TURN) as server:
        circle = await Scene(server).open(new_page)
        welcome = circle.frames.of("welcome")[0]
        minted = welcome["ice_servers"]
        assert any(s.get("username", "").endswith(f":{circle.speaker_id}") for s in minted), minted
        now = await circle.speaker.evaluate(PC_NOW)
        assert same_servers(now["iceServers"], minted), (now["iceServers"], minted)
        # /client-config carries no credentials (it is public): the page took welcome's list.
        public = await circle.speaker.evaluate("fetch('/client-config').then((r) => r.json())")
        assert not any("credential" in s or "username" in s for s in public["ice_servers"]), public
        await circle.moderator.close()


async def test_media_recovers_when_the_server_drops_the_peer_connection(
        new_page: NewPage, screenshots: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with live.live_server(**TURN) as server:
        circle = await Scene(server).open(new_page)
        relay = server.parts.relay
        before = await circle.speaker.evaluate(PC_NOW)
        since = len(await circle.media_history())

        # The speaker's next offer waits at the server until the screenshot is taken.
        answer = relay.answer
        offered, release = asyncio.Event(), asyncio.Event()

        async def held(circle_id: str, member_id: str, sdp: str, **kwargs: Any) -> str:
            if member_id == circle.speaker_id:
                offered.set()
                await release.wait()
            result: str = await answer(circle_id, member_id, sdp, **kwargs)
            return result

        monkeypatch.setattr(relay, "answer", held)
        await relay.close_member(circle.circle_id, circle.speaker_id)
        async with asyncio.timeout(15):
            await offered.wait()
        conn = circle.speaker.locator("#connection-status")
        await expect(conn).to_have_attribute("data-media", "reconnecting")
        await expect(conn).to_have_text(CATALOGS["id"]["conn.media_reconnecting"])
        await shot(circle.speaker, screenshots, "30-reconnecting-audio", top=True)
        release.set()

        await circle.recovered(since)
        after = await circle.speaker.evaluate(PC_NOW)
        assert after["count"] == before["count"] + 1, "not exactly one new PeerConnection"
        assert after["state"] == "connected"
        # The same signaling session: no second welcome, no resume.
        assert len(circle.frames.of("welcome")) == 1
        assert circle.moderator.close_code is None
        await circle.moderator.close()


async def test_media_recovers_when_the_path_goes_silent(new_page: NewPage) -> None:
    """No DTLS close, no ICE failure: the server's ICE sockets just stop (as a phone's Wi-Fi does
    when it walks out of range). The page does not wait for `failed` (about half a minute): it
    rebuilds when nothing at all has arrived for ~4 s, or after ~2 s of `disconnected` (which
    Chrome reaches some 7 s into the silence), whichever comes first. web/tests/media.test.mjs
    checks each of those rules alone."""
    async with live.live_server(**TURN) as server:
        circle = await Scene(server).open(new_page)
        since = len(await circle.media_history())
        peer = server.parts.relay._peers[(circle.circle_id, circle.speaker_id)]
        ice = peer.pc.getTransceivers()[0].receiver.transport.transport
        await ice._connection.close()       # aioice: sockets closed, nothing said to the browser
        await circle.recovered(since)
        reason = await circle.speaker.evaluate(
            "async () => (await import('/static/js/room.js')).current().media.lastReason")
        assert reason in ("silent", "disconnected"), reason
        await circle.moderator.close()


async def test_after_a_resume_the_new_peer_connection_takes_the_fresh_credentials(
        new_page: NewPage, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every mint an hour later than the one before: the resume's credentials differ for certain.
    mint = IceServers.for_member
    minted = 0

    def later(self: IceServers, member_id: str, now_s: int) -> list[dict[str, Any]]:
        nonlocal minted
        minted += 1
        return mint(self, member_id, now_s + 3600 * minted)

    monkeypatch.setattr(IceServers, "for_member", later)
    async with live.live_server(**TURN) as server:
        circle = await Scene(server).open(new_page)
        since = len(await circle.media_history())
        first = circle.frames.of("welcome")[0]["ice_servers"]
        # The socket drops (the page's own WebSocket closed under it): the client resumes its seat.
        await circle.speaker.evaluate("window.__sockets[window.__sockets.length - 1].close()")
        resumed = await circle.frames.wait("welcome", 2)
        assert resumed["member_id"] == circle.speaker_id
        assert not same_servers(resumed["ice_servers"], first)
        await circle.recovered(since)
        now = await circle.speaker.evaluate(PC_NOW)
        assert same_servers(now["iceServers"], resumed["ice_servers"]), (now["iceServers"], resumed)
        await circle.moderator.close()
