"""Schema drift: the tables each projection declares against the database.

`check()` creates every projection's declared DDL (`Projection.tables`) in a
scratch schema (`<schema>__drift_<random>`) inside a transaction that is rolled
back, reads both schemas from `pg_catalog` (`projections/introspect.py`) and
compares them: tables (missing, extra), columns (missing, extra, type with
collation, nullability, default, generated expression, identity), the primary
key, the other constraints (unique, check, exclusion, foreign key) and the
indexes not backing a constraint.

Every difference gets a verdict:

- `repair`: nothing existing is lost or reinterpreted, `repair()` applies it: a
  missing table (the scratch schema's empty table is moved into the schema, so its
  indexes and constraints keep their declared names), a missing column that is
  nullable, has a default, or is generated or an identity (existing rows get NULL
  or the default: a projection whose old rows need real values raises its
  `version` instead, and is rebuilt), a default that differs, a NOT NULL the
  declaration lacks (dropped), a missing or changed index. A rule the existing rows
  may break — a NOT NULL, a unique or other constraint, a unique index — is tried
  in a savepoint; if the rows break it, it is left as needing a rebuild.
- `rebuild`: only the events can say what the rows should hold: a type change, a
  missing NOT NULL column without default, a primary-key change, a column the
  declaration lacks (its data might be needed), a changed generated expression
  or identity.
- `migrate`: a projection not installed yet (`eddy migrate` creates its tables
  and registers it; creating them here would make that migration fail).
- `report`: reported only, never dropped: an index or constraint the declaration
  lacks (an operator may have added it for a reason; it costs writes, loses
  nothing), a table no projection declares (not `eddy_*` infrastructure).

`check` counts every difference; `repair` fails only while something other than
`report` is left.

Deliberate choices:

- `repair()` runs in one transaction under the migration advisory lock, so an
  index is built with a plain CREATE INDEX: it blocks writes to its table
  (projector batches) while it builds, never reads. For a large table build it
  yourself first with CREATE INDEX CONCURRENTLY under the declared name; the
  check then finds it as declared. Each table lock is waited for at most
  `LOCK_TIMEOUT_S`; past it the whole repair fails and changes nothing.
- Materialized views (relkind `m`) are ignored: they are declared apart. Views
  would be one more map in `Tables` read with `pg_get_viewdef`, compared by
  definition like indexes are.
- Column order is not compared: every statement names its columns.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import asyncpg
import msgspec

from projections.db import Connection
from projections.introspect import (
    Column,
    Constraint,
    Index,
    Tables,
    quote,
    read,
    short_type,
    table_names,
)
from projections.migrate import MIGRATION_LOCK
from projections.projection import Projection

LOCK_TIMEOUT_S = 10
"""How long `repair()` waits for a table lock before it gives up (changing nothing)."""

INFRASTRUCTURE_PREFIX = "eddy_"
"""Eddy's own tables (`projections/migrations/`): never reported as extra."""

Verdict = Literal["repair", "rebuild", "migrate", "report"]


@dataclass(frozen=True)
class Difference:
    kind: str
    """missing_table, extra_table, not_installed, missing_column, extra_column,
    column_type, column_nullability, column_default, column_generated,
    column_identity, primary_key, missing_constraint, constraint,
    extra_constraint, missing_index, index, extra_index."""
    verdict: Verdict
    projection: str | None
    """The projection that declares the table (None for an extra table)."""
    table: str | None
    name: str | None = None
    """The column, constraint or index."""
    found: str | None = None
    declared: str | None = None
    reason: str | None = None
    """Why a tried repair failed."""
    fix: tuple[str, ...] = field(default=(), repr=False, compare=False)
    """The statements `repair()` runs (search_path = the schema)."""
    tentative: bool = field(default=False, repr=False, compare=False)
    """Existing rows may refuse it: tried in a savepoint."""

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        return self.kind, self.table, self.name

    def subject(self) -> str:
        if self.kind == "not_installed":
            return f"projection {self.projection}"
        return ".".join(part for part in (self.table, self.name) if part)

    def what(self) -> str:
        """The difference itself, without what to do about it."""
        found, declared = self.found or "none", self.declared or "none"
        text = {
            "not_installed": "not installed",
            "missing_table": "table missing",
            "extra_table": "table not declared by any projection",
            "missing_column": f"column missing, declared {declared}",
            "extra_column": f"column not declared (found {found})",
            "column_type": f"type is {found}, declared {declared}",
            "column_nullability": f"is {found}, declared {declared}",
            "column_default": f"default is {found}, declared {declared}",
            "column_generated": f"generated expression is {found}, declared {declared}",
            "column_identity": f"identity is {found}, declared {declared}",
            "primary_key": f"primary key is {found}, declared {declared}",
            "missing_constraint": f"constraint missing, declared {declared}",
            "constraint": f"constraint is {found}, declared {declared}",
            "extra_constraint": f"constraint not declared ({found})",
            "missing_index": f"index missing, declared {declared}",
            "index": f"index is {found}, declared {declared}",
            "extra_index": f"index not declared ({found})",
        }[self.kind]
        return f"{self.subject()}: {text}"

    def message(self) -> str:
        match self.verdict:
            case "repair":
                todo = "eddy drift repair fixes it"
                if self.tentative:
                    todo = "eddy drift repair tries it (unless existing rows break it)"
            case "rebuild":
                todo = f"needs a rebuild of {self.projection}"
                if self.reason:
                    todo = f"{self.reason}; {todo}"
            case "migrate":
                todo = "run eddy migrate"
            case "report":
                todo = "reported only"
        return f"{self.what()} — {todo}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "verdict": self.verdict,
            "projection": self.projection,
            "table": self.table,
            "name": self.name,
            "found": self.found,
            "declared": self.declared,
            "reason": self.reason,
            "message": self.message(),
        }


@dataclass(frozen=True)
class Declaration:
    """The declared tables, as Postgres reads them in the scratch schema."""

    schema: str
    scratch: str
    tables: Tables
    owners: dict[str, str]
    """Table → the projection that declares it."""
    projections: tuple[str, ...]
    installed: frozenset[str]
    """Projections registered in the schema's `eddy_projections`."""


@dataclass(frozen=True)
class Report:
    differences: list[Difference]
    """For a repair: what is left."""
    tables: int
    """How many tables the projections declare."""
    repaired: list[Difference] | None = None
    """None for a check."""

    @property
    def rebuild(self) -> list[str]:
        """The projections that need `eddy rebuild`."""
        return sorted(
            {d.projection for d in self.differences if d.verdict == "rebuild" and d.projection}
        )

    @property
    def exit_code(self) -> int:
        if self.repaired is None:
            return 1 if self.differences else 0
        return 1 if any(d.verdict != "report" for d in self.differences) else 0

    def text(self) -> str:
        lines = [f"repaired {d.what()}" for d in self.repaired or ()]
        lines += [d.message() for d in self.differences]
        if not lines:
            return f"no drift: {self.tables} declared tables match the database"
        if self.repaired is None:
            summary = f"{_count(len(self.differences), 'difference')}"
            fixable = sum(d.verdict == "repair" for d in self.differences)
            if fixable:
                summary += f"; eddy drift repair fixes {fixable}"
        else:
            summary = f"repaired {len(self.repaired)}, left {len(self.differences)}"
        if self.rebuild:
            commands = ", ".join(f"eddy rebuild {name}" for name in self.rebuild)
            summary += f"; needs a rebuild: {', '.join(self.rebuild)} ({commands})"
        return "\n".join([*lines, summary])

    def json(self) -> str:
        body: dict[str, Any] = {
            "drift": bool(self.differences),
            "differences": [d.to_json() for d in self.differences],
            "rebuild": self.rebuild,
        }
        if self.repaired is not None:
            body["repaired"] = [d.to_json() for d in self.repaired]
        return msgspec.json.encode(body).decode()


async def check(database_url: str, schema: str, projections: Sequence[Projection]) -> Report:
    """The differences between the declared tables and `schema`; changes nothing."""
    conn = await asyncpg.connect(database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        try:
            declaration = await declare(conn, schema, projections)
            found = await read(conn, schema)
            return Report(compare(declaration, found), tables=len(declaration.owners))
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


async def repair(database_url: str, schema: str, projections: Sequence[Projection]) -> Report:
    """Apply every `repair` difference in one transaction under the migration lock;
    the report holds what was repaired and what is left (read again afterwards)."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_S}s'")
            declaration = await declare(conn, schema, projections)
            differences = compare(declaration, await read(conn, schema))
            await conn.execute(f"SET LOCAL search_path TO {quote(schema)}")
            repaired: list[Difference] = []
            refused: dict[tuple[str, str | None, str | None], str] = {}
            for difference in differences:
                if difference.verdict != "repair":
                    continue
                try:
                    async with conn.transaction():  # a savepoint
                        for statement in difference.fix:
                            await conn.execute(statement)
                except asyncpg.IntegrityConstraintViolationError as exc:
                    if not difference.tentative:
                        raise
                    refused[difference.key] = f"existing rows break it ({exc})"
                else:
                    repaired.append(difference)
            await conn.execute(f"DROP SCHEMA {quote(declaration.scratch)} CASCADE")
            left = [
                replace(d, verdict="rebuild", reason=refused[d.key]) if d.key in refused else d
                for d in compare(declaration, await read(conn, schema))
            ]
            return Report(left, tables=len(declaration.owners), repaired=repaired)
    finally:
        await conn.close()


async def declare(conn: Connection, schema: str, projections: Sequence[Projection]) -> Declaration:
    """Create the projections' tables in a new scratch schema (inside the caller's
    transaction, which drops or rolls it back) and read them back."""
    prefix = schema.encode()[: 63 - len("__drift_12345678")].decode(errors="ignore")
    scratch = f"{prefix}__drift_{secrets.token_hex(4)}"
    await conn.execute(f"CREATE SCHEMA {quote(scratch)}")
    await conn.execute(f"SET LOCAL search_path TO {quote(scratch)}")
    owners: dict[str, str] = {}
    for projection in projections:
        if projection.tables.strip():
            await conn.execute(projection.tables)
        for table in await table_names(conn, scratch):
            owners.setdefault(table, projection.name)
    registry = await conn.fetchval(
        "SELECT to_regclass(quote_ident($1) || '.eddy_projections')", schema
    )
    installed: set[str] = set()
    if registry is not None:
        rows = await conn.fetch(f"SELECT name FROM {quote(schema)}.eddy_projections")
        installed = {row["name"] for row in rows}
    return Declaration(
        schema=schema,
        scratch=scratch,
        tables=await read(conn, scratch),
        owners=owners,
        projections=tuple(p.name for p in projections),
        installed=frozenset(installed),
    )


def compare(declaration: Declaration, found: Tables) -> list[Difference]:
    """Every difference between the declared tables and `found`, by projection
    (in declaration order), then table, then column, constraint and index."""
    differences: list[Difference] = []
    for projection in declaration.projections:
        if projection not in declaration.installed:
            differences.append(Difference("not_installed", "migrate", projection, None))
            continue
        for table in sorted(t for t, owner in declaration.owners.items() if owner == projection):
            if table not in found.columns:
                move = (
                    f"ALTER TABLE {quote(declaration.scratch)}.{quote(table)}"
                    f" SET SCHEMA {quote(declaration.schema)}"
                )
                differences.append(
                    Difference("missing_table", "repair", projection, table, fix=(move,))
                )
                continue
            differences += _compare_table(projection, table, declaration.tables, found)
    for table in sorted(found.columns):
        if table not in declaration.owners and not table.startswith(INFRASTRUCTURE_PREFIX):
            differences.append(Difference("extra_table", "report", None, table))
    return differences


def _compare_table(
    projection: str, table: str, declared: Tables, found: Tables
) -> list[Difference]:
    comparison = _TableComparison(projection, table)
    comparison.columns(declared.columns[table], found.columns[table])
    comparison.constraints(declared.constraints[table], found.constraints[table])
    comparison.indexes(declared.indexes[table], found.indexes[table])
    return comparison.differences


class _TableComparison:
    """The differences of one declared table that exists, in the order found."""

    def __init__(self, projection: str, table: str) -> None:
        self.projection, self.table = projection, table
        self.alter = f"ALTER TABLE {quote(table)}"
        self.differences: list[Difference] = []

    def add(
        self,
        kind: str,
        verdict: Verdict,
        name: str | None,
        found: str | None = None,
        declared: str | None = None,
        *fix: str,
        tentative: bool = False,
    ) -> None:
        at = (self.projection, self.table, name)
        self.differences.append(
            Difference(kind, verdict, *at, found, declared, None, fix, tentative)
        )

    def columns(self, want: dict[str, Column], have: dict[str, Column]) -> None:
        add = self.add
        for name, column in want.items():
            current, alter = have.get(name), f"{self.alter} ALTER COLUMN {quote(name)}"
            if current is None:
                sql = f"{self.alter} ADD COLUMN {quote(name)} {column.definition()}"
                fills = column.default or column.generated or column.identity
                verdict: Verdict = "rebuild" if column.not_null and not fills else "repair"
                add("missing_column", verdict, name, None, column.describe(), sql)
                continue
            if current.type != column.type:
                types = (short_type(current.type), short_type(column.type))
                add("column_type", "rebuild", name, *types)
            if current.generated != column.generated:
                add("column_generated", "rebuild", name, current.generated, column.generated)
            if current.identity != column.identity:
                identities = (current.identity or None, column.identity or None)
                add("column_identity", "rebuild", name, *identities)
            if current.not_null != column.not_null:
                sql = f"{alter} {'SET' if column.not_null else 'DROP'} NOT NULL"
                null = (_nullability(current.not_null), _nullability(column.not_null))
                add("column_nullability", "repair", name, *null, sql, tentative=column.not_null)
            if current.default != column.default and current.generated == column.generated:
                default = column.default
                sql = (
                    f"{alter} DROP DEFAULT" if default is None else f"{alter} SET DEFAULT {default}"
                )
                add("column_default", "repair", name, current.default, default, sql)
        for name in sorted(have.keys() - want.keys()):
            add("extra_column", "rebuild", name, have[name].describe())

    def constraints(self, want: dict[str, Constraint], have: dict[str, Constraint]) -> None:
        add = self.add
        if (key := _primary(want)) != (current_key := _primary(have)):
            add("primary_key", "rebuild", None, current_key, key)
        for name, constraint in want.items():
            current, declared = have.get(name), constraint.definition
            sql = f"{self.alter} ADD CONSTRAINT {quote(name)} {declared}"
            if constraint.kind == "p" or current == constraint:
                continue
            if current is None:
                add("missing_constraint", "repair", name, None, declared, sql, tentative=True)
            else:
                drop = f"{self.alter} DROP CONSTRAINT {quote(name)}"
                found = current.definition
                add("constraint", "repair", name, found, declared, drop, sql, tentative=True)
        for name in sorted(have.keys() - want.keys()):
            if have[name].kind != "p":
                add("extra_constraint", "report", name, have[name].definition)

    def indexes(self, want: dict[str, Index], have: dict[str, Index]) -> None:
        add = self.add
        for name, index in want.items():
            current, sql, unique = have.get(name), index.definition, index.unique
            if current is None:
                add("missing_index", "repair", name, None, _shape(index), sql, tentative=unique)
            elif current.definition != index.definition or not current.valid:
                shapes = (_shape(current), _shape(index))
                drop = f"DROP INDEX {quote(name)}"
                add("index", "repair", name, *shapes, drop, sql, tentative=unique)
        for name in sorted(have.keys() - want.keys()):
            add("extra_index", "report", name, _shape(have[name]))


def _primary(constraints: dict[str, Constraint]) -> str | None:
    for constraint in constraints.values():
        if constraint.kind == "p":
            return constraint.definition.removeprefix("PRIMARY KEY ")
    return None


def _shape(index: Index) -> str:
    """`btree (tenant_id, name)` out of `CREATE INDEX … ON … USING btree (tenant_id, name)`."""
    shape = index.definition.partition(" USING ")[2] or index.definition
    if index.unique:
        shape = f"unique {shape}"
    return shape if index.valid else f"{shape} (invalid)"


def _nullability(not_null: bool) -> str:
    return "NOT NULL" if not_null else "nullable"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
