"""Tools over HTTP: register (admin only, valid JSON Schema, unique name), update,
deactivate, and the tool queries."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.stack import Stack

SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}


async def command(
    stack: Stack,
    type_name: str,
    payload: dict[str, Any],
    auth: dict[str, str] | None = None,
    **headers: str,
) -> httpx.Response:
    r = await stack.client.post(
        f"/v1/commands/{type_name}?wait=5",
        json=payload,
        headers={**(auth or stack.auth()), **headers},
    )
    assert r.status_code in (200, 409), r.text
    return r


async def register(stack: Stack, name: str, tenant: str = "tenant-a") -> httpx.Response:
    r = await command(
        stack, "RegisterTool", {"name": name, "input_schema": SCHEMA}, stack.auth(tenant)
    )
    assert r.status_code == 200, r.text
    return r


async def settle(stack: Stack, responses: list[httpx.Response]) -> None:
    """Wait until the tools read model reflects every response's events (they may be
    on different shards, and `?after=` names one position)."""
    for r in responses:
        q = await stack.client.get(
            "/v1/tools", params={"limit": 1, "after": r.json()["position"]}, headers=stack.auth()
        )
        assert q.status_code == 200, q.text


async def test_an_admin_registers_updates_and_deactivates_a_tool(stack) -> None:
    c, auth = stack.client, stack.auth()
    r = await command(
        stack,
        "RegisterTool",
        {
            "name": "web.search",
            "description": "search the web",
            "input_schema": SCHEMA,
            "runtime_hints": {"timeout_s": 5},
            "guardrails": {"max_calls": 3},
        },
    )
    assert r.status_code == 200, r.text
    tool_id = r.json()["tool_id"]
    (event,) = r.json()["events"]
    assert event["type"] == "ToolRegistered" and event["aggregate_id"] == tool_id
    assert event["payload"]["input_schema"] == SCHEMA

    r = await c.get(f"/v1/tools/{tool_id}", params={"after": r.json()["position"]}, headers=auth)
    assert r.status_code == 200, r.text
    tool = r.json()
    assert tool["tool_id"] == tool_id and tool["name"] == "web.search"
    assert tool["description"] == "search the web" and tool["input_schema"] == SCHEMA
    assert tool["runtime_hints"] == {"timeout_s": 5} and tool["guardrails"] == {"max_calls": 3}
    assert tool["active"] is True and tool["version"] == 1
    assert tool["created_at"] == tool["updated_at"]

    agent = stack.auth(roles=("agent",))
    r = await command(
        stack,
        "UpdateToolDefinition",
        {"tool_id": tool_id, "input_schema": {"type": "object"}, "description": "v2"},
        agent,
    )
    assert r.status_code == 200, r.text
    payload = r.json()["events"][0]["payload"]
    assert payload["input_schema"] == {"type": "object"} and payload["guardrails"] is None
    assert payload["definition"]["guardrails"] == {"max_calls": 3}

    r = await c.get(f"/v1/tools/{tool_id}", params={"after": r.json()["position"]}, headers=auth)
    tool = r.json()
    assert tool["input_schema"] == {"type": "object"} and tool["description"] == "v2"
    assert tool["guardrails"] == {"max_calls": 3} and tool["version"] == 2

    r = await command(stack, "DeactivateTool", {"tool_id": tool_id})
    assert r.status_code == 200, r.text
    position = r.json()["position"]
    r = await command(stack, "UpdateToolDefinition", {"tool_id": tool_id, "description": "v3"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "deactivated"
    r = await command(stack, "DeactivateTool", {"tool_id": tool_id})
    assert r.status_code == 409 and r.json()["error"]["code"] == "deactivated"
    r = await c.get(f"/v1/tools/{tool_id}", params={"after": position}, headers=auth)
    tool = r.json()
    assert tool["active"] is False and tool["version"] == 3 and tool["description"] == "v2"


async def test_only_an_admin_registers_a_tool(stack) -> None:
    body = {"name": "calc", "input_schema": {}}
    for roles in [("agent",), ("user",), ("observer",)]:
        r = await stack.client.post(
            "/v1/commands/RegisterTool?wait=5", json=body, headers=stack.auth(roles=roles)
        )
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"
    r = await stack.client.get("/v1/tools", headers=stack.auth(roles=("observer",)))
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("type_name", "body", "path"),
    [
        ("RegisterTool", {"name": "calc", "input_schema": {"type": 12}}, "$.input_schema.type"),
        (
            "RegisterTool",
            {"name": "calc", "input_schema": {"properties": {"q": {"minLength": -1}}}},
            "$.input_schema.properties.q.minLength",
        ),
        ("RegisterTool", {"name": "calc", "input_schema": [1]}, "$.input_schema"),
        ("RegisterTool", {"name": "calc"}, "$.input_schema"),
        ("RegisterTool", {"name": "a b", "input_schema": {}}, "$.name"),
        ("RegisterTool", {"name": "x" * 129, "input_schema": {}}, "$.name"),
        (
            "UpdateToolDefinition",
            {"tool_id": "t1", "input_schema": {"required": "q"}},
            "$.input_schema.required",
        ),
    ],
)
async def test_an_invalid_definition_is_422_with_the_field_path(
    stack, type_name, body, path
) -> None:
    r = await stack.client.post(f"/v1/commands/{type_name}", json=body, headers=stack.auth())
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid"
    (field,) = error["fields"]
    assert field["path"] == path


async def test_lists_page_by_name_and_filter_on_active(stack) -> None:
    c, auth = stack.client, stack.auth()
    ids, done = {}, []
    for name in ["echo", "alpha", "delta", "bravo", "charlie"]:
        done.append(await register(stack, name))
        ids[name] = done[-1].json()["tool_id"]
    for name in ["bravo", "delta"]:
        done.append(await command(stack, "DeactivateTool", {"tool_id": ids[name]}))
        assert done[-1].status_code == 200, done[-1].text
    await settle(stack, done)

    async def names(active: str | None) -> list[list[str]]:
        pages, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 2}
            params |= {"active": active} if active else {}
            params |= {"cursor": cursor} if cursor else {}
            r = await c.get("/v1/tools", params=params, headers=auth)
            assert r.status_code == 200, r.text
            pages.append([t["name"] for t in r.json()["items"]])
            cursor = r.json()["next_cursor"]
            if cursor is None:
                return pages

    assert await names(None) == [["alpha", "bravo"], ["charlie", "delta"], ["echo"]]
    assert await names("all") == [["alpha", "bravo"], ["charlie", "delta"], ["echo"]]
    assert await names("true") == [["alpha", "charlie"], ["echo"]]
    assert await names("false") == [["bravo", "delta"]]
    r = await c.get("/v1/tools", params={"active": "yes"}, headers=auth)
    assert r.status_code == 400
    r = await c.get("/v1/tools", params={"cursor": "W10"}, headers=auth)  # "[]"
    assert r.status_code == 400
    r = await c.get("/v1/tools", params={"active": "true", "limit": 1}, headers=auth)
    (tool,) = r.json()["items"]
    assert tool["tool_id"] == ids["alpha"] and tool["input_schema"] == SCHEMA


async def test_unknown_and_other_tenants_tools_are_404(stack) -> None:
    c = stack.client
    r = await register(stack, "calc", tenant="tenant-b")
    tool_id, position = r.json()["tool_id"], r.json()["position"]
    r = await c.get(f"/v1/tools/{tool_id}", params={"after": position}, headers=stack.auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await c.get("/v1/tools/nope", headers=stack.auth())
    assert r.status_code == 404
    r = await c.get("/v1/tools", params={"after": position}, headers=stack.auth())
    assert r.json()["items"] == []
    r = await c.get(f"/v1/tools/{tool_id}", headers=stack.auth("tenant-b"))
    assert r.status_code == 200 and r.json()["name"] == "calc"
    r = await command(stack, "DeactivateTool", {"tool_id": tool_id})
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_found"


async def test_a_name_is_unique_in_its_tenant(stack) -> None:
    body = {"name": "calc", "input_schema": {}}
    first = await command(stack, "RegisterTool", body, **{"Idempotency-Key": "reg-1"})
    assert first.status_code == 200, first.text

    again = await command(stack, "RegisterTool", body, **{"Idempotency-Key": "reg-1"})
    assert again.status_code == 200, again.text
    assert again.json()["events"] == first.json()["events"]

    taken = await command(stack, "RegisterTool", body, **{"Idempotency-Key": "reg-2"})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "name_taken"
    assert taken.json()["tool_id"] != first.json()["tool_id"]

    other = await command(stack, "RegisterTool", body, stack.auth("tenant-b"))
    assert other.status_code == 200, other.text

    deactivated = await command(stack, "DeactivateTool", {"tool_id": first.json()["tool_id"]})
    assert deactivated.status_code == 200, deactivated.text
    r = await command(stack, "RegisterTool", body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken"

    r = await stack.client.get(
        "/v1/tools", params={"after": deactivated.json()["position"]}, headers=stack.auth()
    )
    assert [(t["tool_id"], t["active"]) for t in r.json()["items"]] == [
        (first.json()["tool_id"], False)
    ]


async def test_a_failed_registration_frees_its_name(stack) -> None:
    tool_id = (await register(stack, "calc")).json()["tool_id"]
    r = await command(
        stack, "RegisterTool", {"tool_id": tool_id, "name": "fresh", "input_schema": {}}
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_exists"
    r = await command(stack, "RegisterTool", {"name": "fresh", "input_schema": {}})
    assert r.status_code == 200, r.text
