"""The Lua steps, driven directly against Redis."""

from __future__ import annotations

from pathlib import Path

from redis.commands.core import AsyncScript

import streams
from streams.connection import Redis, Scripts
from streams.keys import Keys, Shard

SHARD = Shard("chat_sessions", 0)


GROUP = "workers"


def setup(settings, redis: Redis) -> tuple[Keys, Scripts, list[str]]:
    keys = Keys.of(settings)
    scripts = Scripts(redis)
    head = [keys.event_stream(SHARD), keys.lease(SHARD, "worker"), keys.command_stream(SHARD)]
    return keys, scripts, head


async def delivered(redis: Redis, head: list[str]) -> bytes:
    """A command-stream entry, delivered to a consumer of the group (so: pending)."""
    stream = head[2]
    entry_id = await redis.xadd(stream, {"c": b"record"})
    if not await redis.exists(f"{stream}:group-made"):
        await redis.xgroup_create(stream, GROUP, id="0")
        await redis.set(f"{stream}:group-made", 1)
    await redis.xreadgroup(GROUP, "w", {stream: ">"})
    return entry_id


async def pending(redis: Redis, head: list[str]) -> list[bytes]:
    return [p["message_id"] for p in await redis.xpending_range(head[2], GROUP, "-", "+", 100)]


def command(
    keys: Keys, entry_id: bytes, cid: str, outcome: str, expected: int, events: list[bytes]
) -> tuple[list[str], list[object]]:
    return (
        [keys.aggregate(SHARD, "t", "agg"), keys.command_status(SHARD, "t", cid)],
        [
            entry_id,
            outcome,
            expected,
            b"state-after-" + cid.encode(),
            b'{"code":"x"}',
            ",".join(f"e{i}" for i in range(len(events))),
            len(events),
            *events,
        ],
    )


async def apply(
    scripts: Scripts, head: list[str], owner: str, *commands: tuple[list[str], list[object]]
) -> object:
    keys = list(head)
    args: list[object] = [owner, 60, GROUP]
    for k, a in commands:
        keys += k
        args += a
    return await scripts.apply(keys=keys, args=args)


async def test_apply_writes_events_state_status_and_ack_at_once(settings, redis) -> None:
    keys, scripts, head = setup(settings, redis)
    await redis.set(head[1], "me")
    entry = await delivered(redis, head)
    reply = await apply(
        scripts, head, "me", command(keys, entry, "c1", "processed", 0, [b"ev1", b"ev2"])
    )
    assert reply[0][0] == b"ok" and len(reply[0]) == 3
    entries = await redis.xrange(head[0])
    assert [f[b"e"] for _, f in entries] == [b"ev1", b"ev2"]
    assert await redis.hget(keys.aggregate(SHARD, "t", "agg"), "version") == b"2"
    status = await redis.hgetall(keys.command_status(SHARD, "t", "c1"))
    assert status[b"status"] == b"processed" and status[b"events"] == b"e0,e1"
    assert status[b"position"] == entries[-1][0]
    assert await pending(redis, head) == []


async def test_a_known_command_id_is_skipped_and_acknowledged(settings, redis) -> None:
    keys, scripts, head = setup(settings, redis)
    await redis.set(head[1], "me")
    first, again = await delivered(redis, head), await delivered(redis, head)
    await apply(scripts, head, "me", command(keys, first, "c1", "processed", 0, [b"ev1"]))
    reply = await apply(
        scripts, head, "me", command(keys, again, "c1", "processed", 1, [b"ev1-again"])
    )
    assert reply == [[b"duplicate", b"processed"]]
    assert await redis.xlen(head[0]) == 1
    assert await pending(redis, head) == []


async def test_a_stale_version_writes_nothing_and_breaks_the_chain(settings, redis) -> None:
    keys, scripts, head = setup(settings, redis)
    await redis.set(head[1], "me")
    e1, e2, e3, e4 = [await delivered(redis, head) for _ in range(4)]
    await apply(scripts, head, "me", command(keys, e1, "c1", "processed", 0, [b"ev1"]))
    reply = await apply(
        scripts,
        head,
        "me",
        command(keys, e2, "c2", "processed", 0, [b"stale"]),
        # decided on the state c2 would have made: must not land either
        command(keys, e3, "c3", "processed", 1, [b"after-stale"]),
        command(keys, e4, "c4", "failed", 2, []),
    )
    assert reply == [[b"conflict", b"1"], [b"conflict", b"1"], [b"conflict", b"1"]]
    assert await redis.xlen(head[0]) == 1
    assert await redis.hget(keys.aggregate(SHARD, "t", "agg"), "state") == b"state-after-c1"
    assert not await redis.exists(keys.command_status(SHARD, "t", "c2"))
    assert await pending(redis, head) == [e2, e3, e4]  # to be decided again


async def test_a_failure_records_its_error_without_events(settings, redis) -> None:
    keys, scripts, head = setup(settings, redis)
    await redis.set(head[1], "me")
    entry = await delivered(redis, head)
    reply = await apply(scripts, head, "me", command(keys, entry, "c1", "failed", 0, []))
    assert reply == [[b"ok"]]
    status = await redis.hgetall(keys.command_status(SHARD, "t", "c1"))
    assert status[b"status"] == b"failed" and status[b"error"] == b'{"code":"x"}'
    assert not await redis.exists(head[0])
    assert await pending(redis, head) == []


async def test_a_worker_without_the_lease_writes_nothing(settings, redis) -> None:
    keys, scripts, head = setup(settings, redis)
    await redis.set(head[1], "someone-else")
    entry = await delivered(redis, head)
    reply = await apply(scripts, head, "me", command(keys, entry, "c1", "processed", 0, [b"e"]))
    assert reply == b"fenced"
    assert not await redis.exists(head[0])
    assert not await redis.exists(keys.command_status(SHARD, "t", "c1"))
    assert await pending(redis, head) == [entry]


async def test_submit_is_idempotent_by_command_id(settings, redis) -> None:
    keys, scripts, _ = setup(settings, redis)
    status_key, stream = keys.command_status(SHARD, "t", "c1"), keys.command_stream(SHARD)
    first = await scripts.submit(keys=[status_key, stream], args=["T", "agg", b"rec", 60, "now"])
    second = await scripts.submit(keys=[status_key, stream], args=["T", "agg", b"rec2", 60, "now"])
    assert first == [b"new", b"pending", b"T", b"agg"]
    assert second == [b"known", b"pending", b"T", b"agg"]
    assert await redis.xlen(stream) == 1
    assert 0 < await redis.ttl(status_key) <= 60


async def test_lease_extend_and_release_only_for_the_owner(settings, redis) -> None:
    _, scripts, head = setup(settings, redis)
    lease = head[1]
    await redis.set(lease, "me", px=1000)
    assert await scripts.lease_extend(keys=[lease], args=["other", 5000]) == 0
    assert await scripts.lease_release(keys=[lease], args=["other"]) == 0
    assert await scripts.lease_extend(keys=[lease], args=["me", 5000]) == 1
    assert await redis.pttl(lease) > 1000
    assert await scripts.lease_release(keys=[lease], args=["me"]) == 1
    assert not await redis.exists(lease)


async def test_load_marks_the_batch_consumed_and_reads_states(settings, redis) -> None:
    keys, scripts, _ = setup(settings, redis)
    a, b = keys.command_status(SHARD, "t", "a"), keys.command_status(SHARD, "t", "b")
    await redis.hset(a, "status", "pending")
    await redis.hset(b, "status", "processed")
    present, missing = keys.aggregate(SHARD, "t", "x"), keys.aggregate(SHARD, "t", "y")
    await redis.hset(present, mapping={"version": 3, "state": b"{}"})
    reply = await scripts.load_states(keys=[a, b, present, missing], args=[2])
    assert reply == [[b"3", b"{}"], [None, None]]
    assert await redis.hget(a, "status") == b"consumed"
    assert await redis.hget(b, "status") == b"processed"
    assert await scripts.load_states(keys=[present], args=[0]) == [[b"3", b"{}"]]


async def test_every_lua_step_is_registered_and_loaded(settings, redis) -> None:
    _, scripts, _ = setup(settings, redis)
    await scripts.load()
    registered = [s for s in vars(scripts).values() if isinstance(s, AsyncScript)]
    files = list(Path(streams.__file__).parent.joinpath("lua").glob("*.lua"))
    assert sorted(s.script for s in registered) == sorted(f.read_text() for f in files)
    assert all(await redis.script_exists(*[s.sha for s in registered]))
