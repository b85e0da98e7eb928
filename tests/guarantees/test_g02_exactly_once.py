"""Guarantee 2: exactly-once effect per command id.

Delivery is at-least-once; a command id already applied is skipped atomically with
the write of its events, and a retried submission returns the original status.
"""

from __future__ import annotations

from app.contexts import CONTEXTS
from streams.keys import COMMAND_GROUP, Shard
from streams.lease import ShardLease
from streams.worker import ShardWorker
from tests.pipeline import ADMIN, Pipeline, eventually, running


async def events_of(p: Pipeline, aggregate_id: str) -> list[dict]:
    from app.messages import envelope_decoder

    found = []
    for ctx in CONTEXTS:
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
    """A worker applies a batch and dies before XACK; the next owner skips it."""
    p = Pipeline(settings, redis)
    accepted = await p.submit(
        "CreateChatSession", {"agent_id": "a", "participants": []}, command_id="c1"
    )
    await p.submit("CloseChatSession", {"session_id": accepted.aggregate_id}, command_id="c2")
    shard: Shard = p.keys.shard_of("chat_sessions", ADMIN.tenant, accepted.aggregate_id)
    stream = p.keys.command_stream(shard)
    await redis.xgroup_create(stream, COMMAND_GROUP, id="0")
    entries = (await redis.xreadgroup(COMMAND_GROUP, "doomed", {stream: ">"}))[0][1]
    lease = ShardLease(
        redis, p.scripts, p.keys.lease(shard, "worker"), "doomed", settings.lease_ttl_ms
    )
    assert await lease.acquire()
    worker = ShardWorker(redis, p.scripts, p.keys, settings, shard)
    worker.lease = lease
    await worker.handle(entries)  # applied ... and the process dies: no XACK
    await lease.release()
    assert len(await redis.xpending_range(stream, COMMAND_GROUP, "-", "+", 10)) == 2

    async with running(settings, projector=False):

        async def acked() -> bool:
            return not await redis.xpending_range(stream, COMMAND_GROUP, "-", "+", 10)

        await eventually(acked)
    events = await events_of(p, accepted.aggregate_id)
    assert [e.type for e in events] == ["ChatSessionCreated", "ChatSessionClosed"]
    assert [e.aggregate_version for e in events] == [1, 2]
    assert (await p.outcome("c2")).status == "processed"
