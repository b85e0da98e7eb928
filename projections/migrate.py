"""Migrations: Eddy's own tables (`projections/migrations/*.sql`, each applied
once, in name order, recorded with its checksum in `eddy_migrations`), then the
tables of every projection not yet installed (`eddy_projections`) and the
materialized views over them. `eddy migrate` (the Procfile's `release`) runs it,
one process at a time (an advisory lock).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from importlib import resources

import asyncpg

from projections.projection import Projection
from projections.views import View
from projections.views import install as install_views

log = logging.getLogger("eddy.migrate")

MIGRATION_LOCK = 0x4544_4459  # "EDDY": one migrator at a time across processes


def migrations() -> list[tuple[str, str]]:
    """(name, sql) of every file in `projections/migrations/`, in name order."""
    folder = resources.files("projections").joinpath("migrations")
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")), key=lambda e: e.name
    )
    return [(entry.name, entry.read_text()) for entry in files]


async def migrate(
    database_url: str, schema: str, projections: Sequence[Projection], views: Sequence[View]
) -> list[str]:
    """Create the schema, apply every migration not yet applied, create the tables
    of every projection not yet installed and the views over them; return what
    was done.

    A projection installed at another version than it declares is left as it is:
    it needs a rebuild (`eddy rebuild`), which the projector also starts itself."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        applied: list[str] = []
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS eddy_migrations ("
                " name text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                r["name"]: r["checksum"]
                for r in await conn.fetch("SELECT name, checksum FROM eddy_migrations")
            }
            for name, sql in migrations():
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if name in done:
                    if done[name] != checksum:
                        log.warning("migration-changed-after-apply name=%s", name)
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO eddy_migrations (name, checksum) VALUES ($1, $2)", name, checksum
                )
                applied.append(name)
            installed = {
                r["name"]: r["version"]
                for r in await conn.fetch("SELECT name, version FROM eddy_projections")
            }
            for projection in projections:
                version = installed.get(projection.name)
                if version is None:
                    await conn.execute(projection.tables)
                    await conn.execute(
                        "INSERT INTO eddy_projections (name, version) VALUES ($1, $2)",
                        projection.name,
                        projection.version,
                    )
                    applied.append(f"tables of {projection.name}")
                elif version != projection.version:
                    log.warning(
                        "projection-needs-rebuild name=%s installed=%s declared=%s",
                        projection.name,
                        version,
                        projection.version,
                    )
            # The materialized views over those tables (`projections/views.py`).
            listed = {p.name for p in projections}
            applied += await install_views(
                conn, [v for v in views if {p.name for p in v.reads} <= listed]
            )
        return applied
    finally:
        await conn.close()
