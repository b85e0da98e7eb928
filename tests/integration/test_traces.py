"""Traces over HTTP: spans appended, listed and paginated, finalize, purge, lists."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.pipeline import eventually
from tests.stack import Stack


async def send(stack: Stack, command: str, payload: dict[str, Any], **auth: Any) -> httpx.Response:
    return await stack.client.post(
        f"/v1/commands/{command}?wait=5", json=payload, headers=stack.auth(**auth)
    )


async def append(stack: Stack, trace_id: str, span_id: str, **fields: Any) -> httpx.Response:
    payload = {
        "trace_id": trace_id,
        "span_id": span_id,
        "name": f"op-{span_id}",
        "started_at": "2025-01-01T12:00:00Z",
    }
    r = await send(stack, "AppendTraceSpan", payload | fields)
    assert r.status_code == 200, r.text
    return r


async def test_spans_are_appended_and_listed_in_append_order_across_pages(stack) -> None:
    c, auth = stack.client, stack.auth()
    r = await append(
        stack,
        "tr-1",
        "root",
        session_id="sess-1",
        ended_at="2025-01-01T12:00:05Z",
        status="ok",
        attributes={"model": "m-1", "tokens": [1, 2]},
    )
    (event,) = r.json()["events"]
    assert event["type"] == "TraceSpanAppended" and event["aggregate_id"] == "tr-1"
    assert event["metadata"]["session_id"] == "sess-1"
    await append(stack, "tr-1", "child", parent_span_id="root", status="error")
    await append(stack, "tr-1", "early", parent_span_id="root", started_at="2025-01-01T11:00:00Z")
    r = await append(stack, "tr-1", "leaf", parent_span_id="child")
    assert r.json()["events"][0]["metadata"]["session_id"] == "sess-1"
    position = r.json()["position"]

    r = await c.get("/v1/traces/tr-1", params={"after": position}, headers=auth)
    assert r.status_code == 200, r.text
    trace = r.json()
    assert trace["trace_id"] == "tr-1" and trace["session_id"] == "sess-1"
    assert trace["status"] == "open" and trace["span_count"] == 4 and trace["version"] == 4
    assert trace["started_at"] == "2025-01-01T11:00:00Z" and trace["finalized_at"] is None

    spans, cursor, pages = [], None, 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        r = await c.get("/v1/traces/tr-1/spans", params=params, headers=auth)
        assert r.status_code == 200, r.text
        spans += r.json()["items"]
        cursor, pages = r.json()["next_cursor"], pages + 1
        if cursor is None:
            break
    assert pages == 2
    assert [(s["span_id"], s["parent_span_id"]) for s in spans] == [
        ("root", None),
        ("child", "root"),
        ("early", "root"),
        ("leaf", "child"),
    ]
    assert spans[0] == {
        "span_id": "root",
        "parent_span_id": None,
        "name": "op-root",
        "started_at": "2025-01-01T12:00:00Z",
        "ended_at": "2025-01-01T12:00:05Z",
        "status": "ok",
        "attributes": {"model": "m-1", "tokens": [1, 2]},
    }
    assert [s["status"] for s in spans] == ["ok", "error", "unset", "unset"]


async def test_domain_rules_reject_bad_spans(stack) -> None:
    await append(stack, "tr-2", "root", session_id="sess-2")
    for fields, code in [
        ({"span_id": "root"}, "duplicate_span"),
        ({"span_id": "x", "parent_span_id": "nobody"}, "unknown_parent"),
        ({"span_id": "x", "session_id": "sess-other"}, "session_mismatch"),
    ]:
        payload = {"trace_id": "tr-2", "name": "n", "started_at": "2025-01-01T12:00:00Z"}
        r = await send(stack, "AppendTraceSpan", payload | fields)
        assert r.status_code == 409, r.text
        assert r.json()["status"] == "failed" and r.json()["error"]["code"] == code


async def test_a_finalized_trace_is_immutable(stack) -> None:
    await append(stack, "tr-3", "root")
    r = await send(stack, "FinalizeTrace", {"trace_id": "tr-3"})
    assert r.status_code == 200, r.text
    r = await stack.client.get(
        "/v1/traces/tr-3", params={"after": r.json()["position"]}, headers=stack.auth()
    )
    assert r.json()["status"] == "finalized" and r.json()["finalized_at"] is not None
    assert r.json()["version"] == 2
    payload = {
        "trace_id": "tr-3",
        "span_id": "late",
        "name": "n",
        "started_at": "2025-01-01T12:00:00Z",
    }
    r = await send(stack, "AppendTraceSpan", payload)
    assert r.status_code == 409 and r.json()["error"]["code"] == "finalized"
    r = await send(stack, "FinalizeTrace", {"trace_id": "tr-3"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "finalized"
    r = await send(stack, "FinalizeTrace", {"trace_id": "no-such-trace"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_found"


async def test_a_purged_trace_is_gone(stack) -> None:
    c, auth = stack.client, stack.auth()
    await append(stack, "tr-4", "root", session_id="sess-4")
    await append(stack, "tr-4", "child", parent_span_id="root")
    r = await send(stack, "PurgeTrace", {"trace_id": "tr-4"})
    assert r.status_code == 200, r.text
    assert r.json()["events"][0]["metadata"]["session_id"] == "sess-4"
    after = {"after": r.json()["position"]}
    assert (await c.get("/v1/traces/tr-4", params=after, headers=auth)).status_code == 404
    assert (await c.get("/v1/traces/tr-4/spans", params=after, headers=auth)).status_code == 404
    r = await c.get("/v1/traces", params={"session_id": "sess-4", **after}, headers=auth)
    assert r.json() == {"items": [], "next_cursor": None}

    payload = {
        "trace_id": "tr-4",
        "span_id": "new",
        "name": "n",
        "started_at": "2025-01-01T12:00:00Z",
    }
    r = await send(stack, "AppendTraceSpan", payload)
    assert r.status_code == 409 and r.json()["error"]["code"] == "purged"
    r = await send(stack, "PurgeTrace", {"trace_id": "tr-4"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "purged"
    assert (await c.get("/v1/traces/tr-4", headers=auth)).status_code == 404


async def test_traces_are_listed_by_session_newest_first(stack) -> None:
    c, auth = stack.client, stack.auth()
    for trace_id, session_id in [("a", "s1"), ("b", "s2"), ("c", "s1"), ("d", "s1")]:
        await append(stack, trace_id, "root", session_id=session_id)

    async def listed() -> list[str] | None:
        r = await c.get("/v1/traces", headers=auth)
        ids = [t["trace_id"] for t in r.json()["items"]]
        return ids if len(ids) == 4 else None

    assert await eventually(listed) == ["d", "c", "b", "a"]

    ids, cursor = [], None
    for _ in range(2):
        params = {"session_id": "s1", "limit": "2", **({"cursor": cursor} if cursor else {})}
        r = await c.get("/v1/traces", params=params, headers=auth)
        assert r.status_code == 200, r.text
        assert all(t["session_id"] == "s1" for t in r.json()["items"])
        ids += [t["trace_id"] for t in r.json()["items"]]
        cursor = r.json()["next_cursor"]
    assert ids == ["d", "c", "a"] and cursor is None

    other = stack.auth(tenant="tenant-b")
    assert (await c.get("/v1/traces", headers=other)).json()["items"] == []
    assert (await c.get("/v1/traces/a", headers=other)).status_code == 404


async def test_unknown_traces_and_bad_cursors(stack) -> None:
    c, auth = stack.client, stack.auth()
    assert (await c.get("/v1/traces/nope", headers=auth)).status_code == 404
    assert (await c.get("/v1/traces/nope/spans", headers=auth)).status_code == 404
    for path in ("/v1/traces", "/v1/traces/nope/spans"):
        r = await c.get(path, params={"cursor": "bm90IGEgY3Vyc29y"}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
        r = await c.get(path, params={"limit": "501"}, headers=auth)
        assert r.status_code == 400


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"ended_at": "2025-01-01T11:59:59Z"}, "$"),
        ({"status": "fine"}, "$.status"),
        ({"started_at": "2025-01-01T12:00:00"}, "$.started_at"),
        ({"name": ""}, "$.name"),
        ({"attributes": []}, "$.attributes"),
    ],
)
async def test_a_bad_span_is_invalid(stack, fields, path) -> None:
    payload = {
        "trace_id": "tr-5",
        "span_id": "x",
        "name": "n",
        "started_at": "2025-01-01T12:00:00Z",
    }
    r = await stack.client.post(
        "/v1/commands/AppendTraceSpan?wait=5", json=payload | fields, headers=stack.auth()
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid"
    assert [f["path"] for f in r.json()["error"]["fields"]] == [path]


async def test_an_observer_cannot_append(stack) -> None:
    payload = {
        "trace_id": "tr-6",
        "span_id": "x",
        "name": "n",
        "started_at": "2025-01-01T12:00:00Z",
    }
    r = await send(stack, "AppendTraceSpan", payload, roles=("observer",))
    assert r.status_code == 403
