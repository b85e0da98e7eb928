"""Tokens and principals: HS256 JWTs with `sub`, `tenant`, `roles`, `exp` (PyJWT)."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

import jwt
import msgspec
from starlette.requests import HTTPConnection

from core.errors import Forbidden, Unauthenticated
from core.messages import ROLES

ALGORITHM = "HS256"


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling: the token's subject, tenant and roles."""

    sub: str
    tenant: str
    roles: tuple[str, ...]

    def require(self, allowed: Iterable[str]) -> None:
        if not set(self.roles) & set(allowed):
            raise Forbidden(f"roles {list(self.roles)} may not do this")


def issue_token(secret: str, *, tenant: str, sub: str, roles: Iterable[str], ttl_s: int) -> str:
    roles = list(roles)
    unknown = set(roles) - ROLES
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; known: {sorted(ROLES)}")
    claims = {"sub": sub, "tenant": tenant, "roles": roles, "exp": int(time.time()) + ttl_s}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str) -> Principal:
    """The principal of a valid token; `Unauthenticated` otherwise.

    Verifying an HS256 JWT costs about a quarter of a command submission's CPU, and
    clients send the same token again and again: verified tokens are remembered
    (bounded LRU) until they expire. Bad tokens are never remembered.
    """
    principal, expires_at = _verified(secret, token)
    if time.time() >= expires_at:
        raise Unauthenticated("token expired")
    return principal


@functools.lru_cache(maxsize=4096)
def _verified(secret: str, token: str) -> tuple[Principal, float]:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "tenant", "roles", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated(f"bad token: {exc}") from None
    sub, tenant, roles = claims["sub"], claims["tenant"], claims["roles"]
    if not (isinstance(sub, str) and sub and isinstance(tenant, str) and tenant):
        raise Unauthenticated("bad token: sub and tenant must be non-empty strings")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthenticated("bad token: roles must be a list of strings")
    principal = Principal(sub=sub, tenant=tenant, roles=tuple(r for r in roles if r in ROLES))
    try:
        expires_at = float(claims["exp"])
    except OverflowError:  # signed, but past any date a float holds: "never", capped
        expires_at = float("inf")
    return principal, expires_at


def authenticate(
    conn: HTTPConnection, secret: str, *, allow_query_token: bool = False
) -> Principal:
    """The principal of a request or WebSocket: `Authorization: Bearer`, or for
    browsers' SSE and WebSocket (`allow_query_token`) `?access_token=`."""
    header = conn.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if header and scheme.lower() == "bearer" and token.strip():
        return verify_token(secret, token.strip())
    if allow_query_token and conn.query_params.get("access_token"):
        return verify_token(secret, conn.query_params["access_token"])
    raise Unauthenticated("missing bearer token")
