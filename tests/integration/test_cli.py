"""What `eddy` says when it cannot do what it was asked: which server does not
answer, or that the schema was never migrated — never a bare traceback."""

from __future__ import annotations

import anyio
import pytest

from app.cli import main
from app.runtime import redacted
from core.settings import Settings
from devserver.embedded import free_port
from tests.processes import environment


async def test_a_command_names_the_server_it_cannot_reach(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    code = await anyio.to_thread.run_sync(
        main, ["status"], environment(settings) | {"REDIS_URL": dead}
    )
    assert code == 1
    err = capsys.readouterr().err
    assert f"eddy: cannot read the status: Redis at {dead} does not answer" in err, err
    assert err.count("does not answer") == 1  # Postgres does

    # Postgres answers, but this schema was never migrated
    code = await anyio.to_thread.run_sync(main, ["status"], environment(settings))
    err = capsys.readouterr().err
    assert code == 1
    assert f"has no Eddy tables in schema {settings.db_schema!r}: run `eddy migrate`" in err, err


def test_a_servers_password_is_never_shown() -> None:
    assert redacted("redis://:s3cret@redis.internal:6379/0") == "redis://:***@redis.internal:6379/0"
    assert (
        redacted("postgresql://eddy:s3cret@db:5432/eddy?sslmode=require")
        == "postgresql://eddy:***@db:5432/eddy?sslmode=require"
    )
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
