"""Join tokens: only HS256 tokens signed with our key, for this circle, unexpired, are accepted."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from signaling.tokens import (
    Claims,
    SecretTooShort,
    TokenError,
    TokenProblem,
    issue,
    new_resume_secret,
    verify,
)

SECRET = "s" * 64  # long enough that HS512 forgeries raise no key-length warning
OTHER_SECRET = "o" * 64
CIRCLE = "circle-1"


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": CIRCLE, "role": "member", "inv": "inv-1", "iat": now, "exp": now + 600}
    payload.update(changes)
    return {key: value for key, value in payload.items() if value is not None}


def forged(payload: dict[str, Any], key: str | bytes = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


def refused(token: str) -> TokenProblem:
    with pytest.raises(TokenError) as info:
        verify(SECRET, token, CIRCLE)
    return info.value.problem


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_issued_token_verifies_with_its_claims() -> None:
    token = issue(SECRET, CIRCLE, "moderator", "inv-9", ttl_seconds=300, now=int(time.time()))
    result = verify(SECRET, token, CIRCLE)
    assert result == Claims(
        circle_id=CIRCLE,
        role="moderator",
        invite_id="inv-9",
        expires_at=result.issued_at + 300,
        issued_at=result.issued_at,
    )


@pytest.mark.parametrize("role", ["moderator", "member", "guest"])
def test_every_role_round_trips(role: Any) -> None:
    assert verify(SECRET, issue(SECRET, CIRCLE, role, "i", 60), CIRCLE).role == role


def test_token_signed_with_another_key_is_refused() -> None:
    assert refused(issue(OTHER_SECRET, CIRCLE, "member", "i", 60)) is TokenProblem.INVALID


def test_tampered_payload_is_refused() -> None:
    header, _, signature = issue(SECRET, CIRCLE, "member", "i", 60).split(".")
    payload = b64(json.dumps(claims(role="moderator")).encode())
    assert refused(f"{header}.{payload}.{signature}") is TokenProblem.INVALID


def test_tampered_signature_is_refused() -> None:
    token = issue(SECRET, CIRCLE, "member", "i", 60)
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert refused(flipped) is TokenProblem.INVALID


def test_expired_token_is_refused() -> None:
    token = issue(SECRET, CIRCLE, "member", "i", ttl_seconds=60, now=int(time.time()) - 3600)
    assert refused(token) is TokenProblem.EXPIRED


def test_token_without_exp_is_refused() -> None:
    assert refused(forged(claims(exp=None))) is TokenProblem.MISSING_CLAIM


@pytest.mark.parametrize("claim", ["sub", "role", "inv", "iat"])
def test_token_without_a_required_claim_is_refused(claim: str) -> None:
    assert refused(forged(claims(**{claim: None}))) is TokenProblem.MISSING_CLAIM


def test_token_for_another_circle_is_refused() -> None:
    assert refused(issue(SECRET, "circle-2", "member", "i", 60)) is TokenProblem.OTHER_CIRCLE


def test_alg_none_is_refused() -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims()).encode())
    assert refused(f"{header}.{payload}.") is TokenProblem.INVALID


def test_alg_none_with_a_signature_is_refused() -> None:
    token = issue(SECRET, CIRCLE, "member", "i", 60)
    _, payload, signature = token.split(".")
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    assert refused(f"{header}.{payload}.{signature}") is TokenProblem.INVALID


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_hmac_algorithms_with_our_key_are_refused(algorithm: str) -> None:
    assert refused(forged(claims(), algorithm=algorithm)) is TokenProblem.INVALID


def test_asymmetric_algorithm_is_refused() -> None:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(jwt.encode(claims(), private_key, algorithm="RS256")) is TokenProblem.INVALID


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "....", "eyJ.eyJ.sig", "\x00\xff", "a" * 5000])
def test_garbage_is_refused(garbage: str) -> None:
    assert refused(garbage) is TokenProblem.INVALID


@pytest.mark.parametrize("role", ["admin", "Moderator", "", 1, None, ["moderator"], {"r": 1}])
def test_wrong_role_value_is_refused(role: Any) -> None:
    payload = claims()
    payload["role"] = role
    assert refused(forged(payload)) in (TokenProblem.BAD_CLAIM, TokenProblem.MISSING_CLAIM)


@pytest.mark.parametrize(
    "changes",
    [{"inv": 5}, {"sub": 7}, {"exp": "soon"}, {"iat": "then"}, {"iat": int(time.time()) + 3600}],
)
def test_wrongly_typed_or_future_claims_are_refused(changes: dict[str, Any]) -> None:
    assert refused(forged(claims(**changes))) in (TokenProblem.BAD_CLAIM, TokenProblem.INVALID)


def test_short_secret_is_refused_for_issue_and_verify() -> None:
    with pytest.raises(SecretTooShort):
        issue("x" * 31, CIRCLE, "member", "i", 60)
    with pytest.raises(SecretTooShort):
        verify(b"x" * 31, issue(SECRET, CIRCLE, "member", "i", 60), CIRCLE)


def test_secret_length_is_counted_in_bytes() -> None:
    secret = "é" * 16  # 16 characters, 32 bytes
    assert verify(secret, issue(secret, CIRCLE, "guest", "i", 60), CIRCLE).role == "guest"


def test_issue_refuses_nonsense_arguments() -> None:
    with pytest.raises(ValueError):
        issue(SECRET, CIRCLE, "admin", "i", 60)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        issue(SECRET, CIRCLE, "member", "i", 0)


def test_resume_secrets_are_fresh_and_long() -> None:
    first, second = new_resume_secret(), new_resume_secret()
    assert first != second
    assert len(first) >= 43
