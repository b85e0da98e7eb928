"""Finding (or starting) the Redis and Postgres servers the tests run against.

In order: `EDDY_TEST_REDIS_URL` / `EDDY_TEST_DATABASE_URL`; else the servers on
127.0.0.1:6379 / 5432 when they answer; else embedded Valkey and Postgres
(`app.embedded`), started once per test session in a scratch folder that is
removed afterwards. `EDDY_TEST_EMBEDDED=1` skips the local probes, so a machine
that runs Redis and Postgres can still try the fresh-machine path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from app import embedded
from streams.connection import Redis

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def answers(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _local(port: int) -> bool:
    """Whether to use the server on 127.0.0.1:`port` (never with EDDY_TEST_EMBEDDED=1)."""
    return os.environ.get("EDDY_TEST_EMBEDDED") != "1" and answers("127.0.0.1", port)


@contextlib.contextmanager
def scratch_dir(name: str) -> Iterator[Path]:
    """A fresh folder, removed afterwards, that others may traverse: as root, the
    embedded Postgres runs as `nobody`, who must reach its data directory."""
    path = Path(tempfile.mkdtemp(prefix=f"eddy-test-{name}-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    url = os.environ.get("EDDY_TEST_REDIS_URL")
    if url:
        yield url
    elif _local(6379):
        yield LOCAL_REDIS
    else:
        with scratch_dir("valkey") as data, embedded.embedded_redis(data) as url:
            yield url


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    url = os.environ.get("EDDY_TEST_DATABASE_URL")
    if url:
        yield url
    elif _local(5432):
        yield LOCAL_POSTGRES
    else:
        with (
            scratch_dir("postgres") as data,
            embedded.embedded_postgres(data / "data", durable=False) as url,
        ):
            yield url


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
