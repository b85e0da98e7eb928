"""Chat-session read models: one row per session, and the transcript blocks.

Every write is guarded by the aggregate version, so applying an event twice (which
the checkpoint already prevents) would change nothing either.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.contexts import EVENTS
from app.contexts.chat_sessions import (
    ChatSessionArchived,
    ChatSessionClosed,
    ChatSessionCreated,
    ChatSessionParticipantsUpdated,
)
from app.errors import BadRequest
from app.messages import Envelope
from projections.db import Connection
from projections.projection import (
    Answer,
    Projection,
    Query,
    QueryArgs,
    Statements,
    encode_cursor,
)

COLUMNS = (
    "session_id, agent_id, status, participants, metadata, routing, close_reason,"
    " created_at, updated_at, version"
)


CREATE = (
    "INSERT INTO chat_sessions (tenant_id, session_id, agent_id, status,"
    " participants, metadata, routing, created_at, updated_at, version)"
    " VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, $7, $8)"
    " ON CONFLICT DO NOTHING"
)


async def apply(conn: Connection, envelopes: list[Envelope]) -> None:
    statements = Statements()
    for env in envelopes:
        event = EVENTS[env.type].decoder.decode(env.payload)
        match event:
            case ChatSessionCreated():
                statements.add(
                    CREATE,
                    env.tenant_id,
                    event.session_id,
                    event.agent_id,
                    event.participants,
                    event.metadata,
                    event.routing,
                    env.occurred_at,
                    env.aggregate_version,
                )
            case ChatSessionParticipantsUpdated():
                _update(statements, env, "participants = $4", event.participants)
            case ChatSessionClosed():
                _update(statements, env, "status = 'closed', close_reason = $4", event.reason)
            case ChatSessionArchived():
                _update(statements, env, "status = 'archived'")
    await statements.execute(conn)


def _update(statements: Statements, env: Envelope, assignments: str, *values: Any) -> None:
    """Update a session's row with `assignments` (values from `$4` on) if `env` is newer."""
    version = f"${4 + len(values)}"
    statements.add(
        f"UPDATE chat_sessions SET {assignments}, updated_at = $3, version = {version}"
        f" WHERE tenant_id = $1 AND session_id = $2 AND version < {version}",
        env.tenant_id,
        env.aggregate_id,
        env.occurred_at,
        *values,
        env.aggregate_version,
    )


async def get_session(conn: Connection, args: QueryArgs) -> Answer:
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM chat_sessions WHERE tenant_id = $1 AND session_id = $2",
        args.tenant_id,
        args.path["session_id"],
    )
    return None if row is None else _session(row)


async def list_sessions(conn: Connection, args: QueryArgs) -> Answer:
    status = args.choice("status", ("active", "closed", "archived", "all"), "all")
    limit = args.limit()
    where = ["tenant_id = $1"]
    values: list[Any] = [args.tenant_id]
    if args.params.get("agent_id"):
        values.append(args.params["agent_id"])
        where.append(f"agent_id = ${len(values)}")
    if status != "all":
        values.append(status)
        where.append(f"status = ${len(values)}")
    cursor = args.cursor()
    if cursor is not None:
        values += [_timestamp(cursor[0]), str(cursor[1])]
        where.append(f"(created_at, session_id) < (${len(values) - 1}, ${len(values)})")
    values.append(limit + 1)
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM chat_sessions WHERE {' AND '.join(where)}"
        f" ORDER BY created_at DESC, session_id DESC LIMIT ${len(values)}",
        *values,
    )
    items = [_session(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor([last["created_at"].isoformat(), last["session_id"]])
    return {"items": items, "next_cursor": next_cursor}


async def get_transcript(conn: Connection, args: QueryArgs) -> Answer:
    session_id = args.path["session_id"]
    exists = await conn.fetchval(
        "SELECT 1 FROM chat_sessions WHERE tenant_id = $1 AND session_id = $2",
        args.tenant_id,
        session_id,
    )
    if not exists:
        return None
    rows = await conn.fetch(
        "SELECT stream_id, participant_id, text, started_at, stopped_at"
        " FROM chat_transcript_blocks WHERE tenant_id = $1 AND session_id = $2"
        " ORDER BY started_at, stream_id",
        args.tenant_id,
        session_id,
    )
    return {"session_id": session_id, "blocks": [dict(row) for row in rows]}


def _session(row: Any) -> dict[str, Any]:
    return dict(row)


def _timestamp(raw: Any) -> datetime:
    try:
        return datetime.fromisoformat(str(raw))
    except ValueError:
        raise BadRequest("cursor is not one this API issued") from None


PROJECTION = Projection(
    name="chat_sessions",
    contexts=("chat_sessions",),
    apply=apply,
    queries=(
        Query("ListChatSessionsByAgent", "/v1/chat-sessions", list_sessions),
        Query("GetChatSessionById", "/v1/chat-sessions/{session_id}", get_session),
        Query(
            "GetChatSessionTranscript", "/v1/chat-sessions/{session_id}/transcript", get_transcript
        ),
    ),
)
