"""Guarantee 1: no acknowledged command is lost.

A 202 means the command is in Redis; if Redis cannot take it, the client gets 503,
nothing is half-written, and a retry with the same command id succeeds once.
"""

from __future__ import annotations

import msgspec
import pytest

from app.registry import SYSTEM
from core.errors import Unavailable
from streams.bus import CommandBus
from streams.connection import Scripts, connect
from tests.pipeline import ADMIN, Pipeline, running
from tests.stack import serving

BODY = {"agent_id": "a", "participants": []}


async def test_202_means_the_command_is_in_redis(settings, redis, schema) -> None:
    async with serving(settings, worker=False, projector=False) as s:
        r = await s.client.post(
            "/v1/commands/CreateChatSession",
            json=BODY,
            headers={**s.auth(), "Idempotency-Key": "k1"},
        )
        assert r.status_code == 202
    # The web process is gone and no worker ever ran: the command waits in its stream.
    p = Pipeline(settings, redis)
    status = await p.bus.status(ADMIN.tenant, "k1")
    assert status is not None and status.status == "pending"
    shard = p.keys.shard_of("chat_sessions", ADMIN.tenant, r.json()["session_id"])
    (entry,) = await redis.xrange(p.keys.command_stream(shard))
    assert msgspec.json.decode(entry[1][b"c"])["id"] == "k1"
    async with running(settings, projector=False) as p:
        assert (await p.outcome("k1")).status == "processed"


async def test_redis_down_is_503_and_a_retry_with_the_same_key_works(
    settings, redis, schema
) -> None:
    down = msgspec.structs.replace(settings, redis_url="redis://127.0.0.1:1/0")
    async with serving(down, worker=False, projector=False) as s:
        headers = {**s.auth(), "Idempotency-Key": "retry-me"}
        r = await s.client.post("/v1/commands/CreateChatSession", json=BODY, headers=headers)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert (await s.client.get("/readyz")).status_code == 503
    p = Pipeline(settings, redis)
    assert await p.bus.status(ADMIN.tenant, "retry-me") is None  # nothing was accepted
    async with serving(settings) as s:
        headers = {**s.auth(), "Idempotency-Key": "retry-me"}
        r = await s.client.post("/v1/commands/CreateChatSession?wait=5", json=BODY, headers=headers)
        assert r.status_code == 200 and len(r.json()["events"]) == 1


async def test_a_submission_cut_off_half_way_is_completed_by_the_retry(settings, redis) -> None:
    """The locator was written, then Redis failed before the command was appended."""
    p = Pipeline(settings, redis)
    broken = connect(settings.redis_url)
    bus = CommandBus(broken, Scripts(broken), p.keys, settings.command_ttl_s, SYSTEM.catalog)
    # make the second step fail: the submit script is replaced by one that errors
    bus.scripts.submit = broken.register_script("return redis.error_reply('ERR down')")
    with pytest.raises(Unavailable):
        await bus_submit(bus, p, "half")
    await broken.aclose()
    assert await redis.get(p.keys.command_locator(ADMIN.tenant, "half")) is not None
    assert await p.bus.status(ADMIN.tenant, "half") is None  # not accepted: 404 to clients

    accepted = await p.submit("CreateChatSession", BODY, command_id="half")
    assert accepted.new
    async with running(settings, projector=False) as q:
        assert (await q.outcome("half")).status == "processed"


async def bus_submit(bus: CommandBus, p: Pipeline, command_id: str) -> None:
    from app.submission import build_record

    command_type = SYSTEM.catalog.commands["CreateChatSession"]
    command = command_type.decoder.decode(msgspec.json.encode(BODY))
    record = build_record(command_type, command, ADMIN, command_id, None)
    shard = p.keys.shard_of("chat_sessions", ADMIN.tenant, record.aggregate_id)
    await bus.submit(record, shard)
