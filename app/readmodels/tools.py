"""Tool read model: one row per tool, listed by name.

`ListTools` answers `GET /v1/tools`; with `?active=true` it is the blueprint's
`ListActiveTools` (only active tools), with `?active=false` only deactivated ones.
Every write is guarded by the aggregate version, like the chat-sessions projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import assert_never

from app.contexts import tools
from app.contexts.tools import ToolDeactivated, ToolRegistered, ToolUpdated
from app.contexts.traces import TraceFinalized, TracePurged, TraceSpanAppended
from app.readmodels import traces
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

COLUMNS = (
    "tool_id, name, description, input_schema, runtime_hints, guardrails, active,"
    " created_at, updated_at, version"
)

BY_NAME = Keyset(("name", "tool_id"), (str, str))

REGISTER = (
    "INSERT INTO tools (tenant_id, tool_id, name, description, input_schema,"
    " runtime_hints, guardrails, active, created_at, updated_at, version)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, true, $8, $8, $9)"
    " ON CONFLICT DO NOTHING"
)
UPDATE = (
    "UPDATE tools SET description = $4, input_schema = $5, runtime_hints = $6,"
    " guardrails = $7, updated_at = $3, version = $8"
    " WHERE tenant_id = $1 AND tool_id = $2 AND version < $8"
)
DEACTIVATE = (
    "UPDATE tools SET active = false, updated_at = $3, version = $4"
    " WHERE tenant_id = $1 AND tool_id = $2 AND version < $4"
)


Handled = ToolRegistered | ToolUpdated | ToolDeactivated


async def apply(conn: Connection, batch: Sequence[tuple[Envelope, Handled]]) -> None:
    statements = Statements()
    for env, event in batch:
        match event:
            case ToolRegistered():
                statements.add(
                    REGISTER,
                    env.tenant_id,
                    event.tool_id,
                    event.name,
                    event.description,
                    event.input_schema,
                    event.runtime_hints,
                    event.guardrails,
                    env.occurred_at,
                    env.aggregate_version,
                )
            case ToolUpdated():
                definition = event.definition
                statements.add(
                    UPDATE,
                    env.tenant_id,
                    env.aggregate_id,
                    env.occurred_at,
                    definition.description,
                    definition.input_schema,
                    definition.runtime_hints,
                    definition.guardrails,
                    env.aggregate_version,
                )
            case ToolDeactivated():
                statements.add(
                    DEACTIVATE,
                    env.tenant_id,
                    env.aggregate_id,
                    env.occurred_at,
                    env.aggregate_version,
                )
            case _:
                assert_never(event)
    await statements.execute(conn)


async def get_tool(conn: Connection, args: QueryArgs) -> Answer:
    return await one(conn, f"SELECT {COLUMNS} FROM tools", "tool_id", args)


async def list_tools(conn: Connection, args: QueryArgs) -> Answer:
    """ListTools; with `?active=true` ListActiveTools (`false`: the deactivated ones)."""
    return await BY_NAME.page(conn, args, f"SELECT {COLUMNS} FROM tools", _active(args))


def _active(args: QueryArgs) -> dict[str, bool | None]:
    """`?active=true|false|all` (default all), as the condition on the `active` column."""
    active = args.choice("active", ("true", "false", "all"), "all")
    return {"active": None if active == "all" else active == "true"}


PROJECTION = Projection(
    name="tools",
    reads=(tools.CONTEXT,),
    events=Handled,
    apply=apply,
    tables=tables("app.readmodels", "tools"),
    queries=(
        Query(
            "ListTools",
            "/v1/tools",
            list_tools,
            cache=Cache(
                ttl_s=60,
                invalidated_by=(Invalidation((ToolRegistered, ToolUpdated, ToolDeactivated)),),
            ),
        ),
        Query("GetToolById", "/v1/tools/{tool_id}", get_tool),
    ),
)


# ---- materialized views over these tables (projections/views.py) ---------------

TOOL_USAGE_COLUMNS = "tool_id, name, active, calls, error_calls, last_used_at"


async def get_tool_usage(conn: Connection, args: QueryArgs) -> Answer:
    return await one(conn, f"SELECT {TOOL_USAGE_COLUMNS} FROM tool_usage", "tool_id", args)


async def list_tool_usage(conn: Connection, args: QueryArgs) -> Answer:
    """Every tool's usage by name (`?active=true|false` like `GET /v1/tools`)."""
    select = f"SELECT {TOOL_USAGE_COLUMNS} FROM tool_usage"
    return await BY_NAME.page(conn, args, select, _active(args))


TOOL_USAGE = View(
    name="tool_usage",
    # A call of a tool is a trace span whose `attributes.tool` is the tool's name.
    select="""
SELECT t.tenant_id, t.tool_id, t.name, t.active,
    coalesce(u.calls, 0) AS calls,
    coalesce(u.error_calls, 0) AS error_calls,
    u.last_used_at
FROM tools AS t
LEFT JOIN (
    SELECT tenant_id, attributes ->> 'tool' AS name, count(*) AS calls,
        count(*) FILTER (WHERE status = 'error') AS error_calls,
        max(started_at) AS last_used_at
    FROM trace_spans
    WHERE attributes ->> 'tool' IS NOT NULL
    GROUP BY tenant_id, attributes ->> 'tool'
) AS u ON u.tenant_id = t.tenant_id AND u.name = t.name
""",
    unique=("tenant_id", "tool_id"),
    indexes=(("tenant_id", "name", "tool_id"),),
    stale_on=(ToolRegistered, ToolDeactivated, TraceSpanAppended, TracePurged),
    unaffected_by=(
        ToolUpdated,  # changes neither a tool's name nor whether it is active
        TraceFinalized,  # spans are what is counted, not traces
    ),
    reads=(PROJECTION, traces.PROJECTION),
    queries=(
        Query("ListToolUsage", "/v1/tool-usage", list_tool_usage, view="tool_usage"),
        Query("GetToolUsage", "/v1/tools/{tool_id}/usage", get_tool_usage, view="tool_usage"),
    ),
)
