"""Guarantee 2: exactly-once effect per command id.

Delivery is at-least-once; a command id already applied is skipped atomically with
the write of its events, and a retried submission returns the original status.
"""

from __future__ import annotations

from app.registry import SYSTEM
from streams.keys import Shard
from tests.pipeline import ADMIN, Pipeline, eventually, running


async def events_of(p: Pipeline, aggregate_id: str) -> list[dict]:
    from core.messages import envelope_decoder

    found = []
    for ctx in SYSTEM.contexts:
        for shard in p.keys.shards_of(ctx.name):
            for _, fields in await p.redis.xrange(p.keys.event_stream(shard)):
                env = envelope_decoder.decode(fields[b"e"])
                if env.aggregate_id == aggregate_id:
                    found.append(env)
    return found


async def test_the_same_id_submitted_twice_is_one_command(settings, redis) -> None:
    async with running(settings, projector=False) as p:
        payload = {"agent_id": "a", "participants": []}
        first = await p.submit("CreateChatSession", payload, command_id="same")
        second = await p.submit("CreateChatSession", payload, command_id="same")
        assert first.new and not second.new
        assert first.aggregate_id == second.aggregate_id  # the server-made id is stable
        status = await p.outcome("same")
        assert status.status == "processed"
        third = await p.submit("CreateChatSession", payload, command_id="same")
        assert third.status == "processed"  # the original status, not a new command
        assert len(await events_of(p, first.aggregate_id)) == 1


async def test_a_redelivered_command_is_applied_once(settings, redis) -> None:
    """Delivery is at-least-once: the same command entry arriving again (here appended
    a second time, as a redelivery would bring it) changes nothing."""
    p = Pipeline(settings, redis)
    accepted = await p.submit(
        "CreateChatSession", {"agent_id": "a", "participants": []}, command_id="c1"
    )
    await p.submit("CloseChatSession", {"session_id": accepted.aggregate_id}, command_id="c2")
    shard: Shard = p.keys.shard_of("chat_sessions", ADMIN.tenant, accepted.aggregate_id)
    stream = p.keys.command_stream(shard)
    async with running(settings, projector=False):
        assert (await p.outcome("c2")).status == "processed"
        for _, fields in await redis.xrange(stream):
            await redis.xadd(stream, fields)  # every command delivered once more

        async def all_acknowledged() -> bool:
            info = await redis.xinfo_groups(stream)
            return info[0]["pending"] == 0 and info[0]["lag"] == 0

        await eventually(all_acknowledged)
    events = await events_of(p, accepted.aggregate_id)
    assert [e.type for e in events] == ["ChatSessionCreated", "ChatSessionClosed"]
    assert [e.aggregate_version for e in events] == [1, 2]
    assert (await p.bus.status(ADMIN.tenant, "c2")).status == "processed"
