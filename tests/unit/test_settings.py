"""Settings come from the environment only, typed, with clear errors."""

from __future__ import annotations

import pytest

from app.auth import verify_token
from app.cli import main
from core.errors import ConfigurationError
from core.settings import Settings


def test_standard_and_eddy_variables_are_read_and_typed() -> None:
    settings = Settings.from_env(
        {
            "PORT": "9001",
            "REDIS_URL": "redis://r:1/0",
            "DATABASE_URL": "postgresql://p/db",
            "EDDY_SHARDS": "8",
            "EDDY_KEY_PREFIX": "acme",
            "EDDY_MAX_WAIT_S": "2.5",
            "EDDY_TEST_REDIS_URL": "ignored",
            "HOME": "/root",
        }
    )
    assert (settings.port, settings.redis_url, settings.database_url) == (
        9001,
        "redis://r:1/0",
        "postgresql://p/db",
    )
    assert (settings.shards, settings.key_prefix, settings.max_wait_s) == (8, "acme", 2.5)


@pytest.mark.parametrize(
    "env",
    [
        {"EDDY_SHARDS": "many"},
        {"EDDY_SHARDS": "0"},
        {"EDDY_KEY_PREFIX": "a{b}"},
        {"EDDY_DB_SCHEMA": "x;drop"},
    ],
)
def test_bad_values_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_env(env)


def test_eddy_token_prints_a_verifiable_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "cli-test-secret-that-is-long-enough-for-hs256"
    argv = ["token", "--tenant", "acme", "--sub", "bob", "--roles", "agent,user"]
    assert main(argv, {"EDDY_JWT_SECRET": secret}) == 0
    principal = verify_token(secret, capsys.readouterr().out.strip())
    assert (principal.tenant, principal.sub, principal.roles) == ("acme", "bob", ("agent", "user"))


def test_eddy_token_refuses_a_short_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["token", "--tenant", "acme", "--sub", "bob"], {"EDDY_JWT_SECRET": "short"}) == 2
    assert "EDDY_JWT_SECRET" in capsys.readouterr().err
