"""What a Postgres schema holds, read from `pg_catalog`: its tables, their columns
(type with collation, nullability, default, generated expression, identity), their
constraints (by name and `pg_get_constraintdef`) and the indexes not backing a
constraint (by name and `pg_get_indexdef`). `projections/drift.py` compares two
such readings: the declared tables, created in a scratch schema, and the database.

SQL is never parsed: Postgres itself says what a declaration means. A schema is
read with `search_path` set to it, so names inside definitions (types, sequences,
tables) come out unqualified; `pg_get_indexdef` always qualifies the indexed
table, so that qualifier is stripped. Materialized views (relkind `m`) are not
read: they are declared apart (`projections/views.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from projections.db import Connection


@dataclass(frozen=True)
class Column:
    type: str
    """`format_type`, plus ` COLLATE <name>` when not the type's own collation."""
    not_null: bool
    default: str | None
    generated: str | None
    """The expression of a generated column."""
    identity: str
    """`always`, `by default` or empty."""

    def describe(self) -> str:
        """As people write it: `varchar(64) DEFAULT 'x'::character varying NOT NULL`."""
        return self._render(short_type(self.type))

    def definition(self) -> str:
        """What ADD COLUMN takes after the name."""
        return self._render(self.type)

    def _render(self, type_name: str) -> str:
        text = type_name
        if self.generated is not None:
            text += f" GENERATED ALWAYS AS ({self.generated}) STORED"
        if self.identity:
            text += f" GENERATED {self.identity.upper()} AS IDENTITY"
        if self.default is not None:
            text += f" DEFAULT {self.default}"
        return text + (" NOT NULL" if self.not_null else "")


@dataclass(frozen=True)
class Index:
    definition: str
    """`pg_get_indexdef` without the table's schema."""
    unique: bool
    valid: bool


@dataclass(frozen=True)
class Constraint:
    kind: str
    """`pg_constraint.contype`: p, u, c, x or f."""
    definition: str
    """`pg_get_constraintdef`."""


@dataclass
class Tables:
    """What one schema holds, by table name."""

    columns: dict[str, dict[str, Column]] = field(default_factory=dict)
    constraints: dict[str, dict[str, Constraint]] = field(default_factory=dict)
    indexes: dict[str, dict[str, Index]] = field(default_factory=dict)


_TABLES = """
    SELECT c.oid, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
"""

_COLUMNS = f"""
    SELECT t.relname AS table_name, a.attname AS name,
        format_type(a.atttypid, a.atttypmod)
            || CASE WHEN a.attcollation <> ty.typcollation
                THEN ' COLLATE ' || a.attcollation::regcollation::text ELSE '' END AS type,
        a.attnotnull AS not_null,
        CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END AS default_expr,
        CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END AS generated,
        CASE a.attidentity WHEN 'a' THEN 'always' WHEN 'd' THEN 'by default' ELSE '' END
            AS identity
    FROM ({_TABLES}) t
    JOIN pg_attribute a ON a.attrelid = t.oid
    JOIN pg_type ty ON ty.oid = a.atttypid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attnum > 0 AND NOT a.attisdropped
    ORDER BY t.relname, a.attnum
"""

_CONSTRAINTS = f"""
    SELECT t.relname AS table_name, k.conname AS name, k.contype::text AS kind,
        pg_get_constraintdef(k.oid) AS definition
    FROM ({_TABLES}) t JOIN pg_constraint k ON k.conrelid = t.oid
    WHERE k.contype IN ('p', 'u', 'c', 'x', 'f')
    ORDER BY t.relname, k.conname
"""

_INDEXES = f"""
    SELECT t.relname AS table_name, i.relname AS name, pg_get_indexdef(x.indexrelid) AS definition,
        x.indisunique AS is_unique, x.indisvalid AS is_valid
    FROM ({_TABLES}) t
    JOIN pg_index x ON x.indrelid = t.oid
    JOIN pg_class i ON i.oid = x.indexrelid
    WHERE NOT EXISTS (
        SELECT 1 FROM pg_constraint k
        WHERE k.conindid = x.indexrelid AND k.conrelid = x.indrelid AND k.contype IN ('p', 'u', 'x')
    )
    ORDER BY t.relname, i.relname
"""


async def table_names(conn: Connection, schema: str) -> list[str]:
    return sorted(row["relname"] for row in await conn.fetch(_TABLES, schema))


async def read(conn: Connection, schema: str) -> Tables:
    """The tables of `schema` (with `search_path` set to it for the rest of the
    caller's transaction, so definitions name its objects unqualified)."""
    await conn.execute(f"SET LOCAL search_path TO {quote(schema)}")
    tables = Tables()
    for name in await table_names(conn, schema):
        tables.columns[name], tables.constraints[name], tables.indexes[name] = {}, {}, {}
    for row in await conn.fetch(_COLUMNS, schema):
        tables.columns[row["table_name"]][row["name"]] = Column(
            type=row["type"],
            not_null=row["not_null"],
            default=row["default_expr"],
            generated=row["generated"],
            identity=row["identity"],
        )
    for row in await conn.fetch(_CONSTRAINTS, schema):
        tables.constraints[row["table_name"]][row["name"]] = Constraint(
            kind=row["kind"], definition=row["definition"]
        )
    qualifier = await conn.fetchval("SELECT quote_ident($1) || '.'", schema)
    for row in await conn.fetch(_INDEXES, schema):
        definition = row["definition"]
        for on in (" ON ", " ON ONLY "):
            definition = definition.replace(on + qualifier, on, 1)
        tables.indexes[row["table_name"]][row["name"]] = Index(
            definition=definition, unique=row["is_unique"], valid=row["is_valid"]
        )
    return tables


SHORT_TYPES = (
    (re.compile(r"^character varying"), "varchar"),
    (re.compile(r"^character\b"), "char"),
    (re.compile(r"^bit varying"), "varbit"),
    (re.compile(r"^timestamp(\(\d+\))? with time zone"), r"timestamptz\1"),
    (re.compile(r"^timestamp(\(\d+\))? without time zone"), r"timestamp\1"),
    (re.compile(r"^time(\(\d+\))? with time zone"), r"timetz\1"),
    (re.compile(r"^time(\(\d+\))? without time zone"), r"time\1"),
)


def short_type(name: str) -> str:
    """The name people write (`varchar(64)`, `timestamptz`) for `format_type`'s."""
    for pattern, short in SHORT_TYPES:
        name = pattern.sub(short, name)
    return name


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
