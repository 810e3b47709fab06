"""The organizer REST API (DESIGN §10): create circles, list them with counts only, invite,
end. Bearer key checked in constant time; links carry their tokens in the URL fragment."""

from __future__ import annotations

import hmac
import json
import re
import secrets
import time
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rooms import commands as c
from rooms.errors import Code, RoomError
from rooms.model import CircleSettings, FloorMode, Invite, Language, Role, RoomState
from server.config import Settings
from signaling import tokens
from signaling.addresses import prefix
from signaling.ratelimit import Window
from storage.layout import CIRCLE_ID
from storage.manager import Busy, RoomManager
from storage.store import CircleExists, NoSuchCircle, StoreError

LINK_TTL_SECONDS = 7 * 24 * 3600
# A moderator's link hears everything, reads private notes and can end the circle: it lives a
# day (enough to be sent the evening before a meeting), and the organizer page mints a new,
# named one at any time. Member and guest links keep the week a circle's members need.
MODERATOR_LINK_TTL_SECONDS = 24 * 3600
_INVITE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_BODY = 16 * 1024
WRONG_KEYS_PER_MINUTE = 10  # per address (an IPv6 /64 counts as one), then 429 (DESIGN §10)


class NewCircle(msgspec.Struct, forbid_unknown_fields=True):
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=80)]
    topic: Annotated[str, msgspec.Meta(max_length=200)] = ""
    language: Language = Language.ID
    capacity: Annotated[int, msgspec.Meta(ge=2, le=50)] = 15
    turn_seconds: Annotated[int, msgspec.Meta(ge=30, le=1800)] = 180
    floor_mode: FloorMode = FloorMode.HANDS
    lobby: bool = True


class NewInvite(msgspec.Struct, forbid_unknown_fields=True):
    role: Role
    personal: bool = True
    """Ignored for moderators: a moderator invite is always for one person (F10)."""
    label: Annotated[str, msgspec.Meta(max_length=40)] = ""
    """The organizer's own note of whom the link is for; never shown in the circle."""


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


class OrganizerApi:
    def __init__(self, settings: Settings, manager: RoomManager) -> None:
        self.settings = settings
        self.manager = manager
        self._key = settings.api_key.encode()
        self._wrong_keys = Window(WRONG_KEYS_PER_MINUTE, 60.0)

    def routes(self) -> list[Route]:
        return [
            Route("/api/openapi.json", self.openapi, methods=["GET"]),
            Route("/api/circles", self._guard(self.create), methods=["POST"]),
            Route("/api/circles", self._guard(self.list), methods=["GET"]),
            Route("/api/circles/{id}", self._guard(self.get), methods=["GET"]),
            Route("/api/circles/{id}", self._guard(self.end), methods=["DELETE"]),
            Route("/api/circles/{id}/invites", self._guard(self.invite), methods=["POST"]),
            Route("/api/circles/{id}/invites", self._guard(self.invites), methods=["GET"]),
            Route("/api/circles/{id}/invites/{invite}", self._guard(self.revoke), methods=["DELETE"]),
        ]

    def authorized(self, request: Request) -> Response | None:
        """None when the request carries the organizer key as a Bearer token; else the answer:
        401, or 429 once its address sent 10 wrong keys in a minute (then even the right key
        waits, or guessing would go on unhindered behind the 429s)."""
        address = prefix(request.client.host) if request.client else ""
        now = time.monotonic()
        if self._wrong_keys.exceeded(address, now):
            return JSONResponse({"error": "too_many_requests",
                                 "message": "too many wrong organizer keys; wait a minute"},
                                status_code=429, headers={"Retry-After": "60"})
        auth = request.headers.get("authorization")
        if auth is None:
            return _error(401, "unauthorized", "a valid organizer key is needed")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self._key):
            self._wrong_keys.strike(address, now)
            return _error(401, "unauthorized", "a valid organizer key is needed")
        return None

    def _guard(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            refused = self.authorized(request)
            if refused is not None:
                return refused
            try:
                response: Response = await handler(request)
                return response
            except NoSuchCircle:
                return _error(404, "not_found", "no such circle")
            except (StoreError, Busy):
                return _error(503, "unavailable", "the store cannot be reached; try again")

        return endpoint

    async def _body(self, request: Request, schema: type[Any]) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise _Refused(_error(413, "too_large", "request body too large"))
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise _Refused(_error(415, "unsupported_media_type", "send application/json"))
        try:
            return msgspec.json.decode(raw, type=schema)
        except msgspec.ValidationError as err:
            raise _Refused(_error(422, "invalid", str(err))) from None
        except msgspec.DecodeError:
            raise _Refused(_error(400, "bad_json", "the body is not valid JSON")) from None

    def _circle_id(self, request: Request) -> str:
        cid = request.path_params["id"]
        if not CIRCLE_ID.fullmatch(cid):  # ids are made by `secrets.token_urlsafe`
            raise NoSuchCircle(cid)
        return str(cid)

    def link(self, circle_id: str, invite: Invite, language: Language) -> str:
        ttl = MODERATOR_LINK_TTL_SECONDS if invite.role is Role.MODERATOR else LINK_TTL_SECONDS
        token = tokens.issue(self.settings.secret, circle_id, invite.role, invite.id,
                             ttl, language=language.value)
        return f"{self.settings.public_url}/c/{circle_id}#t={token}"

    def summary(self, state: RoomState) -> dict[str, Any]:
        """Counts only (F14): never a member's name."""
        circle = state.circle
        members = state.members.values()
        return {
            "id": circle.id, "title": circle.title, "topic": circle.topic,
            "language": circle.language.value, "capacity": circle.capacity,
            "turn_seconds": circle.turn_seconds, "floor_mode": state.mode.value,
            "lobby": circle.lobby, "locked": state.locked,
            "counts": {
                "members": sum(1 for m in members if not m.listen_only),
                "listeners": sum(1 for m in members if m.listen_only),
                "lobby": len(state.lobby),
                "moderators": sum(1 for m in members if m.role is Role.MODERATOR),
            },
            "moderator_present": state.moderator_present,
            "running_seconds": max(0, (int(time.time() * 1000) - circle.created_at) // 1000),
        }

    async def create(self, request: Request) -> Response:
        try:
            body: NewCircle = await self._body(request, NewCircle)
        except _Refused as r:
            return r.response
        circle = CircleSettings(id=secrets.token_urlsafe(9), title=body.title.strip() or "Lingkar",
                                topic=body.topic, language=body.language,
                                capacity=body.capacity, turn_seconds=body.turn_seconds,
                                floor_mode=body.floor_mode, lobby=body.lobby,
                                grace_seconds=self.settings.grace_seconds,
                                created_at=int(time.time() * 1000))
        invites = [Invite(secrets.token_urlsafe(9), role, personal=role is Role.MODERATOR)
                   for role in (Role.MODERATOR, Role.MEMBER, Role.GUEST)]
        try:
            state = await self.manager.create(circle, invites)
        except CircleExists:
            return _error(409, "conflict", "try again")
        links = {inv.role.value: self.link(circle.id, inv, circle.language) for inv in invites}
        ids = {inv.role.value: inv.id for inv in invites}
        return JSONResponse({**self.summary(state), "links": links, "invites": ids}, status_code=201)

    async def list(self, request: Request) -> Response:
        states = await self.manager.circles()
        return JSONResponse({"circles": [self.summary(s) for s in states if not s.ended]})

    async def get(self, request: Request) -> Response:
        state = await self.manager.load(self._circle_id(request))
        return JSONResponse(self.summary(state))

    async def end(self, request: Request) -> Response:
        try:
            await self.manager.execute(self._circle_id(request), c.EndByOrganizer())
        except RoomError:
            pass  # already ended
        return Response(status_code=204)

    async def invite(self, request: Request) -> Response:
        circle_id = self._circle_id(request)
        try:
            body: NewInvite = await self._body(request, NewInvite)
        except _Refused as r:
            return r.response
        personal = body.personal or body.role is Role.MODERATOR
        invite = Invite(secrets.token_urlsafe(9), body.role, personal, body.label.strip())
        try:
            state, _ = await self.manager.execute(
                circle_id, c.CreateInvite(invite.id, invite.role, invite.personal, invite.label))
        except RoomError:
            return _error(404, "not_found", "no such circle")
        return JSONResponse({"id": invite.id, "link": self.link(circle_id, invite, state.circle.language),
                             "role": invite.role.value, "personal": invite.personal,
                             "label": invite.label}, status_code=201)

    async def invites(self, request: Request) -> Response:
        """The circle's invites with how many people hold a place through each: counts and
        the organizer's own labels, never a member's name."""
        state = await self.manager.load(self._circle_id(request))
        holders: dict[str, int] = {}
        for m in (*state.members.values(), *state.lobby.values()):
            holders[m.invite_id] = holders.get(m.invite_id, 0) + 1
        return JSONResponse({"invites": [
            {"id": i.id, "role": i.role.value, "personal": i.for_one_person, "label": i.label,
             "revoked": i.id in state.revoked, "holders": holders.get(i.id, 0)}
            for i in state.invites.values()]})

    async def revoke(self, request: Request) -> Response:
        """Revoke an invite: refused from now on; whoever holds a place through it is out,
        their sockets closed with 4403 (F10)."""
        circle_id = self._circle_id(request)
        invite_id = request.path_params["invite"]
        if not _INVITE_ID.fullmatch(invite_id):
            return _error(404, "not_found", "no such invite")
        try:
            await self.manager.execute(circle_id, c.RevokeInvite(invite_id))
        except RoomError as err:
            if err.code is Code.ENDED:
                raise NoSuchCircle(circle_id) from None
            return _error(404, "not_found", "no such invite")
        return Response(status_code=204)

    async def openapi(self, request: Request) -> Response:
        return Response(json.dumps(openapi_document()), media_type="application/json")


class _Refused(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def _inline_enums(components: dict[str, Any]) -> dict[str, Any]:
    """msgspec describes an enum field as a `$ref` to a schema of its own; write each enum in
    place (`{"enum": [...]}`, beside the field's default) instead, so the document reads as
    it did when the fields were `Literal`s, and no enum turns up as a schema of the API."""
    ref = "#/components/schemas/{}".format
    enums = {ref(name): schema["enum"] for name, schema in components.items() if "enum" in schema}

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("$ref") in enums:
                rest = {k: inline(v) for k, v in node.items() if k != "$ref"}
                return {"enum": enums[node["$ref"]], **rest}
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {name: inline(schema) for name, schema in components.items()
            if ref(name) not in enums}


def openapi_document() -> dict[str, Any]:
    error = {"$ref": "#/components/schemas/Error"}

    def errors(*codes: int) -> dict[str, Any]:
        if 401 in codes:  # wrong keys are throttled per address
            codes = (*codes, 429)
        return {str(code): {"description": "error", "content": {"application/json": {"schema": error}}}
                for code in codes}

    summary = {"$ref": "#/components/schemas/CircleSummary"}
    circle_id = {"name": "id", "in": "path", "required": True,
                 "schema": {"type": "string", "minLength": 1, "maxLength": 64}}
    invite_id = {"name": "invite", "in": "path", "required": True,
                 "schema": {"type": "string", "minLength": 1, "maxLength": 64}}
    invite_view = {"type": "object", "required": ["id", "role", "personal", "label", "revoked", "holders"],
                   "properties": {"id": {"type": "string"}, "role": {"type": "string"},
                                  "personal": {"type": "boolean"}, "label": {"type": "string"},
                                  "revoked": {"type": "boolean"}, "holders": {"type": "integer"}}}
    _, components = msgspec.json.schema_components([NewCircle, NewInvite],
                                                   ref_template="#/components/schemas/{name}")
    components = _inline_enums(components)
    return {
        "openapi": "3.0.3",
        "info": {"title": "Lingkar organizer API", "version": "1"},
        "components": {
            "securitySchemes": {"organizerKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                **components,
                "Error": {"type": "object", "required": ["error", "message"],
                          "properties": {"error": {"type": "string"}, "message": {"type": "string"}}},
                "Counts": {"type": "object", "properties": {
                    k: {"type": "integer"} for k in ("members", "listeners", "lobby", "moderators")}},
                "CircleSummary": {
                    "type": "object",
                    "required": ["id", "title", "floor_mode", "counts", "moderator_present"],
                    "properties": {
                        "id": {"type": "string"}, "title": {"type": "string"},
                        "topic": {"type": "string"}, "language": {"type": "string"},
                        "capacity": {"type": "integer"}, "turn_seconds": {"type": "integer"},
                        "floor_mode": {"type": "string"}, "lobby": {"type": "boolean"},
                        "locked": {"type": "boolean"},
                        "counts": {"$ref": "#/components/schemas/Counts"},
                        "moderator_present": {"type": "boolean"},
                        "running_seconds": {"type": "integer"},
                        "links": {"type": "object", "additionalProperties": {"type": "string"}},
                        "invites": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                },
            },
        },
        "security": [{"organizerKey": []}],
        "paths": {
            "/api/circles": {
                "post": {
                    "operationId": "createCircle",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/NewCircle"}}}},
                    "responses": {"201": {"description": "created, with links",
                                          "content": {"application/json": {"schema": summary}}},
                                  **errors(400, 401, 413, 415, 422, 503)},
                },
                "get": {
                    "operationId": "listCircles",
                    "responses": {"200": {"description": "live circles, counts only", "content": {
                        "application/json": {"schema": {"type": "object", "properties": {
                            "circles": {"type": "array", "items": summary}}}}}},
                        **errors(401, 503)},
                },
            },
            "/api/circles/{id}": {
                "parameters": [circle_id],
                "get": {"operationId": "getCircle",
                        "responses": {"200": {"description": "one circle", "content": {
                            "application/json": {"schema": summary}}}, **errors(401, 404, 503)}},
                "delete": {"operationId": "endCircle",
                           "responses": {"204": {"description": "ended"}, **errors(401, 404, 503)}},
            },
            "/api/circles/{id}/invites": {
                "parameters": [circle_id],
                "post": {
                    "operationId": "createInvite",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/NewInvite"}}}},
                    "responses": {"201": {"description": "a link", "content": {"application/json": {
                        "schema": {"type": "object", "properties": {
                            "id": {"type": "string"}, "link": {"type": "string"},
                            "role": {"type": "string"}, "personal": {"type": "boolean"},
                            "label": {"type": "string"}}}}}},
                        **errors(400, 401, 404, 413, 415, 422, 503)},
                },
                "get": {
                    "operationId": "listInvites",
                    "responses": {"200": {"description": "the circle's invites, counts only", "content": {
                        "application/json": {"schema": {"type": "object", "properties": {
                            "invites": {"type": "array", "items": invite_view}}}}}},
                        **errors(401, 404, 503)},
                },
            },
            "/api/circles/{id}/invites/{invite}": {
                "parameters": [circle_id, invite_id],
                "delete": {"operationId": "revokeInvite",
                           "responses": {"204": {"description": "revoked; its holders closed with 4403"},
                                         **errors(401, 404, 503)}},
            },
        },
    }
