"""Every command type of API.md, over HTTP and over WebSocket, then every query
route on what they made: the whole public surface, through the real stack.

The test fails when a command type or a query is added without being covered
here (the lists are compared with `SYSTEM.catalog.commands` and `SYSTEM.projections`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from app.registry import SYSTEM
from tests.sockets import opened
from tests.stack import Stack

Submit = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Submit a command and wait for its outcome: `{"status", "position"?, "error"?}`."""


@asynccontextmanager
async def transport(stack: Stack, kind: str) -> AsyncIterator[Submit]:
    if kind == "http":

        async def post(type_name: str, payload: dict[str, Any]) -> dict[str, Any]:
            r = await stack.client.post(
                f"/v1/commands/{type_name}?wait=10", json=payload, headers=stack.auth()
            )
            assert r.status_code in (200, 409), r.text
            return dict(r.json())

        yield post
    else:
        async with opened(stack) as client:

            async def send(type_name: str, payload: dict[str, Any]) -> dict[str, Any]:
                return await client.command(type_name, payload)

            yield send


@pytest.mark.parametrize("kind", ["http", "ws"])
async def test_every_command_and_every_query(stack: Stack, kind: str) -> None:
    n = uuid.uuid4().hex[:8]
    sid, mid, tid, module, tool = f"s-{n}", f"m-{n}", f"t-{n}", f"mod-{n}", f"tool-{n}"
    agent = f"agent-{n}"
    submitted: set[str] = set()
    at: dict[str, str] = {}
    """The position of the last event per context."""

    async with transport(stack, kind) as submit:

        async def run(type_name: str, payload: dict[str, Any]) -> None:
            outcome = await submit(type_name, payload)
            assert outcome["status"] == "processed", (type_name, outcome)
            submitted.add(type_name)
            at[SYSTEM.catalog.commands[type_name].context.name] = outcome["position"]

        await run(
            "CreateChatSession",
            {
                "session_id": sid,
                "agent_id": agent,
                "participants": [{"participant_id": "u1", "role": "observer"}],
                "metadata": {"channel": "web"},
            },
        )
        await run(
            "UpdateChatSessionParticipants",
            {
                "session_id": sid,
                "add": [{"participant_id": "u2", "role": "agent"}],
                "change_roles": [{"participant_id": "u1", "role": "agent"}],
            },
        )
        await run(
            "StartMessageStream", {"stream_id": mid, "session_id": sid, "participant_id": "u2"}
        )
        await run("PushStreamMessage", {"stream_id": mid, "seq": 1, "chunk": "Hello, "})
        await run("PushStreamMessage", {"stream_id": mid, "seq": 2, "chunk": "world"})
        await run("StopMessageStream", {"stream_id": mid, "reason": "done"})
        await run(
            "AppendTraceSpan",
            {
                "trace_id": tid,
                "session_id": sid,
                "span_id": "root",
                "name": "agent-run",
                "started_at": "2026-11-25T10:00:00Z",
                "ended_at": "2026-11-25T10:00:02Z",
                "status": "ok",
                "attributes": {"tool": f"search-{n}"},  # a call of the tool (tool usage)
            },
        )
        await run("FinalizeTrace", {"trace_id": tid})
        await run("SetRuntimeFlag", {"module": module, "flag": "streaming", "enabled": True})
        await run("UpdateRuntimeConfig", {"module": module, "settings": {"temperature": 0.2}})
        await run(
            "RegisterTool",
            {"tool_id": tool, "name": f"search-{n}", "input_schema": {"type": "object"}},
        )
        await run("UpdateToolDefinition", {"tool_id": tool, "description": "Search the web"})
        await run("CloseChatSession", {"session_id": sid, "reason": "resolved"})
        await run("ArchiveChatSession", {"session_id": sid})

        queried: set[str] = set()

        async def get(name: str, path: str, context: str, **params: str) -> Any:
            r = await stack.client.get(
                path, params={**params, "after": at[context]}, headers=stack.auth()
            )
            assert r.status_code == 200, (name, r.text)
            queried.add(name)
            return r.json()

        session = await get("GetChatSessionById", f"/v1/chat-sessions/{sid}", "chat_sessions")
        assert session["status"] == "archived" and session["metadata"] == {"channel": "web"}
        assert {p["participant_id"]: p["role"] for p in session["participants"]} == {
            "u1": "agent",
            "u2": "agent",
        }
        listed = await get(
            "ListChatSessionsByAgent",
            "/v1/chat-sessions",
            "chat_sessions",
            agent_id=agent,
            status="archived",
        )
        assert [s["session_id"] for s in listed["items"]] == [sid]
        transcript = await get(
            "GetChatSessionTranscript", f"/v1/chat-sessions/{sid}/transcript", "message_streams"
        )
        assert [(b["stream_id"], b["text"]) for b in transcript["blocks"]] == [
            (mid, "Hello, world")
        ]
        stream = await get("GetStreamState", f"/v1/message-streams/{mid}", "message_streams")
        assert (stream["status"], stream["chunk_count"], stream["text"]) == (
            "stopped",
            2,
            "Hello, world",
        )
        streams = await get(
            "ListActiveStreams",
            "/v1/message-streams",
            "message_streams",
            session_id=sid,
            active="all",
        )
        assert [s["stream_id"] for s in streams["items"]] == [mid]
        trace = await get("GetTraceById", f"/v1/traces/{tid}", "traces")
        assert (trace["status"], trace["span_count"], trace["session_id"]) == ("finalized", 1, sid)
        traces = await get("ListTracesForSession", "/v1/traces", "traces", session_id=sid)
        assert [t["trace_id"] for t in traces["items"]] == [tid]
        spans = await get("ListTraceSpans", f"/v1/traces/{tid}/spans", "traces")
        assert [(s["span_id"], s["status"]) for s in spans["items"]] == [("root", "ok")]
        config = await get("GetRuntimeConfig", f"/v1/runtime-config/{module}", "runtime_config")
        assert config["settings"] == {"temperature": 0.2} and config["flags"] == {"streaming": True}
        flags = await get(
            "ListRuntimeFlags", f"/v1/runtime-config/{module}/flags", "runtime_config"
        )
        assert [(f["flag"], f["enabled"]) for f in flags["items"]] == [("streaming", True)]
        every_flag = await get("ListAllRuntimeFlags", "/v1/runtime-flags", "runtime_config")
        assert (module, "streaming", True) in [
            (f["module"], f["flag"], f["enabled"]) for f in every_flag["items"]
        ]
        history = await get(
            "GetConfigHistory", f"/v1/runtime-config/{module}/history", "runtime_config"
        )
        assert [(h["version"], h["actor"]) for h in history["items"]] == [
            (1, "alice"),
            (2, "alice"),
        ]
        found = await get("GetToolById", f"/v1/tools/{tool}", "tools")
        assert found["description"] == "Search the web" and found["active"] is True
        tools = await get("ListTools", "/v1/tools", "tools", active="true")
        assert tool in [t["tool_id"] for t in tools["items"]]

        summary = await get(
            "GetAgentSessionSummary", f"/v1/agents/{agent}/summary", "chat_sessions"
        )
        assert (summary["sessions"], summary["archived_sessions"], summary["streams_started"]) == (
            1,
            1,
            1,
        )
        summaries = await get(
            "ListChatSessionSummaries",
            "/v1/chat-session-summaries",
            "chat_sessions",
            agent_id=agent,
        )
        assert [s["agent_id"] for s in summaries["items"]] == [agent]
        stats = await get("GetSessionTraceStats", f"/v1/chat-sessions/{sid}/trace-stats", "traces")
        assert (stats["trace_count"], stats["span_count"], stats["error_spans"]) == (1, 1, 0)
        assert stats["duration_ms"] == 2000
        usage = await get("GetToolUsage", f"/v1/tools/{tool}/usage", "tools")
        assert usage["calls"] == 1, usage
        usages = await get("ListToolUsage", "/v1/tool-usage", "tools")
        assert tool in [u["tool_id"] for u in usages["items"]]

        await run("ResetRuntimeConfig", {"module": module})
        await run("DeactivateTool", {"tool_id": tool})
        await run("PurgeTrace", {"trace_id": tid})

        config = await get("GetRuntimeConfig", f"/v1/runtime-config/{module}", "runtime_config")
        assert config["settings"] == {} and config["flags"] == {} and config["version"] == 3
        tools = await get("ListTools", "/v1/tools", "tools", active="true")
        assert tool not in [t["tool_id"] for t in tools["items"]]
        r = await stack.client.get(
            f"/v1/traces/{tid}", params={"after": at["traces"]}, headers=stack.auth()
        )
        assert r.status_code == 404

    assert submitted == set(SYSTEM.catalog.commands), (
        f"not covered: {set(SYSTEM.catalog.commands) - submitted}"
    )
    every_query = {q.name for p in SYSTEM.projections for q in p.queries}
    assert queried == every_query, f"not covered: {every_query - queried}"
