"""Shard leases: processes of one role divide the shards, and take over a dead one's."""

from __future__ import annotations

import time

import anyio

from streams.connection import Scripts
from streams.keys import Keys, Shard
from streams.lease import Balancer, ShardLease
from tests.pipeline import eventually


class Owners:
    """Which member runs which shard right now (the units record themselves)."""

    def __init__(self) -> None:
        self.running: dict[Shard, str] = {}
        self.overlaps = 0

    def unit(self, member: str):
        async def run(shard: Shard, lease: ShardLease) -> None:
            if shard in self.running:
                self.overlaps += 1
            self.running[shard] = member
            try:
                await anyio.sleep_forever()
            finally:
                if self.running.get(shard) == member:
                    del self.running[shard]

        return run

    def count(self, member: str) -> int:
        return sum(1 for m in self.running.values() if m == member)


async def test_members_divide_the_shards_and_take_over_a_dead_one(settings, redis) -> None:
    keys = Keys(settings.key_prefix, 8)
    scripts = Scripts(redis)
    shards = keys.shards_of("chat_sessions")
    owners = Owners()

    crashed = anyio.Event()

    class Crashing(Balancer):
        async def _leave(self) -> None:
            if not crashed.is_set():
                await super()._leave()

    def balancer(member: str) -> Balancer:
        return Crashing(
            redis, scripts, keys, "worker", shards, owners.unit(member), ttl_ms=1500, member=member
        )

    async with anyio.create_task_group() as tg:
        first = anyio.CancelScope()

        async def run_first() -> None:
            with first:
                await balancer("a").run()

        tg.start_soon(run_first)
        await eventually(lambda: _true(owners.count("a") == 8))
        tg.start_soon(balancer("b").run)
        await eventually(lambda: _true(owners.count("a") == 4 and owners.count("b") == 4))

        # "a" dies without releasing anything (as if SIGKILLed): its leases must expire.
        crashed.set()
        first.cancel()
        died = time.monotonic()
        await eventually(lambda: _true(owners.count("b") == 8), within=10)
        took = time.monotonic() - died
        assert 1.0 < took < 1.5 + 2.0, f"takeover took {took:.1f} s"
        assert owners.overlaps == 0
        tg.cancel_scope.cancel()


async def _true(value: bool) -> bool:
    return value
