"""Runtime config over HTTP: flags, settings, reset, history and the flag lists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest

from app.contexts.runtime_config import (
    DEFAULTS,
    ResetRuntimeConfig,
    SetRuntimeFlag,
    decide,
    evolve,
)
from app.readmodels import runtime_config
from app.registry import SYSTEM
from core.messages import Envelope, Issued, Metadata
from projections.pagination import QueryArgs
from tests.stack import Stack

ISSUED = Issued(
    command_id="c", tenant_id="tenant-a", actor="alice", roles=(), now=datetime.now(UTC)
)


async def command(
    stack: Stack, type_name: str, payload: dict[str, Any], **headers: str
) -> httpx.Response:
    r = await stack.client.post(
        f"/v1/commands/{type_name}?wait=5", json=payload, headers=headers or stack.auth()
    )
    assert r.status_code in (200, 409), r.text
    return r


async def walk(stack: Stack, path: str, position: str, limit: int = 2) -> list[list[Any]]:
    """Every page of a list, in order."""
    pages, cursor = [], None
    while True:
        params = {"limit": limit, "after": position, **({"cursor": cursor} if cursor else {})}
        r = await stack.client.get(path, params=params, headers=stack.auth())
        assert r.status_code == 200, r.text
        pages.append(r.json()["items"])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return pages


async def test_flags_settings_and_reset_are_kept_as_history(stack) -> None:
    c, auth = stack.client, stack.auth()
    chat = DEFAULTS["chat"]
    r = await command(
        stack, "SetRuntimeFlag", {"module": "chat", "flag": "moderation", "enabled": True}
    )
    assert r.status_code == 200 and r.json()["module"] == "chat"
    (event,) = r.json()["events"]
    assert event["type"] == "RuntimeFlagUpdated" and event["aggregate_version"] == 1
    assert event["payload"]["previous"] is False and event["payload"]["enabled"] is True

    r = await c.get("/v1/runtime-config/chat", params={"after": r.json()["position"]}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["module"] == "chat" and body["version"] == 1 and body["updated_by"] == "alice"
    assert body["settings"] == dict(chat.settings)
    assert body["flags"] == {**chat.flags, "moderation": True}

    bob = {"Authorization": f"Bearer {stack.token(sub='bob', roles=('user',))}"}
    r = await command(
        stack,
        "UpdateRuntimeConfig",
        {"module": "chat", "settings": {"model": "big", "x": [1]}},
        **bob,
    )
    assert r.json()["events"][0]["payload"]["previous_settings"] == dict(chat.settings)
    r = await c.get("/v1/runtime-config/chat", params={"after": r.json()["position"]}, headers=auth)
    assert r.json()["settings"] == {"model": "big", "x": [1]}
    assert r.json()["version"] == 2 and r.json()["updated_by"] == "bob"
    assert r.json()["flags"]["moderation"] is True

    again = await command(
        stack, "UpdateRuntimeConfig", {"module": "chat", "settings": {"x": [1], "model": "big"}}
    )
    assert again.status_code == 200 and again.json()["events"] == []

    r = await command(stack, "ResetRuntimeConfig", {"module": "chat"})
    assert r.json()["events"][0]["aggregate_version"] == 3
    position = r.json()["position"]
    r = await c.get("/v1/runtime-config/chat", params={"after": position}, headers=auth)
    assert r.json()["settings"] == dict(chat.settings) and r.json()["flags"] == dict(chat.flags)
    assert r.json()["version"] == 3

    pages = await walk(stack, "/v1/runtime-config/chat/history", position)
    assert [len(page) for page in pages] == [2, 1]
    history = [entry for page in pages for entry in page]
    assert [e["version"] for e in history] == [1, 2, 3]
    assert [e["type"] for e in history] == [
        "RuntimeFlagUpdated",
        "RuntimeConfigUpdated",
        "RuntimeConfigReset",
    ]
    assert [e["actor"] for e in history] == ["alice", "bob", "alice"]
    assert history[0]["change"]["flags"]["changed"] == ["moderation"]
    assert history[1]["settings"] == {"model": "big", "x": [1]}
    assert history[1]["change"]["settings"] == {
        "added": ["x"],
        "removed": sorted(set(chat.settings) - {"model"}),
        "changed": ["model"],
    }
    assert history[2]["flags"] == dict(chat.flags)
    assert history[2]["change"]["flags"]["changed"] == ["moderation"]
    assert all(e["at"] for e in history)


async def test_flag_lists_for_one_module_and_for_all(stack) -> None:
    c, auth = stack.client, stack.auth()
    for module, flag, enabled in [
        ("plugins", "zeta", True),
        ("plugins", "alpha", False),
        ("plugins", "mid", True),
        ("billing", "invoices", True),
    ]:
        r = await command(
            stack, "SetRuntimeFlag", {"module": module, "flag": flag, "enabled": enabled}
        )
        assert r.status_code == 200
    other = stack.auth(tenant="tenant-b")
    r = await command(
        stack, "SetRuntimeFlag", {"module": "plugins", "flag": "other", "enabled": True}, **other
    )
    position = r.json()["position"]

    pages = await walk(stack, "/v1/runtime-config/plugins/flags", position)
    assert [[(i["module"], i["flag"], i["enabled"]) for i in page] for page in pages] == [
        [("plugins", "alpha", False), ("plugins", "mid", True)],
        [("plugins", "zeta", True)],
    ]
    pages = await walk(stack, "/v1/runtime-flags", position, limit=3)
    assert [[(i["module"], i["flag"]) for i in page] for page in pages] == [
        [("billing", "invoices"), ("plugins", "alpha"), ("plugins", "mid")],
        [("plugins", "zeta")],
    ]
    r = await c.get("/v1/runtime-flags", params={"after": position}, headers=other)
    assert [(i["module"], i["flag"], i["enabled"]) for i in r.json()["items"]] == [
        ("plugins", "other", True)
    ]
    assert r.json()["next_cursor"] is None

    r = await command(stack, "ResetRuntimeConfig", {"module": "plugins"})
    r = await c.get(
        "/v1/runtime-config/plugins/flags", params={"after": r.json()["position"]}, headers=auth
    )
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}
    assert (await c.get("/v1/runtime-config/plugins", headers=auth)).json()["flags"] == {}

    r = await c.get("/v1/runtime-flags", params={"cursor": "@@"}, headers=auth)
    assert r.status_code == 400
    r = await c.get("/v1/runtime-config/billing/history", params={"limit": 0}, headers=auth)
    assert r.status_code == 400


async def test_a_flag_set_to_its_value_again_changes_nothing(stack) -> None:
    payload = {"module": "search", "flag": "beta", "enabled": True}
    first = await command(stack, "SetRuntimeFlag", payload)
    again = await command(stack, "SetRuntimeFlag", payload)
    assert len(first.json()["events"]) == 1 and again.json()["events"] == []
    r = await stack.client.get(
        "/v1/runtime-config/search/history",
        params={"after": first.json()["position"]},
        headers=stack.auth(),
    )
    assert [e["version"] for e in r.json()["items"]] == [1]


async def test_a_module_never_configured_is_404_and_cannot_be_reset(stack) -> None:
    c, auth = stack.client, stack.auth()
    for path in (
        "/v1/runtime-config/nope",
        "/v1/runtime-config/nope/flags",
        "/v1/runtime-config/nope/history",
        "/v1/runtime-config/chat",
    ):
        r = await c.get(path, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    r = await command(stack, "ResetRuntimeConfig", {"module": "chat"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_found"
    r = await c.get("/v1/runtime-flags", headers=auth)
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("type_name", "payload", "path"),
    [
        ("SetRuntimeFlag", {"module": "m", "flag": "f", "enabled": "yes"}, "$.enabled"),
        ("SetRuntimeFlag", {"module": "m", "flag": "f", "enabled": True, "x": 1}, "$.x"),
        ("SetRuntimeFlag", {"module": "m", "flag": "", "enabled": True}, "$.flag"),
        ("SetRuntimeFlag", {"module": "a/b", "flag": "f", "enabled": True}, "$.module"),
        ("UpdateRuntimeConfig", {"module": "m", "settings": [1]}, "$.settings"),
        ("ResetRuntimeConfig", {}, "$.module"),
    ],
)
async def test_bad_payloads_are_422(stack, type_name, payload, path) -> None:
    r = await stack.client.post(f"/v1/commands/{type_name}", json=payload, headers=stack.auth())
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid"
    assert r.json()["error"]["fields"][0]["path"] == path


async def test_the_routes_are_in_the_openapi_document(stack) -> None:
    spec = (await stack.client.get("/openapi.json")).json()
    paths = spec["paths"]
    operations = {
        path: paths[path]["get"].get("operationId") for path in paths if "get" in paths[path]
    }
    assert operations["/v1/runtime-config/{module}"] == "GetRuntimeConfig"
    assert operations["/v1/runtime-config/{module}/flags"] == "ListRuntimeFlags"
    assert operations["/v1/runtime-flags"] == "ListAllRuntimeFlags"
    assert operations["/v1/runtime-config/{module}/history"] == "GetConfigHistory"
    assert "SetRuntimeFlag" in (await stack.client.get("/v1/schema")).json()["commands"]


def envelope(version: int, event: Any, actor: str = "alice") -> Envelope:
    return Envelope(
        id=f"e{version}",
        type=type(event).__name__,
        schema_version=1,
        context="runtime_config",
        aggregate_id="plugins",
        aggregate_version=version,
        tenant_id="tenant-a",
        occurred_at=datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=version),
        payload=msgspec.Raw(msgspec.json.encode(event)),
        metadata=Metadata(command_id="c", correlation_id="c", causation_id="c", actor=actor),
    )


async def test_an_older_event_applied_again_changes_nothing(pool) -> None:
    state, envelopes = None, []
    for version, command in enumerate(
        [
            SetRuntimeFlag(module="plugins", flag="a", enabled=True),
            SetRuntimeFlag(module="plugins", flag="b", enabled=True),
            ResetRuntimeConfig(module="plugins"),
            SetRuntimeFlag(module="plugins", flag="c", enabled=False),
        ],
        start=1,
    ):
        (event,) = decide(state, command, ISSUED)
        state = evolve(state, event)
        envelopes.append(envelope(version, event))
    args = QueryArgs(tenant_id="tenant-a", path={"module": "plugins"}, params={})
    async with pool.acquire() as conn:
        await runtime_config.PROJECTION.project(conn, envelopes, SYSTEM.catalog)
        before = (
            await runtime_config.get_config(conn, args),
            await runtime_config.list_module_flags(conn, args),
        )
        await runtime_config.PROJECTION.project(
            conn, [envelopes[1], envelopes[0], envelopes[2]], SYSTEM.catalog
        )
        after = (
            await runtime_config.get_config(conn, args),
            await runtime_config.list_module_flags(conn, args),
        )
        history = await runtime_config.get_history(conn, args)
    assert before == after
    assert after[0] is not None and after[0]["version"] == 4 and after[0]["flags"] == {"c": False}
    assert after[1] is not None and [i["flag"] for i in after[1]["items"]] == ["c"]
    assert history is not None and [e["version"] for e in history["items"]] == [1, 2, 3, 4]
