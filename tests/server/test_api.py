"""The organizer REST API (DESIGN §10): examples of each endpoint, then schemathesis against
the served OpenAPI document (no 500 on any generated request)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from server.api import openapi_document
from tests.live import API_KEY, Live, join, live_server, token_of
from tests.server.conftest import ThreadedLive, ack_of


async def raw(live: Live, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    import asyncio

    def call() -> tuple[int, Any]:
        req = urllib.request.Request(live.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                data = resp.read()
                return resp.status, json.loads(data) if data else None
        except urllib.error.HTTPError as err:
            data = err.read()
            return err.code, json.loads(data) if data else None

    return await asyncio.to_thread(call)


async def test_create_returns_201_with_links_carrying_tokens_in_the_fragment(live: Live) -> None:
    status, circle = await live.api("POST", "/api/circles", {
        "title": "Rahasia", "topic": "duka", "language": "en", "capacity": 8, "turn_seconds": 120,
        "floor_mode": "round", "lobby": False})
    assert status == 201
    assert set(circle["links"]) == {"moderator", "member", "guest"}
    for role, link in circle["links"].items():
        assert link.startswith(f"{live.url}/c/{circle['id']}#t="), link
        assert "?" not in link  # the token is never in the query (access logs, Referer)
        assert token_of(link).count(".") == 2, role
    assert {k: circle[k] for k in ("title", "topic", "language", "capacity", "turn_seconds",
                                   "floor_mode", "lobby", "locked")} == {
        "title": "Rahasia", "topic": "duka", "language": "en", "capacity": 8, "turn_seconds": 120,
        "floor_mode": "round", "lobby": False, "locked": False}
    status, defaults = await live.api("POST", "/api/circles", {"title": "Default"})
    assert status == 201
    assert (defaults["capacity"], defaults["turn_seconds"], defaults["lobby"], defaults["language"],
            defaults["floor_mode"]) == (15, 180, True, "id", "hands")


async def test_no_or_wrong_key_is_401_everywhere(live: Live) -> None:
    circle = await live.create_circle()
    calls = [("GET", "/api/circles"), ("POST", "/api/circles"), ("GET", f"/api/circles/{circle['id']}"),
             ("DELETE", f"/api/circles/{circle['id']}"), ("POST", f"/api/circles/{circle['id']}/invites")]
    for n, (method, path) in enumerate(calls):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                        {"Authorization": API_KEY}, {"Authorization": "Bearer "}):
            # each path from an address of its own (as the trusted loopback proxy says): wrong
            # keys are throttled per address, 10 a minute
            client = {"X-Forwarded-For": f"192.0.2.{n}", "Content-Type": "application/json"}
            status, body = await raw(live, method, path, b"{}", {**headers, **client})
            assert status == 401, (method, path, headers)
            assert body["error"] == "unauthorized" and set(body) == {"error", "message"}
    status, _ = await live.api("GET", f"/api/circles/{circle['id']}")
    assert status == 200  # nothing was ended by the refused DELETE


async def test_bad_bodies_are_4xx_with_an_error_code(live: Live) -> None:
    for capacity in (1, 51, 0, -3, "ten", None, 2.5):
        status, body = await live.api("POST", "/api/circles", {"title": "x", "capacity": capacity})
        assert status == 422, capacity
        assert body["error"] == "invalid"
    for bad in ({"title": ""}, {"title": "x", "turn_seconds": 29}, {"title": "x", "turn_seconds": 1801},
                {"title": "x", "language": "fr"}, {"title": "x", "floor_mode": "free"}, {"title": "x", "extra": 1},
                {}, [], {"title": "x" * 81}):
        status, body = await live.api("POST", "/api/circles", bad)
        assert status == 422, bad
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, body = await raw(live, "POST", "/api/circles", b"{nope", {**auth, "Content-Type": "application/json"})
    assert status == 400 and body["error"] == "bad_json"
    status, body = await raw(live, "POST", "/api/circles", b'{"title": "x"}', {**auth, "Content-Type": "text/plain"})
    assert status == 415
    big = json.dumps({"title": "x", "topic": "y" * 20_000}).encode()
    status, body = await raw(live, "POST", "/api/circles", big, {**auth, "Content-Type": "application/json"})
    assert status == 413


async def test_get_one_list_invite_and_404s(live: Live) -> None:
    circle = await live.create_circle()
    status, one = await live.api("GET", f"/api/circles/{circle['id']}")
    assert status == 200 and one["id"] == circle["id"] and "links" not in one
    status, listing = await live.api("GET", "/api/circles")
    assert status == 200 and circle["id"] in [c["id"] for c in listing["circles"]]
    for path in ("/api/circles/nope", "/api/circles/" + "x" * 65):
        status, body = await live.api("GET", path)
        assert status == 404 and body["error"] == "not_found"
    status, _ = await live.api("DELETE", "/api/circles/nope")
    assert status == 404
    status, _ = await live.api("POST", "/api/circles/nope/invites", {"role": "member"})
    assert status == 404
    status, inv = await live.api("POST", f"/api/circles/{circle['id']}/invites", {"role": "guest", "personal": False})
    assert status == 201 and inv["role"] == "guest" and inv["personal"] is False and "#t=" in inv["link"]
    status, _ = await live.api("POST", f"/api/circles/{circle['id']}/invites", {"role": "boss"})
    assert status == 422


async def test_delete_is_204_then_404(live: Live) -> None:
    circle = await live.create_circle()
    status, body = await live.api("DELETE", f"/api/circles/{circle['id']}")
    assert status == 204 and body is None
    status, _ = await live.api("GET", f"/api/circles/{circle['id']}")
    assert status == 404
    status, _ = await live.api("DELETE", f"/api/circles/{circle['id']}")
    assert status == 404
    status, listing = await live.api("GET", "/api/circles")
    assert circle["id"] not in [c["id"] for c in listing["circles"]]


async def test_list_shows_counts_only_never_a_pseudonym(live: Live) -> None:
    circle = await live.create_circle(lobby=True)
    links = circle["links"]
    mod = await join(live, links["moderator"], "PendampingRahasia")
    a = await join(live, links["member"], "MelatiRahasia", expect="lobby")
    await ack_of(mod, "admit", member_id=a.member_id)
    await join(live, links["member"], "KenangaRahasia", expect="lobby", listen_only=True)
    listener = await join(live, links["member"], "SunyiRahasia", expect="lobby", listen_only=True)
    await ack_of(mod, "admit", member_id=listener.member_id)
    await ack_of(a, "private_note", text="CatatanRahasia")
    status, one = await live.api("GET", f"/api/circles/{circle['id']}")
    assert status == 200
    assert one["counts"] == {"members": 2, "listeners": 1, "lobby": 1, "moderators": 1}
    assert one["moderator_present"] is True and one["floor_mode"] == "hands"
    status, listing = await live.api("GET", "/api/circles")
    text = json.dumps([listing, one])
    for secret in ("PendampingRahasia", "MelatiRahasia", "KenangaRahasia", "SunyiRahasia",
                   "CatatanRahasia", a.member_id, mod.member_id, a.resume):
        assert secret not in text, secret
    summary = [c for c in listing["circles"] if c["id"] == circle["id"]][0]
    assert summary["counts"] == one["counts"]


async def test_openapi_document_is_served(live: Live) -> None:
    status, doc = await raw(live, "GET", "/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/api/circles", "/api/circles/{id}", "/api/circles/{id}/invites",
                                 "/api/circles/{id}/invites/{invite}"}


def test_openapi_writes_the_enums_in_place() -> None:
    """The fields typed with rooms.model's enums read as they did when they were Literals."""
    schemas = openapi_document()["components"]["schemas"]
    assert set(schemas) == {"NewCircle", "NewInvite", "Error", "Counts", "CircleSummary"}
    assert schemas["NewCircle"]["properties"]["language"] == {"enum": ["en", "id"], "default": "id"}
    assert schemas["NewCircle"]["properties"]["floor_mode"] == {"enum": ["hands", "open", "round"],
                                                                "default": "hands"}
    assert schemas["NewInvite"]["properties"]["role"] == {"enum": ["guest", "member", "moderator"]}


@pytest.fixture
def threaded(store_url: str) -> Any:
    server = ThreadedLive(store_url)
    yield server
    server.close()


def test_schemathesis_finds_no_server_error(threaded: ThreadedLive) -> None:
    url = threaded.live.url
    schema = schemathesis.openapi.from_url(f"{url}/api/openapi.json")
    circle = threaded.run(threaded.live.create_circle())
    auth = {"Authorization": f"Bearer {API_KEY}"}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            path_parameters = {"id": circle["id"]} if "{id}" in operation.path and mode is GenerationMode.POSITIVE \
                and operation.method != "delete" else None
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

            @settings(max_examples=25, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case: Any) -> None:
                for headers in (auth, {}):
                    response = case.call(base_url=url, headers=headers, timeout=10)
                    if response.status_code >= 500:
                        failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                        f"{response.text[:200]}")
                    if not headers:  # refused; 429 once its wrong keys (negative cases) pass 10 a minute
                        assert response.status_code in (401, 429), (case.method, case.formatted_path)

            check()
    assert not failures, failures[:5]
    # This address sent wrong keys by the dozen and waits out the minute; an organizer
    # elsewhere (behind the loopback proxy, which is trusted) is served.
    status, _ = threaded.run(raw(threaded.live, "GET", f"/api/circles/{circle['id']}",
                                 headers={**auth, "X-Forwarded-For": "192.0.2.10"}))
    assert status in (200, 404)


async def test_ten_wrong_keys_a_minute_then_429_for_that_address_only(live: Live) -> None:
    wrong = {"Authorization": "Bearer guess-0123456789abcdefghijklmn"}
    right = {"Authorization": f"Bearer {API_KEY}"}
    for _ in range(10):
        assert (await raw(live, "GET", "/api/circles", headers=wrong))[0] == 401
    status, body = await raw(live, "GET", "/api/circles", headers=wrong)
    assert status == 429 and body["error"] == "too_many_requests"
    # Even the right key waits: otherwise guessing would go on behind the 429s.
    assert (await raw(live, "GET", "/api/circles", headers=right))[0] == 429
    # Another client (as a trusted proxy reports it; an IPv6 /64 is one client) is served.
    other = {**right, "X-Forwarded-For": "2001:db8:1:2::10"}
    assert (await raw(live, "GET", "/api/circles", headers=other))[0] == 200
    for n in range(10):
        neighbour = {**wrong, "X-Forwarded-For": f"2001:db8:1:2::{n + 100:x}"}
        assert (await raw(live, "GET", "/api/circles", headers=neighbour))[0] == 401
    assert (await raw(live, "GET", "/api/circles", headers=other))[0] == 429  # the same /64


async def test_forwarded_for_from_an_untrusted_peer_does_not_buy_fresh_guesses() -> None:
    async with live_server("memory", trusted_proxies="10.9.9.9") as live:
        for n in range(10):
            forged = {"Authorization": "Bearer guess-0123456789abcdefghijklmn", "X-Forwarded-For": f"192.0.2.{n}"}
            assert (await raw(live, "GET", "/api/circles", headers=forged))[0] == 401
        fresh = {"Authorization": f"Bearer {API_KEY}", "X-Forwarded-For": "192.0.2.99"}
        assert (await raw(live, "GET", "/api/circles", headers=fresh))[0] == 429
