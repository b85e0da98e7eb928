"""Guarantee 4: every event carries its aggregate version; a stale write never lands.

A worker decides on the state it has cached; when someone else has written the
aggregate meanwhile, `apply.lua` refuses the stale write and the worker decides
again on the fresh state.
"""

from __future__ import annotations

import msgspec

from app.contexts.chat_sessions import ChatSession, Participant
from app.registry import SYSTEM
from streams.keys import COMMAND_GROUP
from streams.lease import ShardLease
from streams.worker import ShardWorker
from tests.guarantees.test_g02_exactly_once import events_of
from tests.pipeline import ADMIN, Pipeline


async def handle_all(redis, worker: ShardWorker, stream: str) -> None:
    reply = await redis.xreadgroup(COMMAND_GROUP, "w", {stream: ">"})
    await worker.handle(reply[0][1])


async def test_a_decision_on_a_stale_state_is_decided_again(settings, redis) -> None:
    p = Pipeline(settings, redis)
    created = await p.submit(
        "CreateChatSession", {"agent_id": "a", "participants": []}, command_id="c1"
    )
    session_id = created.aggregate_id
    shard = p.keys.shard_of("chat_sessions", ADMIN.tenant, session_id)
    stream = p.keys.command_stream(shard)
    await redis.xgroup_create(stream, COMMAND_GROUP, id="0")
    lease = ShardLease(redis, p.scripts, p.keys.lease(shard, "worker"), "w", 60_000)
    assert await lease.acquire()
    worker = ShardWorker(redis, p.scripts, p.keys, settings, SYSTEM.catalog, shard)
    worker.lease = lease
    await handle_all(redis, worker, stream)  # the worker now caches version 1

    # Someone else writes the aggregate (version 2, a participant the cache does not know).
    aggregate = p.keys.aggregate(shard, ADMIN.tenant, session_id)
    other = ChatSession(
        status="active", agent_id="a", participants=(Participant(participant_id="x", role="user"),)
    )
    await redis.hset(aggregate, mapping={"version": 2, "state": msgspec.json.encode(other)})

    # On the stale cache this add is valid; on the real state "x" already takes part.
    await p.submit(
        "UpdateChatSessionParticipants",
        {"session_id": session_id, "add": [{"participant_id": "x", "role": "user"}]},
        command_id="c2",
    )
    await p.submit(
        "UpdateChatSessionParticipants",
        {"session_id": session_id, "add": [{"participant_id": "y", "role": "user"}]},
        command_id="c3",
    )
    await handle_all(redis, worker, stream)

    c2 = await p.bus.status(ADMIN.tenant, "c2")
    assert c2 is not None and c2.status == "failed"
    assert c2.error == {"code": "already_participant", "message": "x takes part"}
    events = await events_of(p, session_id)
    assert [(e.type, e.aggregate_version) for e in events] == [
        ("ChatSessionCreated", 1),
        ("ChatSessionParticipantsUpdated", 3),  # c3, on top of the other writer's version 2
    ]
    assert msgspec.json.decode(events[1].payload)["participants"] == [
        {"participant_id": "x", "role": "user"},
        {"participant_id": "y", "role": "user"},
    ]
    assert int(await redis.hget(aggregate, "version")) == 3
