"""Real `eddy web`, `eddy worker` and `eddy projector` processes, for tests that
SIGKILL them.

Each process is the venv's `eddy` console script, configured only by its
environment (built from the test's `Settings`, never from the test runner's own
`EDDY_*` variables), with its log in a file of the test's `tmp_path`. A `Fleet`
kills whatever it started when it closes, whatever happened in between (and where
`setpriv` exists, a process also dies with the test runner itself).

A process is ready once it heartbeats into its role's member set; the member it
adds there is its lease-owner token, so a test can tell which shards it holds. A
web process listens on a free port of 127.0.0.1 (its `url`) and is ready once
`/healthz` answers.
`pause()` (SIGSTOP) freezes a process so a test can look at what it holds before
deciding to kill it at exactly that instant.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
import httpx
from anyio.abc import Process

from app.registry import SYSTEM
from core.settings import Settings
from devserver.embedded import free_port
from streams.connection import Redis
from streams.keys import Keys, projection_group

EDDY = Path(sys.executable).parent / "eddy"
SETPRIV = shutil.which("setpriv")
"""When there (util-linux), each process also dies with the test runner (`--pdeathsig`)."""
START_TIMEOUT_S = 15

ROLE_MEMBERS = {
    "worker": "worker",
    "projector": projection_group(SYSTEM.projections[0].name),
}
"""The member set each kind of process heartbeats into (a projector: per projection)."""

_OWN_VARIABLES = ("REDIS_URL", "DATABASE_URL", "PORT")


def environment(settings: Settings) -> dict[str, str]:
    """The environment of a process configured like `settings`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("EDDY_") and name not in _OWN_VARIABLES
    }
    env |= {
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "EDDY_KEY_PREFIX": settings.key_prefix,
        "EDDY_DB_SCHEMA": settings.db_schema,
        "EDDY_SHARDS": str(settings.shards),
        "EDDY_LEASE_TTL_MS": str(settings.lease_ttl_ms),
        "EDDY_CLAIM_IDLE_MS": str(settings.claim_idle_ms),
        "EDDY_JWT_SECRET": settings.jwt_secret,
        "EDDY_CORS_ORIGINS": settings.cors_origins,
    }
    return env


@dataclass
class EddyProcess:
    kind: str
    """`web`, `worker` or `projector`."""
    process: Process
    log_path: Path
    member: str = ""
    """Its lease-owner token, known once it is ready (not for `web`)."""
    url: str = ""
    """A web process's base URL (`http://127.0.0.1:<port>`)."""
    killed_at: float | None = None
    """`time.monotonic()` of the SIGKILL, if it was killed."""

    @property
    def alive(self) -> bool:
        return self.killed_at is None and self.process.returncode is None

    async def pause(self) -> None:
        """SIGSTOP it, and wait until it has really stopped (Linux: `/proc/<pid>/stat`)."""
        self.process.send_signal(signal.SIGSTOP)
        stat = anyio.Path(f"/proc/{self.process.pid}/stat")
        with anyio.fail_after(2):
            while await stat.exists():
                if (await stat.read_text()).rpartition(")")[2].split()[0] in "Tt":
                    return
                await anyio.sleep(0.0005)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    async def kill(self) -> float:
        """SIGKILL it and reap it; return the moment of the kill."""
        self.process.send_signal(signal.SIGKILL)
        self.killed_at = time.monotonic()
        await self.process.wait()
        return self.killed_at

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Fleet:
    settings: Settings
    redis: Redis
    log_dir: Path
    processes: list[EddyProcess] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys.of(self.settings)

    def live(self, kind: str) -> list[EddyProcess]:
        return [p for p in self.processes if p.kind == kind and p.alive]

    async def members(self, kind: str) -> set[str]:
        raw: list[bytes] = await self.redis.zrange(self.keys.members(ROLE_MEMBERS[kind]), 0, -1)
        return {m.decode() for m in raw}

    async def start(self, kind: str, port: int | None = None) -> EddyProcess:
        """Start one process and wait until it heartbeats (learning its member
        token), or for `web` (on `port`, or a free one), until it answers `/healthz`."""
        before = set() if kind == "web" else await self.members(kind)
        before |= {p.member for p in self.processes}
        log_path = self.log_dir / f"{kind}-{len(self.processes)}.log"
        log = log_path.open("wb")
        self._logs.append(log)
        env = environment(self.settings)
        url = ""
        if kind == "web":
            port = port or free_port()
            env |= {"PORT": str(port), "EDDY_HOST": "127.0.0.1"}
            url = f"http://127.0.0.1:{port}"
        process = await anyio.open_process(
            [*([SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []), str(EDDY), kind],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started = EddyProcess(kind, process, log_path, url=url)
        self.processes.append(started)
        if kind == "web":
            await _until_healthy(started)
            return started
        with anyio.fail_after(START_TIMEOUT_S):
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"eddy {kind} exited early:\n{started.log_tail()}")
                new = await self.members(kind) - before
                if new:
                    (started.member,) = new
                    return started
                await anyio.sleep(0.02)

    async def close(self) -> None:
        """SIGKILL every process still running and reap them all."""
        with anyio.CancelScope(shield=True):
            for p in self.processes:
                if p.process.returncode is None:
                    p.process.kill()
                await p.process.aclose()
        for log in self._logs:
            log.close()


async def _until_healthy(web: EddyProcess) -> None:
    with anyio.fail_after(START_TIMEOUT_S):
        async with httpx.AsyncClient(base_url=web.url, timeout=1) as client:
            while True:
                if web.process.returncode is not None:
                    raise RuntimeError(f"eddy web exited early:\n{web.log_tail()}")
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.02)


@asynccontextmanager
async def fleet(settings: Settings, redis: Redis, log_dir: Path) -> AsyncIterator[Fleet]:
    """A set of eddy processes, every one of them killed on exit."""
    f = Fleet(settings, redis, log_dir)
    try:
        yield f
    finally:
        await f.close()
