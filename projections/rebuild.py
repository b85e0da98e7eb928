"""Zero-downtime rebuilds: a projection's tables built again from history, in the
background, then swapped in at once.

```
scratch schema ◀─ the projection's declared tables
      ◀─ replay the event archive (pages, in stream order per shard)  ─┐ queries keep
      ◀─ then the event streams beyond it (XRANGE)                      │ answering from
swap, one transaction:                                                  │ the old tables
  LOCK eddy_checkpoints (projector commits wait a moment)               │
  catch up to the live checkpoints (or move them up to the rebuild's)   │
  old tables → <schema>__old_<name>, new tables → <schema>  ◀───────────┘
  registry: version, rebuilt_at · `after_swap` steps (views, caches)
drop the old tables
```

The live projector goes on projecting into the old tables while the new ones are
built; the swap holds the checkpoint table locked, so no batch commits between
the catch-up and the renames, and the new tables start exactly at the live
checkpoints. `ALTER TABLE … SET SCHEMA` keeps indexes and is instant; a query that
runs during the swap waits for it (milliseconds), then reads the new tables.

Events are read as written, from the archive as from the streams, and brought to
their current shape by the projection that decodes them (`Projection.project`).

One rebuild of a projection at a time, across processes (a session advisory
lock, `rebuild_lock`). A projection whose declared `version` differs from the installed one is
rebuilt by `ensure_current` before the projector projects it: the new code may not
fit the old tables, so until the swap its queries answer from the old tables and
it lags.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from core.catalog import Catalog
from core.messages import Envelope
from projections import db
from projections.archive import replay as replay_archive
from projections.cache import Generations
from projections.projection import Projection
from projections.views import View, recreate
from streams.connection import Redis
from streams.entries import read_written
from streams.keys import Keys, Shard
from streams.positions import EntryId, format_entry_id, parse_event_position

log = logging.getLogger("eddy.rebuild")

PAGE = 1000
REBUILD_LOCK = 0x5245_0000  # "RE" + crc of the projection's name in the low bits
BUSY_RETRY_S = 1.0

Progress = Callable[[str, int, int], None]
"""`(phase, done, total)`: `total` is 0 while unknown."""
AfterSwap = Callable[[db.Connection, Projection], Awaitable[None]]
"""A step inside the swap's transaction, after the tables moved (views, caches)."""


class RebuildBusy(Exception):
    """Another process is rebuilding this projection."""


class CannotRebuild(Exception):
    """The projection cannot be rebuilt (the event archive is the history itself)."""


@dataclass
class Report:
    projection: str
    version: int
    events: int = 0
    from_archive: int = 0
    from_streams: int = 0
    caught_up_at_swap: int = 0
    identical: bool | None = None
    """With `verify`: whether the new tables equalled the old ones at the swap."""
    tables: list[str] = field(default_factory=list)


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def schema_name(base: str, kind: str, projection: str) -> str:
    return f"{base}__{kind}_{projection}"[:63]


def rebuild_lock(projection: str) -> int:
    """The advisory lock a rebuild of `projection` holds (session-level, key `bigint`)."""
    return REBUILD_LOCK | (zlib.crc32(projection.encode()) & 0xFFFF)


async def rebuilding(pool: db.Pool, schema: str, projections: Sequence[str]) -> bool:
    """Whether one of `projections` of `schema` is being rebuilt right now: its
    scratch schema exists and its lock is held (the trimmer's question)."""
    scratch = [schema_name(schema, "rebuild", name) for name in projections]
    locks = [rebuild_lock(name) for name in projections]
    found: bool = await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM unnest($1::text[], $2::bigint[]) AS r(scratch, key)"
        " WHERE EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = r.scratch)"
        " AND EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid = (r.key >> 32)::oid AND objid = (r.key & 4294967295)::oid"
        " AND objsubid = 1))",
        scratch,
        locks,
    )
    return found


class Rebuild:
    def __init__(
        self,
        pool: db.Pool,
        redis: Redis,
        keys: Keys,
        schema: str,
        projection: Projection,
        *,
        catalog: Catalog,
        replay: Callable[[db.Connection, Sequence[str]], AsyncIterator[list[Envelope]]],
        after_swap: Sequence[AfterSwap] = (),
        progress: Progress | None = None,
        verify: bool = False,
        page: int = PAGE,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.keys = keys
        self.base = schema
        self.projection = projection
        self.catalog = catalog
        self.replay = replay
        self.after_swap = after_swap
        self.progress = progress or (lambda phase, done, total: None)
        self.verify = verify
        self.page = page
        self.scratch = schema_name(schema, "rebuild", projection.name)
        self.old = schema_name(schema, "old", projection.name)
        self.shards = [s for c in projection.contexts for s in keys.shards_of(c)]
        self.done: dict[Shard, EntryId] = {}
        self.report = Report(projection.name, projection.version)

    async def run(self) -> Report:
        """Build, swap, clean up; raise `RebuildBusy` if another process is at it."""
        if "event_archive" in self.projection.tables:
            raise CannotRebuild("the event archive is the history a rebuild replays")
        async with self._locked():
            try:
                await self._prepare()
                await self._from_archive()
                await self._from_streams()
                await self._swap()
            finally:
                async with self.pool.acquire() as conn:
                    await conn.execute(f"DROP SCHEMA IF EXISTS {ident(self.scratch)} CASCADE")
                    await conn.execute(f"DROP SCHEMA IF EXISTS {ident(self.old)} CASCADE")
        log.info(
            "projection-rebuilt name=%s version=%s events=%s",
            self.projection.name,
            self.projection.version,
            self.report.events,
        )
        return self.report

    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        key = rebuild_lock(self.projection.name)
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                raise RebuildBusy(f"{self.projection.name} is being rebuilt by another process")
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)

    async def _prepare(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"DROP SCHEMA IF EXISTS {ident(self.scratch)} CASCADE")
            await conn.execute(f"CREATE SCHEMA {ident(self.scratch)}")
            await conn.execute(f"SET LOCAL search_path TO {ident(self.scratch)}")
            await conn.execute(self.projection.tables)
            self.report.tables = [
                r["tablename"]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY tablename",
                    self.scratch,
                )
            ]

    async def _apply(self, conn: db.Connection, envelopes: list[Envelope]) -> None:
        """Apply `envelopes` to the new tables, in the caller's transaction."""
        await conn.execute(f"SET LOCAL search_path TO {ident(self.scratch)}, {ident(self.base)}")
        await self.projection.project(conn, envelopes, self.catalog)
        for envelope in envelopes:
            shard, entry = _position(self.keys, envelope)
            self.done[shard] = max(self.done.get(shard, (0, 0)), entry)
        self.report.events += len(envelopes)

    async def _from_archive(self) -> None:
        async with self.pool.acquire() as conn:
            total = await conn.fetchval(
                "SELECT count(*) FROM event_archive WHERE context = ANY($1::text[])",
                list(self.projection.contexts),
            )
            self.progress("archive", 0, total)
            async for page in self.replay(conn, self.projection.contexts):
                async with self.pool.acquire() as writer, writer.transaction():
                    await self._apply(writer, page)
                self.report.from_archive += len(page)
                self.progress("archive", self.report.from_archive, max(total, 1))

    async def _from_streams(self) -> None:
        """Everything after the archive, from the streams, until a pass is short."""
        while True:
            applied = 0
            for shard in self.shards:
                entries = await self._read(shard, self.done.get(shard, (0, 0)), None)
                for start in range(0, len(entries), self.page):
                    async with self.pool.acquire() as conn, conn.transaction():
                        await self._apply(conn, entries[start : start + self.page])
                applied += len(entries)
            self.report.from_streams += applied
            self.progress("streams", self.report.from_streams, 0)
            if applied < self.page:
                return

    async def _read(self, shard: Shard, after: EntryId, upto: EntryId | None) -> list[Envelope]:
        """The envelopes of `shard`'s event stream in (`after`, `upto`] (`None`: to the end)."""
        envelopes: list[Envelope] = []
        start = "(" + format_entry_id(after)
        end = "+" if upto is None else format_entry_id(upto)
        if upto is not None and upto <= after:
            return envelopes
        while True:
            reply: Any = await self.redis.xrange(
                self.keys.event_stream(shard), start, end, count=self.page
            )
            for entry_id, fields in reply:
                envelopes.append(read_written(shard, entry_id.decode(), fields[b"e"]))
            if len(reply) < self.page:
                return envelopes
            start = "(" + reply[-1][0].decode()

    async def _swap(self) -> None:
        name = self.projection.name
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE eddy_checkpoints IN EXCLUSIVE MODE")
            live = {
                Shard(r["context"], r["shard"]): (r["entry_ms"], r["entry_seq"])
                for r in await conn.fetch(
                    "SELECT context, shard, entry_ms, entry_seq FROM eddy_checkpoints"
                    " WHERE projection = $1",
                    name,
                )
            }
            for shard in self.shards:
                rebuilt = self.done.get(shard, (0, 0))
                target = live.get(shard, (0, 0))
                missing = await self._read(shard, rebuilt, target)
                if missing:
                    await self._apply(conn, missing)
                    self.report.caught_up_at_swap += len(missing)
            await conn.execute(f"SET LOCAL search_path TO {ident(self.base)}")
            for shard, entry in self.done.items():
                if entry > live.get(shard, (0, 0)):  # the live projector was behind (paused)
                    await db.advance(conn, name, shard, entry)
            if self.verify:
                self.report.identical = await self._identical(conn)
            await conn.execute(f"DROP SCHEMA IF EXISTS {ident(self.old)} CASCADE")
            await conn.execute(f"CREATE SCHEMA {ident(self.old)}")
            for table in self.report.tables:
                await conn.execute(
                    f"ALTER TABLE IF EXISTS {ident(self.base)}.{ident(table)}"
                    f" SET SCHEMA {ident(self.old)}"
                )
                new = f"{ident(self.scratch)}.{ident(table)}"
                await conn.execute(f"ALTER TABLE {new} SET SCHEMA {ident(self.base)}")
            for step in self.after_swap:
                await step(conn, self.projection)
            await conn.execute(
                "INSERT INTO eddy_projections (name, version, rebuilt_at) VALUES ($1, $2, now())"
                " ON CONFLICT (name) DO UPDATE SET version = $2, rebuilt_at = now()",
                name,
                self.projection.version,
            )

    async def _identical(self, conn: db.Connection) -> bool:
        """Whether every new table holds exactly the rows of the old one (both ways)."""
        for table in self.report.tables:
            old = f"{ident(self.base)}.{ident(table)}"
            new = f"{ident(self.scratch)}.{ident(table)}"
            differ = await conn.fetchval(
                f"SELECT (SELECT count(*) FROM (SELECT * FROM {old} EXCEPT ALL"
                f" SELECT * FROM {new}) a) + (SELECT count(*) FROM (SELECT * FROM {new}"
                f" EXCEPT ALL SELECT * FROM {old}) b)"
            )
            if differ:
                log.warning("rebuild-differs table=%s rows=%s", table, differ)
                return False
        return True


def _position(keys: Keys, envelope: Envelope) -> tuple[Shard, EntryId]:
    return parse_event_position(envelope.position, {envelope.context: None}, keys.shards)


async def installed_version(pool: db.Pool, name: str) -> int | None:
    version: int | None = await pool.fetchval(
        "SELECT version FROM eddy_projections WHERE name = $1", name
    )
    return version


async def ensure_current(
    make: Callable[[Projection], Rebuild], pool: db.Pool, projection: Projection
) -> None:
    """Return once the installed tables are at the declared version: rebuild them
    here, or wait while another process does."""
    while await installed_version(pool, projection.name) != projection.version:
        log.warning(
            "projection-version-changed name=%s declared=%s: rebuilding",
            projection.name,
            projection.version,
        )
        try:
            await make(projection).run()
        except RebuildBusy:
            await anyio.sleep(BUSY_RETRY_S)


def rebuilder(
    pool: db.Pool,
    redis: Redis,
    keys: Keys,
    schema: str,
    *,
    catalog: Catalog,
    projections: Sequence[Projection],
    views: Sequence[View],
    progress: Progress | None = None,
    verify: bool = False,
) -> Callable[[Projection], Rebuild]:
    """Make the `Rebuild` of a projection of `projections`, from the event archive,
    with the steps every swap takes: the views of `views` that read its tables are
    created again, and the cached answers of the queries that read them dropped."""
    generations = Generations(projections)

    async def recreate_views(conn: db.Connection, projection: Projection) -> None:
        await recreate(conn, projection, views)

    def make(projection: Projection) -> Rebuild:
        return Rebuild(
            pool,
            redis,
            keys,
            schema,
            projection,
            catalog=catalog,
            replay=replay_archive,
            after_swap=[recreate_views, generations.forget],
            progress=progress,
            verify=verify,
        )

    return make
