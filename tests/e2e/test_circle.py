"""A whole circle in real browsers (DESIGN F2–F11, F14): the organizer page creates it, a
moderator and three members join (through the lobby), a member takes the floor and is heard by
the others, a member without the floor is not, the turn timer runs, a member leaves quietly,
one is removed, the circle ends. Screenshots of every screen at 360×640 go to
artifacts/screenshots/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import expect

from tests import live
from tests.e2e.conftest import NewPage
from tests.e2e.helpers import (
    INSTRUMENT,
    count_per_source,
    fill_join,
    hear,
    my_id,
    neutral_title,
    relay_settled,
    screen,
    shot,
)

pytestmark = pytest.mark.e2e

TITLE = "Lingkar Rahasia Rabu"


async def organizer_creates_circle(new_page: NewPage, server: live.Live, shots: Path) -> tuple[Any, dict[str, str]]:
    org = await new_page()
    await org.goto(f"{server.url}/organizer#key={live.API_KEY}")
    await expect(org.locator("form#new-circle")).to_be_visible()
    assert "key=" not in org.url, "the key stays in the address bar"
    await org.fill("form#new-circle input[name=title]", TITLE)
    await org.fill("form#new-circle input[name=topic]", "Berbagi cerita minggu ini")
    await org.select_option("form#new-circle select[name=language]", "id")
    await org.select_option("form#new-circle select[name=floor_mode]", "hands")
    await org.check("form#new-circle input[name=lobby]")
    await org.click("form#new-circle button[type=submit]")
    links = {}
    for role in ("moderator", "member", "guest"):
        field = org.locator(f"#new-links [data-link={role}] input")
        await expect(field).not_to_have_value("")
        links[role] = await field.input_value()
        assert links[role].startswith(f"{server.url}/c/") and "#t=" in links[role], links[role]
    await expect(org.locator("#circles [data-circle-id]")).to_have_count(1)
    await neutral_title(org, TITLE)
    await shot(org, shots, "08-organizer", top=True)
    return org, links


async def test_whole_circle(new_page: NewPage, screenshots: Path) -> None:
    async with live.live_server() as server:
        org, links = await organizer_creates_circle(new_page, server, screenshots)
        circle_id = links["member"].split("/c/", 1)[1].split("#", 1)[0]

        # -- the moderator joins ---------------------------------------------------------
        mod = await new_page()
        await mod.add_init_script(INSTRUMENT)
        await fill_join(mod, links["moderator"], "Pendamping Sari")
        await neutral_title(mod, TITLE)
        await shot(mod, screenshots, "01-join", top=True)
        await mod.click("button#join")
        await screen(mod, "room")
        await expect(mod.locator("#mod-panel")).to_be_visible()
        mod_id = await my_id(mod)
        await neutral_title(mod, TITLE)
        counts = await count_per_source(server.parts.relay, circle_id)

        # -- three members wait in the lobby and are admitted ----------------------------
        members: dict[str, Any] = {}
        for name, listen_only in (("Melati", False), ("Kenanga", False), ("Anggrek", True)):
            page = await new_page()
            await page.add_init_script(INSTRUMENT)
            await fill_join(page, links["member"], name, listen_only=listen_only)
            await page.click("button#join")
            await expect(page.locator("#lobby-status")).to_be_visible()
            await screen(page, "lobby")
            await expect(page.locator("#roster [data-member-id]")).to_have_count(0)
            await neutral_title(page, TITLE)
            members[name] = page
        melati, kenanga, anggrek = members["Melati"], members["Kenanga"], members["Anggrek"]
        await shot(melati, screenshots, "02-lobby")
        assert await anggrek.evaluate("window.__gum") == 0, "listen only asked for the microphone"

        waiting = mod.locator("#lobby-list [data-member-id]")
        await expect(waiting).to_have_count(3)
        for left in (2, 1, 0):
            await waiting.first.locator("[data-action=admit]").click()
            await expect(waiting).to_have_count(left)
        for page in members.values():
            await screen(page, "room")
            await expect(page.locator("#roster [data-member-id]")).to_have_count(4)
            await expect(page.locator("#mod-panel")).to_be_hidden()
            await neutral_title(page, TITLE)
        await expect(mod.locator("#roster [data-member-id]")).to_have_count(4)
        ids = {name: await my_id(page) for name, page in members.items()}
        await expect(melati.locator("button#mute-self")).to_have_attribute("aria-pressed", "true")
        await shot(melati, screenshots, "03-room-member")
        await shot(mod, screenshots, "04-room-moderator")

        # -- a private word to the moderators (F9): a moderator-only event ---------------
        await anggrek.click("button#open-help")
        await anggrek.click("button#open-note")
        await anggrek.fill("form#private-note textarea[name=text]", "Saya dengar saja hari ini")
        await anggrek.click("form#private-note button[type=submit]")
        await expect(mod.locator("#notices li[data-kind='notice.private_note']")).to_contain_text(
            "Saya dengar saja hari ini")
        await anggrek.click("#note-panel [data-close]")

        # -- a guest waits in the lobby and is declined: moderator-only events that bump the
        # room version, so from here on members see version gaps
        guest = await live.join(server, links["guest"], "Tamu", expect="lobby")
        await expect(waiting).to_have_count(1)
        await waiting.first.locator("[data-action=decline]").click()
        await expect(waiting).to_have_count(0)
        assert await guest.closed() == 4403

        # -- Melati raises her hand and gets the floor; she is prompted and unmutes --------
        await melati.click("button#raise-hand")
        await expect(mod.locator(f"#queue li[data-member-id='{ids['Melati']}']")).to_have_count(1)
        await mod.click("button#next")
        await expect(melati.locator("#turn-prompt")).to_be_visible()
        await expect(melati.locator("#turn-prompt")).to_have_attribute("data-kind", "floor")
        await expect(mod.locator(f"#roster [data-member-id='{ids['Melati']}']")).to_have_attribute(
            "data-speaking", "true")
        await shot(melati, screenshots, "05-floor-prompt")
        await melati.click("#prompt-unmute")
        await expect(melati.locator("button#mute-self")).to_have_attribute("aria-pressed", "false")
        await expect(melati.locator("#turn-prompt")).to_be_hidden()

        # -- her fake microphone's tone reaches the others ------------------------------
        for listener in (mod, kenanga, anggrek):
            heard = await hear(listener, ids["Melati"])
            assert heard["ms"] is not None, f"Melati not heard (best RMS {heard['rms']:.4f})"
        assert counts.forwarded[ids["Melati"]] > 0

        # -- the turn timer runs (holder and moderator see it) --------------------------
        for page in (melati, mod):
            timer = page.locator("#turn-timer")
            await expect(timer).to_be_visible()
            first = await timer.text_content()
            await page.wait_for_function(
                "t => document.querySelector('#turn-timer').textContent !== t", arg=first)
        await expect(kenanga.locator("#turn-timer")).to_be_hidden()

        # -- Kenanga has no floor: unmuting herself, even forcing her track on, is not heard
        await kenanga.click("button#mute-self")
        await expect(kenanga.locator("button#mute-self")).to_have_attribute("aria-pressed", "false")
        await kenanga.evaluate("""() => {
            for (const pc of window.__pcs) for (const s of pc.getSenders()) {
              if (!s.track) continue;
              s.track.enabled = true;                    // a modified browser keeps sending
              Object.defineProperty(s.track, 'enabled', { get: () => true, set: () => {} });
            }
        }""")
        before = counts.gated[ids["Kenanga"]]
        await counts.wait_until(lambda: counts.gated[ids["Kenanga"]] >= before + 100,
                                what="Kenanga's packets at the gate")
        assert counts.forwarded[ids["Kenanga"]] == 0, "a member without the floor was forwarded"
        for page in (mod, melati, anggrek):
            carried = await page.eval_on_selector_all(
                "audio[data-slot][data-member-id]", "els => els.map(e => e.dataset.memberId)")
            assert ids["Kenanga"] not in carried
            assert set(carried) <= {ids["Melati"], mod_id}, carried
        assert server.parts.relay.stats()["packets_dropped_gated"] >= 100

        # The lobby events bumped the room version unseen by members: since then every event
        # shows them a gap, which must not make them `sync` (the server delivers in order).
        for page in (mod, melati, kenanga, anggrek):
            assert await page.evaluate("window.__syncs") == 0

        # -- the help panel -------------------------------------------------------------
        await anggrek.click("button#open-help")
        await expect(anggrek.locator("#help-panel")).to_be_visible()
        await expect(anggrek.locator("#helplines li").first).to_be_visible()
        await shot(anggrek, screenshots, "06-help-panel")
        await anggrek.click("#help-panel [data-close]")
        await expect(anggrek.locator("#help-panel")).to_be_hidden()

        # -- Kenanga leaves quietly: others see the seat vanish, only moderators are told --
        await kenanga.click("button#leave-quietly")
        await kenanga.wait_for_url("**/bye")
        await neutral_title(kenanga, TITLE)
        await shot(kenanga, screenshots, "07-exit")
        for page in (mod, melati, anggrek):
            await expect(page.locator("#roster [data-member-id]")).to_have_count(3)
            await expect(page.locator(f"#roster [data-member-id='{ids['Kenanga']}']")).to_have_count(0)
        notice = mod.locator("#notices li[data-kind^='notice.left_quietly']")
        await expect(notice).to_have_count(1)
        await expect(notice).to_contain_text("Kenanga")
        for page in (melati, anggrek):
            await expect(page.locator("#notices li")).to_have_count(0)
            assert "Kenanga" not in await page.locator("#screen-room").inner_text()
        assert counts.forwarded[ids["Kenanga"]] == 0

        # -- the moderator removes Anggrek -----------------------------------------------
        await mod.locator(f"#roster [data-member-id='{ids['Anggrek']}'] [data-action=remove]").click()
        await expect(mod.locator("dialog#confirm-dialog")).to_be_visible()
        await mod.click("#confirm-ok")
        await expect(anggrek.locator("#ended-status")).to_have_attribute("data-reason", "removed")
        await screen(anggrek, "ended")
        await neutral_title(anggrek, TITLE)
        for page in (mod, melati):
            await expect(page.locator("#roster [data-member-id]")).to_have_count(2)

        # -- the moderator ends the circle: everyone is out -----------------------------
        await mod.click("button#end")
        await mod.click("#confirm-ok")
        for page in (mod, melati):
            await expect(page.locator("#ended-status")).to_have_attribute("data-reason", "ended")
            await neutral_title(page, TITLE)
        await org.reload()
        await expect(org.locator("#circles [data-circle-id]")).to_have_count(0)
        await relay_settled(server.parts.relay, lambda: server.parts.relay.stats()["peers"] == 0,
                            what="the relay to close every peer")
