"""`eddy dev`: web, worker and projector in one process, on a machine with nothing installed.

With no `REDIS_URL` it starts an embedded Valkey, with no `DATABASE_URL` an
embedded Postgres (`app.embedded`); a URL that is set always wins. Their data,
and the JWT secret made up when `EDDY_JWT_SECRET` is unset, live in `.eddy/` in
the current folder, so sessions, streams and tokens survive a restart.

Shutdown, in order: SIGINT or SIGTERM cancels the root task group; web, worker
and projector finish and release their leases while the servers are still up
(they run in their own sessions, so a terminal's Ctrl-C does not reach them);
then the servers stop. From the first signal on, further ones are ignored, so an
impatient second Ctrl-C cannot leave a server behind; a signal during start-up
stops what has started. A lock on
`.eddy/dev.lock` keeps a second `eddy dev` out of the same folder; what a killed
one left running is stopped by the next start (pidfiles, see `app.embedded`).

The servers start and stop outside the event loop: they are blocking
subprocess calls, and must outlive everything that runs inside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import anyio
import msgspec

from app import embedded, runtime
from app.auth import issue_token
from app.settings import Settings

log = logging.getLogger("eddy.dev")

HOME = ".eddy"
TOKEN_TTL_S = 7 * 24 * 3600
TOKEN_TENANT = "dev"
TOKEN_SUB = "dev-admin"


class DevError(Exception):
    """`eddy dev` cannot start: another one runs in this folder, or the port is taken."""


def run_dev(settings: Settings, env: Mapping[str, str], home: Path | None = None) -> int:
    """Run everything until SIGINT or SIGTERM; return the process's exit code."""
    home = home or Path.cwd() / HOME
    home.mkdir(parents=True, exist_ok=True)
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with _only_one(home), contextlib.ExitStack() as servers:
            sock = _listen(settings)
            servers.callback(sock.close)
            notes = {"redis": "", "postgres": ""}
            if not env.get("REDIS_URL"):
                url = servers.enter_context(embedded.embedded_redis(home / "valkey", persist=True))
                settings = msgspec.structs.replace(settings, redis_url=url)
                notes["redis"] = f"  (embedded Valkey, data in {home / 'valkey'})"
            if not env.get("DATABASE_URL"):
                url = servers.enter_context(embedded.embedded_postgres(home / "postgres"))
                settings = msgspec.structs.replace(settings, database_url=url)
                data = embedded.postgres_data_dir(home / "postgres")
                notes["postgres"] = f"  (embedded PostgreSQL, data in {data})"
            if not settings.jwt_secret:
                settings = msgspec.structs.replace(settings, jwt_secret=_secret(home))
            # the servers stop after this: from the first signal on, others are ignored
            runtime.run_until_signal(functools.partial(_serve, settings, sock, notes))
    except (DevError, embedded.EmbeddedServerError) as exc:
        print(f"eddy dev: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # SIGINT or SIGTERM while the servers were starting
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous_sigterm)
    return 0


async def _serve(settings: Settings, sock: socket.socket, notes: Mapping[str, str]) -> None:
    applied = await runtime.migrate(settings)
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(runtime.serve_web, settings, sock=sock))
        tg.start_soon(runtime.run_worker, settings)
        tg.start_soon(runtime.run_projector, settings)
        print(_banner(settings, applied, notes), flush=True)


def _listen(settings: Settings) -> socket.socket:
    """Bind the web port first, so a taken port fails before any server starts."""
    try:
        return runtime.bind(settings.host, settings.port)
    except OSError as exc:
        raise DevError(
            f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}): set PORT"
        ) from None


def _banner(settings: Settings, applied: list[str], notes: Mapping[str, str]) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}"
    token = issue_token(
        settings.jwt_secret, tenant=TOKEN_TENANT, sub=TOKEN_SUB, roles=["admin"], ttl_s=TOKEN_TTL_S
    )
    return "\n".join(
        [
            f"Eddy is running at {url}",
            f"  Redis      {settings.redis_url}{notes['redis']}",
            f"  Postgres   {settings.database_url}{notes['postgres']}",
            f"  migrations {', '.join(applied) or 'up to date'}",
            f"  admin token (tenant {TOKEN_TENANT!r}, valid {TOKEN_TTL_S // 86400} days):",
            f"export TOKEN={token}",
            f'  try: curl -H "Authorization: Bearer $TOKEN" {url}/readyz',
            "Ctrl-C stops everything.",
        ]
    )


def _secret(home: Path) -> str:
    """The JWT secret kept in `.eddy/jwt-secret` (made once), so tokens survive restarts."""
    path = home / "jwt-secret"
    with contextlib.suppress(FileNotFoundError):
        secret = path.read_text().strip()
        if secret:
            return secret
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret


@contextlib.contextmanager
def _only_one(home: Path) -> Iterator[None]:
    """Hold `.eddy/dev.lock` while running; the kernel drops it however we exit."""
    with (home / "dev.lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise DevError(
                f"another `eddy dev` (pid {lock.read().strip() or '?'}) is running in {home.parent}"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
