"""`eddy dev`'s folder and servers: on a machine with nothing installed.

While `eddy dev` runs, it says where its servers are in `.eddy/dev.json`, so every
other `eddy` command run in the same folder (`eddy token`, `eddy status`, …) finds
them by itself (`running`), and its JWT secret in `.eddy/jwt-secret`.

With no `REDIS_URL` an embedded Valkey is started, with no `DATABASE_URL` an
embedded Postgres (`devserver.embedded`); a URL that is set always wins. Their
data, and the JWT secret made up when `EDDY_JWT_SECRET` is unset, live in `.eddy/`
in the current folder, so sessions, streams and tokens survive a restart. A lock
on `.eddy/dev.lock` keeps a second `eddy dev` out of the same folder; what a
killed one left running is stopped by the next start (pidfiles, see
`devserver.embedded`).

The servers start and stop outside the event loop: they are blocking subprocess
calls, and must outlive everything that runs inside it. While they start, SIGTERM
acts like Ctrl-C (`KeyboardInterrupt`), so a signal then stops what has started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from devserver import embedded

HOME = ".eddy"
RUNNING = "dev.json"
SECRET = "jwt-secret"


class DevError(Exception):
    """`eddy dev` cannot start: another one runs in this folder, or the port is taken."""


@dataclass(frozen=True)
class Servers:
    """Where Redis and Postgres are, and a note on each for the banner."""

    redis_url: str
    database_url: str
    jwt_secret: str
    notes: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def workspace(home: Path) -> Iterator[None]:
    """Hold `home` (one `eddy dev` per folder); SIGTERM acts like Ctrl-C meanwhile."""
    home.mkdir(parents=True, exist_ok=True)
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with _only_one(home):
            yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous_sigterm)


@contextlib.contextmanager
def local_servers(
    redis_url: str, database_url: str, jwt_secret: str, env: Mapping[str, str], home: Path
) -> Iterator[Servers]:
    """Start the embedded servers the environment does not name (data in `home`),
    and stop them on leaving, after everything else."""
    with contextlib.ExitStack() as servers:
        found = Servers(redis_url, database_url, jwt_secret, {"redis": "", "postgres": ""})
        if not env.get("REDIS_URL"):
            url = servers.enter_context(embedded.embedded_redis(home / "valkey", persist=True))
            found.notes["redis"] = f"  (embedded Valkey, data in {home / 'valkey'})"
            found = replace(found, redis_url=url)
        if not env.get("DATABASE_URL"):
            url = servers.enter_context(embedded.embedded_postgres(home / "postgres"))
            data = embedded.postgres_data_dir(home / "postgres")
            found.notes["postgres"] = f"  (embedded PostgreSQL, data in {data})"
            found = replace(found, database_url=url)
        if not jwt_secret:
            found = replace(found, jwt_secret=_secret(home))
        yield found


@contextlib.contextmanager
def advertised(home: Path, environment: Mapping[str, str]) -> Iterator[None]:
    """Say in `home` where this `eddy dev`'s servers are (its environment for other
    `eddy` commands: `REDIS_URL`, `DATABASE_URL`, `PORT`, …) while inside."""
    path = home / RUNNING
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"pid": os.getpid(), "environment": dict(environment)}, out)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def running(home: Path) -> dict[str, str] | None:
    """The environment an `eddy dev` running in `home` advertises; None if none runs
    there (no record, or nobody holds its lock: a killed one left the record)."""
    try:
        record = json.loads((home / RUNNING).read_text())
        with (home / "dev.lock").open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: it runs
                return {str(k): str(v) for k, v in record["environment"].items()}
            fcntl.flock(lock, fcntl.LOCK_UN)
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def dev_secret(home: Path) -> str | None:
    """The JWT secret `eddy dev` keeps in `home`, if it made one."""
    with contextlib.suppress(OSError):
        return (home / SECRET).read_text().strip() or None
    return None


def _secret(home: Path) -> str:
    """The JWT secret kept in `.eddy/jwt-secret` (made once), so tokens survive restarts."""
    path = home / SECRET
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
