"""CORS as a browser's preflight sees it (`app/cors.py`); the real browser is in
`tests/browser/test_cors.py`."""

from __future__ import annotations

import msgspec
import pytest

from app.cors import ALLOWED_HEADERS, DEV_ORIGINS, Origins
from core.settings import Settings
from tests.stack import Stack

PAGE = "https://app.example.com"


@pytest.fixture
def stack_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, cors_origins=f"{PAGE}, http://localhost:*")


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": ", ".join(h.lower() for h in ALLOWED_HEADERS),
    }


async def test_a_listed_page_may_post_with_eddys_headers_and_read_retry_after(
    stack: Stack,
) -> None:
    for origin in (PAGE, "http://localhost:3000"):
        r = await stack.client.options("/v1/commands/CreateChatSession", headers=preflight(origin))
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == origin
        assert "POST" in r.headers["access-control-allow-methods"]
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {h.lower() for h in ALLOWED_HEADERS} <= allowed
        assert "access-control-allow-credentials" not in r.headers  # tokens, never cookies
    r = await stack.client.get("/v1/chat-sessions", headers={**stack.auth(), "Origin": PAGE})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == PAGE
    assert r.headers["access-control-expose-headers"] == "Retry-After"


async def test_an_unlisted_page_gets_no_cors_answer(stack: Stack) -> None:
    for origin in ("https://evil.example.net", "http://localhost.evil.net:3000"):
        r = await stack.client.options("/v1/commands/CreateChatSession", headers=preflight(origin))
        assert r.status_code == 400
        r = await stack.client.get("/v1/chat-sessions", headers={**stack.auth(), "Origin": origin})
        assert "access-control-allow-origin" not in r.headers
    # a plain OPTIONS (not a preflight) is still a 405 with its Allow
    assert (await stack.client.options("/v1/chat-sessions")).status_code == 405


def test_origins_from_the_setting() -> None:
    dev = Origins(DEV_ORIGINS)
    assert dev.allows("http://localhost:5173") and dev.allows("http://127.0.0.1:3000")
    assert not dev.allows("http://localhost.example.com:80") and not dev.allows(
        "https://localhost:1"
    )
    wildcard = Origins("https://*.example.com")
    assert wildcard.allows("https://app.example.com")
    assert not wildcard.allows("https://example.com.evil.net/x.example.com")
    assert Origins("*").allows("https://anyone.example") and not Origins("").allows(PAGE)
