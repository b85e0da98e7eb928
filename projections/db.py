"""The Postgres pool, migrations and projection checkpoints.

Every connection's `search_path` is `EDDY_DB_SCHEMA`, so tests (and several
deployments) can share one database with a schema each.

A checkpoint row per (projection, shard) holds the last event-stream entry the
projection committed; it is advanced in the same transaction as the read-model
rows, so a replayed entry is recognised and skipped (guarantee 7).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from streams.keys import Shard
from streams.positions import EntryId

if TYPE_CHECKING:
    from projections.projection import Projection

log = logging.getLogger("eddy.db")

Pool = asyncpg.Pool
Connection = asyncpg.Connection | PoolConnectionProxy

MIGRATION_LOCK = 0x4544_4459  # "EDDY": one migrator at a time across processes


async def create_pool(database_url: str, schema: str, **options: Any) -> Pool:
    options.setdefault("min_size", 1)
    options.setdefault("max_size", 10)
    options.setdefault("command_timeout", 30)
    pool: Pool = await asyncpg.create_pool(
        database_url, server_settings={"search_path": schema}, init=_init_connection, **options
    )
    return pool


async def _init_connection(conn: Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=_json_text, decoder=msgspec.json.decode
        )


def _json_text(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def migrations() -> list[tuple[str, str]]:
    """(name, sql) of every file in `projections/migrations/`, in name order."""
    folder = resources.files("projections").joinpath("migrations")
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")), key=lambda e: e.name
    )
    return [(entry.name, entry.read_text()) for entry in files]


async def migrate(
    database_url: str, schema: str, projections: Sequence[Projection] | None = None
) -> list[str]:
    """Create the schema, apply every migration not yet applied and create the
    tables of every projection not yet installed; return what was done.

    A projection installed at another version than it declares is left as it is:
    it needs a rebuild (`eddy rebuild`), which the projector also starts itself."""
    if projections is None:
        from projections import PROJECTIONS

        projections = PROJECTIONS
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        applied: list[str] = []
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS eddy_migrations ("
                " name text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                r["name"]: r["checksum"]
                for r in await conn.fetch("SELECT name, checksum FROM eddy_migrations")
            }
            for name, sql in migrations():
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if name in done:
                    if done[name] != checksum:
                        log.warning("migration-changed-after-apply name=%s", name)
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO eddy_migrations (name, checksum) VALUES ($1, $2)", name, checksum
                )
                applied.append(name)
            installed = {
                r["name"]: r["version"]
                for r in await conn.fetch("SELECT name, version FROM eddy_projections")
            }
            for projection in projections:
                version = installed.get(projection.name)
                if version is None:
                    await conn.execute(projection.tables)
                    await conn.execute(
                        "INSERT INTO eddy_projections (name, version) VALUES ($1, $2)",
                        projection.name,
                        projection.version,
                    )
                    applied.append(f"tables of {projection.name}")
                elif version != projection.version:
                    log.warning(
                        "projection-needs-rebuild name=%s installed=%s declared=%s",
                        projection.name,
                        version,
                        projection.version,
                    )
            # The materialized views over those tables (`projections/views.py`).
            from projections import VIEWS, views

            listed = {p.name for p in projections}
            applied += await views.install(
                conn, [v for v in VIEWS if {p.name for p in v.reads} <= listed]
            )
        return applied
    finally:
        await conn.close()


async def checkpoint(conn: Connection, projection: str, shard: Shard) -> EntryId:
    """The last entry committed by a projection on a shard, locked for this transaction."""
    row = await conn.fetchrow(
        "SELECT entry_ms, entry_seq FROM eddy_checkpoints"
        " WHERE projection = $1 AND context = $2 AND shard = $3 FOR UPDATE",
        projection,
        shard.context,
        shard.number,
    )
    return (0, 0) if row is None else (row["entry_ms"], row["entry_seq"])


async def advance(conn: Connection, projection: str, shard: Shard, entry: EntryId) -> None:
    """Move a checkpoint forward (never back) inside the caller's transaction, and
    clear the shard's last error (`projections/status.py`): this batch went through."""
    await conn.execute(
        "INSERT INTO eddy_checkpoints (projection, context, shard, entry_ms, entry_seq)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (projection, context, shard) DO UPDATE"
        " SET entry_ms = excluded.entry_ms, entry_seq = excluded.entry_seq, updated_at = now(),"
        " last_error = NULL, last_error_at = NULL"
        " WHERE (eddy_checkpoints.entry_ms, eddy_checkpoints.entry_seq)"
        " < (excluded.entry_ms, excluded.entry_seq)",
        projection,
        shard.context,
        shard.number,
        entry[0],
        entry[1],
    )


async def reached(pool: Pool, projection: str, shard: Shard, entry: EntryId) -> bool:
    """Whether a projection has committed everything up to `entry` on `shard`."""
    row = await pool.fetchrow(
        "SELECT (entry_ms, entry_seq) >= ($4::bigint, $5::bigint) AS done FROM eddy_checkpoints"
        " WHERE projection = $1 AND context = $2 AND shard = $3",
        projection,
        shard.context,
        shard.number,
        entry[0],
        entry[1],
    )
    return bool(row and row["done"])
