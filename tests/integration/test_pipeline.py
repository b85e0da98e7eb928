"""A command travels the whole pipeline: bus → worker → event stream → projector → query."""

from __future__ import annotations

from typing import Any

from app.readmodels import chat_sessions
from app.registry import SYSTEM
from projections import db
from projections.pagination import QueryArgs
from tests.pipeline import ADMIN, eventually, running


async def session_row(pool: db.Pool, session_id: str) -> dict[str, Any] | None:
    async with pool.acquire() as conn:
        return await chat_sessions.get_session(
            conn, QueryArgs(tenant_id=ADMIN.tenant, path={"session_id": session_id}, params={})
        )


async def test_create_update_close_archive(settings, redis, pool) -> None:
    async with running(settings) as p:
        created = await p.submit(
            "CreateChatSession",
            {"agent_id": "a1", "participants": [{"participant_id": "p1", "role": "observer"}]},
            command_id="create-1",
        )
        assert created.new and created.status == "pending"
        status = await p.outcome("create-1")
        assert status.status == "processed" and status.position
        session_id = created.aggregate_id

        await p.submit(
            "UpdateChatSessionParticipants",
            {"session_id": session_id, "change_roles": [{"participant_id": "p1", "role": "agent"}]},
            command_id="update-1",
        )
        await p.submit("CloseChatSession", {"session_id": session_id}, command_id="close-1")
        await p.submit("ArchiveChatSession", {"session_id": session_id}, command_id="archive-1")
        assert (await p.outcome("archive-1")).status == "processed"

        row = await eventually(lambda: _with_version(pool, session_id, 4))
        assert row["status"] == "archived"
        assert row["participants"] == [{"participant_id": "p1", "role": "agent"}]


async def _with_version(pool: db.Pool, session_id: str, version: int) -> dict[str, Any] | None:
    row = await session_row(pool, session_id)
    return row if row and row["version"] == version else None


async def test_rejected_command_fails_with_its_rule(settings, redis, pool) -> None:
    async with running(settings, projector=False) as p:
        await p.submit("CloseChatSession", {"session_id": "missing"}, command_id="close-x")
        status = await p.outcome("close-x")
        assert status.status == "failed"
        assert status.error == {"code": "not_found", "message": "no chat session missing"}


async def test_a_crashing_handler_fails_its_command_and_the_shard_goes_on(
    settings, redis, monkeypatch
) -> None:
    import dataclasses

    from app.contexts.chat_sessions import CONTEXT
    from core.catalog import CommandType

    def broken(state, event):
        raise ZeroDivisionError("a bug")

    close = SYSTEM.catalog.commands["CloseChatSession"]
    crashing = dataclasses.replace(CONTEXT, evolve=broken)
    monkeypatch.setitem(
        SYSTEM.catalog.commands,
        "CloseChatSession",
        CommandType(close.name, crashing, close.cls, close.decoder),
    )
    async with running(settings, projector=False) as p:
        created = await p.submit(
            "CreateChatSession", {"agent_id": "a", "participants": []}, command_id="c1"
        )
        await p.submit("CloseChatSession", {"session_id": created.aggregate_id}, command_id="c2")
        await p.submit(
            "UpdateChatSessionParticipants",
            {"session_id": created.aggregate_id, "add": [{"participant_id": "x", "role": "user"}]},
            command_id="c3",
        )
        crashed = await p.outcome("c2")
        assert crashed.status == "failed"
        assert crashed.error == {"code": "internal_error", "message": "ZeroDivisionError: a bug"}
        after = await p.outcome("c3")
        assert after.status == "processed" and after.events and len(after.events) == 1


async def test_a_process_with_another_shard_count_accepts_nothing(settings, redis) -> None:
    import msgspec
    import pytest

    from core.errors import Unavailable
    from streams.bus import check_layout
    from tests.pipeline import Pipeline

    await check_layout(redis, Pipeline(settings, redis).keys)  # the data uses 2 shards
    wrong = Pipeline(msgspec.structs.replace(settings, shards=3), redis)
    with pytest.raises(Unavailable, match="misconfigured: EDDY_SHARDS is 3"):
        await wrong.submit("CreateChatSession", {"agent_id": "a", "participants": []})
    shards = wrong.keys.shards_of("chat_sessions")
    assert not any([await redis.exists(wrong.keys.command_stream(s)) for s in shards])
