"""The one consumer-group read loop, shared by command workers, projectors and
process managers.

On taking over a shard, the new owner first claims every entry still pending in
the group (the previous owner's, with XAUTOCLAIM and min-idle 0 — safe because the
lease says that owner is gone), re-reads its own pending entries from `0`, and only
then reads new ones with `>`. Entries idle longer than `claim_idle_ms` are claimed
again periodically. `handle(entries)` returns the ids to XACK; when it raises, the
loop backs off (bounded, with jitter) and re-reads its pending entries, so nothing
read is ever skipped.

A stop (SIGTERM, a shard handed over) lets the batch in hand finish and be
acknowledged (it is shielded from the cancellation, for at most `STOP_GRACE_S`),
then handles whatever else was delivered to this consumer — a read whose reply the
cancellation cut off — so a stopping process leaves nothing pending under its name
and no half-done batch to the next owner.

Poison entries (guarantee 6): given a `Poison`, a batch that fails with an error
that does not say a server is `DOWN` (a Lua error, an undecodable entry, a broken
constraint) is handled again one entry at a time, in order, so the entries before
the culprit go through; the culprit's own failures are counted (in memory: a new
owner of the shard counts afresh) and, at `max_attempts`, `bury` moves it to the
shard's dead letters (`streams/deadletters.py`) and the entries after it flow on.
A server being down (`core/outages.py`) never counts: the loop only backs off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
from redis.exceptions import ResponseError

from core.outages import DOWN, FAILED, Backoff
from core.settings import Settings
from streams.connection import BLOCK_MS, Redis, Scripts
from streams.entries import Entry
from streams.keys import Keys, Shard
from streams.lease import STOP_GRACE_S, Balancer, LeaseLost, ShardLease

log = logging.getLogger("eddy.consumer")

Handle = Callable[[list[Entry]], Awaitable[list[bytes]]]

Bury = Callable[[Entry, BaseException, int], Awaitable[None]]
"""Moves one entry out of its stream (a dead letter, acknowledged), given the error
of its last attempt and the number of attempts."""


@dataclass(frozen=True)
class Poison:
    """What a consumer does with an entry that keeps failing: after `max_attempts`
    failures of its own it is buried, and the entries after it flow on."""

    bury: Bury
    max_attempts: int

    passing: ClassVar[tuple[type[BaseException], ...]] = (*DOWN, LeaseLost)
    """What no attempt is counted for: a server down, and a lost lease."""


class Failing(Exception):
    """An entry failed fewer than `max_attempts` times so far: back off, read it again."""


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
    poison: Poison | None = None,
) -> None:
    """Feed `handle` every entry of `stream` for `group`, in order, until cancelled
    (with `poison`: an entry that keeps failing is buried after its attempts)."""
    backoff = Backoff()

    async def handled(entries: list[Entry]) -> list[bytes]:
        done = await handle(entries)
        backoff.reset()  # the next failure starts from a short pause again
        return done

    reader = GroupReader(
        redis, stream, group, consumer, handled, lease, batch, claim_idle_ms, poison
    )
    taken_over = False
    retrying: tuple[type[BaseException], ...] = (*FAILED, Failing)
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
        except retrying as exc:
            log.warning("consumer-retry stream=%s error=%r", stream, exc)
            await backoff.sleep()
        except anyio.get_cancelled_exc_class():
            await _finish_pending(reader, retrying)
            raise


async def _finish_pending(reader: GroupReader, retrying: tuple[type[BaseException], ...]) -> None:
    """On a stop (shutdown, shard handed over): handle what this consumer was
    delivered but did not handle — a read whose reply the cancellation cut off — so
    nothing is left pending under its name; for at most `STOP_GRACE_S`."""
    passing: tuple[type[BaseException], ...] = (*retrying, LeaseLost)
    with anyio.CancelScope(shield=True, deadline=anyio.current_time() + STOP_GRACE_S):
        try:
            if reader.lease.held():
                await reader.drain_pending()
        except passing as exc:
            log.warning("consumer-left-pending stream=%s error=%r", reader.stream, exc)


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
    poison: Callable[[Shard, ShardLease], Poison] | None = None,
) -> Balancer:
    """One consumer of `group` on each event stream of `contexts` this process owns
    (a fair share, through leases); `handler(shard)` handles that shard's batches,
    `poison(shard, lease)` says what becomes of an entry that keeps failing."""

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
            poison=None if poison is None else poison(shard, lease),
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
    poison: Poison | None = None
    attempts: dict[bytes, int] = field(default_factory=dict)
    """Failures of entries handled alone, by entry id (until settled)."""

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
        # Shielded: a stop lets the batch in hand finish and be acknowledged, so a
        # stopping process leaves nothing half-done (a rolled-back transaction, an
        # applied batch unacknowledged) to the next owner. Bounded all the same.
        deadline = anyio.current_time() + STOP_GRACE_S
        with anyio.CancelScope(shield=True, deadline=deadline) as batch:
            # An entry deleted from the stream while pending comes back without fields.
            live = [(entry_id, fields) for entry_id, fields in entries if fields]
            gone = [entry_id for entry_id, fields in entries if not fields]
            done: list[bytes] = []
            if live:
                done = await (self.handle(live) if self.poison is None else self._guarded(live))
            if done or gone:
                await self.redis.xack(self.stream, self.group, *done, *gone)
        if batch.cancelled_caught:
            raise TimeoutError(f"a batch of {self.stream} took over {STOP_GRACE_S} s")

    async def _guarded(self, entries: list[Entry]) -> list[bytes]:
        """Handle a batch; if it fails, or holds an entry that failed before, handle
        its entries one at a time, in order, acknowledging each as it goes."""
        assert self.poison is not None
        suspect = self.attempts and any(entry_id in self.attempts for entry_id, _ in entries)
        if len(entries) > 1 and not suspect:
            try:
                return await self.handle(entries)
            except self.poison.passing:
                raise
            except Exception as exc:
                log.warning(
                    "batch-failed stream=%s group=%s entries=%d error=%r: one at a time",
                    self.stream,
                    self.group,
                    len(entries),
                    exc,
                )
        for entry in entries:
            done = await self._alone(entry, self.poison)
            if done:
                await self.redis.xack(self.stream, self.group, *done)
        return []

    async def _alone(self, entry: Entry, poison: Poison) -> list[bytes]:
        """Handle one entry; count its failure, and bury it at `max_attempts`."""
        entry_id = entry[0]
        if not self.lease.held():
            raise LeaseLost(self.stream)
        try:
            done = await self.handle([entry])
        except poison.passing:
            raise
        except Exception as exc:
            attempts = self.attempts[entry_id] = self.attempts.get(entry_id, 0) + 1
            if attempts < poison.max_attempts:
                raise Failing(
                    f"entry {entry_id.decode()} failed ({attempts} of {poison.max_attempts}):"
                    f" {type(exc).__name__}: {exc}"
                ) from exc
            await poison.bury(entry, exc, attempts)
            self.attempts.pop(entry_id, None)
            return []
        self.attempts.pop(entry_id, None)
        return done
