"""The whole stack in one test process: a real uvicorn server on a free port, a
worker and a projector — what `eddy dev` runs, on the test's prefix and schema
(the `stack` fixture of `tests/conftest.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx

from app.auth import issue_token
from app.registry import SYSTEM
from app.runtime import bind, projector_process, web_process, worker_process
from app.system import System
from core.settings import Settings


@dataclass
class Stack:
    settings: Settings
    url: str
    client: httpx.AsyncClient

    def token(
        self, tenant: str = "tenant-a", sub: str = "alice", roles: tuple[str, ...] = ("admin",)
    ) -> str:
        return issue_token(self.settings.jwt_secret, tenant=tenant, sub=sub, roles=roles, ttl_s=600)

    def auth(self, tenant: str = "tenant-a", roles: tuple[str, ...] = ("admin",)) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(tenant, roles=roles)}"}


@asynccontextmanager
async def serving(
    settings: Settings,
    *,
    worker: bool = True,
    projector: bool = True,
    system: System = SYSTEM,
) -> AsyncIterator[Stack]:
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with (
        anyio.create_task_group() as tg,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        tg.start_soon(lambda: web_process(settings, system, sock=sock))
        if worker:
            tg.start_soon(worker_process, settings, system)
        if projector:
            tg.start_soon(projector_process, settings, system)
        with anyio.fail_after(10):
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await anyio.sleep(0.02)
        yield Stack(settings, url, client)
        tg.cancel_scope.cancel()
