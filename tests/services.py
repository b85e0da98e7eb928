"""Finding (or starting) the Redis and Postgres servers the tests run against."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import asyncpg

from streams.connection import Redis

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    url = os.environ.get("EDDY_TEST_REDIS_URL")
    if url:
        yield url
    elif _answers("127.0.0.1", 6379):
        yield LOCAL_REDIS
    else:
        raise RuntimeError("no Redis: set EDDY_TEST_REDIS_URL (embedded fallback pending)")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    url = os.environ.get("EDDY_TEST_DATABASE_URL")
    if url:
        yield url
    elif _answers("127.0.0.1", 5432):
        yield LOCAL_POSTGRES
    else:
        raise RuntimeError("no Postgres: set EDDY_TEST_DATABASE_URL (embedded fallback pending)")


async def delete_prefix(client: Redis, prefix: str) -> None:
    """Delete every key a test made (never FLUSHALL: other runs may share the server)."""
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            for k in batch:
                await client.unlink(k)
            batch.clear()
    for k in batch:
        await client.unlink(k)


async def drop_schema(database_url: str, schema: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
