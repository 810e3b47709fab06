"""Join tokens (JWT, HS256 pinned) and resume secrets (DESIGN §5 "Join tokens", §12).

A join token's claims: ``sub`` = circle id, ``role``, ``inv`` = invite id, ``exp``, ``iat``;
all are required. An optional ``lng`` (the circle's language) is only a hint for the web client,
which reads it unverified to show the join screen in that language and fetch one catalog only;
the server never relies on it. Verification accepts HS256 only: ``alg: none``, other HMAC sizes and
asymmetric algorithms are refused, so is a token for another circle.
"""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

import jwt

from rooms.model import Role

ALGORITHM: Final = "HS256"
MIN_SECRET_BYTES: Final = 32
# Tolerated clock difference between the process that issued a token and the one checking it.
CLOCK_SKEW_SECONDS: Final = 10
_REQUIRED_CLAIMS: Final = ["sub", "role", "inv", "exp", "iat"]
_ROLES: Final[dict[str, Role]] = {role.value: role for role in Role}


class TokenProblem(enum.StrEnum):
    """Why a token was refused (for logs and metrics; the client only sees close 4401)."""

    INVALID = "invalid"
    """Garbage, a forged or tampered signature, another key, or a refused algorithm."""
    EXPIRED = "expired"
    MISSING_CLAIM = "missing_claim"
    BAD_CLAIM = "bad_claim"
    OTHER_CIRCLE = "other_circle"


class TokenError(Exception):
    """A join token was refused; ``problem`` says why."""

    def __init__(self, problem: TokenProblem) -> None:
        super().__init__(problem.value)
        self.problem = problem


class SecretTooShort(ValueError):
    """The signing secret is shorter than ``MIN_SECRET_BYTES`` bytes."""


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified join token says."""

    circle_id: str
    role: Role
    invite_id: str
    expires_at: int
    issued_at: int


def _key(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if len(key) < MIN_SECRET_BYTES:
        raise SecretTooShort(f"the token secret must be at least {MIN_SECRET_BYTES} bytes")
    return key


def issue(
    secret: str | bytes,
    circle_id: str,
    role: Role,
    invite_id: str,
    ttl_seconds: int,
    *,
    now: int | None = None,
    language: str | None = None,
) -> str:
    """Return a signed join token valid for ``ttl_seconds`` from ``now`` (epoch s, default: clock)."""
    known = _ROLES.get(role) if isinstance(role, str) else None
    if known is None:
        raise ValueError(f"unknown role {role!r}")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    issued_at = int(time.time()) if now is None else now
    payload = {
        "sub": circle_id,
        "role": known.value,
        "inv": invite_id,
        "iat": issued_at,
        "exp": issued_at + ttl_seconds,
    }
    if language is not None:
        payload["lng"] = language
    return jwt.encode(payload, _key(secret), algorithm=ALGORITHM)


def verify(secret: str | bytes, token: str, circle_id: str) -> Claims:
    """Return the claims of ``token`` for ``circle_id``, or raise :class:`TokenError`."""
    key = _key(secret)
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            options={"require": _REQUIRED_CLAIMS},
            leeway=CLOCK_SKEW_SECONDS,
        )
    except jwt.ExpiredSignatureError:
        raise TokenError(TokenProblem.EXPIRED) from None
    except jwt.MissingRequiredClaimError:
        raise TokenError(TokenProblem.MISSING_CLAIM) from None
    except (jwt.exceptions.InvalidSubjectError, jwt.ImmatureSignatureError, jwt.InvalidIssuedAtError):
        raise TokenError(TokenProblem.BAD_CLAIM) from None
    except (jwt.InvalidTokenError, ValueError, TypeError):
        # InvalidTokenError covers bad signatures, refused algorithms and undecodable input.
        raise TokenError(TokenProblem.INVALID) from None
    raw_role, invite_id = payload["role"], payload["inv"]
    role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None or not isinstance(invite_id, str):
        raise TokenError(TokenProblem.BAD_CLAIM)
    if payload["sub"] != circle_id:
        raise TokenError(TokenProblem.OTHER_CIRCLE)
    return Claims(
        circle_id=circle_id,
        role=role,
        invite_id=invite_id,
        expires_at=int(payload["exp"]),
        issued_at=int(payload["iat"]),
    )


def new_resume_secret() -> str:
    """A fresh opaque resume secret (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def unverified_circle(token: str) -> str | None:
    """The circle a token names, read WITHOUT checking it: only to choose which circle to
    `verify` against (the signature then covers it). None for garbage."""
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    sub = payload.get("sub") if isinstance(payload, dict) else None
    return sub if isinstance(sub, str) and 0 < len(sub) <= 64 else None
