"""A frontend on another origin, in a real headless Chromium: it follows a feed with
an `EventSource` across a restart of the web process it reads (no gap, no
duplicate), POSTs a command with `fetch` and Eddy's headers (a CORS preflight),
and a page of an origin not in `EDDY_CORS_ORIGINS` cannot open a WebSocket."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec

from core.settings import Settings
from devserver.embedded import free_port
from streams.connection import Redis
from tests.browser.conftest import Browser
from tests.processes import EddyProcess, fleet
from tests.stack import Stack, serving


async def create(web: EddyProcess, stack: Stack, n: int) -> list[str]:
    """`n` chat sessions created through `web`; their events' ids."""
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=web.url, timeout=10) as client:
        for _ in range(n):
            r = await client.post(
                "/v1/commands/CreateChatSession?wait=5",
                json={"agent_id": "a", "participants": []},
                headers=stack.auth(),
            )
            assert r.status_code == 200, r.text
            ids += [envelope["id"] for envelope in r.json()["events"]]
    return ids


async def test_a_page_of_another_origin_follows_a_feed_across_a_restart_and_posts(
    settings: Settings, schema: str, redis: Redis, tmp_path: Path, pages: int, browser: Browser
) -> None:
    settings = msgspec.structs.replace(settings, cors_origins=f"http://127.0.0.1:{pages}")
    stack = Stack(settings, "", httpx.AsyncClient())
    token = stack.token()
    port = free_port()
    async with fleet(settings, redis, tmp_path) as processes:
        await processes.start("worker")
        await processes.start("projector")
        read = await processes.start("web", port)
        other = await processes.start("web")

        await browser.open(f"http://127.0.0.1:{pages}/pages/client.html")
        await browser.run("follow(arguments[0], arguments[1], 'chat_sessions')", read.url, token)
        await browser.until("return window.feed.opens", lambda n: n == 1)
        expected = await create(other, stack, 3)

        # fetch with Eddy's headers: a preflight, then the POST, answered to the page
        answer: dict[str, Any] = await browser.run(
            "return submit(arguments[0], arguments[1], arguments[2], arguments[3])",
            read.url,
            token,
            f"browser-{uuid.uuid4().hex[:8]}",
            "from-the-page",
        )
        assert answer["status"] == 200, answer
        [event] = answer["body"]["events"]
        assert event["metadata"]["correlation_id"] == "from-the-page"
        expected.append(event["id"])
        await browser.until("return window.feed.got", lambda got: len(got) >= len(expected))

        # the web process the page reads restarts; events happen meanwhile
        read.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            assert await read.process.wait() == 0
        expected += await create(other, stack, 3)
        restarted = await processes.start("web", port)
        got = await browser.until(
            "return window.feed.got", lambda got: len(got) >= len(expected), within_s=30
        )
        expected += await create(restarted, stack, 2)
        got = await browser.until("return window.feed.got", lambda got: len(got) >= len(expected))
        assert len(got) == len(set(got)), "a duplicate"
        assert set(got) == set(expected), "a gap"
        assert await browser.run("return window.feed.opens") == 2  # reconnected once, by itself


async def test_a_websocket_from_an_unlisted_origin_is_refused(
    settings: Settings, schema: str, pages: int, browser: Browser
) -> None:
    settings = msgspec.structs.replace(settings, cors_origins=f"http://127.0.0.1:{pages}")
    async with serving(settings, worker=False, projector=False) as stack:
        url = f"{stack.url.replace('http', 'ws', 1)}/v1/ws?access_token={stack.token()}"

        # localhost is another origin than 127.0.0.1, and not listed
        await browser.open(f"http://localhost:{pages}/pages/client.html")
        await browser.run("open(arguments[0])", url)
        closed = await browser.until("return window.socket.closed", lambda code: code is not None)
        assert closed == 1006 and await browser.run("return window.socket.opened") is False

        await browser.open(f"http://127.0.0.1:{pages}/pages/client.html")
        await browser.run("open(arguments[0])", url)
        frames = await browser.until("return window.socket.frames", bool)
        assert frames[0]["op"] == "subscribed", frames
