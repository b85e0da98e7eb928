"""Browsers: which web pages may call Eddy (CORS), and which may open its WebSocket.

`EDDY_CORS_ORIGINS` lists the origins of the pages that may (`eddy dev`: any port of
`localhost` and `127.0.0.1`). HTTP goes through Starlette's `CORSMiddleware`:
preflights are answered for the headers a client sends (`Authorization`,
`Content-Type`, `Idempotency-Key`, `X-Correlation-ID`, `Last-Event-ID`,
`X-After-Position`), and pages may read `Retry-After`. Tokens travel in the
`Authorization` header or `?access_token=`, never in cookies, so no credentials
mode is allowed.

A WebSocket handshake is not subject to CORS: a page of any origin can open one,
and the browser sends the page's `Origin` along. So the endpoint checks it itself
and refuses (403, before accepting) a page whose origin is not allowed and not
Eddy's own: cross-site WebSocket hijacking. A client that is not a browser sends no
`Origin` and is not concerned.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

ALLOWED_HEADERS = (
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "X-Correlation-ID",
    "Last-Event-ID",
    "X-After-Position",
)
EXPOSED_HEADERS = ("Retry-After",)
METHODS = ("GET", "POST", "DELETE")
DEV_ORIGINS = "http://localhost:*,http://127.0.0.1:*"
"""What `eddy dev` allows when `EDDY_CORS_ORIGINS` is not set."""


class Origins:
    """The allowed origins, from `EDDY_CORS_ORIGINS`: exact ones, and patterns
    where `*` stands for any run of characters but `/` (a port, a subdomain)."""

    def __init__(self, setting: str) -> None:
        entries = [entry.strip().rstrip("/") for entry in setting.split(",") if entry.strip()]
        self.any = "*" in entries
        self.exact = [e for e in entries if "*" not in e]
        patterns = [re.escape(e).replace(r"\*", "[^/]*") for e in entries if "*" in e and e != "*"]
        self.regex = "|".join(f"(?:{p})" for p in patterns) or None
        self._compiled = re.compile(self.regex) if self.regex else None

    def allows(self, origin: str) -> bool:
        return (
            self.any
            or origin in self.exact
            or (self._compiled is not None and self._compiled.fullmatch(origin) is not None)
        )

    def middleware(self) -> Middleware:
        return Middleware(
            CORSMiddleware,
            allow_origins=["*"] if self.any else self.exact,
            allow_origin_regex=None if self.any else self.regex,
            allow_methods=METHODS,
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )


def own_origin(headers: Mapping[str, str], scheme: str) -> str:
    """The origin of a page served by Eddy itself, as a request to it names it."""
    secure = scheme in ("https", "wss")
    return f"{'https' if secure else 'http'}://{headers.get('host', '')}"


def websocket_allowed(origins: Origins, headers: Mapping[str, str], scheme: str) -> bool:
    """Whether a WebSocket handshake may proceed: no `Origin` (not a browser), Eddy's
    own pages, or an allowed origin."""
    origin = headers.get("origin")
    return origin is None or origin == own_origin(headers, scheme) or origins.allows(origin)
