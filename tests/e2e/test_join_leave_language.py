"""Listen-only join and the time to hear the floor holder; leave quietly with Shift×3 and Back;
an English circle in English (one catalog fetched) and the language switch."""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from tests import live
from tests.e2e.conftest import NewPage
from tests.e2e.helpers import CATALOGS, INSTRUMENT, fill_join, join_milestones, my_id, neutral_title, screen

pytestmark = pytest.mark.e2e

TITLE = "Lingkar Pagi Kamis"
BUDGET_BYTES = 150 * 1024


async def test_listen_only_never_asks_for_the_microphone_and_hears_the_floor_holder(new_page: NewPage) -> None:
    async with live.live_server() as server:
        circle = await server.create_circle(title=TITLE)
        moderator = await live.join(server, circle["links"]["moderator"], "Pendamping")
        speaker = await new_page()
        await fill_join(speaker, circle["links"]["member"], "Melati")
        await speaker.click("button#join")
        await screen(speaker, "room")
        speaker_id = await my_id(speaker)
        assert (await moderator.command("give_floor", member_id=speaker_id))["type"] == "ack"
        await speaker.click("#prompt-unmute")
        await expect(speaker.locator("button#mute-self")).to_have_attribute("aria-pressed", "false")

        listener = await new_page()
        await listener.add_init_script(INSTRUMENT)
        await fill_join(listener, circle["links"]["member"], "Anggrek", listen_only=True)
        await expect(listener.locator("#mic-box")).to_be_hidden()
        await listener.click("button#join")
        took = await join_milestones(listener, speaker_id)
        assert took["tone"] is not None, f"the floor holder was not heard: {took}"
        # A measurement, not an assertion (DESIGN §9). The fake microphone beeps, so `tone`
        # includes up to one beep interval of waiting for sound; `packets` is the first RTP of
        # the holder's slot.
        print("\njoin→hear (listen only, loopback, ms after the #join click): "
              + ", ".join(f"{k} {'-' if v is None else f'{v:.0f}'}" for k, v in took.items()))
        await screen(listener, "room")
        await expect(listener.locator("button#mute-self")).to_be_disabled()
        await expect(listener.locator("button#mute-self")).to_have_attribute("aria-pressed", "true")
        assert await listener.evaluate("window.__gum") == 0, "listen only called getUserMedia"
        await neutral_title(listener, TITLE)
        await moderator.close()


async def test_shift_three_times_leaves_quietly_and_back_does_not_return(new_page: NewPage) -> None:
    async with live.live_server() as server:
        circle = await server.create_circle(title=TITLE)
        moderator = await live.join(server, circle["links"]["moderator"], "Pendamping")
        page = await new_page()
        await fill_join(page, circle["links"]["member"], "Kenanga", listen_only=True)
        await page.click("button#join")
        await screen(page, "room")
        member_id = await my_id(page)
        # Capitals typed in a field never count: only bare Shift presses do.
        for _ in range(3):
            await page.keyboard.press("Shift+A")
        await screen(page, "room")
        for _ in range(3):
            await page.keyboard.press("Shift")
        await page.wait_for_url("**/bye")
        notice = await moderator.event("member_left_quietly", member_id=member_id)
        assert notice["data"]["need_support"] is False
        assert await page.evaluate("sessionStorage.length") == 0
        await neutral_title(page, TITLE)
        await page.go_back()
        assert "/c/" not in page.url, f"Back returned to the circle: {page.url}"
        assert moderator.close_code is None
        await moderator.close()


async def test_english_circle_shows_english_and_the_switch_changes_language(new_page: NewPage) -> None:
    async with live.live_server() as server:
        circle = await server.create_circle(title=TITLE, language="en")
        page = await new_page()
        fetched: list[str] = []
        sizes: dict[str, int] = {}

        async def on_response(response: object) -> None:
            url = response.url  # type: ignore[attr-defined]
            fetched.append(url)
            if url.startswith(server.url) and "/ws" not in url:
                try:
                    sizes[url] = len(await response.body())  # type: ignore[attr-defined]
                except Exception:  # a redirect or an aborted load has no body
                    sizes[url] = 0

        page.on("response", on_response)
        await fill_join(page, circle["links"]["member"], "Rose")
        en, id_ = CATALOGS["en"], CATALOGS["id"]
        await expect(page.locator("button#join")).to_have_text(en["join.enter"])
        await expect(page.locator("html")).to_have_attribute("lang", "en")
        await page.click("button#join")
        await screen(page, "room")
        await expect(page.locator("button#leave-quietly")).to_have_text(en["room.leave_quietly"])
        await expect(page.locator("button#lang-switch")).to_have_text(en["lang.switch"])
        await neutral_title(page, TITLE)
        assert await page.title() == en["app.neutral_title"]
        catalogs = [u for u in fetched if "/static/i18n/" in u]
        assert catalogs == [f"{server.url}/static/i18n/en.json"], catalogs
        before_media = sum(sizes.values())
        assert before_media <= BUDGET_BYTES, f"{before_media} bytes loaded: {sizes}"

        await page.click("button#lang-switch")
        await expect(page.locator("button#leave-quietly")).to_have_text(id_["room.leave_quietly"])
        await expect(page.locator("html")).to_have_attribute("lang", "id")
        await expect(page.locator("button#lang-switch")).to_have_text(id_["lang.switch"])
        assert await page.title() == id_["app.neutral_title"]
        await page.click("button#lang-switch")
        await expect(page.locator("button#leave-quietly")).to_have_text(en["room.leave_quietly"])
