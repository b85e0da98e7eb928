"""The processes of the Procfile, as async functions that run until cancelled, and
the one-shot commands of `eddy`: the composition root, where a `System`'s parts
meet the clients of one process and are handed down to the framework.

`eddy web`, `eddy worker` and `eddy projector` each run one of them under a root
task group that a SIGINT or SIGTERM cancels; `eddy dev` runs all three in one.
Dependencies that are down at start are waited for with bounded backoff.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import uvicorn
from anyio.abc import TaskStatus

from app.system import System
from core.outages import FAILED, waiting_out
from core.settings import Settings
from projections import db
from projections.migrate import migrate as migrate_schema
from projections.projection import Projection
from projections.projector import run_projector
from projections.rebuild import (
    Progress,
    Rebuild,
    Report,
    ensure_current,
    rebuilder,
    rebuilding,
)
from streams.bus import check_layout
from streams.connection import Redis, Scripts, connect
from streams.keys import Keys
from streams.process_managers import run_process_managers
from streams.retention import Trim, Trimmer
from streams.worker import run_worker

log = logging.getLogger("eddy.runtime")

GRACEFUL_SHUTDOWN_S = 10


TOKEN_IN_QUERY = re.compile(r"(access_token=)[^&\s\"']+")


class RedactedTokens(logging.Filter):
    """uvicorn logs a WebSocket's path with its query string, where a browser's token
    travels (`?access_token=`): the token is replaced before the line is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "access_token=" in message:
            record.msg, record.args = TOKEN_IN_QUERY.sub(r"\1[redacted]", message), ()
        return True


def redact_tokens() -> None:
    """Put `RedactedTokens` on uvicorn's loggers (once)."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactedTokens) for f in logger.filters):
            logger.addFilter(RedactedTokens())


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


async def web_process(
    settings: Settings,
    system: System,
    *,
    sock: socket.socket | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """`eddy web`: serve HTTP until cancelled; then finish in-flight requests
    (bounded) and stop."""
    from app.web import create_app, stop_feeds  # only the web process loads the web stack

    sock = sock or bind(settings.host, settings.port)
    redact_tokens()
    app = create_app(settings, system)
    config = uvicorn.Config(
        app,
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
            # Feeds first: SSE responses and WebSocket subscriptions end now, cleanly,
            # instead of holding the graceful shutdown open until it times out.
            stop_feeds(app)
            server.should_exit = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_when_cancelled)
        task_status.started()
        with anyio.CancelScope(shield=True):
            await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[tuple[Redis, Scripts]]:
    """A Redis client with the scripts loaded (waiting for Redis), closed on exit."""
    redis = connect(settings.redis_url)
    try:
        scripts = Scripts(redis)
        await waiting_out("redis", scripts.load, log)
        await check_layout(redis, Keys.of(settings))
        yield redis, scripts
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()


@contextlib.asynccontextmanager
async def _postgres(settings: Settings) -> AsyncIterator[db.Pool]:
    """A Postgres pool (waiting for Postgres), closed on exit."""
    pool = await waiting_out(
        "postgres", lambda: db.create_pool(settings.database_url, settings.db_schema), log
    )
    try:
        yield pool
    finally:
        with anyio.CancelScope(shield=True):
            await pool.close()


async def worker_process(settings: Settings, system: System) -> None:
    """`eddy worker`: the command workers and the process managers."""
    async with _redis(settings) as (redis, scripts), anyio.create_task_group() as tg:
        keys, catalog = Keys.of(settings), system.catalog
        tg.start_soon(run_worker, redis, scripts, keys, settings, catalog)
        managers = system.process_managers
        tg.start_soon(run_process_managers, redis, scripts, keys, settings, catalog, managers)


async def projector_process(settings: Settings, system: System) -> None:
    """`eddy projector`: the projections, the refresher of the materialized views
    they feed, and the trimmer of the streams."""
    async with (
        _redis(settings) as (redis, scripts),
        _postgres(settings) as pool,
        anyio.create_task_group() as tg,
    ):
        keys = Keys.of(settings)
        hooks, refresher = system.projector_hooks(pool, settings.view_debounce_s)
        tg.start_soon(refresher.run)
        if settings.trim_interval_s > 0:
            tg.start_soon(trimmer(redis, pool, keys, settings, system).run, scripts)
        make = rebuilds(pool, redis, settings, system)

        async def current(projection: Projection) -> None:
            await ensure_current(make, pool, projection)

        await run_projector(
            redis,
            scripts,
            keys,
            settings,
            pool,
            system.catalog,
            system.projections,
            hooks,
            current,
        )


def trimmer(redis: Redis, pool: db.Pool, keys: Keys, settings: Settings, system: System) -> Trimmer:
    """The streams' trimmer (`streams/retention.py`), bound by every projection's
    checkpoints and every process manager's consumer group."""
    names = [p.name for p in system.projections]
    return Trimmer(
        redis,
        keys,
        settings,
        contexts=system.catalog.names,
        projections=system.projections,
        process_managers=system.process_managers,
        committed=lambda: db.committed(pool, names),
        rebuilding=lambda: rebuilding(pool, settings.db_schema, names),
    )


async def trim(settings: Settings, system: System, *, dry_run: bool = False) -> list[Trim]:
    """`eddy trim`: one pass of the trimmer now (`--dry-run`: only say what it would do)."""
    async with _redis(settings) as (redis, _scripts), _postgres(settings) as pool:
        return await trimmer(redis, pool, Keys.of(settings), settings, system).trim(dry_run=dry_run)


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
    system: System,
    name: str,
    *,
    verify: bool = False,
    progress: Progress | None = None,
) -> Report:
    """`eddy rebuild <projection>`: build its tables again from history and swap."""
    projection = system.projection(name)
    async with _redis(settings) as (redis, _scripts), _postgres(settings) as pool:
        make = rebuilds(pool, redis, settings, system, progress=progress, verify=verify)
        return await make(projection).run()


def rebuilds(
    pool: db.Pool,
    redis: Redis,
    settings: Settings,
    system: System,
    *,
    progress: Progress | None = None,
    verify: bool = False,
) -> Callable[[Projection], Rebuild]:
    """How this deployment rebuilds a projection of `system` (`projections/rebuild.py`)."""
    return rebuilder(
        pool,
        redis,
        Keys.of(settings),
        settings.db_schema,
        catalog=system.catalog,
        projections=system.projections,
        views=system.views,
        progress=progress,
        verify=verify,
    )


def redacted(url: str) -> str:
    """A server's URL without its password, fit for a message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def diagnose(settings: Settings) -> list[str]:
    """What is wrong with the servers `settings` name, in words: a Redis or a
    Postgres that does not answer, a schema never migrated; [] if nothing is."""
    problems: list[str] = []
    redis = connect(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        with anyio.fail_after(3):
            await redis.ping()
    except FAILED as exc:
        problems.append(f"Redis at {redacted(settings.redis_url)} does not answer: {exc!r}")
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
    postgres = redacted(settings.database_url)
    try:
        with anyio.fail_after(5):
            conn = await asyncpg.connect(settings.database_url, timeout=3)
            try:
                migrated = await conn.fetchval(
                    "SELECT to_regclass(quote_ident($1) || '.eddy_migrations') IS NOT NULL",
                    settings.db_schema,
                )
            finally:
                await conn.close()
    except FAILED as exc:
        problems.append(f"Postgres at {postgres} does not answer: {exc!r}")
    else:
        if not migrated:
            problems.append(
                f"Postgres at {postgres} has no Eddy tables in schema {settings.db_schema!r}:"
                " run `eddy migrate`"
            )
    return problems


async def migrate(settings: Settings, system: System) -> list[str]:
    """`eddy migrate`: Eddy's tables, the projections' tables and the views."""
    return await waiting_out(
        "postgres",
        lambda: migrate_schema(
            settings.database_url, settings.db_schema, system.projections, system.views
        ),
        log,
    )
