"""Runtime-config read models: the current config per module, its flags, and its history.

Every event carries the whole config after it, so each one is written as is: the
current row and the flag rows only if the event is newer than them (a version
guard), the history row once (its key is the version). A module appears here with
its first event; before that every query about it answers 404.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, assert_never

from app.contexts import runtime_config
from app.contexts.runtime_config import RuntimeConfigReset, RuntimeConfigUpdated, RuntimeFlagUpdated
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

UPSERT_CONFIG = (
    "INSERT INTO runtime_configs"
    " (tenant_id, module, settings, flags, version, updated_at, updated_by)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7)"
    " ON CONFLICT (tenant_id, module) DO UPDATE SET settings = excluded.settings,"
    " flags = excluded.flags, version = excluded.version, updated_at = excluded.updated_at,"
    " updated_by = excluded.updated_by"
    " WHERE runtime_configs.version < excluded.version"
)
UPSERT_FLAGS = (
    "INSERT INTO runtime_flags (tenant_id, module, flag, enabled, version, updated_at)"
    " SELECT $1, $2, key, value::boolean, $4, $5 FROM jsonb_each_text($3::jsonb)"
    " ON CONFLICT (tenant_id, module, flag) DO UPDATE SET enabled = excluded.enabled,"
    " version = excluded.version,"
    " updated_at = CASE WHEN runtime_flags.enabled = excluded.enabled"
    " THEN runtime_flags.updated_at ELSE excluded.updated_at END"
    " WHERE runtime_flags.version < excluded.version"
)
DELETE_OTHER_FLAGS = (
    "DELETE FROM runtime_flags"
    " WHERE tenant_id = $1 AND module = $2 AND version < $3 AND NOT $4::jsonb ? flag"
)
"""The flags an event no longer lists (a reset drops flags that have no default)."""
INSERT_HISTORY = (
    "INSERT INTO runtime_config_history"
    " (tenant_id, module, version, event_type, settings, flags, actor, at, change)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    " ON CONFLICT DO NOTHING"
)
EXISTS = "SELECT 1 FROM runtime_configs WHERE tenant_id = $1 AND module = $2"
FLAGS = "SELECT module, flag, enabled, updated_at FROM runtime_flags"
BY_FLAG = Keyset(("flag",), (str,))
BY_MODULE_AND_FLAG = Keyset(("module", "flag"), (str, str))
BY_VERSION = Keyset(("version",), (int,))


Handled = RuntimeFlagUpdated | RuntimeConfigUpdated | RuntimeConfigReset


async def apply(conn: Connection, batch: Sequence[tuple[Envelope, Handled]]) -> None:
    statements = Statements()
    for env, event in batch:
        match event:
            case RuntimeFlagUpdated() | RuntimeConfigUpdated() | RuntimeConfigReset():
                _record(statements, env, event.settings, event.flags, event.changes)
            case _:
                assert_never(event)
    await statements.execute(conn)


def _record(
    statements: Statements,
    env: Envelope,
    settings: dict[str, Any],
    flags: dict[str, bool],
    change: Any,
) -> None:
    tenant, module, version = env.tenant_id, env.aggregate_id, env.aggregate_version
    at, actor = env.occurred_at, env.metadata.actor
    statements.add(UPSERT_CONFIG, tenant, module, settings, flags, version, at, actor)
    statements.add(UPSERT_FLAGS, tenant, module, flags, version, at)
    statements.add(DELETE_OTHER_FLAGS, tenant, module, version, flags)
    statements.add(
        INSERT_HISTORY, tenant, module, version, env.type, settings, flags, actor, at, change
    )


async def get_config(conn: Connection, args: QueryArgs) -> Answer:
    return await one(
        conn,
        "SELECT module, settings, flags, version, updated_at, updated_by FROM runtime_configs",
        "module",
        args,
    )


async def list_module_flags(conn: Connection, args: QueryArgs) -> Answer:
    module = args.path["module"]
    BY_FLAG.check(args)
    if not await conn.fetchval(EXISTS, args.tenant_id, module):
        return None
    return await BY_FLAG.page(conn, args, FLAGS, {"module": module})


async def list_all_flags(conn: Connection, args: QueryArgs) -> Answer:
    return await BY_MODULE_AND_FLAG.page(conn, args, FLAGS)


async def get_history(conn: Connection, args: QueryArgs) -> Answer:
    module = args.path["module"]
    BY_VERSION.check(args)
    if not await conn.fetchval(EXISTS, args.tenant_id, module):
        return None
    return await BY_VERSION.page(
        conn,
        args,
        "SELECT version, event_type AS type, settings, flags, actor, at, change"
        " FROM runtime_config_history",
        {"module": module},
    )


PROJECTION = Projection(
    name="runtime_config",
    reads=(runtime_config.CONTEXT,),
    events=Handled,
    apply=apply,
    tables=tables("app.readmodels", "runtime_config"),
    queries=(
        Query("GetRuntimeConfig", "/v1/runtime-config/{module}", get_config),
        Query("ListRuntimeFlags", "/v1/runtime-config/{module}/flags", list_module_flags),
        Query(
            "ListAllRuntimeFlags",
            "/v1/runtime-flags",
            list_all_flags,
            cache=Cache(
                ttl_s=60,
                invalidated_by=(
                    Invalidation((RuntimeFlagUpdated, RuntimeConfigUpdated, RuntimeConfigReset)),
                ),
            ),
        ),
        Query("GetConfigHistory", "/v1/runtime-config/{module}/history", get_history),
    ),
)
