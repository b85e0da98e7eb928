"""Pages of a query's rows: the query string a query function gets (`QueryArgs`),
and keyset pagination (`Keyset`) with opaque cursors.

Every list answers `{"items", "next_cursor"}`: `?limit=` (1 to `MAX_LIMIT`,
`DEFAULT_LIMIT` if absent) rows after `?cursor=` (the previous page's
`next_cursor`), in an order that rows written in between cannot shift.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from core.errors import BadRequest
from projections.db import Connection

MAX_LIMIT = 500
DEFAULT_LIMIT = 50


class QueryArgs(msgspec.Struct, frozen=True, kw_only=True):
    """What a query function gets: the tenant, the path parameters and the query string."""

    tenant_id: str
    path: Mapping[str, str]
    params: Mapping[str, str]

    def limit(self) -> int:
        return parse_limit(self.params.get("limit"), DEFAULT_LIMIT)

    def cursor(self) -> list[Any] | None:
        raw = self.params.get("cursor")
        return None if not raw else decode_cursor(raw)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.params.get(name, default)
        if value not in choices:
            raise BadRequest(f"{name} must be one of {', '.join(choices)}")
        return value


def parse_limit(raw: str | None, default: int) -> int:
    """`?limit=`: a whole number from 1 to `MAX_LIMIT`; `default` when absent."""
    if raw is None:
        return default
    # isdigit() alone takes "²", which int() refuses
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


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
