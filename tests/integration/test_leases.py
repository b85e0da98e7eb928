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


async def test_each_context_is_divided_evenly(settings, redis) -> None:
    """Fair shares per context: one process never ends up with every shard of a
    busy context while another holds only quiet ones."""
    keys = Keys(settings.key_prefix, 4)
    scripts = Scripts(redis)
    contexts = ("chat_sessions", "traces", "tools")
    shards = [s for c in contexts for s in keys.shards_of(c)]
    owners = Owners()

    def balancer(member: str) -> Balancer:
        unit = owners.unit(member)
        return Balancer(redis, scripts, keys, "worker", shards, unit, ttl_ms=1500, member=member)

    def split() -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for shard, member in owners.running.items():
            counts[member, shard.context] = counts.get((member, shard.context), 0) + 1
        return counts

    async with anyio.create_task_group() as tg:
        tg.start_soon(balancer("a").run)
        await eventually(lambda: _true(owners.count("a") == 12))
        tg.start_soon(balancer("b").run)
        even = {(m, c): 2 for m in "ab" for c in contexts}
        await eventually(lambda: _true(split() == even), within=10)
        assert owners.overlaps == 0
        tg.cancel_scope.cancel()
