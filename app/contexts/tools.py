"""Tools: register, update the definition, deactivate.

Pure domain code: no I/O, nothing from `streams` or `projections`.

A tool's `input_schema` is checked as a JSON Schema when the payload is decoded
(`__post_init__`), so a bad one is refused with 422 before anything is accepted.
The check reads the schema only: `check_schema` validates it against its draft's
metaschema (bundled with `jsonschema`) and never follows the schema's own `$ref`s.
The error names the field by the same ` - at `$.path`` suffix msgspec uses, which
`app.commands.parse_command` turns into the 422's field path.

A name is unique in the tenant: the worker reserves it before deciding (the
context's `unique` hook). A deactivated tool keeps its name.
"""

from __future__ import annotations

from typing import Annotated, Any, NoReturn

import msgspec
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import create, validator_for

from core.errors import Rejected
from core.messages import Command, Context, Event, Issued, State

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
Description = Annotated[str, msgspec.Meta(max_length=4000)]
MAX_MESSAGE = 300

_UNKNOWN_DRAFT: type[Validator] = create(meta_schema={})
"""What `validator_for` answers for a `$schema` it does not know (never registered)."""


def check_input_schema(schema: dict[str, Any], field: str = "input_schema") -> None:
    """Raise ValueError unless `schema` is a valid JSON Schema of a draft we know."""
    if "$schema" not in schema:
        validator = validator_for(schema)  # the latest draft
    elif not isinstance(schema["$schema"], str):
        _invalid(f"$.{field}.$schema", "$schema must be a string naming a JSON Schema draft")
    else:
        validator = validator_for(schema, default=_UNKNOWN_DRAFT)
        if validator is _UNKNOWN_DRAFT:
            _invalid(f"$.{field}.$schema", f"{schema['$schema']!r} is no known JSON Schema draft")
    try:
        validator.check_schema(schema)
    except SchemaError as exc:
        _invalid(f"$.{field}{exc.json_path[1:]}", exc.message)


def _invalid(path: str, message: str) -> NoReturn:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    raise ValueError(f"not a valid JSON Schema: {message} - at `{path.replace('`', '')}`")


# -- commands ---------------------------------------------------------------


class RegisterTool(Command, frozen=True, kw_only=True):
    tool_id: Id | None = None
    name: Name
    description: Description = ""
    input_schema: dict[str, Any]
    runtime_hints: dict[str, Any] = {}
    guardrails: dict[str, Any] = {}

    def __post_init__(self) -> None:
        check_input_schema(self.input_schema)


class UpdateToolDefinition(Command, frozen=True, kw_only=True):
    """Replace the fields given; a field left out (or null) keeps its value."""

    tool_id: Id
    description: Description | None = None
    input_schema: dict[str, Any] | None = None
    runtime_hints: dict[str, Any] | None = None
    guardrails: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.input_schema is not None:
            check_input_schema(self.input_schema)


class DeactivateTool(Command, frozen=True, kw_only=True):
    tool_id: Id


# -- events -----------------------------------------------------------------


class ToolDefinition(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    input_schema: dict[str, Any]
    runtime_hints: dict[str, Any]
    guardrails: dict[str, Any]


class ToolRegistered(Event, frozen=True, kw_only=True):
    tool_id: str
    name: str
    description: str
    input_schema: dict[str, Any]
    runtime_hints: dict[str, Any]
    guardrails: dict[str, Any]


class ToolUpdated(Event, frozen=True, kw_only=True):
    tool_id: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    runtime_hints: dict[str, Any] | None = None
    guardrails: dict[str, Any] | None = None
    """The fields above are the ones the update set (null: unchanged)."""
    definition: ToolDefinition
    """The whole definition after the change."""


class ToolDeactivated(Event, frozen=True, kw_only=True):
    tool_id: str


# -- state and rules --------------------------------------------------------


class Tool(State, frozen=True, kw_only=True):
    active: bool
    definition: ToolDefinition


UPDATABLE = ("description", "input_schema", "runtime_hints", "guardrails")


def decide(state: Tool | None, command: Command, issued: Issued) -> list[Event]:
    match command:
        case RegisterTool():
            if state is not None:
                raise Rejected("already_exists", f"tool {command.tool_id} exists")
            assert command.tool_id is not None  # filled in on submission
            return [
                ToolRegistered(
                    tool_id=command.tool_id,
                    name=command.name,
                    description=command.description,
                    input_schema=command.input_schema,
                    runtime_hints=command.runtime_hints,
                    guardrails=command.guardrails,
                )
            ]
        case UpdateToolDefinition():
            tool = _active(state, command.tool_id)
            changes = {f: getattr(command, f) for f in UPDATABLE}
            changes = {f: value for f, value in changes.items() if value is not None}
            if not changes:
                raise Rejected("empty_update", f"nothing to change: give one of {UPDATABLE}")
            definition = msgspec.structs.replace(tool.definition, **changes)
            return [ToolUpdated(tool_id=command.tool_id, definition=definition, **changes)]
        case DeactivateTool():
            _active(state, command.tool_id)
            return [ToolDeactivated(tool_id=command.tool_id)]
    raise TypeError(f"not a tools command: {type(command).__name__}")


def _active(state: Tool | None, tool_id: str) -> Tool:
    if state is None:
        raise Rejected("not_found", f"no tool {tool_id}")
    if not state.active:
        raise Rejected("deactivated", f"tool {tool_id} is deactivated")
    return state


def evolve(state: Tool | None, event: Event) -> Tool:
    match event:
        case ToolRegistered():
            return Tool(
                active=True,
                definition=ToolDefinition(
                    name=event.name,
                    description=event.description,
                    input_schema=event.input_schema,
                    runtime_hints=event.runtime_hints,
                    guardrails=event.guardrails,
                ),
            )
        case ToolUpdated():
            assert state is not None
            return msgspec.structs.replace(state, definition=event.definition)
        case ToolDeactivated():
            assert state is not None
            return msgspec.structs.replace(state, active=False)
    raise TypeError(f"not a tools event: {type(event).__name__}")


CONTEXT = Context(
    name="tools",
    aggregate_field="tool_id",
    commands=(RegisterTool, UpdateToolDefinition, DeactivateTool),
    events=(ToolRegistered, ToolUpdated, ToolDeactivated),
    state=Tool,
    decide=decide,
    evolve=evolve,
    roles={"RegisterTool": frozenset({"admin"})},
    unique=lambda command: ("name", command.name) if isinstance(command, RegisterTool) else None,
)
