"""The tools context's rules, pure: no Redis, no Postgres."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from app.contexts.tools import (
    CONTEXT,
    DeactivateTool,
    RegisterTool,
    Tool,
    ToolDeactivated,
    ToolRegistered,
    ToolUpdated,
    UpdateToolDefinition,
    decide,
    evolve,
)
from core.errors import Rejected
from core.messages import Issued

ISSUED = Issued(command_id="c1", tenant_id="t", actor="u", roles=("admin",), now=datetime.now(UTC))
SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}

register = msgspec.json.Decoder(RegisterTool)
update = msgspec.json.Decoder(UpdateToolDefinition)


def run(state: Tool | None, command: Any) -> tuple[Tool | None, list[Any]]:
    events = decide(state, command, ISSUED)
    for event in events:
        state = evolve(state, event)
    return state, events


def registered() -> Tool:
    state, _ = run(
        None,
        RegisterTool(
            tool_id="t1",
            name="web.search",
            description="search the web",
            input_schema=SCHEMA,
            runtime_hints={"timeout_s": 5},
        ),
    )
    assert state is not None
    return state


def rejected(state: Tool | None, command: Any) -> str:
    with pytest.raises(Rejected) as info:
        decide(state, command, ISSUED)
    return info.value.code


def invalid(decoder: msgspec.json.Decoder[Any], payload: dict[str, Any]) -> str:
    """The decode error's message (what becomes a 422)."""
    with pytest.raises(msgspec.ValidationError) as info:
        decoder.decode(msgspec.json.encode(payload))
    return str(info.value)


def test_register_makes_an_active_tool() -> None:
    state, events = run(None, RegisterTool(tool_id="t1", name="calc", input_schema={}))
    (event,) = events
    assert isinstance(event, ToolRegistered)
    assert (event.tool_id, event.name, event.description) == ("t1", "calc", "")
    assert event.runtime_hints == event.guardrails == {}
    assert state is not None and state.active and state.definition.name == "calc"


def test_register_twice_is_rejected() -> None:
    command = RegisterTool(tool_id="t1", name="other", input_schema={})
    assert rejected(registered(), command) == "already_exists"


@pytest.mark.parametrize(
    "schema",
    [
        {},
        SCHEMA,
        {"type": ["string", "null"], "maxLength": 10},
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"},
        {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": {"a": {}}},
        {"$ref": "https://example.invalid/never-fetched.json"},
    ],
)
def test_valid_json_schemas_are_accepted(schema: dict[str, Any]) -> None:
    command = register.decode(msgspec.json.encode({"name": "calc", "input_schema": schema}))
    assert command.input_schema == schema
    edit = update.decode(msgspec.json.encode({"tool_id": "t1", "input_schema": schema}))
    assert edit.input_schema == schema


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        ({"type": 12}, "$.input_schema.type"),
        ({"properties": {"q": {"type": "text"}}}, "$.input_schema.properties.q.type"),
        ({"required": "q"}, "$.input_schema.required"),
        ({"pattern": "("}, "$.input_schema.pattern"),
        ({"$schema": "https://example.invalid/my-draft"}, "$.input_schema.$schema"),
        ({"$schema": 7}, "$.input_schema.$schema"),
    ],
)
def test_invalid_json_schemas_are_refused_with_the_path(schema: dict[str, Any], path: str) -> None:
    for decoder, payload in [
        (register, {"name": "calc", "input_schema": schema}),
        (update, {"tool_id": "t1", "input_schema": schema}),
    ]:
        message = invalid(decoder, payload)
        assert message.startswith("not a valid JSON Schema")
        assert message.endswith(f" - at `{path}`")


def test_the_schema_must_be_an_object() -> None:
    assert invalid(register, {"name": "calc", "input_schema": [1]}).startswith("Expected `object`")
    assert invalid(register, {"name": "calc", "input_schema": True}).startswith("Expected `object`")
    assert "required field `input_schema`" in invalid(register, {"name": "calc"})


@pytest.mark.parametrize("name", ["", "a b", "tool/x", "é", "x" * 129])
def test_bad_names_are_refused(name: str) -> None:
    assert "- at `$.name`" in invalid(register, {"name": name, "input_schema": {}})


@pytest.mark.parametrize("name", ["a", "web.search", "ns:tool-1_v2", "x" * 128])
def test_good_names_are_accepted(name: str) -> None:
    assert register.decode(msgspec.json.encode({"name": name, "input_schema": {}})).name == name


def test_update_changes_the_given_fields_and_carries_the_whole_definition() -> None:
    state, events = run(
        registered(), UpdateToolDefinition(tool_id="t1", guardrails={"max_calls": 3})
    )
    (event,) = events
    assert isinstance(event, ToolUpdated)
    assert event.guardrails == {"max_calls": 3}
    assert event.description is None and event.input_schema is None
    assert event.definition.name == "web.search"
    assert event.definition.description == "search the web"
    assert event.definition.input_schema == SCHEMA
    assert event.definition.runtime_hints == {"timeout_s": 5}
    assert state is not None and state.definition == event.definition

    state, _ = run(state, UpdateToolDefinition(tool_id="t1", description="", input_schema={}))
    assert state is not None
    assert (state.definition.description, state.definition.input_schema) == ("", {})
    assert state.definition.guardrails == {"max_calls": 3}


def test_an_empty_update_is_rejected() -> None:
    assert rejected(registered(), UpdateToolDefinition(tool_id="t1")) == "empty_update"


def test_commands_on_a_missing_tool_are_rejected() -> None:
    assert rejected(None, UpdateToolDefinition(tool_id="t9", description="x")) == "not_found"
    assert rejected(None, DeactivateTool(tool_id="t9")) == "not_found"


def test_a_deactivated_tool_takes_no_update_and_no_second_deactivation() -> None:
    state, events = run(registered(), DeactivateTool(tool_id="t1"))
    assert [type(e) for e in events] == [ToolDeactivated]
    assert state is not None and not state.active
    assert state.definition.name == "web.search"
    assert rejected(state, UpdateToolDefinition(tool_id="t1", description="x")) == "deactivated"
    assert rejected(state, DeactivateTool(tool_id="t1")) == "deactivated"


def test_only_admins_register_and_the_name_is_unique() -> None:
    assert CONTEXT.allowed_roles("RegisterTool") == {"admin"}
    assert "agent" in CONTEXT.allowed_roles("UpdateToolDefinition")
    assert "agent" in CONTEXT.allowed_roles("DeactivateTool")
    command = RegisterTool(tool_id="t1", name="calc", input_schema={})
    assert CONTEXT.unique(command) == ("name", "calc")
    assert CONTEXT.unique(DeactivateTool(tool_id="t1")) is None
    assert CONTEXT.unique(UpdateToolDefinition(tool_id="t1", description="x")) is None
