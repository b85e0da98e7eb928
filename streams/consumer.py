"""The one consumer-group read loop, shared by command workers, projectors and
process managers.

On taking over a shard, the new owner first claims every entry still pending in
the group (the previous owner's, with XAUTOCLAIM and min-idle 0 — safe because the
lease says that owner is gone), re-reads its own pending entries from `0`, and only
then reads new ones with `>`. Entries idle longer than `claim_idle_ms` are claimed
again periodically. `handle(entries)` returns the ids to XACK; when it raises, the
loop backs off (bounded, with jitter) and re-reads its pending entries, so nothing
read is ever skipped.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from redis.exceptions import RedisError, ResponseError

from app.settings import Settings
from streams.connection import BLOCK_MS, Redis, Scripts
from streams.keys import Keys, Shard
from streams.lease import Balancer, LeaseLost, ShardLease

log = logging.getLogger("eddy.consumer")
T = TypeVar("T")

Entry = tuple[bytes, dict[bytes, bytes]]
Handle = Callable[[list[Entry]], Awaitable[list[bytes]]]

RETRYABLE: tuple[type[BaseException], ...] = (RedisError, OSError)


class Backoff:
    """Exponential backoff with jitter, capped; reset after a success."""

    def __init__(self, first_s: float = 0.05, cap_s: float = 5.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.next_s = first_s

    def reset(self) -> None:
        self.next_s = self.first_s

    async def sleep(self) -> None:
        await anyio.sleep(self.next_s * random.uniform(0.5, 1.0))
        self.next_s = min(self.next_s * 2, self.cap_s)


async def poll(
    check: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    *,
    within_s: float,
    first_s: float,
    cap_s: float,
) -> T:
    """Call `check` until `ok(result)` or `within_s` has passed, pausing a little
    longer each time (from `first_s` up to `cap_s`); return the last result."""
    result = await check()
    delay = first_s
    with anyio.move_on_after(within_s):
        while not ok(result):
            await anyio.sleep(delay)
            delay = min(delay * 1.5, cap_s)
            result = await check()
    return result


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create the group at the stream's start (`0`), so no earlier entry is missed."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def consume(
    redis: Redis,
    stream: str,
    group: str,
    consumer: str,
    handle: Handle,
    *,
    lease: ShardLease,
    batch: int,
    claim_idle_ms: int,
    retry_on: tuple[type[BaseException], ...] = RETRYABLE,
) -> None:
    """Feed `handle` every entry of `stream` for `group`, in order, until cancelled."""
    reader = GroupReader(redis, stream, group, consumer, handle, lease, batch, claim_idle_ms)
    backoff = Backoff()
    taken_over = False
    while True:
        try:
            if not lease.held():
                raise LeaseLost(stream)
            await ensure_group(redis, stream, group)
            if not taken_over:
                await reader.claim(min_idle_ms=0)
                taken_over = True
            await reader.drain_pending()
            await reader.read_new()
            backoff.reset()
        except retry_on as exc:
            log.warning("consumer-retry stream=%s error=%r", stream, exc)
            await backoff.sleep()


def event_consumers(
    redis: Redis,
    scripts: Scripts,
    keys: Keys,
    settings: Settings,
    *,
    group: str,
    contexts: Sequence[str],
    member: str,
    handler: Callable[[Shard], Handle],
    retry_on: tuple[type[BaseException], ...] = RETRYABLE,
) -> Balancer:
    """One consumer of `group` on each event stream of `contexts` this process owns
    (a fair share, through leases); `handler(shard)` handles that shard's batches."""

    async def unit(shard: Shard, lease: ShardLease) -> None:
        await consume(
            redis,
            keys.event_stream(shard),
            group,
            member,
            handler(shard),
            lease=lease,
            batch=settings.batch_size,
            claim_idle_ms=settings.claim_idle_ms,
            retry_on=retry_on,
        )

    shards = [s for context in contexts for s in keys.shards_of(context)]
    return Balancer(
        redis, scripts, keys, group, shards, unit, ttl_ms=settings.lease_ttl_ms, member=member
    )


@dataclass(frozen=True)
class GroupReader:
    """One consumer of one group on one stream, held by the shard's lease."""

    redis: Redis
    stream: str
    group: str
    consumer: str
    handle: Handle
    lease: ShardLease
    batch: int
    claim_idle_ms: int

    async def claim(self, min_idle_ms: int) -> int:
        """Move entries idle at least `min_idle_ms` to this consumer; return how many."""
        claimed = 0
        start = "0-0"
        while True:
            reply: Any = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=min_idle_ms,
                start_id=start,
                count=self.batch,
            )
            # Not JUSTID: redis-py drops the cursor from a JUSTID reply.
            start, claimed_now = reply[0], reply[1]
            claimed += len(claimed_now)
            if start in (b"0-0", "0-0"):
                return claimed

    async def drain_pending(self) -> None:
        """Handle the entries already delivered to this consumer, in stream order."""
        cursor: bytes | str = "0"
        while entries := await self._read(cursor):
            cursor = entries[-1][0]
            await self._handle(entries)

    async def read_new(self) -> None:
        """Read new entries until stale ones need claiming; then return to re-drain."""
        every_s = self.claim_idle_ms / 2000
        next_claim = time.monotonic() + every_s
        while True:
            entries = await self._read(">", block=BLOCK_MS)
            if entries:
                await self._handle(entries)
            if time.monotonic() >= next_claim:
                next_claim = time.monotonic() + every_s
                if await self.claim(self.claim_idle_ms):
                    return

    async def _read(self, cursor: bytes | str, block: int | None = None) -> list[Entry]:
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: cursor}, count=self.batch, block=block
        )
        return reply[0][1] if reply else []

    async def _handle(self, entries: list[Entry]) -> None:
        if not self.lease.held():
            raise LeaseLost(self.stream)
        # An entry deleted from the stream while pending comes back without fields.
        live = [(entry_id, fields) for entry_id, fields in entries if fields]
        gone = [entry_id for entry_id, fields in entries if not fields]
        done = await self.handle(live) if live else []
        if done or gone:
            await self.redis.xack(self.stream, self.group, *done, *gone)
