"""Zero-downtime rebuilds: from the event archive plus the live streams, under
load, with queries answering throughout and the same rows after the swap."""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio
import httpx

from app.cli import main
from app.readmodels.chat_sessions import PROJECTION as CHAT_SESSIONS
from app.registry import SYSTEM
from app.runtime import rebuilds
from projections import db
from projections.rebuild import Rebuild, ensure_current, installed_version
from streams.connection import connect
from tests.pipeline import Pipeline, eventually
from tests.processes import environment
from tests.stack import Stack, serving

SEEDED = 300


def participants() -> dict[str, Any]:
    return {"agent_id": "agent-r", "participants": [{"participant_id": "u1", "role": "agent"}]}


async def seed(stack: Stack, n: int) -> str:
    """`n` sessions, every third closed; the position of the last command."""
    p = Pipeline(stack.settings, connect(stack.settings.redis_url))
    try:
        created = [await p.submit("CreateChatSession", participants()) for _ in range(n)]
        closes = [
            await p.submit("CloseChatSession", {"session_id": c.aggregate_id}) for c in created[::3]
        ]
        last = await p.outcome(closes[-1].command_id)
        assert last.position is not None
        return last.position
    finally:
        await p.redis.aclose()


async def sessions(stack: Stack, after: str | None = None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "500", **({"cursor": cursor} if cursor else {})}
        if after:
            params["after"] = after
        r = await stack.client.get("/v1/chat-sessions", params=params, headers=stack.auth())
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return items


async def test_a_rebuild_under_load_answers_throughout_and_swaps_identical_rows(
    settings, schema
) -> None:
    async with serving(settings) as stack:
        position = await seed(stack, SEEDED)
        before = await sessions(stack, after=position)
        assert len(before) == SEEDED
        answered: list[int] = []
        written: list[str] = []

        async with anyio.create_task_group() as tg:

            async def load() -> None:
                p = Pipeline(settings, connect(settings.redis_url))
                try:
                    while True:
                        accepted = await p.submit("CreateChatSession", participants())
                        written.append(accepted.aggregate_id)
                        await anyio.sleep(0.002)
                finally:
                    with anyio.CancelScope(shield=True):
                        await p.redis.aclose()

            async def query() -> None:
                async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
                    while True:
                        r = await client.get(
                            "/v1/chat-sessions", params={"limit": "50"}, headers=stack.auth()
                        )
                        answered.append(r.status_code)
                        await anyio.sleep(0.005)

            tg.start_soon(load)
            tg.start_soon(query)
            pool = await db.create_pool(settings.database_url, settings.db_schema)
            redis = connect(settings.redis_url)
            try:
                make = rebuilding_of(pool, redis, stack, verify=True)
                report = await make(CHAT_SESSIONS).run()
            finally:
                await pool.close()
                await redis.aclose()
            await anyio.sleep(0.2)  # load and queries go on after the swap too
            tg.cancel_scope.cancel()

        assert report.identical is True
        assert report.from_archive > 0 and report.events >= SEEDED + SEEDED // 3
        assert answered and set(answered) == {200}, f"queries during the rebuild: {answered}"
        assert written, "no load ran during the rebuild"
        # After the swap the new tables go on projecting: every session, none twice.
        p = Pipeline(settings, connect(settings.redis_url))
        try:
            last = await p.submit("CreateChatSession", participants())
            done = await p.outcome(last.command_id)
        finally:
            await p.redis.aclose()
        after = await sessions(stack, after=done.position)
        ids = [s["session_id"] for s in after]
        assert len(ids) == len(set(ids)) == SEEDED + len(written) + 1
        closed = {s["session_id"] for s in after if s["status"] == "closed"}
        assert closed == {s["session_id"] for s in before if s["status"] == "closed"}


def rebuilding_of(pool: db.Pool, redis: Any, stack: Stack, *, verify: bool = False) -> Any:
    """The rebuilds `eddy rebuild` and `eddy projector` make, for `stack`'s deployment."""
    return rebuilds(pool, redis, stack.settings, SYSTEM, verify=verify)


async def test_a_new_declared_version_is_rebuilt_once_across_processes(settings, schema) -> None:
    async with serving(settings) as stack:
        position = await seed(stack, 30)
        await sessions(stack, after=position)
    pool = await db.create_pool(settings.database_url, settings.db_schema)
    redis = connect(settings.redis_url)
    try:
        assert await installed_version(pool, "chat_sessions") == 1
        bumped = dataclasses.replace(CHAT_SESSIONS, version=2)
        runs: list[Rebuild] = []
        make = rebuilding_of(pool, redis, stack)

        def counted(projection: Any) -> Rebuild:
            runs.append(make(projection))
            return runs[-1]

        async with anyio.create_task_group() as tg:  # two projector processes starting
            for _ in range(2):
                tg.start_soon(ensure_current, counted, pool, bumped)
        assert await installed_version(pool, "chat_sessions") == 2
        assert sum(1 for r in runs if r.report.events) == 1, "rebuilt more than once"
        assert await pool.fetchval("SELECT count(*) FROM chat_sessions") == 30
    finally:
        await pool.close()
        await redis.aclose()


async def test_eddy_rebuild_on_the_command_line(settings, schema) -> None:
    async with serving(settings) as stack:
        position = await seed(stack, 20)
        await sessions(stack, after=position)
        env = environment(settings)
        code = await anyio.to_thread.run_sync(main, ["rebuild", "chat_sessions", "--verify"], env)
        assert code == 0
        assert len(await sessions(stack)) == 20
        code = await anyio.to_thread.run_sync(main, ["rebuild", "no_such_projection"], env)
        assert code == 2
    assert {p.name for p in SYSTEM.projections} >= {"chat_sessions", "archive"}


async def test_the_projector_rebuilds_a_projection_whose_version_changed(settings, schema) -> None:
    """As after a deploy that raised a projection's `version`: the installed tables
    are of another version, and `eddy projector` rebuilds them before projecting."""
    async with serving(settings) as stack:
        position = await seed(stack, 12)
        await sessions(stack, after=position)
    pool = await db.create_pool(settings.database_url, settings.db_schema)
    try:
        await pool.execute("UPDATE eddy_projections SET version = 0 WHERE name = 'chat_sessions'")
        async with serving(settings) as stack:

            async def rebuilt() -> bool:
                return await installed_version(pool, "chat_sessions") == 1

            await eventually(rebuilt, within=20)
            assert await pool.fetchval(
                "SELECT rebuilt_at IS NOT NULL FROM eddy_projections WHERE name = 'chat_sessions'"
            )
            position = await seed(stack, 3)  # and it projects again afterwards
            assert len(await sessions(stack, after=position)) == 15
    finally:
        await pool.close()
