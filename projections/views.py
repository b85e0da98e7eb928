"""Materialized views over the projections' tables: declared beside the projection
that owns them (and listed in the system's registry, `app/registry.py`), created by
`eddy migrate`, refreshed by the projector processes when events they depend on
are committed, and queried like a projection's tables.

```
projector batch ─▶ BEGIN · rows · checkpoint · eddy_view_changes (its last event that
                   makes a view stale) ─▶ COMMIT ─▶ mark the view dirty
refresher       ─▶ wait EDDY_VIEW_DEBOUNCE_S (later marks ride along)
                ─▶ BEGIN · pg_try_advisory_xact_lock(view)   held elsewhere: retry later
                   · read the feeding projections' checkpoints
                   · REFRESH MATERIALIZED VIEW CONCURRENTLY
                   · eddy_view_positions := those checkpoints ─▶ COMMIT
```

`?after=P` on a view's query waits until, for every feeding projection that
reads P's shard, the view's recorded position has reached P, or nothing that
makes the view stale was committed after that position and the projection's
checkpoint has reached P (an event the view ignores, such as `ToolUpdated` for
tool usage, needs no refresh to be reflected). Checkpoints are read before the
REFRESH, whose snapshot is newer: a recorded position never claims too much.

Deliberate choices:

- The debounce is a throttle: the first mark starts the wait and the marks that
  arrive during it ride along; a mark that arrives during a refresh brings
  another one after the next wait. Under steady writes a view is refreshed once
  per `EDDY_VIEW_DEBOUNCE_S`, and always once after the last change.
- Marks live in memory, so a projector killed between a COMMIT and the refresh
  would lose one. Every refresher therefore also looks, at start and every
  `SWEEP_S`, for views with a change past their recorded positions.
- The advisory lock is transaction-scoped (released by COMMIT, ROLLBACK or a lost
  connection) and keyed by schema and view, so schemas sharing a database do not
  exclude each other. A refresh waits at most `REFRESH_LOCK_TIMEOUT` for a table
  lock, so it never holds up (or deadlocks with) a rebuild's table swap: it fails
  and is retried.
- A view holds nothing of its own: `eddy migrate` drops and creates again a view
  whose definition changed, and a rebuild creates again the views reading the
  tables it swapped (`recreate`, one of its `after_swap` steps).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import anyio
import asyncpg
from anyio.abc import TaskStatus

from core.messages import Envelope, Event
from core.outages import FAILED, Backoff
from projections.db import Connection, Pool
from projections.projection import Projection, Query, account_for
from streams.keys import Shard
from streams.positions import EntryId, parse_entry_id

log = logging.getLogger("eddy.views")

VIEW_LOCK = 0x5649_4557  # "VIEW": with a hash of `schema.view`, one refresher of a view at a time
SWEEP_S = 15.0
REFRESH_LOCK_TIMEOUT = "500ms"
BUSY_RETRY_S = 0.05  # at least this long before trying a lock another process held


@dataclass(frozen=True)
class View:
    """A materialized view: its rows, what keeps it fresh, and its queries."""

    name: str
    select: str
    """Its rows: a `SELECT …` over the tables of `reads` (unqualified names)."""
    unique: tuple[str, ...]
    """Columns unique together: the index `REFRESH … CONCURRENTLY` needs."""
    stale_on: tuple[type[Event], ...]
    """The events that make it stale once projected."""
    reads: tuple[Projection, ...]
    """The projections whose tables `select` reads; the first one serves its queries."""
    queries: tuple[Query, ...] = ()
    indexes: tuple[tuple[str, ...], ...] = ()
    """More (not unique) indexes, for its queries."""
    unaffected_by: tuple[type[Event], ...] = ()
    """The other events those projections handle: each of them is named in one of
    the two, so a new one cannot be forgotten (a `ConfigurationError` here)."""
    stale_types: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or not self.reads:
            raise ValueError(f"view {self.name!r}: a plain name and at least one projection")
        for query in self.queries:
            if query.view != self.name:
                raise ValueError(f"query {query.name} of view {self.name} says view={query.view}")
        account_for(
            f"view {self.name}",
            f"{', '.join(p.name for p in self.reads)}",
            {e for p in self.reads for e in p.handles},
            frozenset(self.stale_on),
            set(self.unaffected_by),
        )
        object.__setattr__(self, "stale_types", frozenset(e.__name__ for e in self.stale_on))

    def ddl(self) -> str:
        """The statements that create it, filled with its rows, and its indexes."""
        statements = [
            f"CREATE MATERIALIZED VIEW {self.name} AS {self.select.strip()} WITH DATA",
            f"CREATE UNIQUE INDEX {self.name}_key ON {self.name} ({', '.join(self.unique)})",
        ]
        statements += [
            f"CREATE INDEX {self.name}_by_{'_'.join(columns)} ON {self.name} ({', '.join(columns)})"
            for columns in self.indexes
        ]
        return ";\n".join(statements)

    def checksum(self) -> str:
        return hashlib.sha256(self.ddl().encode()).hexdigest()

    def feeding(self, shard: Shard) -> list[str]:
        """The projections it reads that project `shard`'s events."""
        return [p.name for p in self.reads if shard.context in p.contexts]


def serving(projections: Sequence[Projection], views: Sequence[View]) -> tuple[Projection, ...]:
    """`projections`, each with the queries of the views whose first read it is:
    the query routes, the OpenAPI document and `?after=` follow from them."""
    extra: dict[str, tuple[Query, ...]] = {}
    for view in views:
        owner = view.reads[0].name
        extra[owner] = extra.get(owner, ()) + view.queries
    names = {p.name for p in projections}
    if missing := set(extra) - names:
        raise ValueError(f"views served by projections that are not listed: {sorted(missing)}")
    return tuple(
        replace(p, queries=p.queries + extra[p.name]) if p.name in extra else p for p in projections
    )


# ---- creating views ------------------------------------------------------------


async def install(conn: Connection, views: Sequence[View]) -> list[str]:
    """Inside `eddy migrate`'s transaction: create every view that does not exist
    (or whose definition changed); return what was done."""
    registered = {
        r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM eddy_views")
    }
    existing = {
        r["matviewname"]
        for r in await conn.fetch(
            "SELECT matviewname FROM pg_matviews WHERE schemaname = current_schema()"
        )
    }
    done: list[str] = []
    for view in views:
        checksum = view.checksum()
        if view.name in existing and registered.get(view.name) == checksum:
            continue
        if view.name in existing:
            log.info("view-redefined name=%s", view.name)
            await conn.execute(f"DROP MATERIALIZED VIEW {view.name}")
        await _create(conn, view)
        done.append(f"view {view.name}")
    return done


async def recreate(conn: Connection, projection: Projection, views: Sequence[View]) -> None:
    """A rebuild's `after_swap` step: create again (from the new tables) every view
    of `views` that reads `projection`, before its old tables are dropped."""
    for view in views:
        if projection.name in {p.name for p in view.reads}:
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext(current_schema() || '.' || $2))",
                VIEW_LOCK,
                view.name,
            )
            await conn.execute(f"DROP MATERIALIZED VIEW IF EXISTS {view.name}")
            await _create(conn, view)


async def _create(conn: Connection, view: View) -> None:
    checkpoints = await _checkpoints(conn, view)  # before the rows: never claims too much
    await conn.execute(view.ddl())
    await conn.execute("DELETE FROM eddy_view_positions WHERE view_name = $1", view.name)
    await _record(conn, view, checkpoints)
    await conn.execute(
        "INSERT INTO eddy_views (name, checksum) VALUES ($1, $2)"
        " ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, created_at = now(),"
        " refreshed_at = NULL, refreshes = 0, refresh_ms = NULL",
        view.name,
        view.checksum(),
    )


async def _checkpoints(conn: Connection, view: View) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT projection, context, shard, entry_ms, entry_seq FROM eddy_checkpoints"
        " WHERE projection = ANY($1::text[])",
        [p.name for p in view.reads],
    )
    return rows


async def _record(conn: Connection, view: View, checkpoints: list[asyncpg.Record]) -> None:
    await conn.executemany(
        "INSERT INTO eddy_view_positions"
        " (view_name, projection, context, shard, entry_ms, entry_seq)"
        " VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (view_name, projection, context, shard) DO UPDATE"
        " SET entry_ms = excluded.entry_ms, entry_seq = excluded.entry_seq"
        " WHERE (eddy_view_positions.entry_ms, eddy_view_positions.entry_seq)"
        " < (excluded.entry_ms, excluded.entry_seq)",
        [
            (view.name, r["projection"], r["context"], r["shard"], r["entry_ms"], r["entry_seq"])
            for r in checkpoints
        ],
    )


# ---- reading them at a position ------------------------------------------------

REFLECTS = (
    "SELECT bool_and("
    " coalesce((r.entry_ms, r.entry_seq) >= ($5::bigint, $6::bigint), false)"
    " OR ((ch.entry_ms IS NULL"
    "      OR coalesce((ch.entry_ms, ch.entry_seq) <= (r.entry_ms, r.entry_seq), false))"
    "     AND coalesce((c.entry_ms, c.entry_seq) >= ($5::bigint, $6::bigint), false)))"
    " FROM unnest($2::text[]) AS p (projection)"
    " LEFT JOIN eddy_view_positions AS r ON r.view_name = $1 AND r.projection = p.projection"
    "  AND r.context = $3 AND r.shard = $4"
    " LEFT JOIN eddy_view_changes AS ch ON ch.view_name = $1 AND ch.projection = p.projection"
    "  AND ch.context = $3 AND ch.shard = $4"
    " LEFT JOIN eddy_checkpoints AS c ON c.projection = p.projection"
    "  AND c.context = $3 AND c.shard = $4"
)


async def reflects(pool: Pool, view: View, shard: Shard, entry: EntryId) -> bool:
    """Whether `view` reflects every event up to `entry` on `shard` (see the module
    docstring); one statement, so one snapshot of positions, changes and checkpoints."""
    feeding = view.feeding(shard)
    if not feeding:
        return True
    done = await pool.fetchval(
        REFLECTS, view.name, feeding, shard.context, shard.number, entry[0], entry[1]
    )
    return bool(done)


# ---- refreshing them -----------------------------------------------------------

STALE = (
    "SELECT DISTINCT ch.view_name FROM eddy_view_changes AS ch"
    " LEFT JOIN eddy_view_positions AS r USING (view_name, projection, context, shard)"
    " WHERE ch.view_name = ANY($1::text[])"
    " AND (r.view_name IS NULL OR (ch.entry_ms, ch.entry_seq) > (r.entry_ms, r.entry_seq))"
)
CHANGED = (
    "INSERT INTO eddy_view_changes (view_name, projection, context, shard, entry_ms, entry_seq)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
    " ON CONFLICT (view_name, projection, context, shard) DO UPDATE"
    " SET entry_ms = excluded.entry_ms, entry_seq = excluded.entry_seq"
    " WHERE (eddy_view_changes.entry_ms, eddy_view_changes.entry_seq)"
    " < (excluded.entry_ms, excluded.entry_seq)"
)


@dataclass
class Refresher:
    """Keeps `views` fresh for one projector process. Its two projector hooks:
    `record_changes` (inside a batch's transaction) and `mark` (after its COMMIT);
    `run` is the task that refreshes."""

    pool: Pool
    views: Sequence[View]
    debounce_s: float
    sweep_s: float = SWEEP_S
    refreshes: int = 0
    """Refreshes this refresher made."""
    busy: int = 0
    """Refreshes put off because another process was refreshing the view."""
    _dirty: set[str] = field(default_factory=set)
    _marked: anyio.Event = field(default_factory=anyio.Event)

    async def record_changes(
        self, conn: Connection, projection: Projection, shard: Shard, envelopes: list[Envelope]
    ) -> None:
        staled = self._staled(projection, envelopes)
        if staled:
            await conn.executemany(
                CHANGED,
                [
                    (view.name, projection.name, shard.context, shard.number, *entry)
                    for view, entry in staled
                ],
            )

    async def mark(self, projection: Projection, shard: Shard, envelopes: list[Envelope]) -> None:
        for view, _ in self._staled(projection, envelopes):
            self._dirty.add(view.name)
            self._marked.set()

    def _staled(
        self, projection: Projection, envelopes: list[Envelope]
    ) -> list[tuple[View, EntryId]]:
        """Each view the batch made stale, with the entry of its last event that did."""
        staled = []
        for view in self.views:
            if projection.name not in {p.name for p in view.reads}:
                continue
            for env in reversed(envelopes):
                if env.type in view.stale_types:
                    staled.append((view, parse_entry_id(env.position.rpartition(".")[2])))
                    break
        return staled

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Refresh the marked views, debounced, until cancelled."""
        backoff = Backoff(first_s=max(self.debounce_s, 0.1), cap_s=10)
        task_status.started()
        next_sweep = anyio.current_time()
        put_off = False
        while True:
            if anyio.current_time() >= next_sweep:
                await self._sweep()
                next_sweep = anyio.current_time() + self.sweep_s
            if not self._dirty:
                with anyio.move_on_after(next_sweep - anyio.current_time()):
                    await self._marked.wait()
                self._marked = anyio.Event()
                continue
            await anyio.sleep(max(self.debounce_s, BUSY_RETRY_S) if put_off else self.debounce_s)
            self._marked = anyio.Event()
            due, self._dirty = self._dirty, set()
            failed = put_off = False
            for view in self.views:
                if view.name not in due:
                    continue
                try:
                    done = await self.refresh(view)
                    put_off = put_off or not done
                except FAILED as exc:
                    log.warning("view-refresh-failed view=%s error=%r", view.name, exc)
                    done, failed = False, True
                if not done:
                    self._dirty.add(view.name)
            if failed:
                await backoff.sleep()
            else:
                backoff.reset()

    async def refresh(self, view: View) -> bool:
        """Refresh `view` now and record what it reflects; False if another
        process is refreshing it (then it is refreshed again later)."""
        async with self.pool.acquire() as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema() || '.' || $2))",
                VIEW_LOCK,
                view.name,
            )
            if not locked:
                self.busy += 1
                return False
            started = time.perf_counter()
            await conn.execute(f"SET LOCAL lock_timeout = '{REFRESH_LOCK_TIMEOUT}'")
            checkpoints = await _checkpoints(conn, view)
            await conn.execute(f"REFRESH MATERIALIZED VIEW CONCURRENTLY {view.name}")
            await _record(conn, view, checkpoints)
            took_ms = (time.perf_counter() - started) * 1000
            await conn.execute(
                "UPDATE eddy_views SET refreshed_at = now(), refreshes = refreshes + 1,"
                " refresh_ms = $2 WHERE name = $1",
                view.name,
                took_ms,
            )
        self.refreshes += 1
        log.debug("view-refreshed view=%s ms=%.1f", view.name, took_ms)
        return True

    async def _sweep(self) -> None:
        """Mark every view with a change past its recorded positions."""
        try:
            rows = await self.pool.fetch(STALE, [v.name for v in self.views])
        except FAILED as exc:
            log.warning("view-sweep-failed error=%r", exc)
            return
        for row in rows:
            self._dirty.add(row["view_name"])
