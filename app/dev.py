"""`eddy dev`: web, worker and projector in one process, on a machine with nothing
installed (the servers and the `.eddy/` folder: `devserver.local`).

Shutdown, in order: SIGINT or SIGTERM cancels the root task group; web, worker
and projector finish and release their leases while the servers are still up
(they run in their own sessions, so a terminal's Ctrl-C does not reach them);
then the servers stop. From the first signal on, further ones are ignored, so an
impatient second Ctrl-C cannot leave a server behind; a signal during start-up
stops what has started.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

import anyio
import msgspec

from app import runtime
from app.auth import issue_token
from app.cors import DEV_ORIGINS
from app.system import System
from core.settings import Settings
from devserver.embedded import EmbeddedServerError
from devserver.local import HOME, DevError, advertised, local_servers, workspace

TOKEN_TTL_S = 7 * 24 * 3600
TOKEN_TENANT = "dev"
TOKEN_SUB = "dev-admin"


def run_dev(
    settings: Settings, system: System, env: Mapping[str, str], home: Path | None = None
) -> int:
    """Run everything until SIGINT or SIGTERM; return the process's exit code."""
    home = home or Path.cwd() / HOME
    try:
        with workspace(home):
            sock = _listen(settings)
            with (
                contextlib.closing(sock),
                local_servers(
                    settings.redis_url, settings.database_url, settings.jwt_secret, env, home
                ) as servers,
            ):
                settings = msgspec.structs.replace(
                    settings,
                    redis_url=servers.redis_url,
                    database_url=servers.database_url,
                    jwt_secret=servers.jwt_secret,
                    cors_origins=env.get("EDDY_CORS_ORIGINS", DEV_ORIGINS),
                )
                where = {
                    "REDIS_URL": settings.redis_url,
                    "DATABASE_URL": settings.database_url,
                    "PORT": str(settings.port),
                    "EDDY_HOST": settings.host,
                }
                # the servers stop after this: from the first signal on, others are ignored
                with advertised(home, where):
                    runtime.run_until_signal(
                        functools.partial(_serve, settings, system, sock, servers.notes)
                    )
    except (DevError, EmbeddedServerError) as exc:
        print(f"eddy dev: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # SIGINT or SIGTERM while the servers were starting
        return 0
    return 0


async def _serve(
    settings: Settings, system: System, sock: socket.socket, notes: Mapping[str, str]
) -> None:
    applied = await runtime.migrate(settings, system)
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(runtime.web_process, settings, system, sock=sock))
        tg.start_soon(runtime.worker_process, settings, system)
        tg.start_soon(runtime.projector_process, settings, system)
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
