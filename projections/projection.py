"""What a projection module declares: the contexts it reads, how it applies a
batch of events inside the projector's transaction, and the queries it answers.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from app.errors import BadRequest
from app.messages import Envelope
from projections.db import Connection

MAX_LIMIT = 500
DEFAULT_LIMIT = 50


class QueryArgs(msgspec.Struct, frozen=True, kw_only=True):
    """What a query function gets: the tenant, the path parameters and the query string."""

    tenant_id: str
    path: Mapping[str, str]
    params: Mapping[str, str]

    def limit(self) -> int:
        raw = self.params.get("limit", str(DEFAULT_LIMIT))
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        return int(raw)

    def cursor(self) -> list[Any] | None:
        raw = self.params.get("cursor")
        return None if not raw else decode_cursor(raw)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.params.get(name, default)
        if value not in choices:
            raise BadRequest(f"{name} must be one of {', '.join(choices)}")
        return value


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(values)).decode().rstrip("=")


def decode_cursor(raw: str) -> list[Any]:
    try:
        values = msgspec.json.decode(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise BadRequest("cursor is not one this API issued") from None
    if not isinstance(values, list):
        raise BadRequest("cursor is not one this API issued")
    return values


class Statements:
    """SQL statements of one batch, run in order; runs of the same statement go
    to Postgres as one `executemany` (one round trip instead of one each)."""

    def __init__(self) -> None:
        self._runs: list[tuple[str, list[tuple[Any, ...]]]] = []

    def add(self, sql: str, *args: Any) -> None:
        if self._runs and self._runs[-1][0] == sql:
            self._runs[-1][1].append(args)
        else:
            self._runs.append((sql, [args]))

    async def execute(self, conn: Connection) -> None:
        for sql, rows in self._runs:
            if len(rows) == 1:
                await conn.execute(sql, *rows[0])
            else:
                await conn.executemany(sql, rows)


Answer = dict[str, Any] | None
"""A query's answer; None means 404."""


@dataclass(frozen=True)
class Query:
    name: str
    """The blueprint's name (`GetChatSessionById`)."""
    path: str
    """The HTTP route (`/v1/chat-sessions/{session_id}`)."""
    run: Callable[[Connection, QueryArgs], Awaitable[Answer]]


@dataclass(frozen=True)
class Projection:
    name: str
    contexts: tuple[str, ...]
    apply: Callable[[Connection, list[Envelope]], Awaitable[None]]
    queries: tuple[Query, ...] = ()
