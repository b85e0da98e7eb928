"""Query caching (`projections/cache.py`): a repeated query is served from Redis,
and a projected change is never hidden by a cached answer; tenants never share
answers; answers expire; Redis failing only costs speed."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.contexts.message_streams import MessageStreamStopped
from app.contexts.tools import ToolRegistered
from app.readmodels import chat_sessions, tools
from app.registry import SYSTEM
from core.errors import ConfigurationError
from core.messages import Envelope, Metadata
from projections.cache import Generations, QueryCache, generation
from projections.pagination import QueryArgs
from projections.projection import Cache, Invalidation, Projection, Query, check_invalidations
from streams.connection import connect
from streams.keys import Keys
from tests.pipeline import eventually
from tests.stack import Stack, serving


async def run(stack: Stack, type_name: str, payload: dict[str, Any], tenant: str = "tenant-a"):
    """Submit a command, wait for it; its events' position."""
    r = await stack.client.post(
        f"/v1/commands/{type_name}?wait=10", json=payload, headers=stack.auth(tenant)
    )
    assert r.status_code == 200, r.text
    return r.json()["position"]


async def counts(stack: Stack) -> dict[tuple[str, str], float]:
    """`eddy_query_cache_total` by (query, outcome)."""
    text = (await stack.client.get("/metrics")).text
    return {
        (sample.labels["query"], sample.labels["outcome"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "eddy_query_cache_total"
    }


def tool(name: str) -> dict[str, Any]:
    return {"name": name, "input_schema": {"type": "object"}}


async def test_a_repeated_query_is_a_hit_with_the_same_body(stack: Stack) -> None:
    c, auth = stack.client, stack.auth()
    at = await run(stack, "RegisterTool", tool("search"))
    first = await c.get("/v1/tools", params={"after": at}, headers=auth)
    again = await c.get("/v1/tools", headers=auth)
    assert first.status_code == again.status_code == 200
    assert [t["name"] for t in first.json()["items"]] == ["search"]
    assert again.content == first.content
    assert again.headers["content-type"] == "application/json"
    assert await counts(stack) == {("ListTools", "miss"): 1, ("ListTools", "hit"): 1}

    other = await c.get("/v1/tools", params={"active": "false"}, headers=auth)
    assert other.json()["items"] == []  # other arguments, another answer
    assert (await counts(stack))[("ListTools", "miss")] == 2


async def test_a_projected_change_is_never_hidden_by_a_cached_answer(stack: Stack) -> None:
    """Writes interleaved with reads: every read after a write's position shows the
    write, and a reader polling all along never sees the list go back in time."""
    c, auth = stack.client, stack.auth()
    expected: dict[str, str] = {}  # name → description
    ids: dict[str, str] = {}
    seen: list[int] = []
    done = anyio.Event()

    async def poll() -> None:
        while not done.is_set():
            r = await c.get("/v1/tools", params={"limit": "500"}, headers=auth)
            assert r.status_code == 200
            seen.append(len(r.json()["items"]))
            assert seen == sorted(seen), "an older answer came back"

    async with anyio.create_task_group() as tg:
        tg.start_soon(poll)
        for i in range(24):
            name = f"tool-{i:02}"
            r = await c.post("/v1/commands/RegisterTool?wait=10", json=tool(name), headers=auth)
            assert r.status_code == 200, r.text
            ids[name], expected[name] = r.json()["events"][0]["aggregate_id"], ""
            at = r.json()["position"]
            if i % 3 == 2:  # a change that keeps the count: only invalidation shows it
                changed = f"tool-{i - 1:02}"
                expected[changed] = f"v{i}"
                payload = {"tool_id": ids[changed], "description": f"v{i}"}
                at = await run(stack, "UpdateToolDefinition", payload)
            for params in ({"after": at, "limit": "500"}, {"limit": "500"}):
                r = await c.get("/v1/tools", params=params, headers=auth)
                got = {t["name"]: t["description"] or "" for t in r.json()["items"]}
                assert got == expected, (i, params)
        done.set()
    outcomes = await counts(stack)
    assert outcomes[("ListTools", "hit")] >= 24  # the cache was in play, not bypassed
    assert ("ListTools", "bypass") not in outcomes


async def test_every_cached_query_sees_the_changes_its_rules_name(stack: Stack) -> None:
    c, auth = stack.client, stack.auth()
    n = uuid.uuid4().hex[:6]
    sid, other_sid, mid = f"s-{n}", f"s2-{n}", f"m-{n}"

    async def twice(path: str, **params: str) -> Any:
        """The answer, read twice: the second read must be the same bytes."""
        first = await c.get(path, params=params, headers=auth)
        assert first.status_code == 200, first.text
        again = await c.get(
            path, params={k: v for k, v in params.items() if k != "after"}, headers=auth
        )
        assert again.content == first.content
        return first.json()

    participants = [{"participant_id": "u1", "role": "agent"}]
    at = await run(
        stack, "CreateChatSession", {"session_id": sid, "agent_id": "a", "participants": []}
    )
    listed = await twice("/v1/chat-sessions", status="active", after=at)
    assert [s["session_id"] for s in listed["items"]] == [sid]
    at = await run(stack, "CloseChatSession", {"session_id": sid})
    assert (await twice("/v1/chat-sessions", status="active", after=at))["items"] == []

    at = await run(
        stack,
        "CreateChatSession",
        {"session_id": other_sid, "agent_id": "a", "participants": participants},
    )
    assert (await twice(f"/v1/chat-sessions/{other_sid}/transcript", after=at))["blocks"] == []
    start = {"stream_id": mid, "session_id": other_sid, "participant_id": "u1"}
    await run(stack, "StartMessageStream", start)
    await run(stack, "PushStreamMessage", {"stream_id": mid, "seq": 1, "chunk": "hi"})
    at = await run(stack, "StopMessageStream", {"stream_id": mid})
    transcript = await twice(f"/v1/chat-sessions/{other_sid}/transcript", after=at)
    assert [b["text"] for b in transcript["blocks"]] == ["hi"]

    span = {"span_id": "root", "name": "run", "started_at": "2026-01-01T00:00:00Z"}
    at = await run(stack, "AppendTraceSpan", {"trace_id": f"t-{n}", "session_id": sid, **span})
    traces = await twice("/v1/traces", session_id=sid, after=at)
    assert [(t["trace_id"], t["span_count"]) for t in traces["items"]] == [(f"t-{n}", 1)]
    every = await twice("/v1/traces", after=at)
    assert [t["trace_id"] for t in every["items"]] == [f"t-{n}"]
    # a trace of another session leaves this session's answer cached
    hits = (await counts(stack))[("ListTracesForSession", "hit")]
    at = await run(
        stack, "AppendTraceSpan", {"trace_id": f"u-{n}", "session_id": other_sid, **span}
    )
    assert (await twice("/v1/traces", session_id=sid, after=at)) == traces
    assert (await counts(stack))[("ListTracesForSession", "hit")] == hits + 2
    every = await twice("/v1/traces", after=at)
    assert {t["trace_id"] for t in every["items"]} == {f"t-{n}", f"u-{n}"}
    at = await run(stack, "AppendTraceSpan", {"trace_id": f"t-{n}", **span, "span_id": "child"})
    traces = await twice("/v1/traces", session_id=sid, after=at)
    assert [(t["trace_id"], t["span_count"]) for t in traces["items"]] == [(f"t-{n}", 2)]
    at = await run(stack, "PurgeTrace", {"trace_id": f"t-{n}"})
    assert (await twice("/v1/traces", session_id=sid, after=at))["items"] == []

    for enabled in (True, False, True):
        flag = {"module": f"mod-{n}", "flag": "beta", "enabled": enabled}
        at = await run(stack, "SetRuntimeFlag", flag)
        flags = await twice("/v1/runtime-flags", after=at)
        assert [(f["flag"], f["enabled"]) for f in flags["items"]] == [("beta", enabled)]
    at = await run(stack, "ResetRuntimeConfig", {"module": f"mod-{n}"})
    assert (await twice("/v1/runtime-flags", after=at))["items"] == []

    outcomes = await counts(stack)
    for name in ("ListChatSessionsByAgent", "GetChatSessionTranscript", "ListAllRuntimeFlags"):
        assert outcomes[(name, "hit")] >= 2, name


async def test_a_tenant_never_gets_another_tenants_cached_answer(stack: Stack) -> None:
    c = stack.client
    at = await run(stack, "RegisterTool", tool("search"), tenant="tenant-a")
    for _ in range(2):
        r = await c.get("/v1/tools", params={"after": at}, headers=stack.auth("tenant-a"))
        assert [t["name"] for t in r.json()["items"]] == ["search"]
    r = await c.get("/v1/tools", headers=stack.auth("tenant-b"))
    assert r.json()["items"] == []
    at = await run(stack, "RegisterTool", tool("other"), tenant="tenant-b")
    r = await c.get("/v1/tools", params={"after": at}, headers=stack.auth("tenant-b"))
    assert [t["name"] for t in r.json()["items"]] == ["other"]
    r = await c.get("/v1/tools", headers=stack.auth("tenant-a"))
    assert [t["name"] for t in r.json()["items"]] == ["search"]
    assert await counts(stack) == {("ListTools", "miss"): 3, ("ListTools", "hit"): 2}


async def test_a_cached_answer_lives_for_its_ttl(stack: Stack, redis) -> None:
    r = await stack.client.get("/v1/tools", headers=stack.auth())
    assert r.status_code == 200
    (key,) = [k async for k in redis.scan_iter(match=f"{stack.settings.key_prefix}:qcache:*")]
    assert 0 < await redis.pttl(key) <= 60_000
    assert await redis.get(key) == r.content


async def test_an_expired_answer_is_read_again(settings, pool, redis) -> None:
    keys = Keys.of(settings)
    query = _short_lived(_query(tools.PROJECTION, "ListTools"), ttl_s=0.05)
    args = QueryArgs(tenant_id="tenant-a", path={}, params={})
    qc = QueryCache()
    assert await qc.answer(pool, redis, keys, query, args) == (
        b'{"items":[],"next_cursor":null}',
        "miss",
    )
    assert (await qc.answer(pool, redis, keys, query, args))[1] == "hit"

    async def expired() -> bool:
        return not [k async for k in redis.scan_iter(match=f"{settings.key_prefix}:qcache:*")]

    await eventually(expired)
    assert (await qc.answer(pool, redis, keys, query, args))[1] == "miss"


async def test_with_redis_failing_queries_are_answered_from_postgres(
    settings, pool, redis, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys.of(settings)
    query = _query(tools.PROJECTION, "ListTools")
    args = QueryArgs(tenant_id="tenant-a", path={}, params={})
    broken = connect("redis://127.0.0.1:1/0")  # nothing listens there
    empty = b'{"items":[],"next_cursor":null}'
    try:
        pausing = QueryCache()
        assert await pausing.answer(pool, broken, keys, query, args) == (empty, "bypass")
        # for a while after a failure, Redis is not asked at all
        assert await pausing.answer(pool, redis, keys, query, args) == (empty, "bypass")

        with caplog.at_level(logging.INFO, logger="eddy.cache"):
            caplog.clear()
            retrying = QueryCache(pause_s=0)
            for _ in range(3):
                assert await retrying.answer(pool, broken, keys, query, args) == (empty, "bypass")
            assert await retrying.answer(pool, redis, keys, query, args) == (empty, "miss")
            assert await retrying.answer(pool, redis, keys, query, args) == (empty, "hit")
    finally:
        await broken.aclose()
    events = [r.getMessage().split()[0] for r in caplog.records if r.name == "eddy.cache"]
    assert events == ["query-cache-unavailable", "query-cache-back"]  # once per outage


async def test_with_the_cache_off_nothing_is_cached(settings, schema, redis) -> None:
    off = msgspec.structs.replace(settings, query_cache="off")
    async with serving(off) as stack:
        for _ in range(2):
            r = await stack.client.get("/v1/tools", headers=stack.auth())
            assert r.status_code == 200 and r.json()["items"] == []
        assert await counts(stack) == {}
    assert not [k async for k in redis.scan_iter(match=f"{settings.key_prefix}:qcache:*")]


async def test_a_rebuild_forgets_every_tenants_answers(pool) -> None:
    generations = Generations(SYSTEM.projections)
    before = [await generation(pool, "ListTools", t, "") for t in ("a", "b")]
    async with pool.acquire() as conn:
        await generations.forget(conn, tools.PROJECTION)
    after = [await generation(pool, "ListTools", t, "") for t in ("a", "b")]
    assert after == [g + 1 for g in before]
    # a transcript reads the message streams' tables too
    async with pool.acquire() as conn:
        await generations.forget(conn, BY_PROJECTION["message_streams"])
    assert await generation(pool, "GetChatSessionTranscript", "a", "s1") == 1


# -- the rules, without services -------------------------------------------------

BY_PROJECTION = {p.name: p for p in SYSTEM.projections}

NOT_INVALIDATING = {
    # a 404 is not cached, and nothing of a session but its existence is read
    "GetChatSessionTranscript": {
        "ChatSessionCreated",
        "ChatSessionParticipantsUpdated",
        "ChatSessionClosed",
        "ChatSessionArchived",
        "MessageStreamStarted",
        "StreamMessagePushed",
    },
}


def test_every_cached_query_names_every_event_of_the_tables_it_reads() -> None:
    """A new event in a context read by a cached query must be named by its rules,
    or listed here with the reason it changes no answer."""
    cached = [(p, q) for p in SYSTEM.projections for q in p.queries if q.cache is not None]
    assert {q.name for _, q in cached} >= {
        "ListChatSessionsByAgent",
        "ListTools",
        "ListAllRuntimeFlags",
        "ListTracesForSession",
        "GetChatSessionTranscript",
    }
    for projection, query in cached:
        assert query.cache is not None
        readers = [projection, *(BY_PROJECTION[name] for name in query.also_from)]
        projected = {
            e.__name__
            for r in readers
            for c in r.contexts
            for e in SYSTEM.catalog.by_name[c].events
        }
        named = {e.__name__ for rule in query.cache.invalidated_by for e in rule.events}
        assert projected - named == NOT_INVALIDATING.get(query.name, set()), query.name
    Generations(SYSTEM.projections)  # and every rule passes the checks


def _envelope(type_name: str, aggregate_id: str, session_id: str | None = None) -> Envelope:
    return Envelope(
        id="e",
        type=type_name,
        schema_version=1,
        context=SYSTEM.catalog.events[type_name].context.name,
        aggregate_id=aggregate_id,
        aggregate_version=1,
        tenant_id="t",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        payload=msgspec.Raw(b"{}"),
        metadata=Metadata(
            command_id="c", correlation_id="c", causation_id="c", actor="a", session_id=session_id
        ),
    )


def test_a_batch_moves_the_generations_its_rules_name() -> None:
    generations = Generations(SYSTEM.projections)
    streams = BY_PROJECTION["message_streams"]
    batch = [
        _envelope("StreamMessagePushed", "m1", "s1"),
        _envelope("MessageStreamStopped", "m1", "s1"),
        _envelope("MessageStreamStopped", "m2"),  # no session known: the whole tenant
    ]
    assert generations.moved(streams, batch) == {
        ("GetChatSessionTranscript", "t", "s1"),
        ("GetChatSessionTranscript", "t", ""),
    }
    assert generations.moved(BY_PROJECTION["chat_sessions"], batch) == set()
    traces = [_envelope("TraceSpanAppended", "t1", "s1"), _envelope("TraceFinalized", "t2")]
    assert generations.moved(BY_PROJECTION["traces"], traces) == {
        ("ListTracesForSession", "t", "all"),
        ("ListTracesForSession", "t", "session:s1"),
    }
    tools_batch = [_envelope("ToolRegistered", "x")]
    assert generations.moved(tools.PROJECTION, tools_batch) == {("ListTools", "t", "")}


@pytest.mark.parametrize(
    ("cache_policy", "message"),
    [
        (
            Cache(ttl_s=1, invalidated_by=(Invalidation((ToolRegistered,)),)),
            "ToolRegistered not handled by",
        ),
        (
            Cache(ttl_s=1, invalidated_by=(Invalidation((MessageStreamStopped,), lambda e: ()),)),
            "needs a Cache.scope",
        ),
    ],
)
def test_a_rule_that_could_not_work_is_refused(cache_policy: Cache, message: str) -> None:
    query = _query(chat_sessions.PROJECTION, "ListChatSessionsByAgent")
    query = dataclasses.replace(query, cache=cache_policy, also_from=("message_streams",))
    projection = dataclasses.replace(chat_sessions.PROJECTION, queries=(query,))
    with pytest.raises(ConfigurationError, match=message):
        check_invalidations([projection, BY_PROJECTION["message_streams"]])


def _query(projection: Projection, name: str) -> Query:
    (query,) = [q for q in projection.queries if q.name == name]
    return query


def _short_lived(query: Query, ttl_s: float) -> Query:
    assert query.cache is not None
    return dataclasses.replace(query, cache=dataclasses.replace(query.cache, ttl_s=ttl_s))
