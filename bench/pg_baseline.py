"""Baseline (c): a hand-written projector, plain redis-py and asyncpg and nothing else.

One task per event stream, each in a loop: XREADGROUP up to `--count` (200, Eddy's
`EDDY_BATCH_SIZE`) envelopes → decode → in ONE Postgres transaction, a batched
`executemany` of `INSERT … ON CONFLICT DO UPDATE` into `pg_baseline_sessions`
(the columns, primary key and indexes of Eddy's `chat_sessions`) and an upsert
of the stream's checkpoint row → COMMIT → XACK. The group is created at `0`, so
the streams' backlog is read too.

It is what a projector cannot do without: no checkpoint read (the version guard
of the upsert makes a replayed batch harmless), no event-type registry (only
`ChatSessionCreated` is expected), no decoding of the payload's JSON objects
(they go to Postgres as the text they arrived as), no archive, no hooks, no
leases. The tables are made by `create_tables` (the benchmark calls it before
starting this process). Runs until SIGTERM or SIGINT, which end each loop
between two reads:

    python -m bench.pg_baseline --schema S --stream S1 --stream S2 …
    # REDIS_URL and DATABASE_URL from the environment
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
import uvloop

from bench.relay import batches

GROUP = "pg-baseline"
TABLE = "pg_baseline_sessions"


def create_tables(schema: str) -> str:
    """The baseline's tables in `schema`: a copy of `chat_sessions`' shape, and checkpoints."""
    return f"""
CREATE TABLE "{schema}".{TABLE} (
    tenant_id text NOT NULL,
    session_id text NOT NULL,
    agent_id text NOT NULL,
    status text NOT NULL,
    participants jsonb NOT NULL,
    metadata jsonb NOT NULL,
    routing jsonb NOT NULL,
    close_reason text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version integer NOT NULL,
    PRIMARY KEY (tenant_id, session_id)
);
CREATE INDEX ON "{schema}".{TABLE} (tenant_id, agent_id, created_at DESC, session_id DESC);
CREATE INDEX ON "{schema}".{TABLE} (tenant_id, created_at DESC, session_id DESC);
CREATE TABLE "{schema}".pg_baseline_checkpoints (
    stream text PRIMARY KEY,
    entry_ms bigint NOT NULL,
    entry_seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""


UPSERT = (
    f"INSERT INTO {TABLE} (tenant_id, session_id, agent_id, status, participants, metadata,"
    " routing, created_at, updated_at, version)"
    " VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, $7, $8)"
    " ON CONFLICT (tenant_id, session_id) DO UPDATE SET agent_id = excluded.agent_id,"
    " participants = excluded.participants, metadata = excluded.metadata,"
    " routing = excluded.routing, updated_at = excluded.updated_at, version = excluded.version"
    f" WHERE {TABLE}.version < excluded.version"
)
CHECKPOINT = (
    "INSERT INTO pg_baseline_checkpoints (stream, entry_ms, entry_seq) VALUES ($1, $2, $3)"
    " ON CONFLICT (stream) DO UPDATE"
    " SET entry_ms = excluded.entry_ms, entry_seq = excluded.entry_seq, updated_at = now()"
)


class Envelope(msgspec.Struct):
    type: str
    tenant_id: str
    aggregate_version: int
    occurred_at: datetime
    payload: msgspec.Raw


class Created(msgspec.Struct):
    session_id: str
    agent_id: str
    participants: msgspec.Raw
    metadata: msgspec.Raw
    routing: msgspec.Raw


_envelope = msgspec.json.Decoder(Envelope)
_created = msgspec.json.Decoder(Created)


def row(raw: bytes) -> tuple[Any, ...]:
    """The upsert's arguments for one `ChatSessionCreated` envelope."""
    env = _envelope.decode(raw)
    if env.type != "ChatSessionCreated":
        raise ValueError(f"unexpected event type {env.type}")
    event = _created.decode(env.payload)
    return (
        env.tenant_id,
        event.session_id,
        event.agent_id,
        bytes(event.participants).decode(),
        bytes(event.metadata).decode(),
        bytes(event.routing).decode(),
        env.occurred_at,
        env.aggregate_version,
    )


async def project(
    client: aioredis.Redis, pool: asyncpg.Pool, stream: str, count: int, stop: asyncio.Event
) -> None:
    """Project one stream until `stop` is set."""
    async for entries in batches(client, stream, GROUP, "pg-baseline-1", count, stop):
        rows = [row(fields[b"e"]) for _, fields in entries]
        ids = [entry_id for entry_id, _ in entries]
        ms, seq = ids[-1].split(b"-")
        async with pool.acquire() as conn, conn.transaction():
            await conn.executemany(UPSERT, rows)
            await conn.execute(CHECKPOINT, stream, int(ms), int(seq))
        await client.xack(stream, GROUP, *ids)


async def main(schema: str, streams: list[str], count: int) -> None:
    client = aioredis.Redis.from_url(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), socket_timeout=10.0
    )
    pool = await asyncpg.create_pool(
        os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        server_settings={"search_path": schema},
        min_size=len(streams),
        max_size=len(streams),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with asyncio.TaskGroup() as tg:
            for stream in streams:
                tg.create_task(project(client, pool, stream, count, stop))
    finally:
        await pool.close()
        await client.aclose()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schema", required=True)
    p.add_argument("--stream", action="append", required=True, help="an event stream (repeat)")
    p.add_argument("--count", type=int, default=200)
    args = p.parse_args()
    uvloop.run(main(args.schema, args.stream, args.count))
