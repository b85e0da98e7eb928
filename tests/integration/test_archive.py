"""The event archive holds every event of every context exactly once, in stream
order, and replays them as the projector read them."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
import pytest

from app.registry import SYSTEM
from core.messages import Envelope
from projections import archive, db
from streams.connection import Redis
from streams.entries import read_event
from streams.keys import Keys, Shard
from streams.positions import entry_id_of
from tests.pipeline import Pipeline, eventually, running

CHUNK = 'tab\there, newline\nthere, a \\ backslash, "quotes", \\N, é and 🎉'
ODD_ID = "an id with\ta tab,\na newline, \\. and \\N"


async def burst(p: Pipeline) -> str:
    """Commands of every context, interleaved; returns the message stream's id."""
    ids = []
    for i in range(12):
        ids.append(await p.submit("CreateChatSession", {"agent_id": f"a{i}", "participants": []}))
        ids.append(
            await p.submit(
                "SetRuntimeFlag", {"module": f"m{i % 3}", "flag": f"f{i}", "enabled": i % 2 == 0}
            )
        )
        ids.append(
            await p.submit(
                "AppendTraceSpan",
                {
                    "trace_id": f"t{i % 4}",
                    "span_id": f"s{i}",
                    "name": "step",
                    "started_at": "2026-11-25T10:00:00Z",
                },
            )
        )
        ids.append(
            await p.submit(
                "RegisterTool", {"name": f"tool-{i}", "input_schema": {"type": "object"}}
            )
        )
    ids.append(
        await p.submit(
            "CreateChatSession", {"session_id": ODD_ID, "agent_id": "a", "participants": []}
        )
    )
    session = ids[0].aggregate_id
    started = await p.submit("StartMessageStream", {"session_id": session, "participant_id": "u"})
    stream_id = started.aggregate_id
    ids.append(started)
    for seq in range(1, 6):
        ids.append(
            await p.submit(
                "PushStreamMessage", {"stream_id": stream_id, "seq": seq, "chunk": f"{seq} {CHUNK}"}
            )
        )
    for accepted in ids:
        assert (await p.outcome(accepted.command_id)).status == "processed"
    return stream_id


async def streamed(redis: Redis, keys: Keys) -> dict[Shard, list[Envelope]]:
    """Every event in the event streams, per shard, in stream order (XRANGE)."""
    events: dict[Shard, list[Envelope]] = {}
    for context in SYSTEM.contexts:
        for shard in keys.shards_of(context.name):
            entries: list[Any] = await redis.xrange(keys.event_stream(shard))
            events[shard] = [
                read_event(shard, i.decode(), fields[b"e"], SYSTEM.catalog) for i, fields in entries
            ]
    return events


def comparable(envelope: Envelope) -> tuple[Any, ...]:
    """An envelope's fields; the payload as a value (jsonb keeps it, not its spelling)."""
    fields = msgspec.structs.asdict(envelope)
    fields["payload"] = msgspec.json.decode(envelope.payload)
    return tuple(sorted(fields.items()))


async def archived_rows(pool: db.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT context, shard, entry_ms, entry_seq, event_id FROM event_archive"
        ' ORDER BY context COLLATE "C", shard, entry_ms, entry_seq'
    )


async def test_the_archive_holds_every_event_once_in_stream_order(settings, redis, pool) -> None:
    async with running(settings) as p:
        stream_id = await burst(p)
        events = await streamed(redis, p.keys)
        total = sum(len(shard_events) for shard_events in events.values())
        assert total == 12 * 4 + 1 + 6
        assert {shard.context for shard, found in events.items() if found} == {
            c.name for c in SYSTEM.contexts
        }

        async def everything_archived() -> list[asyncpg.Record] | None:
            rows = await archived_rows(pool)
            return rows if len(rows) >= total else None

        rows = await eventually(everything_archived)

    expected = [
        (shard.context, shard.number, *entry_id_of(e.position.rsplit(".", 1)[1].encode()), e.id)
        for shard, shard_events in sorted(events.items(), key=lambda i: (i[0].context, i[0].number))
        for e in shard_events
    ]
    assert [tuple(row) for row in rows] == expected  # each once, in stream order

    # replay: pages of one shard each, in stream order, equal to what the streams hold
    contexts = [c.name for c in SYSTEM.contexts]
    async with pool.acquire() as conn:
        pages = [page async for page in archive.replay(conn, contexts, page=7)]
    assert all(1 <= len(page) <= 7 for page in pages)
    replayed: dict[Shard, list[Envelope]] = {}
    for page in pages:
        shards = {(e.context, e.position.split(".")[1]) for e in page}
        assert len(shards) == 1, shards
        shard = Shard(page[0].context, int(page[0].position.split(".")[1]))
        replayed.setdefault(shard, []).extend(page)
    nonempty = {shard: found for shard, found in events.items() if found}
    assert list(replayed) == [
        Shard(c, n) for c in contexts for n in range(settings.shards) if nonempty.get(Shard(c, n))
    ]
    for shard, found in nonempty.items():
        assert [comparable(e) for e in replayed[shard]] == [comparable(e) for e in found]

    # ... resumed after a position, and one aggregate's history in version order
    shard, found = max(nonempty.items(), key=lambda item: len(item[1]))
    after = {shard: entry_id_of(found[2].position.rsplit(".", 1)[1].encode())}
    async with pool.acquire() as conn:
        rest = [
            e async for page in archive.replay(conn, [shard.context], after=after) for e in page
        ]
        chunks = await archive.history(conn, "tenant-a", "message_streams", stream_id)
        [odd] = await archive.history(conn, "tenant-a", "chat_sessions", ODD_ID)
    assert [e.id for e in rest if e.position.startswith(f"{shard.context}.{shard.number}.")] == [
        e.id for e in found[3:]
    ]
    assert [e.aggregate_version for e in chunks] == [1, 2, 3, 4, 5, 6]
    assert msgspec.json.decode(chunks[1].payload)["chunk"] == f"1 {CHUNK}"
    assert odd.aggregate_id == ODD_ID and odd.type == "ChatSessionCreated"


async def test_an_event_archived_twice_fails_loudly(settings, redis, pool) -> None:
    async with running(settings, projector=False) as p:
        accepted = await p.submit("CreateChatSession", {"agent_id": "a", "participants": []})
        await p.outcome(accepted.command_id)
        events = await streamed(redis, p.keys)
    [envelope] = [e for found in events.values() for e in found]
    async with pool.acquire() as conn:
        await archive.apply(conn, [(envelope, None)])
        with pytest.raises(asyncpg.UniqueViolationError):
            await archive.apply(conn, [(envelope, None)])
        assert await conn.fetchval("SELECT count(*) FROM event_archive") == 1
