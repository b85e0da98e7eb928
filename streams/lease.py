"""Shard leases, and dividing a role's shards among its live processes.

Each shard of a role (the command workers, or one projection) has one owner at a
time: a Redis key `SET NX PX` with the owner's token, renewed every third of its
TTL by a Lua step that checks the owner. A dead owner's lease expires and a live
process takes the shard over within `lease_ttl_ms` plus one tick. Writes of the
command workers are additionally fenced by the lease inside `apply.lua`, so a
paused process that lost its lease cannot write.

Every process of a role heartbeats into a sorted set; each aims at its fair share
of every context, `ceil(the context's shards / live processes)`, releases what is
over it and takes free shards up to it, so any number of processes converge to an
even split of each context (a busy context is spread like a quiet one).

```
tick ─▶ heartbeat ─▶ renew held leases ─▶ lost one? cancel its unit
      ─▶ over fair share? stop a unit, then release its lease
      ─▶ under fair share? SET NX a free shard, start its unit
```
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from core.outages import FAILED
from streams.connection import Redis, Scripts
from streams.keys import Keys, Shard

log = logging.getLogger("eddy.lease")

STOP_GRACE_S = 10.0
"""How long a stopped unit may take to finish the batch in hand (a consumer shields
it: `streams/consumer.py`) before its process gives up waiting and leaves."""


class LeaseLost(Exception):
    """Raised inside a unit when its shard's lease is no longer held."""


class ShardLease:
    def __init__(self, redis: Redis, scripts: Scripts, key: str, owner: str, ttl_ms: int) -> None:
        self.redis = redis
        self.scripts = scripts
        self.key = key
        self.owner = owner
        self.ttl_ms = ttl_ms
        self._valid_until = 0.0

    def held(self) -> bool:
        """Whether the lease is surely still ours (local clock, with a safety margin)."""
        return time.monotonic() < self._valid_until

    def _mark(self, started: float) -> None:
        self._valid_until = started + self.ttl_ms / 1000 * 0.8

    async def acquire(self) -> bool:
        started = time.monotonic()
        if await self.redis.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            self._mark(started)
            return True
        return False

    async def renew(self) -> bool:
        started = time.monotonic()
        if await self.scripts.lease_extend(keys=[self.key], args=[self.owner, self.ttl_ms]):
            self._mark(started)
            return True
        self._valid_until = 0.0
        return False

    async def release(self) -> None:
        self._valid_until = 0.0
        await self.scripts.lease_release(keys=[self.key], args=[self.owner])


Unit = Callable[[Shard, ShardLease], Awaitable[None]]


@dataclass
class _Running:
    lease: ShardLease
    scope: anyio.CancelScope
    done: anyio.Event = field(default_factory=anyio.Event)


class Balancer:
    """Runs `unit(shard, lease)` for the shards of `role` this process owns."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        role: str,
        shards: Sequence[Shard],
        unit: Unit,
        *,
        ttl_ms: int,
        member: str,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.role = role
        self.shards = list(shards)
        self._by_context: dict[str, list[Shard]] = {}
        for shard in self.shards:
            self._by_context.setdefault(shard.context, []).append(shard)
        self.unit = unit
        self.ttl_ms = ttl_ms
        self.member = member
        self.running: dict[Shard, _Running] = {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        interval = self.ttl_ms / 3000
        async with anyio.create_task_group() as tg:
            try:
                await self._tick(tg)
                task_status.started()
                while True:
                    await anyio.sleep(interval)
                    try:
                        await self._tick(tg)
                    except FAILED as exc:
                        log.warning("balancer-tick-failed role=%s error=%s", self.role, exc)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_GRACE_S + 2):
                    await self._leave()
                tg.cancel_scope.cancel()

    async def _leave(self) -> None:
        for shard in list(self.running):
            await self._stop(shard)
        try:
            await self.redis.zrem(self.keys.members(self.role), self.member)
        except FAILED as exc:  # Redis away: the heartbeat just ages out
            log.warning("balancer-leave-failed role=%s error=%s", self.role, exc)

    async def _tick(self, tg: TaskGroup) -> None:
        now_ms = int(time.time() * 1000)
        members = self.keys.members(self.role)
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip
            pipe.zadd(members, {self.member: now_ms})
            pipe.zremrangebyscore(members, 0, now_ms - self.ttl_ms)
            pipe.zcard(members)
            *_, count = await pipe.execute()
        alive = max(1, int(count))

        for shard, running in list(self.running.items()):
            if running.done.is_set():
                await self._stop(shard)
            elif not await running.lease.renew():
                log.warning("shard-lease-lost role=%s shard=%s", self.role, shard.name)
                await self._stop(shard)
        taken: list[str] = []
        for context, shards in self._by_context.items():
            fair = math.ceil(len(shards) / alive)
            held = [s for s in self.running if s.context == context]
            while len(held) > fair:
                shard = max(held, key=lambda s: s.number)
                held.remove(shard)
                log.info("shard-handed-over role=%s shard=%s", self.role, shard.name)
                await self._stop(shard)
            free = [s for s in shards if s not in self.running]
            random.shuffle(free)
            for shard in free:
                if len(held) >= fair:
                    break
                lease = ShardLease(
                    self.redis,
                    self.scripts,
                    self.keys.lease(shard, self.role),
                    self.member,
                    self.ttl_ms,
                )
                if await lease.acquire():
                    log.debug("shard-taken role=%s shard=%s", self.role, shard.name)
                    self._start(tg, shard, lease)
                    held.append(shard)
                    taken.append(shard.name)
        if taken:  # one line a tick, not one a shard (dozens at start)
            log.info(
                "shards-taken role=%s count=%d held=%d", self.role, len(taken), len(self.running)
            )

    def _start(self, tg: TaskGroup, shard: Shard, lease: ShardLease) -> None:
        running = _Running(lease=lease, scope=anyio.CancelScope())
        self.running[shard] = running

        async def unit() -> None:
            try:
                with running.scope:
                    await self.unit(shard, lease)
            except LeaseLost:
                log.warning("shard-fenced role=%s shard=%s", self.role, shard.name)
            except Exception:
                log.exception("shard-unit-crashed role=%s shard=%s", self.role, shard.name)
            finally:
                running.done.set()

        tg.start_soon(unit, name=f"{self.role}:{shard.name}")

    async def _stop(self, shard: Shard) -> None:
        """Stop a unit, wait until it has stopped, then release its lease."""
        running = self.running.pop(shard)
        running.scope.cancel()
        await running.done.wait()
        try:
            await running.lease.release()
        except FAILED as exc:
            log.warning("lease-release-failed shard=%s error=%s", shard.name, exc)
