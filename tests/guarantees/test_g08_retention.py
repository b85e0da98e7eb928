"""Guarantee 8: streams are never trimmed past what every projection and the event
archive have committed.

On the running pipeline, with a policy that would trim everything (`EDDY_RETENTION_S`
0): the archive's projector stopped while the others run, then every projector
stopped, then all of them caught up. After each trim, every event is still either
in its stream or in the archive, and a rebuild from the archive gives the same
tables. Then through the whole stack (uvicorn, worker, projector with its own
trimmer): an SSE or WebSocket client resuming from a position trimmed away gets
exactly one reset and then live events; one resuming from a position still
retained gets everything it missed, with no reset. Each test runs on a single
Redis and on a Redis Cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec

from app import runtime
from app.readmodels import chat_sessions
from app.registry import SYSTEM
from core.settings import Settings
from projections import db, status
from projections.projection import Projection
from projections.projector import run_projector
from streams.connection import Redis, connect
from streams.keys import Keys, Shard, process_manager_group
from streams.positions import EntryId, entry_id_of
from streams.retention import Trim, Trimmer
from tests.feeds import read_events
from tests.pipeline import Pipeline, eventually, running
from tests.sockets import opened
from tests.sse import Frame, frames
from tests.stack import Stack, serving

CONTEXT_NAMES = [c.name for c in SYSTEM.contexts]
MANAGER = process_manager_group("session-streams")


def trimmer(settings: Settings, redis: Redis, pool: db.Pool) -> Trimmer:
    """The trimmer `eddy projector` runs, on the test's settings."""
    return runtime.trimmer(redis, pool, Keys.of(settings), settings, SYSTEM)


@asynccontextmanager
async def projecting(
    settings: Settings, pool: db.Pool, projections: Sequence[Projection]
) -> AsyncIterator[Pipeline]:
    """The worker and process managers, and a projector of `projections` only."""
    async with running(settings, projector=False) as p, anyio.create_task_group() as tg:
        tg.start_soon(
            run_projector,
            *(p.redis, p.scripts, p.keys, settings, pool, SYSTEM.catalog, projections),
        )
        yield p
        tg.cancel_scope.cancel()


async def caught_up(
    redis: Redis, pool: db.Pool, keys: Keys, projections: Sequence[Projection]
) -> None:
    """Until every one of `projections` has committed every event, and the process
    manager has acknowledged every event it reads."""

    async def check() -> bool:
        shards = await status.read(redis, pool, keys, projections)
        if any(s.lag_events for s in shards):
            return False
        for context in ("chat_sessions", "message_streams"):
            for shard in keys.shards_of(context):
                stream = keys.event_stream(shard)
                if not await redis.exists(stream):
                    continue
                groups = {g["name"].decode(): g for g in await redis.xinfo_groups(stream)}
                last = (await redis.xinfo_stream(stream))["last-generated-id"]
                group = groups.get(MANAGER)
                if group is None or group["pending"] or group["last-delivered-id"] != last:
                    return False
        return True

    await eventually(check, within=20)


async def submit(p: Pipeline, count: int, tag: str) -> list[str]:
    """`count` commands of two contexts (chat sessions and runtime flags), processed."""
    ids = []
    for n in range(count):
        if n % 2:
            payload = {"module": f"mod-{tag}", "flag": f"f{n}", "enabled": True}
            accepted = await p.submit("SetRuntimeFlag", payload)
        else:
            payload = {"agent_id": f"agent-{tag}-{n}", "participants": []}
            accepted = await p.submit("CreateChatSession", payload)
        ids.append(accepted.command_id)
    for command_id in ids:
        assert (await p.outcome(command_id)).status == "processed"
    return ids


async def in_streams(redis: Redis, keys: Keys) -> dict[str, tuple[Shard, EntryId]]:
    """Every event still in an event stream: its id → where."""
    found = {}
    for context in CONTEXT_NAMES:
        for shard in keys.shards_of(context):
            for entry_id, fields in await redis.xrange(keys.event_stream(shard)):
                envelope: Any = msgspec.json.decode(fields[b"e"])
                found[envelope["id"]] = (shard, entry_id_of(entry_id))
    return found


async def archived(pool: db.Pool) -> set[str]:
    return {r["event_id"] for r in await pool.fetch("SELECT event_id FROM event_archive")}


async def checkpoint(pool: db.Pool, projection: str, shard: Shard) -> EntryId:
    async with pool.acquire() as conn:
        return await db.checkpoint(conn, projection, shard)


def removed(trims: list[Trim], kind: str = "events") -> int:
    return sum(t.removed for t in trims if t.kind == kind)


async def test_nothing_uncommitted_is_trimmed_and_history_stays_whole(
    settings: Settings, redis: Redis, pool: db.Pool
) -> None:
    settings = msgspec.structs.replace(settings, retention_s=0)
    keys = Keys.of(settings)
    not_archive = [p for p in SYSTEM.projections if p.name != "archive"]

    # A deployment whose archive has never run (no checkpoint, no consumer group):
    # every other projection has everything, yet no event goes.
    async with projecting(settings, pool, not_archive) as p:
        await submit(p, 8, "a")
        await caught_up(redis, pool, keys, not_archive)
    trims = await trimmer(settings, redis, pool).trim()
    assert removed(trims) == 0
    assert removed(trims, "commands") == 8  # every command was acknowledged
    assert {t.held_by for t in trims if t.kind == "events" and t.length} == {"projection:archive"}
    assert len(await in_streams(redis, keys)) == 8

    # The archive catches up; 8 more for everyone; then the archive's projector is
    # stopped while the others go on with 6 more.
    async with running(settings) as p:
        await caught_up(redis, pool, keys, SYSTEM.projections)
        await submit(p, 8, "b")
        await caught_up(redis, pool, keys, SYSTEM.projections)
    async with projecting(settings, pool, not_archive) as p:
        await submit(p, 6, "c")
        await caught_up(redis, pool, keys, not_archive)
    events = await in_streams(redis, keys)
    assert len(events) == 22

    trims = await trimmer(settings, redis, pool).trim()
    assert removed(trims) == 16
    kept = await in_streams(redis, keys)
    for event_id, (shard, entry) in events.items():
        readers = [p.name for p in SYSTEM.projections if shard.context in p.contexts]
        needed = [name for name in readers if entry > await checkpoint(pool, name, shard)]
        assert needed in ([], ["archive"])
        assert (event_id in kept) == bool(needed), event_id
    holding = {t.held_by for t in trims if t.kind == "events" and t.length > t.removed}
    assert holding == {"projection:archive"}
    assert set(events) == set(kept) | await archived(pool)  # history whole

    # No projector at all: 4 more commands' events stay, whatever the policy says.
    async with running(settings, projector=False) as p:
        await submit(p, 4, "d")
    trims = await trimmer(settings, redis, pool).trim()
    assert removed(trims) == 0
    assert len(await in_streams(redis, keys)) == 10
    assert all(t.held_by != "policy" for t in trims if t.kind == "events" and t.length)

    # Everyone catches up: the streams are emptied, the archive holds all 26.
    async with running(settings) as p:
        await caught_up(redis, pool, keys, SYSTEM.projections)
        trims = await trimmer(settings, redis, pool).trim()
    assert removed(trims) == 10
    assert await in_streams(redis, keys) == {}
    assert len(await archived(pool)) == 26

    # A rebuild reads it all from the archive, and builds the very same tables.
    report = await runtime.rebuilds(pool, redis, settings, SYSTEM, verify=True)(
        chat_sessions.PROJECTION
    ).run()
    assert report.identical is True
    assert (report.from_archive, report.from_streams, report.caught_up_at_swap) == (13, 0, 0)
    assert await pool.fetchval("SELECT count(*) FROM chat_sessions") == 13


# -- feeds through the whole stack -------------------------------------------------

FEED = "/v1/events/stream"
TOPIC = {"topic": "chat_sessions"}


def create(n: int | str) -> dict[str, Any]:
    return {"agent_id": f"agent-{n}", "participants": []}


async def post(stack: Stack, command_id: str, n: int | str) -> None:
    r = await stack.client.post(
        "/v1/commands/CreateChatSession",
        json=create(n),
        headers={**stack.auth(), "Idempotency-Key": command_id},
    )
    assert r.status_code == 202, r.text


def commands_of(got: list[Frame]) -> list[str | None]:
    return [None if f.event == "reset" else f.envelope.metadata.command_id for f in got]


async def until_command(feed: AsyncIterator[Frame], command_id: str) -> str:
    """Read SSE events until the one of `command_id`; the position after it."""
    while True:
        got, position = await read_events(feed, count=1)
        if commands_of(got) == [command_id]:
            return position


async def processed(stack: Stack, command_id: str) -> bool:
    r = await stack.client.get(f"/v1/commands/{command_id}", headers=stack.auth())
    return r.status_code == 200 and r.json()["status"] == "processed"


async def event_streams_emptied(settings: Settings, redis: Redis, contexts: list[str]) -> bool:
    keys = Keys.of(settings)
    for context in contexts:
        for shard in keys.shards_of(context):
            stream = keys.event_stream(shard)
            if await redis.exists(stream) and await redis.xlen(stream):
                return False
    return True


async def test_a_feed_resumed_from_a_trimmed_position_gets_one_reset_then_live_events(
    settings: Settings, schema: str, redis: Redis
) -> None:
    """The projector's own trimmer, every 0.1 s, with nothing kept beyond commits."""
    settings = msgspec.structs.replace(settings, retention_s=0, trim_interval_s=0.1)
    async with serving(settings) as s:
        # One event seen over SSE, one over a WebSocket; their positions kept.
        async with s.client.stream("GET", FEED, params=TOPIC, headers=s.auth()) as live:
            feed = frames(live)
            await anext(feed)
            await post(s, "seen-sse", "seen")
            seen, sse_position = await read_events(feed, count=1)
        assert commands_of(seen) == ["seen-sse"]
        async with opened(s) as ws:
            await ws.ask({"op": "subscribe", "topic": "chat_sessions"})
            result = await ws.command("CreateChatSession", create("ws"), "seen-ws")
            frame = await ws.expect("event", lambda f: f["event"]["id"] in result["events"])
            ws_position = frame["position"]

        # Away: four more events, all committed, then trimmed by the projector.
        for n in range(4):
            await post(s, f"missed-{n}", n)
        await eventually(lambda: event_streams_emptied(settings, redis, ["chat_sessions"]), 20)

        # SSE: one reset (where delivery goes on), then live events, nothing missed.
        headers = {**s.auth(), "Last-Event-ID": sse_position}
        async with s.client.stream("GET", FEED, params=TOPIC, headers=headers) as again:
            feed = frames(again)
            [reset], _ = await read_events(feed, count=1)
            assert reset.event == "reset" and reset.data
            assert msgspec.json.decode(reset.data) == {
                "reason": "beyond_retention",
                "position": reset.id,
            }
            await post(s, "live-sse", "live")
            got, _ = await read_events(feed, count=1)
            assert commands_of(got) == ["live-sse"]

        # WebSocket `since`: the same, as a reset frame.
        async with opened(s) as ws:
            subscribed = await ws.ask(
                {"op": "subscribe", "topic": "chat_sessions", "since": ws_position}
            )
            assert subscribed["op"] == "subscribed"
            reset_frame = await ws.expect("reset")
            assert reset_frame["reason"] == "beyond_retention"
            assert reset_frame["topic"] == "chat_sessions" and reset_frame["position"]
            result = await ws.command("CreateChatSession", create("ws-live"), "live-ws")
            live_frame = await ws.expect("event")
            assert live_frame["event"]["id"] == result["events"][0]
            await ws.pong()
            assert [f["op"] for f in ws.skipped if f["op"] in ("event", "reset")] == []


async def test_a_feed_resumed_from_a_retained_position_gets_no_reset_and_no_gap(
    settings: Settings, schema: str, redis: Redis
) -> None:
    """Older events trimmed (the feed's positions name some of them: a token holds
    every shard's last entry), the one resumed from and everything after it kept."""
    settings = msgspec.structs.replace(settings, retention_s=3600, trim_interval_s=0)
    keys = Keys.of(settings)
    async with serving(settings) as s:
        for n in range(4):
            await post(s, f"old-{n}", f"old-{n}")
        for n in range(4):  # processed: written to the streams before what follows
            await eventually(lambda n=n: processed(s, f"old-{n}"))
        async with (
            s.client.stream("GET", FEED, params=TOPIC, headers=s.auth()) as live,
            opened(s) as ws,
        ):
            await ws.ask({"op": "subscribe", "topic": "chat_sessions"})
            feed = frames(live)
            await anext(feed)
            await post(s, "seen", "seen")
            sse_position = await until_command(feed, "seen")
            seen = await ws.expect(
                "event", lambda f: f["event"]["metadata"]["command_id"] == "seen"
            )
            ws_position = seen["position"]
        seen_ms = entry_id_of(seen["event"]["position"].rsplit(".", 1)[1].encode())[0]

        missed = [f"missed-{n}" for n in range(5)]
        for command_id in missed:
            await post(s, command_id, command_id)
        pool = await db.create_pool(settings.database_url, settings.db_schema)
        client = connect(settings.redis_url)
        try:
            await caught_up(client, pool, keys, SYSTEM.projections)
            # Keeping an hour, an hour after the seen event: everything before it goes.
            trims = await trimmer(settings, client, pool).trim(now_ms=seen_ms + 3600_000)
        finally:
            await pool.close()
            await client.aclose()
        assert removed(trims) == 4

        headers = {**s.auth(), "Last-Event-ID": sse_position}
        async with s.client.stream("GET", FEED, params=TOPIC, headers=headers) as again:
            feed = frames(again)
            got, _ = await read_events(feed, count=5)
            await post(s, "live", "live")
            got += (await read_events(feed, count=1))[0]
        assert commands_of(got) == [*missed, "live"]

        async with opened(s) as ws:
            await ws.ask({"op": "subscribe", "topic": "chat_sessions", "since": ws_position})
            frames_got = [await ws.expect("event") for _ in range(6)]
            await ws.pong()
            assert [f["op"] for f in ws.skipped if f["op"] == "reset"] == []
        assert [f["event"]["metadata"]["command_id"] for f in frames_got] == [*missed, "live"]
