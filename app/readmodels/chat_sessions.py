"""Chat-session read models: one row per session, and the transcript blocks.

Every write is guarded by the aggregate version, so applying an event twice (which
the checkpoint already prevents) would change nothing either.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, assert_never

from app.contexts import chat_sessions
from app.contexts.chat_sessions import (
    ChatSessionArchived,
    ChatSessionClosed,
    ChatSessionCreated,
    ChatSessionParticipantsUpdated,
)
from app.contexts.message_streams import (
    MessageStreamStarted,
    MessageStreamStopped,
    StreamMessagePushed,
)
from app.readmodels import message_streams
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
    "session_id, agent_id, status, participants, metadata, routing, close_reason,"
    " created_at, updated_at, version"
)


NEWEST_FIRST = Keyset(("created_at", "session_id"), (datetime, str), descending=True)
IN_START_ORDER = Keyset(("started_at", "stream_id"), (datetime, str))

CREATE = (
    "INSERT INTO chat_sessions (tenant_id, session_id, agent_id, status,"
    " participants, metadata, routing, created_at, updated_at, version)"
    " VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, $7, $8)"
    " ON CONFLICT DO NOTHING"
)

Handled = (
    ChatSessionCreated | ChatSessionParticipantsUpdated | ChatSessionClosed | ChatSessionArchived
)


async def apply(conn: Connection, batch: Sequence[tuple[Envelope, Handled]]) -> None:
    statements = Statements()
    for env, event in batch:
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
            case _:
                assert_never(event)
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
    return await one(conn, f"SELECT {COLUMNS} FROM chat_sessions", "session_id", args)


async def list_sessions(conn: Connection, args: QueryArgs) -> Answer:
    status = args.choice("status", ("active", "closed", "archived", "all"), "all")
    equal = {"agent_id": args.params.get("agent_id") or None}
    equal["status"] = None if status == "all" else status
    return await NEWEST_FIRST.page(conn, args, f"SELECT {COLUMNS} FROM chat_sessions", equal)


async def get_transcript(conn: Connection, args: QueryArgs) -> Answer:
    """The session's transcript blocks in start order, paginated like every list."""
    session_id = args.path["session_id"]
    IN_START_ORDER.check(args)
    exists = await conn.fetchval(
        "SELECT 1 FROM chat_sessions WHERE tenant_id = $1 AND session_id = $2",
        args.tenant_id,
        session_id,
    )
    if not exists:
        return None
    page = await IN_START_ORDER.page(
        conn,
        args,
        "SELECT stream_id, participant_id, text, started_at, stopped_at"
        " FROM chat_transcript_blocks",
        {"session_id": session_id},
    )
    return {"session_id": session_id, "blocks": page["items"], "next_cursor": page["next_cursor"]}


def _session_of(env: Envelope) -> tuple[str] | None:
    """The session whose transcript a stopped message stream adds a block to."""
    return None if env.metadata.session_id is None else (env.metadata.session_id,)


PROJECTION = Projection(
    name="chat_sessions",
    reads=(chat_sessions.CONTEXT,),
    events=Handled,
    apply=apply,
    tables=tables("app.readmodels", "chat_sessions"),
    queries=(
        Query(
            "ListChatSessionsByAgent",
            "/v1/chat-sessions",
            list_sessions,
            cache=Cache(
                ttl_s=60,
                invalidated_by=(
                    Invalidation(
                        (
                            ChatSessionCreated,
                            ChatSessionParticipantsUpdated,
                            ChatSessionClosed,
                            ChatSessionArchived,
                        )
                    ),
                ),
            ),
        ),
        Query("GetChatSessionById", "/v1/chat-sessions/{session_id}", get_session),
        Query(
            "GetChatSessionTranscript",
            "/v1/chat-sessions/{session_id}/transcript",
            get_transcript,
            also_from=("message_streams",),  # it writes the transcript blocks
            # per session; a 404 is not cached, so the session's creation changes nothing
            cache=Cache(
                ttl_s=60,
                scope=lambda args: args.path["session_id"],
                invalidated_by=(Invalidation((MessageStreamStopped,), scopes=_session_of),),
                unaffected_by=(
                    ChatSessionCreated,  # a 404 is not cached
                    ChatSessionParticipantsUpdated,
                    ChatSessionClosed,
                    ChatSessionArchived,
                    MessageStreamStarted,  # a block is written when its stream stops
                    StreamMessagePushed,
                ),
            ),
        ),
    ),
)


# ---- materialized views over these tables (projections/views.py) ---------------

CHAT_SESSION_SUMMARY_COLUMNS = (
    "agent_id, sessions, active_sessions, closed_sessions, archived_sessions,"
    " streams_started, active_streams, last_activity_at"
)
BY_AGENT = Keyset(("agent_id",), (str,))


async def get_agent_summary(conn: Connection, args: QueryArgs) -> Answer:
    """An agent's chat sessions and message streams in numbers; 404 if it has no session."""
    select = f"SELECT {CHAT_SESSION_SUMMARY_COLUMNS} FROM chat_session_summaries"
    return await one(conn, select, "agent_id", args)


async def list_chat_session_summaries(conn: Connection, args: QueryArgs) -> Answer:
    """Every agent's summary (one agent's with `?agent_id=`), by agent id."""
    select = f"SELECT {CHAT_SESSION_SUMMARY_COLUMNS} FROM chat_session_summaries"
    return await BY_AGENT.page(
        conn, args, select, {"agent_id": args.params.get("agent_id") or None}
    )


CHAT_SESSION_SUMMARIES = View(
    name="chat_session_summaries",
    select="""
SELECT s.tenant_id, s.agent_id,
    count(*) AS sessions,
    count(*) FILTER (WHERE s.status = 'active') AS active_sessions,
    count(*) FILTER (WHERE s.status = 'closed') AS closed_sessions,
    count(*) FILTER (WHERE s.status = 'archived') AS archived_sessions,
    coalesce(sum(m.streams), 0)::bigint AS streams_started,
    coalesce(sum(m.active_streams), 0)::bigint AS active_streams,
    greatest(max(s.updated_at), max(m.updated_at)) AS last_activity_at
FROM chat_sessions AS s
LEFT JOIN (
    SELECT tenant_id, session_id, count(*) AS streams,
        count(*) FILTER (WHERE status = 'active') AS active_streams,
        max(updated_at) AS updated_at
    FROM message_streams
    GROUP BY tenant_id, session_id
) AS m USING (tenant_id, session_id)
GROUP BY s.tenant_id, s.agent_id
""",
    unique=("tenant_id", "agent_id"),
    stale_on=(
        ChatSessionCreated,
        ChatSessionParticipantsUpdated,  # moves the session's updated_at
        ChatSessionClosed,
        ChatSessionArchived,
        MessageStreamStarted,
        StreamMessagePushed,  # moves the stream's updated_at
        MessageStreamStopped,
    ),
    reads=(PROJECTION, message_streams.PROJECTION),
    queries=(
        Query(
            "GetAgentSessionSummary",
            "/v1/agents/{agent_id}/summary",
            get_agent_summary,
            view="chat_session_summaries",
        ),
        Query(
            "ListChatSessionSummaries",
            "/v1/chat-session-summaries",
            list_chat_session_summaries,
            view="chat_session_summaries",
        ),
    ),
)
