"""Durability with `appendfsync always`: redis-server killed with SIGKILL while
commands are being accepted, and started again on the same append-only file,
has lost no command that got a 202 — every one is found afterwards and processed.

Real `eddy web` and `eddy worker` processes on a throwaway redis-server
(`conftest.py`). Clients post chat-session creations, each with its own
Idempotency-Key, without retrying: what got a 202 is the set to find again; a
503 or a broken connection is not an acceptance (a client would retry it).

(`everysec` passes this too: a killed process loses nothing the kernel has
been given, and Redis writes the AOF before it replies. What `everysec` can lose
is the last second or so on a crash of the machine itself, which a test cannot
stage; README.md, "Durability".)
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from core.settings import Settings
from streams.bus import FINAL
from tests.faults.conftest import Client, RedisProcess
from tests.faults.test_outages import patient_client
from tests.pipeline import ADMIN, Pipeline, eventually
from tests.processes import fleet

pytestmark = pytest.mark.slow

CLIENTS = 16
ACCEPTED_BEFORE_KILL = (300, 600)
"""The kill comes once this many commands (a random number in the range) have a 202."""
DOWN_S = 0.5
"""How long Redis stays down; clients keep posting meanwhile (and get 503s)."""
AFTER_S = 1.0
"""How long the clients go on posting once Redis is back."""


@pytest.mark.timeout(90)
async def test_sigkilled_redis_with_appendfsync_always_loses_no_accepted_command(
    settings: Settings, redis_always: RedisProcess, tmp_path: Path
) -> None:
    settings = msgspec.structs.replace(settings, redis_url=redis_always.url)
    redis = patient_client(settings.redis_url)
    try:
        async with fleet(settings, redis, tmp_path) as f:
            web = await f.start("web")
            await f.start("worker")
            client = Client(web.url, settings, ADMIN.tenant, CLIENTS)
            stop = anyio.Event()
            posted = 0

            async def post() -> None:
                nonlocal posted
                while not stop.is_set():
                    sid = f"durable-{posted:06}"
                    posted += 1
                    payload = {"session_id": sid, "agent_id": "agent", "participants": []}
                    await client.post(f"{sid}:create", "CreateChatSession", payload, retry=False)
                    if sid not in client.accepted:
                        await anyio.sleep(0.02)  # a client's pause after a failure

            async def accepted(n: int) -> bool:
                return len(client.accepted) >= n

            try:
                async with anyio.create_task_group() as tg:
                    for _ in range(CLIENTS):
                        tg.start_soon(post)
                    threshold = random.randint(*ACCEPTED_BEFORE_KILL)
                    await eventually(lambda: accepted(threshold), within=30)
                    redis_always.stop(signal.SIGKILL)
                    killed_after = len(client.accepted)
                    await anyio.sleep(DOWN_S)  # the outage itself
                    await anyio.to_thread.run_sync(redis_always.start)
                    restarted = time.monotonic()
                    await anyio.sleep(AFTER_S)  # more load once Redis is back
                    stop.set()
            finally:
                await client.aclose()
            assert not client.unexpected, client.unexpected[:5]
            assert client.unavailable + client.broken > 0, "no request met the outage"
            assert len(client.accepted) > killed_after, "nothing was accepted after the restart"

            # Every 202 is found again, and processed.
            p = Pipeline(settings, redis)
            ids = sorted(client.accepted)

            async def all_processed() -> bool:
                statuses = await p.bus.statuses(ADMIN.tenant, ids)
                return all(s is not None and s.status in FINAL for s in statuses)

            statuses = await p.bus.statuses(ADMIN.tenant, ids)
            missing = [i for i, s in zip(ids, statuses, strict=True) if s is None]
            assert not missing, f"{len(missing)} accepted commands lost: {missing[:5]}"
            await eventually(all_processed, within=20)
            final = await p.bus.statuses(ADMIN.tenant, ids)
            assert {s.status for s in final if s is not None} == {"processed"}
            print(
                f"{len(ids)} accepted ({killed_after} before the SIGKILL), all processed;"
                f" {client.unavailable} 503s and {client.broken} broken requests during"
                f" the outage; {time.monotonic() - restarted:.1f} s after the restart"
            )
    finally:
        await redis.aclose()
