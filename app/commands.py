"""Command submission over HTTP: `POST /v1/commands/{type}` and `GET /v1/commands/{id}`.

Order of checks, so each failure gets its precise status: the connection's rate
(429), the token (401), the tenant's rate (429, `app/limits.py`), `?wait=` (400),
then the pipeline every transport shares (`app/submission.py`): the command type
(404), the roles (403), the body size (413), JSON (400), the schema (422), the
ids (400), then Redis (503). Only then is anything written.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from app.http import json_response, read_body, wait_seconds
from app.limits import authenticate_within_limits
from app.submission import accept
from app.webprocess import WebProcess
from core.errors import NotFound
from streams.bus import FINAL, CommandStatus


async def submit(request: Request) -> Response:
    web: WebProcess = request.app.state.web
    settings = web.settings
    principal = await authenticate_within_limits(request, "commands")
    wait = wait_seconds(request, settings.max_wait_s)
    accepted = await accept(
        web,
        principal,
        request.path_params["type"],
        lambda: read_body(request, settings.max_body_bytes),
        command_id=_header(request, "idempotency-key"),
        correlation_id=_header(request, "x-correlation-id"),
    )
    ids = accepted.ids()
    if wait > 0 or not accepted.new:
        status = await web.bus.wait(principal.tenant, accepted.command_id, wait)
        if status is not None and status.status in FINAL:
            return await outcome(web, status, ids)
    return json_response({"command_id": accepted.command_id, "status": "pending", **ids}, 202)


def _header(request: Request, name: str) -> tuple[str, str] | None:
    value = request.headers.get(name)
    return None if value is None else (value, name)


async def outcome(web: WebProcess, status: CommandStatus, ids: dict[str, str]) -> Response:
    """200 with the events of a processed command, 409 with the error of a failed one."""
    if status.status == "failed":
        return json_response(
            {"command_id": status.command_id, "status": "failed", "error": status.error, **ids}, 409
        )
    envelopes = await web.bus.events_of(status)
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
    web: WebProcess = request.app.state.web
    principal = await authenticate_within_limits(request, "queries")
    command_id = request.path_params["command_id"]
    found = await web.bus.status(principal.tenant, command_id)
    if found is None:
        raise NotFound(f"no command {command_id!r}")
    return json_response(found.public())
