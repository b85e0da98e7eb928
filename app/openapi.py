"""`GET /v1/schema` (JSON Schema of every command and event) and `GET /openapi.json`,
both generated from the same msgspec types the server decodes with.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from app.system import System
from core.catalog import Catalog
from core.messages import Envelope
from projections.pagination import MAX_LIMIT
from projections.projection import Query

REF = "#/components/schemas/{name}"


def _components(catalog: Catalog) -> tuple[dict[str, Any], dict[str, Any]]:
    types: list[Any] = [t.cls for t in catalog.commands.values()]
    types += [t.cls for t in catalog.events.values()]
    types.append(Envelope)
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    return dict(zip([t.__name__ for t in types], refs, strict=True)), components


@cache
def schema_document(catalog: Catalog) -> dict[str, Any]:
    refs, components = _components(catalog)
    return {
        "commands": {
            name: {
                "context": t.context.name,
                "aggregate": t.context.aggregate_field,
                "payload": refs[name],
            }
            for name, t in catalog.commands.items()
        },
        "events": {
            name: {
                "context": t.context.name,
                "schema_version": t.cls.schema_version,
                "payload": refs[name],
            }
            for name, t in catalog.events.items()
        },
        "envelope": refs["Envelope"],
        "components": {"schemas": components},
    }


ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "fields": {"type": "array", "items": {"type": "object"}},
            },
            "required": ["code", "message"],
        }
    },
    "required": ["error"],
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "bad request",
        401: "missing or bad token",
        403: "role not allowed",
        404: "not found",
        409: "rejected by a domain rule",
        413: "body over the limit",
        422: "payload breaks the schema",
        429: "over a rate limit (of the tenant or of the connection); see `Retry-After`",
        503: "Redis or Postgres unavailable; retry",
        504: "read model still behind `after`",
    }
    answers = {str(c): _json({"$ref": "#/components/schemas/Error"}, text[c]) for c in codes}
    if "429" in answers:
        seconds = {"type": "integer", "minimum": 1}
        answers["429"]["headers"] = {"Retry-After": {"required": True, "schema": seconds}}
    return answers


def _pages(query: Query) -> bool:
    """Whether a query answers pages (`limit`, `cursor`): its function calls a
    `Keyset`'s `page`. The others ignore both, so documenting them there would be
    wrong (a fuzzer finds `?limit=501` accepted)."""
    return "page" in query.run.__code__.co_names


@cache
def openapi(system: System) -> dict[str, Any]:
    refs, components = _components(system.catalog)
    components["Error"] = ERROR
    auth: list[dict[str, list[str]]] = [{"bearer": []}]
    paths: dict[str, Any] = {}
    for name, t in system.catalog.commands.items():
        paths[f"/v1/commands/{name}"] = {
            "post": {
                "operationId": name,
                "tags": [t.context.name],
                "security": auth,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
                    },
                    {
                        "name": "X-Correlation-ID",
                        "in": "header",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
                    },
                    {"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": refs[name]}},
                },
                "responses": {
                    "202": _json({"type": "object"}, "accepted, pending"),
                    "200": _json({"type": "object"}, "processed (with wait)"),
                    **_errors(400, 401, 403, 404, 409, 413, 422, 429, 503),
                },
            }
        }
    paths["/v1/commands/{command_id}"] = {
        "get": {
            "operationId": "GetCommandStatus",
            "security": auth,
            "parameters": [
                {"name": "command_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": _json({"type": "object"}, "the command's status"),
                **_errors(401, 404, 429, 503),
            },
        }
    }
    for projection in system.projections:
        for query in projection.queries:
            params = [
                {
                    "name": p.strip("{}"),
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                }
                for p in query.path.split("/")
                if p.startswith("{")
            ]
            params.append({"name": "after", "in": "query", "schema": {"type": "string"}})
            if _pages(query):
                params += [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ]
            paths[query.path] = {
                "get": {
                    "operationId": query.name,
                    "tags": [projection.name],
                    "security": auth,
                    "parameters": params,
                    "responses": {
                        "200": _json({"type": "object"}, query.name),
                        **_errors(400, 401, 404, 429, 503, 504),
                    },
                }
            }
    paths["/v1/events/stream"] = {
        "get": {
            "operationId": "StreamEvents",
            "security": auth,
            "parameters": [
                {"name": "topic", "in": "query", "required": True, "schema": {"type": "string"}},
                {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
                {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {"description": "Server-Sent Events", "content": {"text/event-stream": {}}},
                **_errors(400, 401),
            },
        }
    }
    for path, text in (
        ("/healthz", "process alive"),
        ("/readyz", "Redis and Postgres reachable"),
        ("/v1/schema", "JSON Schema of every command and event"),
    ):
        paths[path] = {"get": {"responses": {"200": {"description": text}, **_errors(503)}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Eddy", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
