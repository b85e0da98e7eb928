"""Guarantee 7: a projection applies each event exactly once — the checkpoint moves
in the same transaction as the rows, and a replayed entry is skipped.

The probe projection below inserts one row per event under a primary key, so
applying any event twice would fail loudly instead of passing unnoticed.
"""

from __future__ import annotations

from app.contexts import chat_sessions
from app.registry import SYSTEM
from projections import db
from projections.projection import Batch, Projection
from projections.projector import ShardProjector, run_projector
from streams.keys import projection_group
from tests.pipeline import eventually, running

PROBE_TABLE = "CREATE TABLE probe (event_id text PRIMARY KEY, version int NOT NULL)"


async def apply_probe(conn: db.Connection, batch: Batch) -> None:
    await conn.executemany(
        "INSERT INTO probe (event_id, version) VALUES ($1, $2)",
        [(e.id, e.aggregate_version) for e, _ in batch],
    )


PROBE = Projection(name="probe", reads=(chat_sessions.CONTEXT,), events=None, apply=apply_probe)


async def test_replayed_entries_are_skipped(settings, redis, pool) -> None:
    await pool.execute(PROBE_TABLE)
    async with running(settings, projector=False) as p:
        ids = []
        for i in range(20):
            accepted = await p.submit(
                "CreateChatSession", {"agent_id": f"a{i}", "participants": []}
            )
            ids.append(accepted.command_id)
        for command_id in ids:
            assert (await p.outcome(command_id)).status == "processed"

        # A projector commits every shard's entries, then dies before its XACK.
        group = projection_group("probe")
        for shard in p.keys.shards_of("chat_sessions"):
            stream = p.keys.event_stream(shard)
            await redis.xgroup_create(stream, group, id="0", mkstream=True)
            reply = await redis.xreadgroup(group, "doomed", {stream: ">"})
            if reply:
                projector = ShardProjector(pool, PROBE, shard, SYSTEM.catalog)
                await projector.handle(reply[0][1])
                # ... and a second delivery of the same entries changes nothing
                await projector.handle(reply[0][1])
        assert await pool.fetchval("SELECT count(*) FROM probe") == 20

        # The next owner claims the pending entries, skips them, and acknowledges them.
        from anyio import create_task_group

        async with create_task_group() as tg:
            tg.start_soon(
                run_projector, redis, p.scripts, p.keys, settings, pool, SYSTEM.catalog, [PROBE]
            )

            async def nothing_pending() -> bool:
                for shard in p.keys.shards_of("chat_sessions"):
                    info = await redis.xpending(p.keys.event_stream(shard), group)
                    if info["pending"]:
                        return False
                return True

            await eventually(nothing_pending)
            more = await p.submit("CreateChatSession", {"agent_id": "late", "participants": []})
            await p.outcome(more.command_id)

            async def twenty_one() -> bool:
                return await pool.fetchval("SELECT count(*) FROM probe") == 21

            await eventually(twenty_one)
            tg.cancel_scope.cancel()
        assert await pool.fetchval("SELECT count(DISTINCT event_id) FROM probe") == 21
