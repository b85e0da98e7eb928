"""Message-stream read models: one row per stream with its text so far, and, when
a stream stops, its text as one block of the session's transcript
(`chat_transcript_blocks`, read by `GetChatSessionTranscript`).

Consecutive chunks of one stream in a batch are written as one UPDATE: a client
streaming tokens produces long runs of them, and the row is written once per
batch instead of once per chunk. Every write is guarded by the aggregate version.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import assert_never

from app.contexts import message_streams
from app.contexts.message_streams import (
    MessageStreamStarted,
    MessageStreamStopped,
    StreamMessagePushed,
)
from core.messages import Envelope
from projections.db import Connection
from projections.pagination import Keyset, QueryArgs
from projections.projection import Answer, Projection, Query, Statements, one, tables

COLUMNS = (
    "stream_id, session_id, participant_id, status, chunk_count, text, stop_reason,"
    " started_at, stopped_at, updated_at, version"
)
IN_START_ORDER = Keyset(("started_at", "stream_id"), (datetime, str))

START = (
    "INSERT INTO message_streams (tenant_id, stream_id, session_id, participant_id, status,"
    " chunk_count, text, started_at, updated_at, version)"
    " VALUES ($1, $2, $3, $4, 'active', 0, '', $5, $5, $6) ON CONFLICT DO NOTHING"
)
APPEND = (
    "UPDATE message_streams SET text = text || $3, chunk_count = $4, updated_at = $5,"
    " version = $7 WHERE tenant_id = $1 AND stream_id = $2 AND version < $6"
)
STOP = (
    "UPDATE message_streams SET status = 'stopped', stop_reason = $3, stopped_at = $4,"
    " updated_at = $4, version = $5 WHERE tenant_id = $1 AND stream_id = $2 AND version < $5"
)
TRANSCRIBE = (
    "INSERT INTO chat_transcript_blocks"
    " (tenant_id, session_id, stream_id, participant_id, text, started_at, stopped_at)"
    " SELECT tenant_id, session_id, stream_id, participant_id, text, started_at, stopped_at"
    " FROM message_streams WHERE tenant_id = $1 AND stream_id = $2 AND status = 'stopped'"
    " ON CONFLICT DO NOTHING"
)


class _Run:
    """Consecutive chunks of one stream, written as one UPDATE."""

    def __init__(self, env: Envelope) -> None:
        self.parts: list[str] = []
        self.first_version = env.aggregate_version
        self.env = env
        self.count = 0

    def add(self, env: Envelope, event: StreamMessagePushed) -> None:
        self.parts.append(event.chunk)
        self.env = env
        self.count = event.seq

    def write(self, statements: Statements) -> None:
        env = self.env
        statements.add(
            APPEND,
            env.tenant_id,
            env.aggregate_id,
            "".join(self.parts),
            self.count,
            env.occurred_at,
            self.first_version,
            env.aggregate_version,
        )


Handled = MessageStreamStarted | StreamMessagePushed | MessageStreamStopped


async def apply(conn: Connection, batch: Sequence[tuple[Envelope, Handled]]) -> None:
    statements = Statements()
    runs: dict[tuple[str, str], _Run] = {}

    def flush(key: tuple[str, str]) -> None:
        run = runs.pop(key, None)
        if run is not None:
            run.write(statements)

    for env, event in batch:
        key = (env.tenant_id, env.aggregate_id)
        match event:
            case MessageStreamStarted():
                statements.add(
                    START,
                    env.tenant_id,
                    event.stream_id,
                    event.session_id,
                    event.participant_id,
                    env.occurred_at,
                    env.aggregate_version,
                )
            case StreamMessagePushed():
                runs.setdefault(key, _Run(env)).add(env, event)
            case MessageStreamStopped():
                flush(key)
                statements.add(
                    STOP,
                    env.tenant_id,
                    env.aggregate_id,
                    event.reason,
                    env.occurred_at,
                    env.aggregate_version,
                )
                statements.add(TRANSCRIBE, env.tenant_id, env.aggregate_id)
            case _:
                assert_never(event)
    for key in list(runs):
        flush(key)
    await statements.execute(conn)


async def get_stream(conn: Connection, args: QueryArgs) -> Answer:
    return await one(conn, f"SELECT {COLUMNS} FROM message_streams", "stream_id", args)


async def list_streams(conn: Connection, args: QueryArgs) -> Answer:
    """Streams in start order; `active=true` (the default), `false` or `all`."""
    active = args.choice("active", ("true", "false", "all"), "true")
    equal = {
        "session_id": args.params.get("session_id") or None,
        "status": {"true": "active", "false": "stopped", "all": None}[active],
    }
    select = f"SELECT {COLUMNS} FROM message_streams"
    return await IN_START_ORDER.page(conn, args, select, equal)


PROJECTION = Projection(
    name="message_streams",
    reads=(message_streams.CONTEXT,),
    events=Handled,
    apply=apply,
    tables=tables("app.readmodels", "message_streams"),
    queries=(
        Query("ListActiveStreams", "/v1/message-streams", list_streams),
        Query("GetStreamState", "/v1/message-streams/{stream_id}", get_stream),
    ),
)
