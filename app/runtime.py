"""The processes of the Procfile, as async functions that run until cancelled.

`eddy web`, `eddy worker` and `eddy projector` each run one of them under a root
task group that a SIGINT or SIGTERM cancels; `eddy dev` runs all three in one.
Dependencies that are down at start are waited for with bounded backoff.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import anyio
import asyncpg
import uvicorn
from anyio.abc import TaskStatus
from redis.exceptions import RedisError

from app.contexts import CONTEXTS
from app.errors import ConfigurationError
from app.reactions import reactors
from app.settings import Settings
from projections import PROJECTIONS, VIEWS, db
from projections.cache import Generations
from projections.projection import Projection
from projections.projector import Hooks
from projections.projector import run_projector as project
from projections.rebuild import Progress, Report, ensure_current, rebuilder
from projections.views import Refresher
from streams.bus import CommandBus, check_layout
from streams.connection import Redis, Scripts, connect
from streams.consumer import Backoff
from streams.keys import Keys
from streams.reactor import run_reactors as react
from streams.retention import Trim, Trimmer
from streams.worker import run_worker as work

log = logging.getLogger("eddy.runtime")
T = TypeVar("T")

GRACEFUL_SHUTDOWN_S = 10


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handlers: the process's root task group owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it. Without it, a response written in two parts
    # (headers, body) waits for the client's delayed ACK: 40 ms per request on a
    # keep-alive connection (measured: /healthz 43 ms → 0.1 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def serve_web(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP until cancelled; then finish in-flight requests (bounded) and stop."""
    from app.web import create_app  # the web stack is only loaded by the web process

    sock = sock or bind(settings.host, settings.port)
    config = uvicorn.Config(
        create_app(settings),
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=False,
        lifespan="on",
    )
    server = _Server(config)

    async def stop_when_cancelled() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            server.should_exit = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_when_cancelled)
        task_status.started()
        with anyio.CancelScope(shield=True):
            await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


async def _retrying(what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    backoff = Backoff(first_s=0.2, cap_s=5)
    while True:
        try:
            return await attempt()
        except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("waiting-for-dependency what=%s error=%r", what, exc)
            await backoff.sleep()


@contextlib.asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[tuple[Redis, Scripts]]:
    """A Redis client with the scripts loaded (waiting for Redis), closed on exit."""
    redis = connect(settings.redis_url)
    try:
        scripts = Scripts(redis)
        await _retrying("redis", scripts.load)
        await check_layout(redis, Keys(settings.key_prefix, settings.shards))
        yield redis, scripts
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()


@contextlib.asynccontextmanager
async def _postgres(settings: Settings) -> AsyncIterator[db.Pool]:
    """A Postgres pool (waiting for Postgres), closed on exit."""
    pool = await _retrying(
        "postgres", lambda: db.create_pool(settings.database_url, settings.db_schema)
    )
    try:
        yield pool
    finally:
        with anyio.CancelScope(shield=True):
            await pool.close()


async def run_worker(settings: Settings) -> None:
    """The command workers and the process managers (`app/reactions.py`)."""
    async with _redis(settings) as (redis, scripts), anyio.create_task_group() as tg:
        keys = Keys(settings.key_prefix, settings.shards)
        bus = CommandBus(redis, scripts, keys, settings.command_ttl_s)
        tg.start_soon(work, redis, scripts, keys, settings, CONTEXTS)
        tg.start_soon(react, redis, scripts, keys, settings, reactors(redis, keys, bus))


async def run_projector(settings: Settings) -> None:
    """The projections, and the refresher of the materialized views they feed."""
    async with (
        _redis(settings) as (redis, scripts),
        _postgres(settings) as pool,
        anyio.create_task_group() as tg,
    ):
        keys = Keys(settings.key_prefix, settings.shards)
        refresher = Refresher(pool, VIEWS, debounce_s=settings.view_debounce_s)
        hooks = Hooks(
            in_transaction=[Generations(PROJECTIONS).advance, refresher.record_changes],
            on_commit=[refresher.mark],
        )
        tg.start_soon(refresher.run)
        if settings.trim_interval_s > 0:
            tg.start_soon(trimmer(redis, scripts, pool, keys, settings).run, scripts)
        make = rebuilder(pool, redis, keys, settings.db_schema)

        async def current(projection: Projection) -> None:
            await ensure_current(make, pool, projection)

        await project(redis, scripts, keys, settings, pool, PROJECTIONS, hooks, current)


def trimmer(
    redis: Redis, scripts: Scripts, pool: db.Pool, keys: Keys, settings: Settings
) -> Trimmer:
    """The streams' trimmer (`streams/retention.py`), bound by every projection and
    every process manager of `eddy worker`."""
    bus = CommandBus(redis, scripts, keys, settings.command_ttl_s)
    return Trimmer(
        redis,
        pool,
        keys,
        settings,
        contexts=[context.name for context in CONTEXTS],
        projections=PROJECTIONS,
        reactors=reactors(redis, keys, bus),
    )


async def trim(settings: Settings, *, dry_run: bool = False) -> list[Trim]:
    """`eddy trim`: one pass of the trimmer now (`--dry-run`: only say what it would do)."""
    async with _redis(settings) as (redis, scripts), _postgres(settings) as pool:
        keys = Keys(settings.key_prefix, settings.shards)
        return await trimmer(redis, scripts, pool, keys, settings).trim(dry_run=dry_run)


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def run_until_signal(run: Callable[[], Awaitable[None]]) -> None:
    """Run `run()` under anyio until it returns or SIGINT/SIGTERM cancels it.

    The signals are blocked until the event loop listens for them and ignored
    once it has stopped: one arriving during start-up cancels cleanly instead of
    raising inside a task, and a second one during shutdown cannot kill the
    process half-way (SIGTERM's default action).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        anyio.run(until_signal, run, backend_options={"use_uvloop": True})
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


async def until_signal(run: Callable[[], Awaitable[None]]) -> None:
    """One root task group: `run()`, and a receiver that cancels it on a signal.

    The caller blocks the signals until the receiver is installed; it stays
    installed until the task group is done."""
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            async with anyio.create_task_group() as tg:

                async def cancel_on_signal() -> None:
                    async for signum in signals:
                        log.info("shutdown-requested signal=%s", signal.Signals(signum).name)
                        tg.cancel_scope.cancel()

                tg.start_soon(cancel_on_signal)
                await run()
                tg.cancel_scope.cancel()
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


async def rebuild(
    settings: Settings,
    name: str,
    *,
    verify: bool = False,
    progress: Progress | None = None,
) -> Report:
    """`eddy rebuild <projection>`: build its tables again from history and swap."""
    from projections.rebuild import Rebuild

    by_name = {p.name: p for p in PROJECTIONS}
    if name not in by_name:
        raise ConfigurationError(f"no projection {name!r}; there are: {', '.join(by_name)}")
    async with _redis(settings) as (redis, _scripts), _postgres(settings) as pool:
        keys = Keys(settings.key_prefix, settings.shards)
        make = rebuilder(pool, redis, keys, settings.db_schema, progress=progress, verify=verify)
        built: Rebuild = make(by_name[name])
        return await built.run()


async def migrate(settings: Settings) -> list[str]:
    return await _retrying(
        "postgres", lambda: db.migrate(settings.database_url, settings.db_schema)
    )
