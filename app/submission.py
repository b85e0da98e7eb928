"""Accepting a command: the one pipeline of `POST /v1/commands/{type}` and of a
WebSocket `command` frame.

```
type (404) ─▶ roles (403) ─▶ payload: size (413) ─▶ JSON (400) ─▶ schema (422)
   ─▶ command id, correlation id (400) ─▶ record (aggregate id derived if omitted)
   ─▶ bus.submit: its shard's stream (422 a key reused for another command, 503 Redis)
```

The transports do what comes before (HTTP: the connection's and tenant's rates
and the token; a WebSocket: the tenant's rate, and its count of pending
commands) and build their own answer from the `Acceptance`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

from app.auth import Principal
from app.webprocess import WebProcess
from core.catalog import CommandType
from core.errors import Invalid, Malformed, UnknownCommand
from core.messages import CommandRecord, check_id, derived_id, new_id, utcnow

T = TypeVar("T")

MAX_DEPTH = 32
_ERROR_PATH = re.compile(r"^(?P<message>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD_NAME = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]*)`")
_encoder = msgspec.json.Encoder()


class Acceptance(msgspec.Struct, frozen=True, kw_only=True):
    """A command accepted (or found accepted before, `new` False)."""

    command_id: str
    aggregate_id: str
    aggregate_field: str
    """The name of its aggregate's id in the command (`session_id`), answered too."""
    new: bool

    def ids(self) -> dict[str, str]:
        return {"aggregate_id": self.aggregate_id, self.aggregate_field: self.aggregate_id}


async def accept(
    web: WebProcess,
    principal: Principal,
    name: str,
    payload: bytes | Callable[[], Awaitable[bytes]],
    *,
    command_id: tuple[str, str] | None = None,
    correlation_id: tuple[str, str] | None = None,
) -> Acceptance:
    """Validate a command of type `name` from `principal` and submit it.

    `payload`: its JSON, or how to read it (after the type and roles are checked);
    `command_id`, `correlation_id`: `(value, what the client called it)`, checked
    after the payload; a new command id when None."""
    command_type = web.system.catalog.commands.get(name)
    if command_type is None:
        raise UnknownCommand(
            f"unknown command type {name!r}", known=sorted(web.system.catalog.commands)
        )
    principal.require(command_type.context.allowed_roles(name))
    body = payload if isinstance(payload, bytes) else await payload()
    command = parse_command(command_type, body)
    chosen = new_id() if command_id is None else check_id(*command_id)
    correlation = None if correlation_id is None else check_id(*correlation_id)
    record = build_record(command_type, command, principal, chosen, correlation)
    shard = web.keys.shard_of(command_type.context.name, principal.tenant, record.aggregate_id)
    accepted = await web.bus.submit(record, shard)
    web.metrics.commands.labels(name, "accepted" if accepted.new else "repeated").inc()
    return Acceptance(
        command_id=chosen,
        aggregate_id=accepted.aggregate_id,
        aggregate_field=command_type.context.aggregate_field,
        new=accepted.new,
    )


def decode(decoder: msgspec.json.Decoder[T], raw: bytes | str, subject: str, name: str) -> T:
    """Decode JSON with `decoder`, or raise what a client is told: `Malformed` (400:
    not JSON, not an object, nested too deeply) or `Invalid` (422, with the field's
    path). `subject` names what was sent ("body"), `name` what it should be."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        match = _ERROR_PATH.match(str(exc))
        assert match is not None
        message, path = match["message"], match["path"] or "$"
        if path == "$" and message.startswith("Expected `object`"):
            raise Malformed(f"{subject} must be a JSON object: {exc}") from None
        named = _FIELD_NAME.search(message)
        if named:  # a missing or unknown field: point at the field itself
            path = f"{path}.{named[1]}"
        raise Invalid(f"{name}: {exc}", fields=[{"path": path, "message": message}]) from None
    except msgspec.DecodeError as exc:
        raise Malformed(f"{subject} is not JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # a JSON string holding bytes that are not UTF-8
        raise Malformed(f"{subject} is not UTF-8: {exc}") from None
    except RecursionError:
        raise Malformed(f"JSON nested deeper than {MAX_DEPTH} levels") from None


def parse_command(command_type: CommandType, body: bytes) -> Any:
    """Decode and validate a payload: `Malformed` (400) or `Invalid` (422, with the field path)."""
    command = decode(command_type.decoder, body, "body", command_type.name)
    check_values(command)
    return command


def check_values(command: Any) -> None:
    """What the schema cannot say, checked before anything is accepted, because
    every later step (the worker, Postgres, clients) must handle what was accepted:
    free-form values (`metadata`, `attributes`, …) nest at most `MAX_DEPTH` levels,
    no string holds a NUL character (Postgres text and jsonb refuse it), and every
    time can be expressed in UTC (year 1 with a +14:00 offset cannot)."""
    for name in command.__struct_fields__:
        stack = [(getattr(command, name), 1)]
        while stack:
            value, depth = stack.pop()
            if isinstance(value, str):
                if "\x00" in value:
                    _refuse(name, "a string holds a NUL character (\\u0000)")
            elif isinstance(value, datetime):
                try:
                    value.astimezone(UTC)
                except OverflowError:
                    _refuse(name, f"{value.isoformat()} is out of range in UTC")
            elif isinstance(value, dict | list | msgspec.Struct):
                if depth > MAX_DEPTH:
                    _refuse(name, f"nested deeper than {MAX_DEPTH} levels")
                if isinstance(value, dict):
                    stack += [(k, depth) for k in value]
                    stack += [(v, depth + 1) for v in value.values()]
                elif isinstance(value, list):
                    stack += [(v, depth + 1) for v in value]
                else:
                    stack += [(getattr(value, f), depth + 1) for f in value.__struct_fields__]


def _refuse(name: str, message: str) -> None:
    raise Invalid(f"{name}: {message}", fields=[{"path": f"$.{name}", "message": message}])


def build_record(
    command_type: CommandType,
    command: Any,
    principal: Principal,
    command_id: str,
    correlation_id: str | None,
) -> CommandRecord:
    field = command_type.context.aggregate_field
    aggregate_id = getattr(command, field)
    if aggregate_id is None:
        aggregate_id = derived_id(principal.tenant, command_id)
        command = msgspec.structs.replace(command, **{field: aggregate_id})
    return CommandRecord(
        id=command_id,
        type=command_type.name,
        tenant_id=principal.tenant,
        actor=principal.sub,
        roles=list(principal.roles),
        correlation_id=correlation_id or command_id,
        aggregate_id=aggregate_id,
        accepted_at=utcnow(),
        payload=msgspec.Raw(_encoder.encode(command)),
    )
