"""Trace read models: one row per trace, and its spans in append order.

Every write is guarded by the aggregate version: a span row is written only by the
statement that moved its trace's row to the span's version, and a purge deletes
the trace's rows only if the row is older than the purge. A purged trace's rows
are gone for good; the domain rejects every later command on it, so nothing can
bring them back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, assert_never

from app.contexts import traces
from app.contexts.traces import TraceFinalized, TracePurged, TraceSpanAppended
from core.messages import Envelope
from projections.db import Connection
from projections.pagination import Keyset, QueryArgs
from projections.projection import (
    Answer,
    Cache,
    Invalidation,
    Projection,
    Query,
    Statements,
    one,
    tables,
)
from projections.views import View

TRACE_COLUMNS = (
    "trace_id, session_id, status, span_count, started_at, finalized_at,"
    " created_at, updated_at, version"
)
SPAN_COLUMNS = "span_id, parent_span_id, name, started_at, ended_at, status, attributes"

NEWEST_FIRST = Keyset(("created_at", "trace_id"), (datetime, str), descending=True)
IN_APPEND_ORDER = Keyset(("seq",), (int,))

APPEND = (
    "WITH trace AS ("
    " INSERT INTO traces (tenant_id, trace_id, session_id, status, span_count, started_at,"
    " created_at, updated_at, version)"
    " VALUES ($1, $2, $3, 'open', 1, $4, $10, $10, $11)"
    " ON CONFLICT (tenant_id, trace_id) DO UPDATE SET span_count = traces.span_count + 1,"
    " started_at = LEAST(traces.started_at, excluded.started_at),"
    " updated_at = excluded.updated_at, version = excluded.version"
    " WHERE traces.version < excluded.version"
    " RETURNING 1)"
    " INSERT INTO trace_spans (tenant_id, trace_id, seq, span_id, parent_span_id, name,"
    " started_at, ended_at, status, attributes)"
    " SELECT $1, $2, $11::integer, $5::text, $6::text, $7::text, $4, $8::timestamptz,"
    " $9::text, $12::jsonb FROM trace"
    " ON CONFLICT DO NOTHING"
)
FINALIZE = (
    "UPDATE traces SET status = 'finalized', finalized_at = $3, updated_at = $3, version = $4"
    " WHERE tenant_id = $1 AND trace_id = $2 AND version < $4"
)
PURGE = (
    "WITH gone AS ("
    " DELETE FROM traces WHERE tenant_id = $1 AND trace_id = $2 AND version < $3"
    " RETURNING tenant_id, trace_id)"
    " DELETE FROM trace_spans AS s USING gone"
    " WHERE s.tenant_id = gone.tenant_id AND s.trace_id = gone.trace_id"
)


Handled = TraceSpanAppended | TraceFinalized | TracePurged


async def apply(conn: Connection, batch: Sequence[tuple[Envelope, Handled]]) -> None:
    statements = Statements()
    for env, event in batch:
        match event:
            case TraceSpanAppended():
                statements.add(
                    APPEND,
                    env.tenant_id,
                    event.trace_id,
                    event.session_id,
                    event.started_at,
                    event.span_id,
                    event.parent_span_id,
                    event.name,
                    event.ended_at,
                    event.status,
                    env.occurred_at,
                    env.aggregate_version,
                    event.attributes,
                )
            case TraceFinalized():
                statements.add(
                    FINALIZE, env.tenant_id, event.trace_id, env.occurred_at, env.aggregate_version
                )
            case TracePurged():
                statements.add(PURGE, env.tenant_id, event.trace_id, env.aggregate_version)
            case _:
                assert_never(event)
    await statements.execute(conn)


async def get_trace(conn: Connection, args: QueryArgs) -> Answer:
    return await one(conn, f"SELECT {TRACE_COLUMNS} FROM traces", "trace_id", args)


async def list_traces(conn: Connection, args: QueryArgs) -> Answer:
    """The tenant's traces (of one session with `?session_id=`), newest first."""
    select = f"SELECT {TRACE_COLUMNS} FROM traces"
    equal = {"session_id": args.params.get("session_id") or None}
    return await NEWEST_FIRST.page(conn, args, select, equal)


async def list_spans(conn: Connection, args: QueryArgs) -> Answer:
    """A trace's spans in append order; None (404) if the trace does not exist."""
    trace_id = args.path["trace_id"]
    IN_APPEND_ORDER.check(args)
    exists = await conn.fetchval(
        "SELECT 1 FROM traces WHERE tenant_id = $1 AND trace_id = $2", args.tenant_id, trace_id
    )
    if not exists:
        return None
    page = await IN_APPEND_ORDER.page(
        conn,
        args,
        f"SELECT seq, {SPAN_COLUMNS} FROM trace_spans",
        {"trace_id": trace_id},
        item=lambda row: {k: v for k, v in row.items() if k != "seq"},
    )
    return {"trace_id": trace_id, **page}


def _listed_in(args: QueryArgs) -> str:
    """The cache scope of a trace list: one session's, or the tenant's whole list."""
    session_id = args.params.get("session_id")
    return f"session:{session_id}" if session_id else "all"


def _lists_of(env: Envelope) -> tuple[str, ...]:
    """The trace lists an event changes: the whole list, and its session's (a
    trace's session is fixed by its first span; the worker puts it in the metadata)."""
    session_id = env.metadata.session_id
    return ("all",) if session_id is None else ("all", f"session:{session_id}")


PROJECTION = Projection(
    name="traces",
    reads=(traces.CONTEXT,),
    events=Handled,
    apply=apply,
    tables=tables("app.readmodels", "traces"),
    queries=(
        Query(
            "ListTracesForSession",
            "/v1/traces",
            list_traces,
            cache=Cache(
                ttl_s=60,
                scope=_listed_in,
                invalidated_by=(
                    Invalidation(
                        (TraceSpanAppended, TraceFinalized, TracePurged), scopes=_lists_of
                    ),
                ),
            ),
        ),
        Query("GetTraceById", "/v1/traces/{trace_id}", get_trace),
        Query("ListTraceSpans", "/v1/traces/{trace_id}/spans", list_spans),
    ),
)


# ---- materialized views over these tables (projections/views.py) ---------------

TRACE_STATS_COLUMNS = (
    "session_id, trace_count, finalized_traces, span_count, error_spans,"
    " started_at, ended_at, duration_ms"
)
NO_TRACES: Mapping[str, Any] = {
    "trace_count": 0,
    "finalized_traces": 0,
    "span_count": 0,
    "error_spans": 0,
    "started_at": None,
    "ended_at": None,
    "duration_ms": None,
}


async def get_session_trace_stats(conn: Connection, args: QueryArgs) -> Answer:
    """The traces of a chat session in numbers: zeros for a session without traces,
    404 for neither a session nor traces naming it."""
    select = f"SELECT {TRACE_STATS_COLUMNS} FROM session_trace_stats"
    stats = await one(conn, select, "session_id", args)
    if stats is not None:
        return stats
    session_id = args.path["session_id"]
    exists = await conn.fetchval(
        "SELECT 1 FROM chat_sessions WHERE tenant_id = $1 AND session_id = $2",
        args.tenant_id,
        session_id,
    )
    return {"session_id": session_id, **NO_TRACES} if exists else None


SESSION_TRACE_STATS = View(
    name="session_trace_stats",
    select="""
SELECT t.tenant_id, t.session_id,
    count(*) AS trace_count,
    count(*) FILTER (WHERE t.status = 'finalized') AS finalized_traces,
    coalesce(sum(s.spans), 0)::bigint AS span_count,
    coalesce(sum(s.error_spans), 0)::bigint AS error_spans,
    min(s.started_at) AS started_at,
    max(s.ended_at) AS ended_at,
    (extract(epoch FROM max(s.ended_at) - min(s.started_at)) * 1000)::double precision
        AS duration_ms
FROM traces AS t
LEFT JOIN (
    SELECT tenant_id, trace_id, count(*) AS spans,
        count(*) FILTER (WHERE status = 'error') AS error_spans,
        min(started_at) AS started_at,
        max(ended_at) AS ended_at
    FROM trace_spans
    GROUP BY tenant_id, trace_id
) AS s USING (tenant_id, trace_id)
WHERE t.session_id IS NOT NULL
GROUP BY t.tenant_id, t.session_id
""",
    unique=("tenant_id", "session_id"),
    stale_on=(TraceSpanAppended, TraceFinalized, TracePurged),
    reads=(PROJECTION,),
    queries=(
        Query(
            "GetSessionTraceStats",
            "/v1/chat-sessions/{session_id}/trace-stats",
            get_session_trace_stats,
            also_from=("chat_sessions",),  # a session without traces answers zeros
            view="session_trace_stats",
        ),
    ),
)
