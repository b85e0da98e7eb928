"""The projector: per projection, a consumer group over the event streams of the
contexts it reads; each batch is applied in one Postgres transaction that also
advances the projection's checkpoint, and XACKed only after the commit.

```
XREADGROUP batch ─▶ BEGIN ─▶ checkpoint FOR UPDATE ─▶ skip entries ≤ checkpoint
                 ─▶ apply rows ─▶ advance checkpoint ─▶ COMMIT ─▶ XACK
```

A crash between COMMIT and XACK leaves entries pending; the next owner reads them
again, finds them at or below the checkpoint, and only acknowledges them.

An event whose batch keeps failing (a row breaks a constraint, an entry cannot be
decoded) is isolated by the consumer loop and, after `EDDY_MAX_ATTEMPTS`, moved to the
shard's dead letters for this projection only (`streams/deadletters.py`); `skip`
then moves the checkpoint past it and records it as the shard's last error.
`replay` applies a dead event again when an operator asks.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio

from core.catalog import Catalog
from core.messages import Envelope
from core.settings import Settings
from projections import db
from projections.db import Connection
from projections.projection import Projection
from projections.status import record_failure
from streams.connection import Redis, Scripts
from streams.consumer import Poison, event_consumers
from streams.deadletters import DeadLettered, DeadLetters
from streams.entries import Entry, read_written
from streams.keys import Keys, Shard, projection_group
from streams.lease import Balancer, ShardLease
from streams.positions import entry_id_of

log = logging.getLogger("eddy.projector")


Applied = Callable[[Connection, Projection, Shard, list[Envelope]], Awaitable[None]]
"""Runs inside a batch's transaction, after the rows and the checkpoint are written."""
Committed = Callable[[Projection, Shard, list[Envelope]], Awaitable[None]]
"""Told, after a batch's COMMIT (before its XACK), which events it projected. A
batch that fails after COMMIT is acknowledged without telling again: use it for
what may be lost (waking a refresher), `Applied` for what may not."""


@dataclass(frozen=True)
class Hooks:
    in_transaction: Sequence[Applied] = ()
    on_commit: Sequence[Committed] = ()


class ShardProjector:
    def __init__(
        self,
        pool: db.Pool,
        projection: Projection,
        shard: Shard,
        catalog: Catalog,
        hooks: Hooks | None = None,
    ) -> None:
        self.pool = pool
        self.projection = projection
        self.shard = shard
        self.catalog = catalog
        self.hooks = hooks or Hooks()

    async def handle(self, entries: list[Entry]) -> list[bytes]:
        """Project a batch. A failure is recorded on the shard's checkpoint row
        (`eddy status`, /metrics), outside the rolled-back transaction, and raised."""
        ids = [entry_id for entry_id, _ in entries]
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                committed = await db.checkpoint(conn, self.projection.name, self.shard)
                fresh = [
                    read_written(self.shard, entry_id.decode(), fields[b"e"])
                    for entry_id, fields in entries
                    if entry_id_of(entry_id) > committed
                ]
                if fresh:
                    await self.projection.project(conn, fresh, self.catalog)
                    await db.advance(conn, self.projection.name, self.shard, entry_id_of(ids[-1]))
                    for applied in self.hooks.in_transaction:
                        await applied(conn, self.projection, self.shard, fresh)
            if fresh:
                for tell in self.hooks.on_commit:
                    await tell(self.projection, self.shard, fresh)
        except Exception as exc:
            await record_failure(self.pool, self.projection.name, self.shard, exc)
            raise
        return ids

    async def skip(self, entry_id: bytes, dead_letter: str, error: BaseException) -> None:
        """After an entry was dead-lettered: move the checkpoint past it (every entry
        before it is committed) and record it as the shard's last error."""
        async with self.pool.acquire() as conn, conn.transaction():
            await db.checkpoint(conn, self.projection.name, self.shard)
            await db.advance(conn, self.projection.name, self.shard, entry_id_of(entry_id))
        reason = DeadLettered(f"{dead_letter} after {type(error).__name__}: {error}")
        await record_failure(self.pool, self.projection.name, self.shard, reason)

    async def replay(self, envelope: Envelope) -> None:
        """Apply one event again, out of the stream's order (a dead letter's replay),
        with the hooks, in a transaction that holds the shard's checkpoint row (so
        never beside a batch of the shard). The checkpoint does not move."""
        async with self.pool.acquire() as conn, conn.transaction():
            await db.checkpoint(conn, self.projection.name, self.shard)
            await self.projection.project(conn, [envelope], self.catalog)
            for applied in self.hooks.in_transaction:
                await applied(conn, self.projection, self.shard, [envelope])
        for tell in self.hooks.on_commit:
            await tell(self.projection, self.shard, [envelope])


async def run_projector(
    redis: Redis,
    scripts: Scripts,
    keys: Keys,
    settings: Settings,
    pool: db.Pool,
    catalog: Catalog,
    projections: Sequence[Projection],
    hooks: Hooks | None = None,
    prepare: Callable[[Projection], Awaitable[None]] | None = None,
) -> None:
    """Own a fair share of every projection's shards until cancelled, running
    `hooks` with every batch (cache invalidation, view refreshes). `prepare(p)` is
    awaited before projecting `p` (a rebuild, when its declared version changed)."""
    member = f"projector-{uuid.uuid4().hex[:12]}"
    dead_letters = DeadLetters(redis, scripts, keys, settings.command_ttl_s, catalog)

    def balancer(projection: Projection) -> Balancer:
        group = projection_group(projection.name)

        def poison(shard: Shard, lease: ShardLease) -> Poison:
            projector = ShardProjector(pool, projection, shard, catalog, hooks)
            return dead_letters.poison(
                lease, shard, group, settings.max_attempts, then=projector.skip
            )

        return event_consumers(
            redis,
            scripts,
            keys,
            settings,
            group=group,
            contexts=projection.contexts,
            member=member,
            handler=lambda shard: ShardProjector(pool, projection, shard, catalog, hooks).handle,
            poison=poison,
        )

    async def project(projection: Projection) -> None:
        if prepare is not None:
            await prepare(projection)
        await balancer(projection).run()

    async with anyio.create_task_group() as tg:
        for projection in projections:
            tg.start_soon(project, projection)
