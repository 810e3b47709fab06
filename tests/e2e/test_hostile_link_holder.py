"""Issue 16 in the browser: a pseudonym typed before the page works never lands in a URL (a slow
phone on a slow link); an ordinary Leave is announced to the circle but never reaches moderators
as a quiet one; the organizer revokes a named moderator invite and its holder is out at once.
Screenshots at 360×640 go to artifacts/screenshots/."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Route, expect

from tests import live
from tests.e2e.conftest import NewPage
from tests.e2e.helpers import fill_join, my_id, screen, shot, slow_link

pytestmark = pytest.mark.e2e

TITLE = "Lingkar Jumat Sore"
NAME = "Mawar Pagi"


def carries(text: str, name: str) -> bool:
    """`name` in `text` as typed, or encoded as a form or a URL would encode it."""
    forms = {name, urllib.parse.quote_plus(name), urllib.parse.quote(name), name.replace(" ", "%20")}
    return any(f.lower() in text.lower() for f in forms)


class EarlyJoin:
    """A member's page on a slow link, with every request recorded, and one module the join form
    needs held back until release(): the early presses certainly come before the client is ready,
    whatever the machine's speed."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.sent: list[tuple[str, str]] = []
        self.held = asyncio.Event()

    @classmethod
    async def open(cls, new_page: NewPage, link: str, *, block: str | None = None) -> EarlyJoin:
        page = await new_page()
        early = cls(page)
        page.on("request", lambda r: early.sent.append((r.url, r.post_data or "")))
        await slow_link(page)

        async def hold(route: Route) -> None:
            await early.held.wait()
            await route.continue_()

        await page.route("**/static/js/ui-join.js", hold)
        if block:
            await page.route(block, lambda route: route.abort())
        await page.goto(link, wait_until="commit")
        return early

    async def not_ready_yet(self) -> None:
        assert await self.page.evaluate("() => document.body.dataset.ready ?? null") is None, \
            "the client was ready before the early presses: this test proved nothing"

    def release(self) -> None:
        self.held.set()

    def leaks(self, name: str) -> list[tuple[str, str]]:
        found = [(u, b) for u, b in self.sent if carries(u, name) or carries(b, name)]
        if carries(self.page.url, name):
            found.append((self.page.url, "(address bar)"))
        return found


async def test_a_pseudonym_typed_before_the_page_works_never_reaches_a_url(
        new_page: NewPage, screenshots: Path) -> None:
    """Before the fix, Enter (or a tap on Join) before the modules ran submitted the form natively:
    GET /c/{id}?pseudonym=…, the name in proxy logs and the browser's history. Now, until the
    client is ready, the join screen shows a disabled "Memuat…" button and nothing to type in."""
    async with live.live_server() as server:
        circle = await server.create_circle(title=TITLE)
        moderator = await live.join(server, circle["links"]["moderator"], "Pendamping")
        early = await EarlyJoin.open(new_page, circle["links"]["member"])
        page = early.page

        join = page.locator("button#join")
        await expect(join).to_have_text("Memuat…")
        await expect(join).to_be_disabled()
        await expect(page.locator("input[name=pseudonym]")).to_be_hidden()
        await page.keyboard.type(NAME)
        await page.keyboard.press("Enter")
        await join.click(force=True)
        await early.not_ready_yet()
        await shot(page, screenshots, "20-join-loading", top=True)

        early.release()
        # The first moment the field takes a name, Enter (a phone keyboard's "Go") joins.
        await page.fill("input[name=pseudonym]", NAME)
        await page.check("input[name=listen_only]")
        await page.check("input[name=pledge]")
        await expect(page.locator("body")).to_have_attribute("data-ready", "true")
        await shot(page, screenshots, "21-join-ready", top=True)
        await page.press("input[name=pseudonym]", "Enter")
        await screen(page, "room")
        joined = await moderator.event("member_joined")
        assert joined["data"]["member"]["name"] == NAME
        assert early.leaks(NAME) == [], "requests carried the pseudonym"
        assert any("/static/js/room.js" in url for url, _ in early.sent), "the join did not go through the page"
        await moderator.close()


async def test_without_its_stylesheet_the_join_form_still_never_submits_a_name(new_page: NewPage) -> None:
    """The same attack when the stylesheet failed to load (the fields show before the client is
    ready): the form's method is "dialog" and its default button is disabled, so neither Enter
    nor a tap on Join submits it natively."""
    async with live.live_server() as server:
        circle = await server.create_circle(title=TITLE)
        early = await EarlyJoin.open(new_page, circle["links"]["member"], block="**/static/css/*")
        page = early.page
        await page.fill("input[name=pseudonym]", NAME)
        await page.check("input[name=pledge]")
        await page.press("input[name=pseudonym]", "Enter")
        await page.click("button#join", force=True)
        await early.not_ready_yet()
        early.release()
        await expect(page.locator("body")).to_have_attribute("data-ready", "true")
        await page.check("input[name=listen_only]")
        await page.press("input[name=pseudonym]", "Enter")
        await screen(page, "room")
        assert early.leaks(NAME) == [], "requests carried the pseudonym"


async def test_an_ordinary_leave_is_announced_but_never_reported_as_a_quiet_one(
        new_page: NewPage, screenshots: Path) -> None:
    """Routine exits must not reach moderators as quiet leaves (F8): a moderator who follows up on
    each quiet leave would chase members who simply said goodbye, and stop trusting the notice."""
    async with live.live_server() as server:
        circle = await server.create_circle(title=TITLE)
        mod = await new_page()
        await fill_join(mod, circle["links"]["moderator"], "Pendamping Sari")
        await mod.click("button#join")
        await screen(mod, "room")
        await expect(mod.locator("#mod-panel")).to_be_visible()

        member = await new_page()
        await fill_join(member, circle["links"]["member"], "Kenanga", listen_only=True)
        await member.click("button#join")
        await screen(member, "room")
        member_id = await my_id(member)
        other = await live.join(server, circle["links"]["member"], "Melati", listen_only=True)
        quiet = await live.join(server, circle["links"]["member"], "Anggrek", listen_only=True)
        await expect(mod.locator("#roster [data-member-id]")).to_have_count(4)
        await expect(member.locator("#roster [data-member-id]")).to_have_count(4)

        # Both ways out are there; the quiet one stays in the bar, the ordinary one apart from it.
        await expect(member.locator("button#leave-quietly")).to_be_visible()
        await expect(member.locator("button#leave")).to_be_visible()
        await shot(member, screenshots, "22-room-two-leave-buttons", top=True)

        await member.click("button#leave")
        await expect(member.locator("dialog#confirm-dialog")).to_be_visible()
        await shot(member, screenshots, "23-leave-confirm")
        await member.click("button#confirm-ok")
        await expect(member.locator("#ended-status")).to_have_attribute("data-reason", "left")
        assert "/c/" in member.url, f"an ordinary leave went to {member.url}"
        assert await member.evaluate("() => document.documentElement.hasAttribute('data-blank')") is False
        await shot(member, screenshots, "24-left", top=True)

        gone = await other.event("member_left", member_id=member_id)
        assert gone["data"] == {"member_id": member_id}
        await expect(mod.locator(f'#roster [data-member-id="{member_id}"]')).to_have_count(0)

        # A quiet leave still reaches the moderator. Events arrive in order, so once its notice is
        # shown, any notice the ordinary leave had caused would be shown too.
        await quiet.send({"type": "leave_quietly", "need_support": False})
        notices = mod.locator('#notices li[data-kind^="notice.left_quietly"]')
        await expect(notices).to_have_count(1)
        await expect(notices).to_contain_text("Anggrek")
        await expect(mod.locator("#notices")).not_to_contain_text("Kenanga")
        assert [fr for fr in other.events() if fr["name"] == "member_left_quietly"] == []
        await other.close()


def token_claims(link: str) -> dict[str, Any]:
    payload = live.token_of(link).split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


async def test_a_revoked_moderator_invite_puts_its_holder_out_at_once(
        new_page: NewPage, screenshots: Path) -> None:
    """A moderator's link hears everything and can end the circle: the organizer who learns it
    went to the wrong person revokes it on the page, and whoever holds it is out (4403)."""
    async with live.live_server() as server:
        circle = await server.create_circle(title=TITLE)
        org = await new_page()
        await org.goto(f"{server.url}/organizer#key={live.API_KEY}")
        row = org.locator(f'#circles [data-circle-id="{circle["id"]}"]')
        await row.locator("[data-action=invites]").click()
        await expect(org.locator("#invites-panel")).to_be_visible()
        entries = org.locator("#invites [data-invite-id]")
        await expect(entries).to_have_count(3)   # the circle's own: moderator, member, guest

        await org.select_option("form#new-invite select[name=role]", "moderator")
        await expect(org.locator("form#new-invite input[name=personal]")).to_be_hidden()
        await org.fill("form#new-invite input[name=label]", "Bu Sari")
        await org.click("form#new-invite button[type=submit]")
        link_box = org.locator("#invite-link input")
        await expect(link_box).not_to_have_value("")
        link = await link_box.input_value()
        entry = entries.filter(has_text="Bu Sari")
        await expect(entry).to_have_count(1)
        await expect(entry).to_have_attribute("data-role", "moderator")
        assert token_claims(link)["inv"] == await entry.get_attribute("data-invite-id")

        sari = await new_page()
        await fill_join(sari, link, "Sari", listen_only=True)
        await sari.click("button#join")
        await screen(sari, "room")
        await expect(sari.locator("#mod-panel")).to_be_visible()

        await row.locator("[data-action=invites]").click()    # reloads the list
        await expect(entry).to_have_attribute("data-holders", "1")
        await shot(org, screenshots, "25-organizer-invites")
        org.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await entry.locator("[data-action=revoke]").click()

        await expect(sari.locator("#ended-status")).to_have_attribute("data-reason", "removed")
        await expect(entry).to_have_attribute("data-revoked", "true")
        await expect(entry.locator("[data-action=revoke]")).to_have_count(0)
        await shot(org, screenshots, "26-organizer-invite-revoked")
        await shot(sari, screenshots, "27-moderator-revoked", top=True)

        # The link is dead for good.
        again = await new_page()
        await fill_join(again, link, "Sari", listen_only=True)
        await again.click("button#join")
        await screen(again, "ended")
        reason = await again.locator("#ended-status").get_attribute("data-reason")
        assert reason in ("invalid", "refused"), reason
