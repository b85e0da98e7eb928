"""Retention (guarantee 8), rule by rule, against real Redis and Postgres: what holds
a stream back (a projection's checkpoint, a consumer group's pending and undelivered
entries, a process manager's group not created yet, a rebuild), what the policy
trims when nothing holds it, the trim record that spares the fan-out false resets,
one trimmer at a time, and `eddy trim --dry-run`.

Entries are added with explicit ids (`<ms>-0`) and checkpoints written directly,
so each rule is shown alone; `tests/guarantees/test_g08_retention.py` shows them
together on the running pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec
import pytest

from app import cli, runtime
from app.registry import SYSTEM
from core.settings import Settings
from projections import db
from projections.rebuild import rebuild_lock, rebuilding, schema_name
from streams import retention
from streams.connection import Redis, Scripts
from streams.fanout import Reset
from streams.keys import COMMAND_GROUP, Shard, process_manager_group, projection_group
from streams.positions import EntryId, encode_cursor, entry_id_of
from streams.retention import Trim, Trimmer
from tests.feeds import deliveries, event, keys_of, running, take

TRACES = Shard("traces", 0)
SESSIONS = Shard("chat_sessions", 0)
MANAGER = process_manager_group("session-streams")


def trimmer(settings: Settings, redis: Redis, pool: db.Pool) -> Trimmer:
    """The trimmer `eddy projector` runs, on the test's settings."""
    return runtime.trimmer(redis, pool, keys_of(settings), settings, SYSTEM)


async def fill(redis: Redis, stream: str, count: int, *, every_ms: int = 1000) -> list[str]:
    """`count` entries with ids 1000-0, 2000-0, …; their ids."""
    ids = []
    for n in range(1, count + 1):
        entry_id = f"{n * every_ms}-0"
        await redis.xadd(stream, {"e": b"{}"}, id=entry_id)
        ids.append(entry_id)
    return ids


async def commit(
    pool: db.Pool, shard: Shard, entry: EntryId, *, only: Sequence[str] | None = None
) -> None:
    """Every projection reading `shard` (or those named) has committed up to `entry`."""
    async with pool.acquire() as conn, conn.transaction():
        for projection in SYSTEM.projections:
            if shard.context in projection.contexts and (only is None or projection.name in only):
                await db.advance(conn, projection.name, shard, entry)


async def remaining(redis: Redis, stream: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in await redis.xrange(stream)]


def of(trims: list[Trim], stream: str) -> Trim:
    [found] = [t for t in trims if t.stream == stream]
    return found


async def test_a_projection_behind_holds_the_stream_at_its_checkpoint(
    settings: Settings, redis: Redis, pool: db.Pool
) -> None:
    settings = msgspec.structs.replace(settings, retention_s=0)  # the policy trims everything
    stream = keys_of(settings).event_stream(TRACES)
    ids = await fill(redis, stream, 10)
    others = [p.name for p in SYSTEM.projections if p.name != "archive" and "traces" in p.contexts]
    await commit(pool, TRACES, (10000, 0), only=others)

    # The archive never committed on this shard: nothing goes.
    trims = await trimmer(settings, redis, pool).trim()
    assert of(trims, stream).held_by == "projection:archive"
    assert of(trims, stream).removed == 0
    assert await remaining(redis, stream) == ids

    # The archive committed up to the third entry: exactly those three go.
    await commit(pool, TRACES, (3000, 0), only=["archive"])
    trims = await trimmer(settings, redis, pool).trim()
    assert (of(trims, stream).held_by, of(trims, stream).removed) == ("projection:archive", 3)
    assert await remaining(redis, stream) == ids[3:]

    # A projection with one checkpoint on another shard only is no less behind here.
    await commit(pool, TRACES, (10000, 0), only=["archive"])
    await commit(pool, Shard("traces", 1), (99000, 0))
    await redis.xadd(stream, {"e": b"{}"}, id="11000-0")
    trims = await trimmer(settings, redis, pool).trim()
    assert of(trims, stream).removed == 7
    assert await remaining(redis, stream) == ["11000-0"]


async def test_when_everyone_committed_the_policy_point_decides(
    settings: Settings, redis: Redis, pool: db.Pool
) -> None:
    settings = msgspec.structs.replace(settings, retention_s=5)
    stream = keys_of(settings).event_stream(TRACES)
    ids = await fill(redis, stream, 10)
    await commit(pool, TRACES, (10000, 0))

    # At 12 s, keeping 5 s: the entries before 7 s go, and not one more.
    trims = await trimmer(settings, redis, pool).trim(now_ms=12_000)
    assert (of(trims, stream).held_by, of(trims, stream).removed) == ("policy", 6)
    assert await remaining(redis, stream) == ids[6:]

    # Much later, everything committed goes; the stream itself stays.
    trims = await trimmer(settings, redis, pool).trim(now_ms=10**12)
    assert of(trims, stream).removed == 4
    assert await redis.xlen(stream) == 0
    assert await redis.exists(stream)


async def test_entries_pending_in_a_group_are_never_trimmed(
    settings: Settings, redis: Redis, pool: db.Pool
) -> None:
    """The process manager's group on a chat-session stream reads in batches; a
    batch delivered and not acknowledged (a crash half-way) stays, and so does what
    was never delivered to it."""
    settings = msgspec.structs.replace(settings, retention_s=0)
    stream = keys_of(settings).event_stream(SESSIONS)
    ids = await fill(redis, stream, 10)
    await commit(pool, SESSIONS, (10000, 0))
    await redis.xgroup_create(stream, MANAGER, id="0")

    async def deliver(count: int) -> list[bytes]:
        reply = await redis.xreadgroup(MANAGER, "m1", {stream: ">"}, count=count)
        return [entry_id for entry_id, _ in reply[0][1]]

    await redis.xack(stream, MANAGER, *await deliver(3))  # 1-3 done
    pending = await deliver(3)  # 4-6 delivered, not acknowledged; 7-10 not delivered
    trims = await trimmer(settings, redis, pool).trim()
    assert (of(trims, stream).held_by, of(trims, stream).removed) == (MANAGER, 3)
    assert await remaining(redis, stream) == ids[3:]

    # Claimed by another consumer, still pending: still kept.
    await redis.xclaim(stream, MANAGER, "m2", 0, pending)
    await trimmer(settings, redis, pool).trim()
    assert await remaining(redis, stream) == ids[3:]
    [info] = [g for g in await redis.xinfo_groups(stream) if g["name"].decode() == MANAGER]
    assert info["pending"] == 3

    # Acknowledged: they go; the undelivered ones stay.
    await redis.xack(stream, MANAGER, *pending)
    await trimmer(settings, redis, pool).trim()
    assert await remaining(redis, stream) == ids[6:]

    # A group of someone else's with an entry pending holds the stream too.
    await redis.xack(stream, MANAGER, *await deliver(10))
    await redis.xgroup_create(stream, "audit", id="0")
    await redis.xreadgroup("audit", "a1", {stream: ">"}, count=8)
    trims = await trimmer(settings, redis, pool).trim()
    assert of(trims, stream).held_by == "audit"
    assert await remaining(redis, stream) == ids[6:]


async def test_a_process_manager_group_not_created_yet_holds_its_streams(
    settings: Settings, redis: Redis, pool: db.Pool
) -> None:
    """Its first read will start at 0: until it exists, the contexts it reads keep
    everything; a context no process manager reads does not wait for it."""
    settings = msgspec.structs.replace(settings, retention_s=0)
    keys = keys_of(settings)
    sessions, traces = keys.event_stream(SESSIONS), keys.event_stream(TRACES)
    await fill(redis, sessions, 4)
    await fill(redis, traces, 4)
    await commit(pool, SESSIONS, (4000, 0))
    await commit(pool, TRACES, (4000, 0))
    for stream in (sessions, traces):
        for projection in SYSTEM.projections:  # as the projectors leave them: all read and acked
            await redis.xgroup_create(stream, projection_group(projection.name), id="$")

    trims = await trimmer(settings, redis, pool).trim()
    assert (of(trims, sessions).held_by, of(trims, sessions).removed) == (MANAGER, 0)
    assert await redis.xlen(sessions) == 4
    assert of(trims, traces).removed == 4

    await redis.xgroup_create(sessions, MANAGER, id="$")
    trims = await trimmer(settings, redis, pool).trim()
    assert of(trims, sessions).removed == 4


async def test_command_streams_keep_what_the_workers_have_not_acknowledged(
    settings: Settings, redis: Redis, pool: db.Pool
) -> None:
    settings = msgspec.structs.replace(settings, retention_s=0)
    stream = keys_of(settings).command_stream(TRACES)
    ids = await fill(redis, stream, 6)
    trims = await trimmer(settings, redis, pool).trim()
    assert (of(trims, stream).held_by, of(trims, stream).removed) == (COMMAND_GROUP, 0)

    await redis.xgroup_create(stream, COMMAND_GROUP, id="0")
    reply = await redis.xreadgroup(COMMAND_GROUP, "w1", {stream: ">"}, count=4)
    delivered = [entry_id for entry_id, _ in reply[0][1]]
    await redis.xack(stream, COMMAND_GROUP, *delivered[:2])  # 3 and 4 pending (a conflict)
    trims = await trimmer(settings, redis, pool).trim()
    assert (of(trims, stream).held_by, of(trims, stream).removed) == (COMMAND_GROUP, 2)
    assert await remaining(redis, stream) == ids[2:]
    assert not any(t.removed for t in trims if t.kind == "events")  # no checkpoints anywhere


async def test_a_long_backlog_is_trimmed_in_steps_to_the_exact_entry(
    settings: Settings, redis: Redis, pool: db.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dense and sparse stretches (several entries per millisecond, then gaps): each
    XTRIM removes about `STEP_ENTRIES`, and together exactly what was asked."""
    settings = msgspec.structs.replace(settings, retention_s=0)
    monkeypatch.setattr(retention, "STEP_ENTRIES", 10)
    steps: list[int] = []
    trim_to = Trimmer._trim_to

    async def counted(self: Trimmer, stream: Any, upto: EntryId) -> tuple[int, EntryId | None]:
        removed, first = await trim_to(self, stream, upto)
        steps.append(removed)
        return removed, first

    monkeypatch.setattr(Trimmer, "_trim_to", counted)
    stream = keys_of(settings).event_stream(TRACES)
    ids = [f"{ms}-{seq}" for ms in range(1, 41) for seq in range(5)]  # 200, 5 per ms
    ids += [f"{ms}-0" for ms in range(1000, 100_000, 1000)]  # then 99 far apart
    for entry_id in ids:
        await redis.xadd(stream, {"e": b"{}"}, id=entry_id)
    await commit(pool, TRACES, (57000, 0))

    trims = await trimmer(settings, redis, pool).trim()
    assert of(trims, stream).removed == 257 == sum(steps)
    assert await remaining(redis, stream) == ids[257:]
    assert len(steps) > 10 and max(steps) <= 4 * 10
    assert await redis.hget(keys_of(settings).trimmed(TRACES), "through") == b"57000-0"


async def test_no_event_stream_is_trimmed_while_a_projection_is_rebuilt(
    settings: Settings, redis: Redis, pool: db.Pool
) -> None:
    """A rebuild reads the archive and then the streams from where the archive
    ended: a trim in between could remove what it read from neither."""
    settings = msgspec.structs.replace(settings, retention_s=0)
    stream = keys_of(settings).event_stream(TRACES)
    await fill(redis, stream, 5)
    await commit(pool, TRACES, (5000, 0))
    scratch = schema_name(settings.db_schema, "rebuild", "traces")
    lock = rebuild_lock("traces")
    async with pool.acquire() as rebuilding:
        await rebuilding.execute(f'CREATE SCHEMA "{scratch}"')  # as `Rebuild._prepare`
        trims = await trimmer(settings, redis, pool).trim()  # a scratch schema left over
        assert of(trims, stream).removed == 5
        await redis.xadd(stream, {"e": b"{}"}, id="6000-0")
        await commit(pool, TRACES, (6000, 0))

        assert await rebuilding.fetchval("SELECT pg_try_advisory_lock($1)", lock)
        try:
            trims = await trimmer(settings, redis, pool).trim()
            assert (of(trims, stream).held_by, of(trims, stream).removed) == ("rebuild", 0)
            assert await redis.xlen(stream) == 1
        finally:
            await rebuilding.execute("SELECT pg_advisory_unlock($1)", lock)
            await rebuilding.execute(f'DROP SCHEMA "{scratch}"')
    trims = await trimmer(settings, redis, pool).trim()
    assert of(trims, stream).removed == 1


async def test_a_resume_after_the_last_trimmed_entry_is_not_reset(
    settings: Settings, redis: Redis, pool: db.Pool
) -> None:
    """A feed token names every shard's last entry, quiet shards' too. Once the
    trimmer has removed such an entry, a resume that lost nothing must not get a
    reset; one that did lose entries must, also when someone else trimmed them."""
    settings = msgspec.structs.replace(settings, retention_s=0)
    keys = keys_of(settings)
    shard = keys.shard_of("traces", "a", "t1")
    stream = keys.event_stream(shard)
    async with running(redis, settings, ["traces"]) as fanout:
        async with fanout.subscribe("a", ["traces"]) as sub:
            first = event("a", "traces", "t1", 1)
            await redis.xadd(stream, {"e": msgspec.json.encode(first)})
            [delivered] = deliveries(await take(sub, 1))
        token = delivered.token
        entry = entry_id_of(delivered.envelope.position.rsplit(".", 1)[1].encode())
        await commit(pool, shard, entry)
        trims = await trimmer(settings, redis, pool).trim()
        assert of(trims, stream).removed == 1  # the stream is empty now

        second = event("a", "traces", "t1", 2)
        await redis.xadd(stream, {"e": msgspec.json.encode(second)})
        async with fanout.subscribe("a", ["traces"], token) as resumed:
            items = await take(resumed, 1)
            assert [d.envelope.id for d in deliveries(items)] == [second.id]
            assert len(items) == 1

        # Trimmed by someone else (the record no longer accounts for it): reset.
        await redis.xadd(stream, {"e": msgspec.json.encode(event("a", "traces", "t1", 3))})
        await redis.xtrim(stream, maxlen=1, approximate=False)
        async with fanout.subscribe("a", ["traces"], token) as resumed:
            [reset] = await take(resumed, 1)
            assert isinstance(reset, Reset) and reset.reason == "beyond_retention"

        # Trimmed by the trimmer past the token: reset, and only one.
        await commit(pool, shard, (2**62, 0))
        older = encode_cursor({shard: (1, 0)})
        await trimmer(settings, redis, pool).trim()
        async with fanout.subscribe("a", ["traces"], older) as resumed:
            [reset] = await take(resumed, 1)
            assert isinstance(reset, Reset) and reset.reason == "beyond_retention"
            fourth = event("a", "traces", "t1", 4)
            await redis.xadd(stream, {"e": msgspec.json.encode(fourth)})
            assert [d.envelope.id for d in deliveries(await take(resumed, 1))] == [fourth.id]


async def test_one_process_trims_at_a_time(settings: Settings, redis: Redis, pool: db.Pool) -> None:
    settings = msgspec.structs.replace(settings, trim_interval_s=0.05)
    passes: list[int] = []

    class Counted(Trimmer):
        def __init__(self, number: int) -> None:
            names = [p.name for p in SYSTEM.projections]
            super().__init__(
                redis,
                keys_of(settings),
                settings,
                contexts=SYSTEM.catalog.names,
                projections=SYSTEM.projections,
                process_managers=(),
                committed=lambda: db.committed(pool, names),
                rebuilding=lambda: rebuilding(pool, settings.db_schema, names),
            )
            self.number = number

        async def trim(self, *, dry_run: bool = False, now_ms: int | None = None) -> list[Trim]:
            passes.append(self.number)
            return await super().trim(dry_run=dry_run, now_ms=now_ms)

    async def until(count: int) -> None:
        with anyio.fail_after(10):
            while len(passes) < count:  # noqa: ASYNC110 (the passes are the signal)
                await anyio.sleep(0.02)

    scripts = Scripts(redis)
    async with anyio.create_task_group() as tg:
        one, two = anyio.CancelScope(), anyio.CancelScope()

        async def run(trimmer: Trimmer, scope: anyio.CancelScope) -> None:
            with scope:
                await trimmer.run(scripts)

        tg.start_soon(run, Counted(1), one)
        await until(1)
        tg.start_soon(run, Counted(2), two)
        await until(len(passes) + 5)
        assert set(passes) == {1}

        one.cancel()  # releases the lease on its way out: the other takes over at once
        before = len(passes)
        await until(before + 3)
        assert set(passes[before:]) == {2}
        tg.cancel_scope.cancel()


async def test_eddy_trim_dry_run_says_what_would_go_and_changes_nothing(
    settings: Settings, redis: Redis, pool: db.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = keys_of(settings)
    stream = keys.event_stream(TRACES)
    await fill(redis, stream, 5)
    await commit(pool, TRACES, (3000, 0), only=["archive"])
    await commit(
        pool, TRACES, (5000, 0), only=[p.name for p in SYSTEM.projections if p.name != "archive"]
    )
    env = {
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "EDDY_KEY_PREFIX": settings.key_prefix,
        "EDDY_DB_SCHEMA": settings.db_schema,
        "EDDY_SHARDS": str(settings.shards),
        "EDDY_RETENTION_S": "0",
    }

    async def eddy_trim(*argv: str) -> tuple[int, str]:
        """`eddy trim <argv>` (in a thread: it runs its own event loop)."""
        code = await anyio.to_thread.run_sync(cli.main, ["trim", *argv], env)
        return code, capsys.readouterr().out

    code, text = await eddy_trim("--dry-run")
    assert code == 0
    [line] = [line for line in text.splitlines() if line.startswith(stream + " ")]
    assert line.split()[1:] == ["5", "3000-1", "projection:archive", "3"]
    assert "would remove" in text
    assert await redis.xlen(stream) == 5

    code, text = await eddy_trim("--json")
    assert code == 0
    [row] = [row for row in json.loads(text) if row["stream"] == stream]
    assert row == {
        "stream": stream,
        "kind": "events",
        "length": 5,
        "upto": "3000-1",
        "held_by": "projection:archive",
        "removed": 3,
    }
    assert await remaining(redis, stream) == ["4000-0", "5000-0"]
    assert await redis.hget(keys.trimmed(TRACES), "through") == b"3000-0"
