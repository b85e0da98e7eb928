"""What a projection module declares: the contexts it reads, its tables, how it
applies a batch of events inside the projector's transaction, and the queries it
answers.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import msgspec

from app.errors import BadRequest
from app.messages import Envelope, Event
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
        # isdigit() alone takes "²", which int() refuses
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
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
        raise _not_ours() from None
    if not isinstance(values, list):
        raise _not_ours()
    return values


def _not_ours() -> BadRequest:
    return BadRequest("cursor is not one this API issued")


@dataclass(frozen=True)
class Keyset:
    """Keyset pagination: rows in the order of `columns` (unique together), all
    ascending or all descending. A page's cursor holds its last row's values of
    `columns`; the next page starts after them, so rows written in between never
    shift or repeat a page."""

    columns: tuple[str, ...]
    types: tuple[type, ...]
    """Of each column's cursor value: `str`, `int` (0 ≤ n < 2³¹) or `datetime`."""
    descending: bool = False

    async def page(
        self,
        conn: Connection,
        args: QueryArgs,
        select: str,
        equal: Mapping[str, Any] | None = None,
        item: Callable[[Any], dict[str, Any]] = dict,
    ) -> dict[str, Any]:
        """`{"items", "next_cursor"}`: one page of the tenant's rows of `select`
        (`SELECT … FROM …`) whose columns equal the values of `equal` (a None value
        is no condition)."""
        limit = args.limit()
        where: list[str] = ["tenant_id = $1"]
        values: list[Any] = [args.tenant_id]
        for column, value in (equal or {}).items():
            if value is not None:
                values.append(value)
                where.append(f"{column} = ${len(values)}")
        cursor = args.cursor()
        if cursor is not None:
            after = self._after(cursor)
            marks = ", ".join(f"${len(values) + 1 + i}" for i in range(len(after)))
            values += after
            compare = "<" if self.descending else ">"
            where.append(f"({', '.join(self.columns)}) {compare} ({marks})")
        values.append(limit + 1)
        direction = " DESC" if self.descending else ""
        rows = await conn.fetch(
            f"{select} WHERE {' AND '.join(where)}"
            f" ORDER BY {', '.join(c + direction for c in self.columns)} LIMIT ${len(values)}",
            *values,
        )
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor([_plain(last[column]) for column in self.columns])
        return {"items": [item(row) for row in rows[:limit]], "next_cursor": next_cursor}

    def check(self, args: QueryArgs) -> None:
        """Refuse a bad `limit` or `cursor` (400) before anything is looked up."""
        args.limit()
        if (cursor := args.cursor()) is not None:
            self._after(cursor)

    def _after(self, cursor: list[Any]) -> list[Any]:
        if len(cursor) != len(self.types):
            raise _not_ours()
        values: list[Any] = []
        for value, kind in zip(cursor, self.types, strict=True):
            if kind is datetime and isinstance(value, str):
                # what Eddy issues has an offset; Postgres must be able to take it in UTC
                try:
                    moment = datetime.fromisoformat(value)
                    if moment.tzinfo is None:
                        raise ValueError(value)
                    values.append(moment.astimezone(UTC))
                except (ValueError, OverflowError):
                    raise _not_ours() from None
            elif (kind is int and type(value) is int and 0 <= value < 2**31) or (
                kind is str and isinstance(value, str) and "\x00" not in value
            ):
                values.append(value)
            else:
                raise _not_ours()
        return values


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


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


async def one(conn: Connection, select: str, id_column: str, args: QueryArgs) -> Answer:
    """The tenant's row of `select` (`SELECT … FROM …`) whose `id_column` equals the
    path parameter of that name, as a dict; None (404) if there is none."""
    row = await conn.fetchrow(
        f"{select} WHERE tenant_id = $1 AND {id_column} = $2", args.tenant_id, args.path[id_column]
    )
    return None if row is None else dict(row)


@dataclass(frozen=True)
class Invalidation:
    """Events that change a cached query's answers (see `projections/cache.py`)."""

    events: tuple[type[Event], ...]
    scopes: Callable[[Envelope], Sequence[str] | None] | None = None
    """The scopes (`Cache.scope`) whose answers an event changes. Without it, or
    when it returns None, every answer of the event's tenant."""


@dataclass(frozen=True)
class Cache:
    """A query's answers may be kept in Redis for `ttl_s` seconds; one is never
    served once an event of `invalidated_by` that changes it has been projected.

    `invalidated_by` must name every event that changes the rows the query reads
    (in any projection it reads); `scope` (None: the whole tenant) narrows which
    answers an `Invalidation` with `scopes` drops."""

    ttl_s: float
    invalidated_by: tuple[Invalidation, ...]
    scope: Callable[[QueryArgs], str] | None = None


@dataclass(frozen=True)
class Query:
    name: str
    """The blueprint's name (`GetChatSessionById`)."""
    path: str
    """The HTTP route (`/v1/chat-sessions/{session_id}`)."""
    run: Callable[[Connection, QueryArgs], Awaitable[Answer]]
    also_from: tuple[str, ...] = ()
    """Other projections whose tables the query reads: `?after=` waits for them too."""
    view: str | None = None
    """The materialized view it reads (`projections/views.py`): `?after=` waits until
    the view reflects the position, not only its projections."""
    cache: Cache | None = None
    """How its answers are cached (`projections/cache.py`); None: never."""


def tables(name: str) -> str:
    """The DDL of `projections/tables/<name>.sql`: a projection's tables and indexes."""
    return resources.files("projections").joinpath("tables", f"{name}.sql").read_text()


@dataclass(frozen=True)
class Projection:
    name: str
    contexts: tuple[str, ...]
    apply: Callable[[Connection, list[Envelope]], Awaitable[None]]
    queries: tuple[Query, ...] = ()
    tables: str = ""
    """Its tables and indexes (unqualified names): what `eddy migrate` creates, what
    a rebuild builds again, what `eddy drift check` compares with the database."""
    version: int = 1
    """Raise it when the rows' meaning changes: the projection is rebuilt from history."""
