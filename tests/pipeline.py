"""Running the pipeline inside a test: worker and projector tasks, and submitting
commands through the bus as the web process does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import msgspec

from app.auth import Principal
from app.registry import SYSTEM
from app.submission import build_record
from app.system import System
from core.settings import Settings
from projections import db
from projections.projector import run_projector
from streams.bus import Accepted, CommandBus, CommandStatus
from streams.connection import Redis, Scripts, connect
from streams.keys import Keys
from streams.process_managers import run_process_managers
from streams.worker import run_worker

T = TypeVar("T")

ADMIN = Principal(sub="tester", tenant="tenant-a", roles=("admin",))


class Pipeline:
    def __init__(self, settings: Settings, redis: Redis, system: System = SYSTEM) -> None:
        self.settings = settings
        self.redis = redis
        self.system = system
        self.keys = Keys.of(settings)
        self.scripts = Scripts(redis)
        self.bus = CommandBus(
            redis, self.scripts, self.keys, settings.command_ttl_s, system.catalog
        )

    async def submit(
        self,
        type_name: str,
        payload: dict[str, Any],
        *,
        command_id: str | None = None,
        principal: Principal = ADMIN,
    ) -> Accepted:
        command_type = self.system.catalog.commands[type_name]
        command = command_type.decoder.decode(msgspec.json.encode(payload))
        record = build_record(command_type, command, principal, command_id or _new(), None)
        shard = self.keys.shard_of(command_type.context.name, principal.tenant, record.aggregate_id)
        return await self.bus.submit(record, shard)

    async def outcome(self, command_id: str, tenant: str = ADMIN.tenant) -> CommandStatus:
        status = await self.bus.wait(tenant, command_id, 10)
        assert status is not None and status.status in ("processed", "failed"), status
        return status


def _new() -> str:
    import uuid

    return str(uuid.uuid4())


async def eventually(check: Callable[[], Awaitable[T | None]], within: float = 10) -> T:
    """Poll `check` until it returns something truthy, or fail after `within` seconds."""
    delay = 0.01
    with anyio.fail_after(within):
        while True:
            result = await check()
            if result:
                return result
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 0.2)


@asynccontextmanager
async def running(
    settings: Settings,
    *,
    worker: bool = True,
    projector: bool = True,
    reacting: bool = True,
    system: System = SYSTEM,
) -> AsyncIterator[Pipeline]:
    """Worker (with the process managers unless not `reacting`) and projector tasks
    in this process, stopped on exit."""
    redis = connect(settings.redis_url)
    pool = await db.create_pool(settings.database_url, settings.db_schema)
    p = Pipeline(settings, redis, system)
    catalog = system.catalog
    try:
        async with anyio.create_task_group() as tg:
            if worker:
                tg.start_soon(run_worker, redis, p.scripts, p.keys, settings, catalog)
            if worker and reacting:
                managers = system.process_managers
                tg.start_soon(
                    run_process_managers, redis, p.scripts, p.keys, settings, catalog, managers
                )
            if projector:
                hooks, refresher = system.projector_hooks(pool, settings.view_debounce_s)
                tg.start_soon(refresher.run)
                projections = system.projections
                tg.start_soon(
                    run_projector,
                    *(redis, p.scripts, p.keys, settings, pool, catalog, projections, hooks),
                )
            yield p
            tg.cancel_scope.cancel()
    finally:
        await pool.close()
        await redis.aclose()
