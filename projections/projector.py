"""The projector: per projection, a consumer group over the event streams of the
contexts it reads; each batch is applied in one Postgres transaction that also
advances the projection's checkpoint, and XACKed only after the commit.

```
XREADGROUP batch ─▶ BEGIN ─▶ checkpoint FOR UPDATE ─▶ skip entries ≤ checkpoint
                 ─▶ apply rows ─▶ advance checkpoint ─▶ COMMIT ─▶ XACK
```

A crash between COMMIT and XACK leaves entries pending; the next owner reads them
again, finds them at or below the checkpoint, and only acknowledges them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import anyio
import asyncpg

from app.settings import Settings
from projections import db
from projections.projection import Projection
from streams.bus import stamp
from streams.connection import Redis, Scripts
from streams.consumer import RETRYABLE, Entry, event_consumers
from streams.keys import Keys, Shard, projection_group
from streams.lease import Balancer
from streams.positions import entry_id_of

log = logging.getLogger("eddy.projector")

RETRYABLE_DB: tuple[type[BaseException], ...] = (
    *RETRYABLE,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    ConnectionError,
)


class ShardProjector:
    def __init__(self, pool: db.Pool, projection: Projection, shard: Shard) -> None:
        self.pool = pool
        self.projection = projection
        self.shard = shard

    async def handle(self, entries: list[Entry]) -> list[bytes]:
        ids = [entry_id for entry_id, _ in entries]
        async with self.pool.acquire() as conn, conn.transaction():
            committed = await db.checkpoint(conn, self.projection.name, self.shard)
            fresh = [
                stamp(self.shard, entry_id.decode(), fields[b"e"])
                for entry_id, fields in entries
                if entry_id_of(entry_id) > committed
            ]
            if fresh:
                await self.projection.apply(conn, fresh)
                await db.advance(conn, self.projection.name, self.shard, entry_id_of(ids[-1]))
        return ids


async def run_projector(
    redis: Redis,
    scripts: Scripts,
    keys: Keys,
    settings: Settings,
    pool: db.Pool,
    projections: Sequence[Projection],
) -> None:
    """Own a fair share of every projection's shards until cancelled."""
    member = f"projector-{uuid.uuid4().hex[:12]}"

    def balancer(projection: Projection) -> Balancer:
        return event_consumers(
            redis,
            scripts,
            keys,
            settings,
            group=projection_group(projection.name),
            contexts=projection.contexts,
            member=member,
            handler=lambda shard: ShardProjector(pool, projection, shard).handle,
            retry_on=RETRYABLE_DB,
        )

    async with anyio.create_task_group() as tg:
        for projection in projections:
            tg.start_soon(balancer(projection).run)
