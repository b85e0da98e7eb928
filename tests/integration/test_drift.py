"""Schema drift: `eddy drift check` finds nothing in a freshly migrated schema (the
check CI runs), reports each kind of difference precisely, and `eddy drift repair`
fixes the safe ones without losing a row and names the projections to rebuild."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from app.cli import main
from app.registry import SYSTEM
from projections import db, drift
from projections.migrate import migrate as migrate_schema
from projections.projection import Batch, Projection
from tests.processes import EDDY, environment

DRIFT = """
    DROP INDEX chat_sessions_by_agent;
    ALTER TABLE chat_sessions ALTER COLUMN close_reason TYPE varchar(64);
    ALTER TABLE chat_sessions ADD COLUMN note text;
    ALTER TABLE traces DROP COLUMN finalized_at;
    ALTER TABLE trace_spans DROP CONSTRAINT trace_spans_pkey;
    ALTER TABLE trace_spans ADD PRIMARY KEY (tenant_id, trace_id, span_id);
    DROP TABLE chat_transcript_blocks;
    ALTER TABLE message_streams ALTER COLUMN stop_reason SET NOT NULL;
    ALTER TABLE runtime_flags ALTER COLUMN enabled SET DEFAULT false;
    ALTER TABLE runtime_flags ALTER COLUMN version DROP NOT NULL;
    ALTER TABLE tools DROP COLUMN description;
    CREATE INDEX tools_by_active ON tools (tenant_id, active);
    CREATE TABLE scratchpad (note text);
"""
"""One of each kind of drift, in a migrated schema (leaving alone the columns the
materialized views read)."""

NEEDS_REBUILD = [
    "chat_sessions.close_reason: type is varchar(64), declared text"
    " — needs a rebuild of chat_sessions",
    "chat_sessions.note: column not declared (found text) — needs a rebuild of chat_sessions",
]
REPAIRABLE = [
    "chat_sessions.chat_sessions_by_agent: index missing,"
    " declared btree (tenant_id, agent_id, created_at DESC, session_id DESC)",
    "traces.finalized_at: column missing, declared timestamptz",
    "chat_transcript_blocks: table missing",
    "message_streams.stop_reason: is NOT NULL, declared nullable",
    "runtime_flags.enabled: default is false, declared none",
]
FIX = " — eddy drift repair fixes it"
PRIMARY_KEY = (
    "trace_spans: primary key is (tenant_id, trace_id, span_id),"
    " declared (tenant_id, trace_id, seq) — needs a rebuild of traces"
)
VERSION = "runtime_flags.version: is nullable, declared NOT NULL"
TOOLS = [
    "tools.description: column missing, declared text NOT NULL — needs a rebuild of tools",
    "tools.tools_by_active: index not declared (btree (tenant_id, active)) — reported only",
    "scratchpad: table not declared by any projection — reported only",
]
REBUILDS = "needs a rebuild: chat_sessions, tools, traces"


def cli_env(settings) -> dict[str, str]:
    return {"DATABASE_URL": settings.database_url, "EDDY_DB_SCHEMA": settings.db_schema}


async def eddy(capsys: pytest.CaptureFixture[str], settings, *argv: str) -> tuple[int, str]:
    """`eddy <argv>` through `app.cli.main` (in a thread: it runs its own event loop)."""
    code = await anyio.to_thread.run_sync(main, list(argv), cli_env(settings))
    return code, capsys.readouterr().out


async def test_eddy_drift_check_finds_no_drift_in_a_migrated_schema(settings, schema) -> None:
    """The check CI runs: the real `eddy` console script, configured by environment."""
    result = await anyio.run_process(
        [str(EDDY), "drift", "check"], env=environment(settings), check=False
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert out.startswith("no drift: "), out


async def test_check_reports_each_difference_precisely(settings, schema, pool, capsys) -> None:
    await pool.execute(DRIFT)

    report = await drift.check(settings.database_url, schema, SYSTEM.projections)

    assert report.text().splitlines() == [
        *NEEDS_REBUILD,
        REPAIRABLE[0] + FIX,
        PRIMARY_KEY,
        *(line + FIX for line in REPAIRABLE[1:]),
        VERSION + " — eddy drift repair tries it (unless existing rows break it)",
        *TOOLS,
        f"12 differences; eddy drift repair fixes 6; {REBUILDS}"
        " (eddy rebuild chat_sessions, eddy rebuild tools, eddy rebuild traces)",
    ]
    code, out = await eddy(capsys, settings, "drift", "check", "--json")
    assert code == report.exit_code == 1
    body = msgspec.json.decode(out)
    assert body["drift"] is True and body["rebuild"] == ["chat_sessions", "tools", "traces"]
    assert [(d["kind"], d["verdict"]) for d in body["differences"]] == [
        ("column_type", "rebuild"),
        ("extra_column", "rebuild"),
        ("missing_index", "repair"),
        ("primary_key", "rebuild"),
        ("missing_column", "repair"),
        ("missing_table", "repair"),
        ("column_nullability", "repair"),
        ("column_default", "repair"),
        ("column_nullability", "repair"),
        ("missing_column", "rebuild"),
        ("extra_index", "report"),
        ("extra_table", "report"),
    ]
    assert body["differences"][0] == {
        "kind": "column_type",
        "verdict": "rebuild",
        "projection": "chat_sessions",
        "table": "chat_sessions",
        "name": "close_reason",
        "found": "varchar(64)",
        "declared": "text",
        "reason": None,
        "message": NEEDS_REBUILD[0],
    }


async def test_repair_fixes_the_safe_ones_and_names_the_projections_to_rebuild(
    settings, schema, pool, capsys
) -> None:
    await pool.execute(
        "INSERT INTO chat_sessions VALUES ('t', 's1', 'agent-7', 'active', '[]', '{}', '{}',"
        " NULL, now(), now(), 1);"
        "INSERT INTO traces VALUES ('t', 'tr1', 's1', 'open', 1, now(), NULL, now(), now(), 1);"
        "INSERT INTO tools VALUES ('t', 'tool1', 'grep', 'finds', '{}', '{}', '{}', true,"
        " now(), now(), 1)"
    )
    await pool.execute(DRIFT)
    await pool.execute("INSERT INTO runtime_flags VALUES ('t', 'chat', 'beta', true, NULL, now())")

    report = await drift.repair(settings.database_url, schema, SYSTEM.projections)

    assert [d.what() for d in report.repaired or ()] == REPAIRABLE
    null_version = (
        f'{VERSION} — existing rows break it (column "version" of relation'
        ' "runtime_flags" contains null values); needs a rebuild of runtime_config'
    )
    assert [d.message() for d in report.differences] == [
        *NEEDS_REBUILD,
        PRIMARY_KEY,
        null_version,
        *TOOLS,
    ]
    assert report.rebuild == ["chat_sessions", "runtime_config", "tools", "traces"]
    assert report.exit_code == 1
    left = [
        d.what()
        for d in (await drift.check(settings.database_url, schema, SYSTEM.projections)).differences
    ]
    assert left == [d.what() for d in report.differences]
    assert await pool.fetchval("SELECT count(*) FROM chat_sessions WHERE note IS NULL") == 1
    assert await pool.fetchval("SELECT count(*) FROM traces WHERE finalized_at IS NULL") == 1
    assert await pool.fetchval("SELECT count(*) FROM tools") == 1
    assert await pool.fetchval("SELECT count(*) FROM chat_transcript_blocks") == 0

    code, out = await eddy(capsys, settings, "drift", "repair")
    assert code == 1
    assert out.splitlines()[-1] == (
        "repaired 0, left 7; needs a rebuild: chat_sessions, runtime_config, tools, traces"
        " (eddy rebuild chat_sessions, eddy rebuild runtime_config, eddy rebuild tools,"
        " eddy rebuild traces)"
    )


async def test_a_repair_of_only_safe_drift_leaves_no_drift(settings, schema, pool, capsys) -> None:
    await pool.execute(
        "DROP TABLE runtime_config_history; DROP INDEX tools_by_name;"
        " ALTER TABLE tools ALTER COLUMN active DROP NOT NULL;"
        " ALTER TABLE tools ALTER COLUMN created_at SET DEFAULT now()"
    )

    code, out = await eddy(capsys, settings, "drift", "repair", "--json")

    assert code == 0
    body = msgspec.json.decode(out)
    assert body["drift"] is False and body["differences"] == [] and body["rebuild"] == []
    assert [d["message"] for d in body["repaired"]] == [
        "runtime_config_history: table missing — eddy drift repair fixes it",
        "tools.active: is nullable, declared NOT NULL"
        " — eddy drift repair tries it (unless existing rows break it)",
        "tools.created_at: default is now(), declared none — eddy drift repair fixes it",
        "tools.tools_by_name: index missing, declared btree (tenant_id, name, tool_id)"
        " — eddy drift repair fixes it",
    ]
    assert await eddy(capsys, settings, "drift", "check") == (
        0,
        f"no drift: {(await drift.check(settings.database_url, schema, SYSTEM.projections)).tables}"
        " declared tables match the database\n",
    )


async def _apply_nothing(conn: db.Connection, batch: Batch) -> None:
    return None


WIDGETS = Projection(
    name="widgets",
    reads=(),
    events=None,
    apply=_apply_nothing,
    tables="""
        CREATE TABLE widgets (
            id text PRIMARY KEY,
            name text NOT NULL,
            code text NOT NULL,
            size integer NOT NULL CONSTRAINT widgets_size_positive CHECK (size > 0),
            CONSTRAINT widgets_name_key UNIQUE (name)
        );
        CREATE UNIQUE INDEX widgets_by_code ON widgets (code);
    """,
)


async def test_a_rule_the_existing_rows_break_is_left_for_a_rebuild(settings, schema, pool) -> None:
    projections = [*SYSTEM.projections, WIDGETS]
    await migrate_schema(settings.database_url, schema, projections, SYSTEM.views)
    await pool.execute(
        "ALTER TABLE widgets DROP CONSTRAINT widgets_name_key;"
        " ALTER TABLE widgets DROP CONSTRAINT widgets_size_positive;"
        " ALTER TABLE widgets ALTER COLUMN name DROP NOT NULL;"
        " DROP INDEX widgets_by_code;"
        " INSERT INTO widgets VALUES ('a', 'same', 'c1', 1), ('b', 'same', 'c2', -1)"
    )

    report = await drift.repair(settings.database_url, schema, projections)

    assert [d.what() for d in report.repaired or ()] == [
        "widgets.name: is nullable, declared NOT NULL",
        "widgets.widgets_by_code: index missing, declared unique btree (code)",
    ]
    assert [(d.what(), d.verdict, d.projection) for d in report.differences] == [
        (
            "widgets.widgets_name_key: constraint missing, declared UNIQUE (name)",
            "rebuild",
            "widgets",
        ),
        (
            "widgets.widgets_size_positive: constraint missing, declared CHECK ((size > 0))",
            "rebuild",
            "widgets",
        ),
    ]
    assert all((d.reason or "").startswith("existing rows break it") for d in report.differences)
    assert report.rebuild == ["widgets"]
    assert await pool.fetchval("SELECT count(*) FROM widgets") == 2


async def test_a_projection_not_installed_needs_eddy_migrate(settings, schema, pool) -> None:
    await pool.execute("DELETE FROM eddy_projections WHERE name = 'tools'")

    report = await drift.repair(settings.database_url, schema, SYSTEM.projections)

    assert report.text() == (
        "projection tools: not installed — run eddy migrate\nrepaired 0, left 1"
    )
    assert report.exit_code == 1


async def test_a_schema_never_migrated_has_every_projection_to_install(settings) -> None:
    report = await drift.check(settings.database_url, settings.db_schema, SYSTEM.projections)

    assert [(d.kind, d.projection) for d in report.differences] == [
        ("not_installed", p.name) for p in SYSTEM.projections
    ]
    assert report.exit_code == 1
