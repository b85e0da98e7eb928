"""Materialized views: each view's routes after a burst of events (through the
real stack, read with `?after=` of the last writes), refreshes debounced, and two
projector processes' refreshers never refreshing one view at the same time."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import anyio
import msgspec
import pytest

from app.contexts.chat_sessions import (
    ChatSessionArchived,
    ChatSessionClosed,
    ChatSessionCreated,
    ChatSessionParticipantsUpdated,
)
from app.readmodels import chat_sessions
from app.readmodels.chat_sessions import CHAT_SESSION_SUMMARIES
from app.readmodels.tools import TOOL_USAGE
from app.registry import SYSTEM
from core.messages import Envelope
from core.settings import Settings
from projections import db, views
from projections.projection import Projection
from projections.projector import Hooks, run_projector
from projections.views import Refresher, View
from streams.connection import Redis
from streams.keys import Shard
from streams.positions import parse_event_position
from tests.pipeline import eventually, running
from tests.stack import Stack

BASE = datetime.fromisoformat("2026-11-25T10:00:00+00:00")


@pytest.fixture
def stack_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, view_debounce_s=0.05)


class Writer:
    """Submits commands over HTTP (answering their events) and keeps the last
    position of every shard."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.last: dict[str, str] = {}

    async def __call__(self, type_name: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        r = await self.stack.client.post(
            f"/v1/commands/{type_name}?wait=10", json=payload, headers=self.stack.auth()
        )
        assert r.status_code == 200, r.text
        keep_last(self.last, r.json()["position"])
        return list(r.json()["events"])

    async def read(self, path: str, **params: str) -> Any:
        """`path` once the view reflects every write so far: read with `?after=` of
        each shard's last position (a view only moves forward, so the last answer
        reflects them all)."""
        answer: Any = None
        for position in self.last.values():
            r = await self.stack.client.get(
                path, params={**params, "after": position}, headers=self.stack.auth()
            )
            assert r.status_code == 200, r.text
            answer = r.json()
        return answer


def keep_last(last: dict[str, str], position: str) -> None:
    """Keep `position` in `last` (by shard) if it is the shard's latest so far."""
    shard, _, entry = position.rpartition(".")
    if shard not in last or _entry(entry) > _entry(last[shard].rpartition(".")[2]):
        last[shard] = position


def _entry(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq)


def _at(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


async def test_chat_session_summaries_after_a_burst(stack: Stack) -> None:
    write = Writer(stack)
    agents = [f"agent-{i}" for i in range(3)]
    expected: dict[str, dict[str, int]] = {a: defaultdict(int) for a in agents}
    latest: dict[str, datetime] = {}

    async def act(agent: str, type_name: str, payload: dict[str, Any]) -> None:
        """Submit a command on one of `agent`'s sessions; note when its events occurred."""
        for event in await write(type_name, payload):
            at = datetime.fromisoformat(event["occurred_at"])
            latest[agent] = max(latest.get(agent, at), at)

    async def one_session(i: int) -> None:
        agent, sid = agents[i % 3], f"s-{i}"
        participants = [{"participant_id": "u1", "role": "user"}]
        created = {"session_id": sid, "agent_id": agent, "participants": participants}
        await act(agent, "CreateChatSession", created)
        counts = expected[agent]
        counts["sessions"] += 1
        if i % 5 != 0 and i % 4 == 1:  # streams only in sessions that stay open
            mid = f"m-{i}"
            start = {"stream_id": mid, "session_id": sid, "participant_id": "u1"}
            await act(agent, "StartMessageStream", start)
            await act(agent, "PushStreamMessage", {"stream_id": mid, "seq": 1, "chunk": "hi"})
            counts["streams_started"] += 1
            if i % 8 == 1:
                await act(agent, "StopMessageStream", {"stream_id": mid})
            else:
                counts["active_streams"] += 1
        if i % 5 == 0:
            await act(agent, "CloseChatSession", {"session_id": sid})
            if i % 10 == 0:
                await act(agent, "ArchiveChatSession", {"session_id": sid})
                counts["archived_sessions"] += 1
            else:
                counts["closed_sessions"] += 1
        else:
            counts["active_sessions"] += 1

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(one_session, i)

    listed = await write.read("/v1/chat-session-summaries")
    assert [item["agent_id"] for item in listed["items"]] == agents
    for item in listed["items"]:
        agent = item["agent_id"]
        for name in (
            "sessions",
            "active_sessions",
            "closed_sessions",
            "archived_sessions",
            "streams_started",
            "active_streams",
        ):
            assert item[name] == expected[agent][name], (agent, name, item)
        assert _at(item["last_activity_at"]) == latest[agent], agent
    summary = await write.read("/v1/agents/agent-1/summary")
    assert summary == next(i for i in listed["items"] if i["agent_id"] == "agent-1")
    assert sum(i["sessions"] for i in listed["items"]) == 50

    page = await write.read("/v1/chat-session-summaries", limit="2")
    assert [i["agent_id"] for i in page["items"]] == agents[:2] and page["next_cursor"]
    one = await write.read("/v1/chat-session-summaries", agent_id="agent-2")
    assert [i["agent_id"] for i in one["items"]] == ["agent-2"]
    r = await stack.client.get("/v1/agents/agent-1/summary", headers=stack.auth("tenant-b"))
    assert r.status_code == 404
    r = await stack.client.get("/v1/agents/nobody/summary", headers=stack.auth())
    assert r.status_code == 404


async def test_session_trace_stats_after_a_burst(stack: Stack) -> None:
    write = Writer(stack)
    sessions = [f"s-{k}" for k in range(5)]
    for sid in sessions:
        await write(
            "CreateChatSession",
            {
                "session_id": sid,
                "agent_id": "a",
                "participants": [{"participant_id": "u", "role": "user"}],
            },
        )
    expected: dict[str, dict[str, Any]] = {}

    async def one_trace(k: int, j: int) -> list[dict[str, Any]]:
        """Three spans (the second an error when k + j is even, the third unfinished)."""
        tid, start = f"t-{k}-{j}", BASE + timedelta(minutes=k, seconds=10 * j)
        spans = [
            {
                "span_id": "root",
                "name": "run",
                "started_at": start,
                "ended_at": start + timedelta(seconds=3),
                "status": "ok",
            },
            {
                "span_id": "llm",
                "parent_span_id": "root",
                "name": "llm",
                "started_at": start + timedelta(milliseconds=250),
                "ended_at": start + timedelta(seconds=2, milliseconds=125),
                "status": "error" if (k + j) % 2 == 0 else "ok",
            },
            {
                "span_id": "tool",
                "parent_span_id": "root",
                "name": "tool",
                "started_at": start + timedelta(seconds=1),
                "status": "unset",
            },
        ]
        for span in spans:
            payload = {"trace_id": tid, "session_id": f"s-{k}", **span}
            for key in ("started_at", "ended_at"):
                if key in payload:
                    payload[key] = payload[key].isoformat()
            await write("AppendTraceSpan", payload)
        if j == 0:
            await write("FinalizeTrace", {"trace_id": tid})
        if k == 3 and j == 2:
            await write("PurgeTrace", {"trace_id": tid})
            return []
        return spans

    async def one_session(k: int) -> None:
        stats = {"trace_count": 0, "finalized_traces": 0, "span_count": 0, "error_spans": 0}
        spans: list[dict[str, Any]] = []
        for j in range(3):
            made = await one_trace(k, j)
            if made:
                stats["trace_count"] += 1
                stats["finalized_traces"] += j == 0
                stats["span_count"] += len(made)
                stats["error_spans"] += sum(s["status"] == "error" for s in made)
                spans += made
        first = min(s["started_at"] for s in spans)
        last = max(s["ended_at"] for s in spans if "ended_at" in s)
        expected[f"s-{k}"] = {
            **stats,
            "started_at": first,
            "ended_at": last,
            "duration_ms": (last - first) / timedelta(milliseconds=1),
        }

    async with anyio.create_task_group() as tg:
        for k in range(4):  # s-4 has no traces
            tg.start_soon(one_session, k)
    await write(
        "AppendTraceSpan",
        {"trace_id": "loose", "span_id": "x", "name": "x", "started_at": BASE.isoformat()},
    )

    for sid, want in expected.items():
        got = await write.read(f"/v1/chat-sessions/{sid}/trace-stats")
        assert got["session_id"] == sid
        for name in ("trace_count", "finalized_traces", "span_count", "error_spans"):
            assert got[name] == want[name], (sid, name, got)
        assert _at(got["started_at"]) == want["started_at"]
        assert _at(got["ended_at"]) == want["ended_at"]
        assert got["duration_ms"] == pytest.approx(want["duration_ms"])
    assert expected["s-3"]["trace_count"] == 2  # the purged trace is gone
    empty = await write.read("/v1/chat-sessions/s-4/trace-stats")
    assert empty["trace_count"] == 0 and empty["duration_ms"] is None
    r = await stack.client.get("/v1/chat-sessions/nope/trace-stats", headers=stack.auth())
    assert r.status_code == 404


async def test_tool_usage_after_a_burst(stack: Stack) -> None:
    write = Writer(stack)
    calls = {"search": (5, 2), "fetch": (3, 0), "calc": (0, 0), "sleep": (2, 1)}
    ids: dict[str, str] = {}
    for name in calls:
        events = await write("RegisterTool", {"name": name, "input_schema": {"type": "object"}})
        ids[name] = events[0]["payload"]["tool_id"]
    await write("DeactivateTool", {"tool_id": ids["sleep"]})
    last_used: dict[str, datetime] = {}

    async def trace(name: str, n: int, errors: int) -> None:
        for i in range(n):
            started = BASE + timedelta(seconds=i, milliseconds=len(name))
            await write(
                "AppendTraceSpan",
                {
                    "trace_id": f"t-{name}-{i}",
                    "span_id": "call",
                    "name": f"call {name}",
                    "started_at": started.isoformat(),
                    "status": "error" if i < errors else "ok",
                    "attributes": {"tool": name, "input": {"q": i}},
                },
            )
            last_used[name] = max(last_used.get(name, started), started)

    async with anyio.create_task_group() as tg:
        for name, (n, errors) in {**calls, "unregistered": (2, 1)}.items():
            tg.start_soon(trace, name, n, errors)
        tg.start_soon(
            write,
            "AppendTraceSpan",
            {"trace_id": "plain", "span_id": "a", "name": "a", "started_at": BASE.isoformat()},
        )

    listed = await write.read("/v1/tool-usage")
    assert [i["name"] for i in listed["items"]] == sorted(calls)
    for item in listed["items"]:
        name = item["name"]
        assert (item["calls"], item["error_calls"]) == calls[name], item
        assert item["tool_id"] == ids[name] and item["active"] is (name != "sleep")
        assert _at(item["last_used_at"]) == last_used.get(name)
    got = await write.read(f"/v1/tools/{ids['search']}/usage")
    assert got == next(i for i in listed["items"] if i["name"] == "search")
    inactive = await write.read("/v1/tool-usage", active="false")
    assert [i["name"] for i in inactive["items"]] == ["sleep"]
    page = await write.read("/v1/tool-usage", limit="3")
    rest = await stack.client.get(
        "/v1/tool-usage", params={"limit": "3", "cursor": page["next_cursor"]}, headers=stack.auth()
    )
    assert [i["name"] for i in page["items"] + rest.json()["items"]] == sorted(calls)

    r = await stack.client.get("/v1/tools/nope/usage", headers=stack.auth())
    assert r.status_code == 404


# ---- refreshing ------------------------------------------------------------------


def _positions(settings: Settings, positions: Iterable[str]) -> list[tuple[Shard, tuple[int, int]]]:
    return [parse_event_position(p, SYSTEM.catalog.by_name, settings.shards) for p in positions]


async def _reflected(pool: db.Pool, view: View, at: list[tuple[Shard, tuple[int, int]]]) -> bool:
    for shard, entry in at:
        if not await views.reflects(pool, view, shard, entry):
            return False
    return True


async def _all_reflected(
    pool: db.Pool, of: list[View], at: list[tuple[Shard, tuple[int, int]]]
) -> bool:
    for view in of:
        if not await _reflected(pool, view, at):
            return False
    return True


def _session(i: int) -> dict[str, Any]:
    return {
        "session_id": f"s-{i}",
        "agent_id": f"agent-{i % 3}",
        "participants": [{"participant_id": "u", "role": "user"}],
    }


async def test_refreshes_are_debounced(settings: Settings, schema: str, redis: Redis) -> None:
    debounce_s = 0.1
    pool = await db.create_pool(settings.database_url, schema)
    refresher = Refresher(pool, SYSTEM.views, debounce_s=debounce_s)
    batches = 0

    async def count(projection: Projection, shard: Shard, envelopes: list[Envelope]) -> None:
        nonlocal batches
        batches += projection.name == "chat_sessions"

    hooks = Hooks(in_transaction=[refresher.record_changes], on_commit=[refresher.mark, count])
    last: dict[str, str] = {}
    try:
        async with running(settings, projector=False) as p, anyio.create_task_group() as tg:
            tg.start_soon(refresher.run)
            tg.start_soon(
                run_projector,
                redis,
                p.scripts,
                p.keys,
                settings,
                pool,
                SYSTEM.catalog,
                SYSTEM.projections,
                hooks,
            )
            started = anyio.current_time()
            for i in range(120):  # one command at a time: about one batch each
                status = await p.outcome(
                    (await p.submit("CreateChatSession", _session(i))).command_id
                )
                assert status.position is not None
                keep_last(last, status.position)
            at = _positions(settings, last.values())
            await eventually(lambda: _reflected(pool, CHAT_SESSION_SUMMARIES, at))
            elapsed = anyio.current_time() - started
            tg.cancel_scope.cancel()
        refreshes = await pool.fetchval(
            "SELECT refreshes FROM eddy_views WHERE name = 'chat_session_summaries'"
        )
        total = await pool.fetchval("SELECT sum(sessions) FROM chat_session_summaries")
    finally:
        await pool.close()
    assert total == 120
    assert batches >= 30, batches
    # Each refresh follows a wait of debounce_s: at most one per interval, plus the last.
    assert 1 <= refreshes <= elapsed / debounce_s + 1, (refreshes, elapsed)
    assert refreshes * 4 <= batches, (refreshes, batches)
    assert refreshes == refresher.refreshes


async def test_two_refreshers_never_refresh_a_view_at_once(
    settings: Settings, schema: str, redis: Redis
) -> None:
    # A view slow to refresh (0.1 s), so that two refreshers contend for it.
    slow = View(
        name=f"slow_{uuid.uuid4().hex[:8]}",
        select="SELECT tenant_id, session_id, status FROM chat_sessions"
        " WHERE (SELECT pg_sleep(0.1)::text) = ''",
        unique=("tenant_id", "session_id"),
        stale_on=(ChatSessionCreated, ChatSessionClosed),
        reads=(chat_sessions.PROJECTION,),
        unaffected_by=(ChatSessionParticipantsUpdated, ChatSessionArchived),
    )
    pools = [await db.create_pool(settings.database_url, schema) for _ in range(3)]
    watcher = pools[2]
    async with watcher.acquire() as conn, conn.transaction():
        assert await views.install(conn, [slow]) == [f"view {slow.name}"]
    refreshers = [
        Refresher(pool, (*SYSTEM.views, slow), debounce_s=0.02, sweep_s=0.1) for pool in pools[:2]
    ]
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            running_now = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
                f"REFRESH MATERIALIZED VIEW CONCURRENTLY {slow.name}",
            )
            most = max(most, running_now)
            await anyio.sleep(0.005)

    last: dict[str, str] = {}
    closed: set[str] = set()
    try:
        async with running(settings, projector=False) as p, anyio.create_task_group() as tg:
            tg.start_soon(watch)
            for refresher in refreshers:  # two projector processes, each with its refresher
                hooks = Hooks(in_transaction=[refresher.record_changes], on_commit=[refresher.mark])
                tg.start_soon(refresher.run)
                tg.start_soon(
                    run_projector,
                    redis,
                    p.scripts,
                    p.keys,
                    settings,
                    refresher.pool,
                    SYSTEM.catalog,
                    SYSTEM.projections,
                    hooks,
                )

            async def one(i: int) -> None:
                commands = [("CreateChatSession", _session(i))]
                if i % 3 == 0:
                    commands.append(("CloseChatSession", {"session_id": f"s-{i}"}))
                    closed.add(f"s-{i}")
                for type_name, payload in commands:
                    status = await p.outcome((await p.submit(type_name, payload)).command_id)
                    assert status.position is not None
                    keep_last(last, status.position)

            for wave in range(6):  # waves of writes while the views are being refreshed
                async with anyio.create_task_group() as writes:
                    for i in range(wave * 10, wave * 10 + 10):
                        writes.start_soon(one, i)
            at = _positions(settings, last.values())
            await eventually(
                lambda: _all_reflected(watcher, [slow, CHAT_SESSION_SUMMARIES], at), within=20
            )
            tg.cancel_scope.cancel()
        rows = await watcher.fetch(f"SELECT session_id, status FROM {slow.name}")
        summaries = await watcher.fetch("SELECT * FROM chat_session_summaries")
        recorded = await watcher.fetchval(
            "SELECT refreshes FROM eddy_views WHERE name = $1", slow.name
        )
    finally:
        for pool in pools:
            await pool.close()
    assert most == 1, most  # seen refreshing, and never twice at once
    assert sum(r.busy for r in refreshers) >= 1  # they did contend for the lock
    assert recorded >= 2
    assert {r["session_id"]: r["status"] for r in rows} == {
        f"s-{i}": "closed" if f"s-{i}" in closed else "active" for i in range(60)
    }
    assert sum(r["sessions"] for r in summaries) == 60
    assert sum(r["closed_sessions"] for r in summaries) == len(closed) == 20


async def test_an_event_the_view_ignores_needs_no_refresh(
    settings: Settings, schema: str, redis: Redis
) -> None:
    pool = await db.create_pool(settings.database_url, schema)
    refresher = Refresher(pool, SYSTEM.views, debounce_s=0)  # refreshes only when told here
    hooks = Hooks(in_transaction=[refresher.record_changes], on_commit=[refresher.mark])
    tools = next(projection for projection in SYSTEM.projections if projection.name == "tools")
    try:
        async with running(settings, projector=False) as p, anyio.create_task_group() as tg:
            tg.start_soon(
                run_projector,
                redis,
                p.scripts,
                p.keys,
                settings,
                pool,
                SYSTEM.catalog,
                SYSTEM.projections,
                hooks,
            )

            async def projected(type_name: str, payload: dict[str, Any]) -> list[Any]:
                status = await p.outcome((await p.submit(type_name, payload)).command_id)
                assert status.position is not None
                at = _positions(settings, [status.position])
                await eventually(lambda: db.reached(pool, tools.name, *at[0]))
                return at

            registered = await projected(
                "RegisterTool", {"tool_id": "t1", "name": "search", "input_schema": {}}
            )
            assert not await _reflected(pool, TOOL_USAGE, registered)
            assert await refresher.refresh(TOOL_USAGE)
            assert await _reflected(pool, TOOL_USAGE, registered)

            updated = await projected(
                "UpdateToolDefinition", {"tool_id": "t1", "description": "Search"}
            )
            assert await _reflected(pool, TOOL_USAGE, updated)  # no refresh in between

            deactivated = await projected("DeactivateTool", {"tool_id": "t1"})
            assert not await _reflected(pool, TOOL_USAGE, deactivated)
            assert await refresher.refresh(TOOL_USAGE)
            assert await _reflected(pool, TOOL_USAGE, deactivated)
            tg.cancel_scope.cancel()
        active = await pool.fetchval("SELECT active FROM tool_usage WHERE tool_id = 't1'")
    finally:
        await pool.close()
    assert active is False


async def test_a_view_is_created_again_when_its_tables_are_swapped(pool: db.Pool) -> None:
    """What a rebuild's swap does to the tables a view reads, then `views.recreate`
    (its `after_swap` step): the view reads the new tables, the old ones can go."""
    old = f"{(await pool.fetchval('SELECT current_schema()'))}__old"
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO tools (tenant_id, tool_id, name, description, input_schema,"
            " runtime_hints, guardrails, active, created_at, updated_at, version)"
            " VALUES ('t', 'old', 'old', '', '{}', '{}', '{}', true, now(), now(), 1)"
        )
    assert await Refresher(pool, SYSTEM.views, debounce_s=0).refresh(TOOL_USAGE)
    tools = next(projection for projection in SYSTEM.projections if projection.name == "tools")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"CREATE SCHEMA {old}")
        await conn.execute(f"ALTER TABLE tools SET SCHEMA {old}")
        await conn.execute(tools.tables)
        await conn.execute(
            "INSERT INTO tools (tenant_id, tool_id, name, description, input_schema,"
            " runtime_hints, guardrails, active, created_at, updated_at, version)"
            " VALUES ('t', 'new', 'new', '', '{}', '{}', '{}', true, now(), now(), 1)"
        )
        await views.recreate(conn, tools, SYSTEM.views)
        await conn.execute(f"DROP SCHEMA {old} CASCADE")
    assert [r["tool_id"] for r in await pool.fetch("SELECT tool_id FROM tool_usage")] == ["new"]
    assert await Refresher(pool, SYSTEM.views, debounce_s=0).refresh(TOOL_USAGE)
    installed = await pool.fetch(
        "SELECT matviewname FROM pg_matviews WHERE schemaname = current_schema()"
    )
    assert {r["matviewname"] for r in installed} == {v.name for v in SYSTEM.views}


async def test_a_lost_mark_is_found_by_the_sweep(
    settings: Settings, schema: str, redis: Redis
) -> None:
    """A projector that committed changes but died before its refresher heard of
    them: another process's refresher finds them in `eddy_view_changes`."""
    pool = await db.create_pool(settings.database_url, schema)
    committer = Refresher(pool, SYSTEM.views, debounce_s=0)  # records changes, never refreshes
    survivor = Refresher(pool, SYSTEM.views, debounce_s=0.01, sweep_s=0.1)  # never marked
    hooks = Hooks(in_transaction=[committer.record_changes])
    last: dict[str, str] = {}
    try:
        async with running(settings, projector=False) as p, anyio.create_task_group() as tg:
            tg.start_soon(
                run_projector,
                redis,
                p.scripts,
                p.keys,
                settings,
                pool,
                SYSTEM.catalog,
                SYSTEM.projections,
                hooks,
            )
            tg.start_soon(survivor.run)
            for i in range(10):
                status = await p.outcome(
                    (await p.submit("CreateChatSession", _session(i))).command_id
                )
                assert status.position is not None
                keep_last(last, status.position)
            at = _positions(settings, last.values())
            await eventually(lambda: _reflected(pool, CHAT_SESSION_SUMMARIES, at))
            tg.cancel_scope.cancel()
        total = await pool.fetchval("SELECT sum(sessions) FROM chat_session_summaries")
    finally:
        await pool.close()
    assert total == 10 and survivor.refreshes >= 1
