"""Guarantee 6: poison messages do not block a stream.

A command or event that keeps failing goes, after `EDDY_MAX_ATTEMPTS`, to its
shard's dead letters with its error and attempts; the command's status is
`failed` (`dead_lettered`); what comes after it on the shard flows on; a
replayed dead letter, once its cause is fixed, is processed exactly once.

The poisons are real, not test hooks: a command whose aggregate's state in Redis
was overwritten with a value of the wrong type (every load of it raises WRONGTYPE
inside the Lua step), and an event whose row breaks a CHECK constraint.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from app.registry import SYSTEM
from core.errors import NotFound
from core.messages import envelope_decoder
from core.settings import Settings
from projections import db
from projections.projector import Hooks, ShardProjector
from streams.deadletters import DeadLetters
from streams.keys import Shard
from tests.pipeline import ADMIN, Pipeline, eventually, running

MAX_ATTEMPTS = 3


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The guarantees' settings (single Redis, then Cluster), giving up sooner."""
    return msgspec.structs.replace(settings, max_attempts=MAX_ATTEMPTS)


def dead_letters(p: Pipeline) -> DeadLetters:
    return DeadLetters(p.redis, p.scripts, p.keys, p.settings.command_ttl_s, SYSTEM.catalog)


def on_shard(p: Pipeline, shard: Shard, prefix: str, n: int) -> list[str]:
    """`n` chat session ids whose shard is `shard`."""
    ids = (f"{prefix}-{i}" for i in range(10_000))
    found = [i for i in ids if p.keys.shard_of("chat_sessions", ADMIN.tenant, i) == shard]
    return found[:n]


async def events_of_command(p: Pipeline, shard: Shard, command_id: str) -> list[Any]:
    entries = await p.redis.xrange(p.keys.event_stream(shard))
    envelopes = [envelope_decoder.decode(fields[b"e"]) for _, fields in entries]
    return [e for e in envelopes if e.metadata.command_id == command_id]


async def test_a_poison_command_is_dead_lettered_and_its_shard_flows_on(settings, redis) -> None:
    async with running(settings, projector=False) as p:
        shard = p.keys.shard_of("chat_sessions", ADMIN.tenant, "s-poison")
        await p.submit(
            "CreateChatSession",
            {"session_id": "s-poison", "agent_id": "a", "participants": []},
            command_id="create",
        )
        assert (await p.outcome("create")).status == "processed"
        # Break the aggregate's state in Redis: every load of it now raises WRONGTYPE.
        state = p.keys.aggregate(shard, ADMIN.tenant, "s-poison")
        await redis.rename(state, f"{state}:saved")
        await redis.set(state, "not a hash")

        add = {"session_id": "s-poison", "add": [{"participant_id": "u1", "role": "user"}]}
        await p.submit("UpdateChatSessionParticipants", add, command_id="poison")
        after = on_shard(p, shard, "after", 5)
        for session_id in after:
            payload = {"session_id": session_id, "agent_id": "a", "participants": []}
            await p.submit("CreateChatSession", payload, command_id=f"create-{session_id}")

        for session_id in after:  # the commands behind the poison went through
            assert (await p.outcome(f"create-{session_id}")).status == "processed"
        failed = await p.outcome("poison")
        assert failed.status == "failed" and failed.error is not None
        assert failed.error["code"] == "dead_lettered"
        assert f"after {MAX_ATTEMPTS} attempts" in failed.error["message"]
        assert "WRONGTYPE" in failed.error["message"]

        (letter,) = await dead_letters(p).read()
        assert letter.dead_letter_id == failed.error["dead_letter_id"]
        assert (letter.kind, letter.consumer, letter.command_id) == ("command", "workers", "poison")
        assert (letter.tenant_id, letter.type) == (ADMIN.tenant, "UpdateChatSessionParticipants")
        assert letter.attempts == MAX_ATTEMPTS and "WRONGTYPE" in letter.error
        group = (await redis.xinfo_groups(p.keys.command_stream(shard)))[0]
        assert group["pending"] == 0  # nothing left behind in the stream

        # Fix the cause, replay: applied exactly once, as the aggregate's next version.
        await redis.delete(state)
        await redis.rename(f"{state}:saved", state)
        await dead_letters(p).replay_command(letter)
        replayed = await p.outcome("poison")
        assert replayed.status == "processed"
        (event,) = await events_of_command(p, shard, "poison")
        assert (event.type, event.aggregate_version) == ("ChatSessionParticipantsUpdated", 2)
        with pytest.raises(NotFound):  # a dead letter is replayed once
            await dead_letters(p).replay_command(letter)
        assert await dead_letters(p).read() == []
        await p.submit("CloseChatSession", {"session_id": "s-poison"}, command_id="close")
        assert (await p.outcome("close")).status == "processed"
        assert len(await events_of_command(p, shard, "poison")) == 1


async def test_a_poison_event_is_dead_lettered_for_its_projection_only(
    settings, redis, pool
) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "ALTER TABLE chat_sessions ADD CONSTRAINT no_poison CHECK (agent_id <> 'poison')"
        )
    async with running(settings) as p:
        shard = p.keys.shard_of("chat_sessions", ADMIN.tenant, "s-poison")
        payload = {"session_id": "s-poison", "agent_id": "poison", "participants": []}
        await p.submit("CreateChatSession", payload, command_id="poison")
        poisoned = await p.outcome("poison")
        after = on_shard(p, shard, "after", 3)
        for session_id in after:
            payload = {"session_id": session_id, "agent_id": "a", "participants": []}
            await p.submit("CreateChatSession", payload, command_id=f"create-{session_id}")
        last = await p.outcome(f"create-{after[-1]}")

        async def projected() -> bool:  # the shard moved on past the poison
            return await db.reached(pool, "chat_sessions", shard, entry(last.entry))

        await eventually(projected)
        assert await count(pool, "chat_sessions", "session_id = $1", "s-poison") == 0
        for session_id in after:
            assert await count(pool, "chat_sessions", "session_id = $1", session_id) == 1

        (letter,) = await eventually(dead_letters(p).read)
        assert (letter.kind, letter.consumer) == ("event", "projection:chat_sessions")
        assert letter.event_id == (poisoned.events or [""])[0]
        assert letter.attempts == MAX_ATTEMPTS and "CheckViolationError" in letter.error
        # Only that projection gave up on it: the archive has it.
        assert await count(pool, "event_archive", "event_id = $1", letter.event_id) == 1

        # Fix the cause, replay: projected once, for chat_sessions only.
        async with pool.acquire() as conn:
            await conn.execute("ALTER TABLE chat_sessions DROP CONSTRAINT no_poison")
        chat_sessions = SYSTEM.projection("chat_sessions")
        projector = ShardProjector(pool, chat_sessions, shard, SYSTEM.catalog, Hooks())
        await dead_letters(p).replay_event(letter, projector.replay)
        assert await count(pool, "chat_sessions", "session_id = $1", "s-poison") == 1
        assert await count(pool, "event_archive", "event_id = $1", letter.event_id) == 1
        with pytest.raises(NotFound):
            await dead_letters(p).replay_event(letter, projector.replay)
        assert await count(pool, "chat_sessions", "session_id = $1", "s-poison") == 1


def entry(raw: str | None) -> tuple[int, int]:
    assert raw is not None
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq)


async def count(pool: db.Pool, table: str, where: str, *args: Any) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {table} WHERE {where}", *args))
