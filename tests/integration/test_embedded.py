"""The embedded servers of `eddy dev` and of a test run on a fresh machine.

These start their own Valkey and Postgres on free ports whatever else runs here,
so the fresh-machine path is exercised on every machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import asyncpg
import pytest

from devserver import embedded
from streams.connection import connect
from tests.services import answers, scratch_dir


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _answers(port: int) -> bool:
    return answers(embedded.HOST, port)


async def _blocking_round_trip(redis_url: str) -> None:
    """XREADGROUP BLOCK waits for an entry another client adds, then returns it."""
    reader, writer = connect(redis_url), connect(redis_url)
    try:
        await writer.xgroup_create("s", "g", id="0", mkstream=True)
        got: list[object] = []

        async def read() -> None:
            got.extend(await reader.xreadgroup("g", "c", {"s": ">"}, count=10, block=3000))

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.sleep(0.3)
            entry_id = await writer.xadd("s", {"k": "v"})
        waited = time.monotonic() - started
        assert got == [[b"s", [(entry_id, {b"k": b"v"})]]]
        assert 0.3 <= waited < 3, f"XREADGROUP BLOCK returned after {waited:.2f}s"
        assert await writer.xack("s", "g", entry_id) == 1
    finally:
        await reader.aclose()
        await writer.aclose()


async def _query(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert (await conn.fetchval("SHOW server_version")).startswith("18.")
        await conn.execute("CREATE TEMP TABLE t (id int PRIMARY KEY, doc jsonb NOT NULL)")
        await conn.execute("INSERT INTO t VALUES (1, '{\"a\": 1}') ON CONFLICT DO NOTHING")
        assert await conn.fetchval("SELECT doc->>'a' FROM t WHERE id = 1") == "1"
    finally:
        await conn.close()


async def test_embedded_servers_serve_and_stop() -> None:
    with scratch_dir("embedded") as data:
        with (
            embedded.embedded_redis(data / "valkey") as redis_url,
            embedded.embedded_postgres(data / "postgres", durable=False) as database_url,
        ):
            await _blocking_round_trip(redis_url)
            await _query(database_url)
        assert not _answers(_port(redis_url))
        assert not _answers(_port(database_url))


CHILD = """
import sys, time
from pathlib import Path
from devserver import embedded
data = Path(sys.argv[1])
with embedded.embedded_redis(data / "valkey") as r, embedded.embedded_postgres(data / "pg") as p:
    print(r, p, flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_a_killed_owner_leaves_no_second_copy() -> None:
    """What a SIGKILLed `eddy dev` left running is stopped by the next start."""
    with scratch_dir("stale") as data:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        assert child.stdout is not None
        stale = child.stdout.readline().split()
        child.stdout.close()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert len(stale) == 2 and all(_answers(_port(url)) for url in stale)
        with (
            embedded.embedded_redis(data / "valkey") as redis_url,
            embedded.embedded_postgres(data / "pg") as database_url,
        ):
            assert not any(_answers(_port(url)) for url in stale)
            assert _answers(_port(redis_url)) and _answers(_port(database_url))
