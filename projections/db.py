"""The Postgres pool and the projections' checkpoints.

Every connection's `search_path` is `EDDY_DB_SCHEMA`, so tests (and several
deployments) can share one database with a schema each.

A checkpoint row per (projection, shard) holds the last event-stream entry the
projection committed; it is advanced in the same transaction as the read-model
rows, so a replayed entry is recognised and skipped (guarantee 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from streams.keys import Shard
from streams.positions import EntryId

Pool = asyncpg.Pool
Connection = asyncpg.Connection | PoolConnectionProxy


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


async def committed(pool: Pool, projections: Sequence[str]) -> dict[tuple[str, Shard], EntryId]:
    """Every checkpoint of `projections`: `(projection, shard)` → its last entry."""
    rows = await pool.fetch(
        "SELECT projection, context, shard, entry_ms, entry_seq FROM eddy_checkpoints"
        " WHERE projection = ANY($1::text[])",
        list(projections),
    )
    return {
        (r["projection"], Shard(r["context"], r["shard"])): (r["entry_ms"], r["entry_seq"])
        for r in rows
    }
