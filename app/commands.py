"""Command submission over HTTP: `POST /v1/commands/{type}` and `GET /v1/commands/{id}`.

Order of checks, so each failure gets its precise status: the connection's rate
(429), the token (401), the tenant's rate (429, `app/limits.py`), the command type
(404), the roles (403), the body size (413), JSON (400), the schema (422), then
Redis (503). Only then is anything written.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app.auth import Principal
from app.contexts import COMMANDS, CommandType
from app.errors import BadRequest, Invalid, Malformed, NotFound, TooLarge, UnknownCommand
from app.limits import admit
from app.messages import CommandRecord, derived_id, new_id, utcnow
from app.services import Services, json_response
from streams.bus import FINAL, CommandStatus

T = TypeVar("T")

MAX_ID_LENGTH = 128
MAX_DEPTH = 32
_ERROR_PATH = re.compile(r"^(?P<message>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD_NAME = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]*)`")
_encoder = msgspec.json.Encoder()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` without reading it all."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise TooLarge(f"body is {length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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


def header_id(request: Request, name: str) -> str | None:
    value = request.headers.get(name)
    return None if value is None else check_id(value, name)


def check_id(value: str, name: str) -> str:
    """A client's id (`Idempotency-Key`, `X-Correlation-ID`, a WebSocket command's
    `id`): 1 to `MAX_ID_LENGTH` characters and no NUL, which would reach Postgres
    in every event's metadata (and stop the projections there)."""
    if not 0 < len(value) <= MAX_ID_LENGTH:
        raise BadRequest(f"{name} must be 1 to {MAX_ID_LENGTH} characters")
    if "\x00" in value:
        raise BadRequest(f"{name} holds a NUL character (\\u0000)")
    return value


def wait_seconds(request: Request, limit: float) -> float:
    raw = request.query_params.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        raise BadRequest("wait must be a number of seconds") from None
    if not 0 <= wait <= limit:
        raise BadRequest(f"wait must be between 0 and {limit} seconds")
    return wait


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


async def submit(request: Request) -> Response:
    services: Services = request.app.state.services
    settings = services.settings
    principal = await admit(request, "commands")
    name = request.path_params["type"]
    command_type = COMMANDS.get(name)
    if command_type is None:
        raise UnknownCommand(f"unknown command type {name!r}", known=sorted(COMMANDS))
    principal.require(command_type.context.allowed_roles(name))
    body = await read_body(request, settings.max_body_bytes)
    command = parse_command(command_type, body)
    command_id = header_id(request, "idempotency-key") or new_id()
    correlation_id = header_id(request, "x-correlation-id")
    wait = wait_seconds(request, settings.max_wait_s)
    record = build_record(command_type, command, principal, command_id, correlation_id)
    shard = services.keys.shard_of(command_type.context.name, principal.tenant, record.aggregate_id)
    accepted = await services.bus.submit(record, shard)
    services.metrics.commands.labels(name, "accepted" if accepted.new else "repeated").inc()
    ids = {
        "aggregate_id": accepted.aggregate_id,
        command_type.context.aggregate_field: accepted.aggregate_id,
    }
    if wait > 0 or not accepted.new:
        status = await services.bus.wait(principal.tenant, command_id, wait)
        if status is not None and status.status in FINAL:
            return await outcome(services, status, ids)
    return json_response({"command_id": command_id, "status": "pending", **ids}, 202)


async def outcome(services: Services, status: CommandStatus, ids: dict[str, str]) -> Response:
    """200 with the events of a processed command, 409 with the error of a failed one."""
    if status.status == "failed":
        return json_response(
            {"command_id": status.command_id, "status": "failed", "error": status.error, **ids}, 409
        )
    envelopes = await services.bus.events_of(status)
    return json_response(
        {
            "command_id": status.command_id,
            "status": "processed",
            "events": envelopes,
            "position": status.position,
            **ids,
        },
        200,
    )


async def status(request: Request) -> Response:
    services: Services = request.app.state.services
    principal = await admit(request, "queries")
    command_id = request.path_params["command_id"]
    found = await services.bus.status(principal.tenant, command_id)
    if found is None:
        raise NotFound(f"no command {command_id!r}")
    answer: dict[str, Any] = {
        "command_id": found.command_id,
        "type": found.type,
        "status": found.status,
        "aggregate_id": found.aggregate_id,
    }
    for name in ("error", "events", "position"):
        if getattr(found, name) is not None:
            answer[name] = getattr(found, name)
    return json_response(answer)
