"""Tokens: issue, verify, expiry, tampering — pure."""

from __future__ import annotations

import time

import jwt
import pytest

from app.auth import issue_token, verify_token
from core.errors import Unauthenticated

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"


def test_a_token_round_trips() -> None:
    token = issue_token(SECRET, tenant="t1", sub="alice", roles=["agent", "user"], ttl_s=60)
    principal = verify_token(SECRET, token)
    assert (principal.tenant, principal.sub, principal.roles) == ("t1", "alice", ("agent", "user"))
    assert verify_token(SECRET, token) == principal  # (remembered)


def test_unknown_roles_cannot_be_issued() -> None:
    with pytest.raises(ValueError, match="unknown roles"):
        issue_token(SECRET, tenant="t", sub="s", roles=["root"], ttl_s=60)


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        issue_token(
            "another-secret-that-is-long-enough-for-hs256", tenant="t", sub="s", roles=[], ttl_s=60
        ),
        jwt.encode(
            {"sub": "s", "roles": [], "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
        ),
        jwt.encode(
            {"sub": "s", "tenant": "", "roles": [], "exp": int(time.time()) + 60},
            SECRET,
            algorithm="HS256",
        ),
        jwt.encode(
            {"sub": "s", "tenant": "t", "roles": "admin", "exp": int(time.time()) + 60},
            SECRET,
            algorithm="HS256",
        ),
        jwt.encode(
            {"sub": "s", "tenant": "t", "roles": [], "exp": int(time.time()) - 1},
            SECRET,
            algorithm="HS256",
        ),
    ],
    ids=["garbage", "other-secret", "no-tenant", "empty-tenant", "roles-not-a-list", "expired"],
)
def test_bad_tokens_are_refused(token: str) -> None:
    with pytest.raises(Unauthenticated):
        verify_token(SECRET, token)


def test_a_remembered_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    token = issue_token(SECRET, tenant="t", sub="s", roles=["user"], ttl_s=5)
    verify_token(SECRET, token)
    later = time.time() + 10
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(Unauthenticated, match="expired"):
        verify_token(SECRET, token)
