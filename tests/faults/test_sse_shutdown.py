"""SIGTERM ends a web process's SSE feeds at once and cleanly: each response
finishes within a fraction of a second (not when uvicorn's graceful-shutdown
deadline cancels it mid-write, 10 s later, with `Exception in ASGI application`
in the log), the process exits 0, and a client reconnects to another web process
with its last id and receives what it missed: no gap, no duplicate.

Without `app.web.stop_feeds` (called by `app.runtime.web_process` on a signal)
the feed stays open for the whole grace period: the timing below fails."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from core.settings import Settings
from streams.connection import Redis
from tests.processes import EddyProcess, fleet
from tests.sse import Frame, frames
from tests.stack import Stack

pytestmark = pytest.mark.slow

ENDED_WITHIN_S = 1.0
"""An SSE response of a web process sent SIGTERM ends within this long."""


async def create(web: EddyProcess, stack: Stack, n: int) -> list[str]:
    """`n` chat sessions created through `web`; their event ids."""
    ids = []
    async with httpx.AsyncClient(base_url=web.url, timeout=10) as client:
        for _ in range(n):
            r = await client.post(
                "/v1/commands/CreateChatSession?wait=5",
                json={"agent_id": "a", "participants": []},
                headers={**stack.auth(), "Idempotency-Key": uuid.uuid4().hex},
            )
            assert r.status_code == 200, r.text
            ids += [envelope["id"] for envelope in r.json()["events"]]
    return ids


async def events(feed: AsyncIterator[Frame], want: set[str], last_id: str) -> tuple[list[str], str]:
    """Event ids read until every one of `want` arrived; and the last id."""
    got: list[str] = []
    with anyio.fail_after(10):
        while not want <= set(got):
            frame: Frame = await anext(feed)
            last_id = frame.id or last_id
            if frame.event is not None and frame.data is not None:
                got.append(frame.envelope.id)
    return got, last_id


@pytest.mark.timeout(90)
async def test_sigterm_ends_sse_feeds_at_once_and_a_client_resumes_elsewhere(
    settings: Settings, schema: str, redis: Redis, tmp_path: Path
) -> None:
    stack = Stack(settings, "", httpx.AsyncClient())
    params = {"topic": "chat_sessions"}
    async with fleet(settings, redis, tmp_path) as processes:
        await processes.start("worker")
        await processes.start("projector")
        doomed = await processes.start("web")
        other = await processes.start("web")
        async with (
            httpx.AsyncClient(base_url=doomed.url, timeout=httpx.Timeout(10, read=30)) as client,
            client.stream("GET", "/v1/events/stream", params=params, headers=stack.auth()) as feed,
        ):
            assert feed.status_code == 200
            live = frames(feed)
            before = await create(other, stack, 3)
            got, last_id = await events(live, set(before), "")
            assert got == before

            doomed.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            with anyio.fail_after(ENDED_WITHIN_S):
                async for _ in live:  # what remains, then the clean end
                    pass
            ended_s = time.monotonic() - signalled
        with anyio.fail_after(15):
            code = await doomed.process.wait()
        assert code == 0
        log = doomed.log_path.read_text()
        assert "Exception in ASGI application" not in log and "Traceback" not in log, log

        missed = await create(other, stack, 3)
        async with (
            httpx.AsyncClient(base_url=other.url, timeout=httpx.Timeout(10, read=30)) as client,
            client.stream(
                "GET",
                "/v1/events/stream",
                params=params,
                headers={**stack.auth(), "Last-Event-ID": last_id},
            ) as resumed,
        ):
            got, _ = await events(frames(resumed), set(missed), last_id)
        assert got == missed  # no gap, no duplicate
    print(f"sse-ended-after-sigterm s={ended_s:.3f}")
