"""The command bus: accept a command into its shard's stream, and tell its status.

Submission is two steps: a locator (`command id → shard, type and payload digest`,
in its own slot, written first with SET NX) and one Lua step in the shard's slot
that records the status and XADDs the command (each step one pipeline per batch).
A retry with the same id finds both and appends nothing; one with the same id but
another type or payload is refused (`IdempotencyKeyReused`, 422). If Redis fails
anywhere, the caller gets `Unavailable` (503) and retries with the same id: a
locator without a status is a command never accepted.

The digest is of the payload's canonical JSON (keys sorted, the server-made
aggregate id filled in), so a retry that spells the same object differently is the
same command. A locator written without one (before digests, or restored by a
dead-letter replay) is compared by type alone.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from core.catalog import Catalog
from core.errors import ConfigurationError, EddyError, IdempotencyKeyReused, Unavailable
from core.messages import CommandRecord, Envelope
from core.outages import FAILED, poll
from streams.batching import Coalescer
from streams.connection import Redis, Scripts
from streams.entries import read_event
from streams.keys import Keys, Shard
from streams.positions import event_position

log = logging.getLogger("eddy.bus")

FINAL = ("processed", "failed")


class Accepted(msgspec.Struct, frozen=True, kw_only=True):
    command_id: str
    status: str
    aggregate_id: str
    new: bool
    """False when the id was already known (a retry)."""


class CommandStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    command_id: str
    type: str
    status: str
    aggregate_id: str
    error: dict[str, Any] | None = None
    events: list[str] | None = None
    position: str | None = None
    shard: Shard | None = None
    entry: str | None = None
    """The stream id of the command's last event (internal)."""

    def public(self) -> dict[str, Any]:
        """What a client is told (`GET /v1/commands/{id}`, a WebSocket `result` frame)."""
        shown: dict[str, Any] = {
            "command_id": self.command_id,
            "type": self.type,
            "status": self.status,
            "aggregate_id": self.aggregate_id,
        }
        for name in ("error", "events", "position"):
            if (value := getattr(self, name)) is not None:
                shown[name] = value
        return shown


_encoder = msgspec.json.Encoder()
_canonical = msgspec.json.Encoder(order="sorted")


def payload_digest(payload: msgspec.Raw | bytes) -> str:
    """A digest of a command payload's canonical JSON (object keys sorted)."""
    canonical = _canonical.encode(msgspec.json.decode(payload))
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def same_command(known: str, where: str) -> bool:
    """Whether two locators (`context:shard:type[:digest]`) name the same command."""
    known_parts, parts = known.split(":"), where.split(":")
    if known_parts[:3] != parts[:3]:
        return False
    return len(known_parts) < 4 or len(parts) < 4 or known_parts[3] == parts[3]


def _reused(command_id: str) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        f"Idempotency-Key {command_id!r} already names another command"
        " (another type or payload); use a new key for a new command"
    )


class _Pending:
    """One submission waiting for the batch it rides in."""

    __slots__ = ("done", "outcome", "record", "shard")

    def __init__(self, record: CommandRecord, shard: Shard) -> None:
        self.record = record
        self.shard = shard
        self.done = anyio.Event()
        self.outcome: Accepted | EddyError | None = None


def _stopping(left: list[_Pending]) -> None:
    for pending in left:
        pending.outcome = Unavailable("the web process is stopping; retry with the same key")
        pending.done.set()


class CommandBus:
    """Accepts commands and reads their statuses.

    While `run()` is running (the web process runs it), concurrent submissions are
    coalesced: whatever arrived during the previous batch's round trips goes to
    Redis as the next batch, in two pipelines. LIMITS.md measured one XADD per
    request at 0.35x a bare endpoint and coalesced XADDs at 0.64x. Without `run()`,
    each submission is a batch of one.
    """

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        status_ttl_s: int,
        catalog: Catalog,
        batch_limit: int = 256,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.status_ttl_s = status_ttl_s
        self.catalog = catalog
        self.batch_limit = batch_limit
        self._layout_checked = False
        """Whether the shard count was checked against the data's (before the first write)."""
        self._batches = Coalescer(self._flush, stopped=_stopping, limit=batch_limit)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send queued submissions in batches until cancelled."""
        await self._batches.run(task_status=task_status)

    async def submit(self, record: CommandRecord, shard: Shard) -> Accepted:
        """Accept a command (idempotent by its id). Raises `Unavailable`, `IdempotencyKeyReused`."""
        pending = _Pending(record, shard)
        await self._batches.put(pending, pending.done)
        assert pending.outcome is not None
        if isinstance(pending.outcome, EddyError):
            raise pending.outcome
        return pending.outcome

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            with anyio.CancelScope(shield=True):  # waiters depend on this batch's outcome
                await self.check_layout()
                await self._submit(batch)
        except FAILED as exc:
            for pending in batch:
                pending.outcome = Unavailable(f"Redis unavailable: {exc}; retry with the same key")
        except ConfigurationError as exc:
            log.critical("shard-layout-mismatch error=%s", exc.message)
            for pending in batch:
                pending.outcome = Unavailable(f"this process is misconfigured: {exc.message}")
        finally:
            for pending in batch:
                pending.done.set()

    async def check_layout(self) -> None:
        """Check the shard count against the data's once, before the first write."""
        if not self._layout_checked:
            await check_layout(self.redis, self.keys)
            self._layout_checked = True

    async def _submit(self, batch: list[_Pending]) -> None:
        """Locators first (SET NX), then the submit step of every command not in conflict."""
        wheres = [
            f"{p.shard.context}:{p.shard.number}:{p.record.type}:{payload_digest(p.record.payload)}"
            for p in batch
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for pending, where in zip(batch, wheres, strict=True):
                locator = self.keys.command_locator(pending.record.tenant_id, pending.record.id)
                pipe.set(locator, where, nx=True, ex=self.status_ttl_s)
                pipe.get(locator)
            replies = await pipe.execute()
        accepted: list[_Pending] = []
        for i, (pending, where) in enumerate(zip(batch, wheres, strict=True)):
            known = replies[2 * i + 1]
            if known is not None and not same_command(known.decode(), where):
                pending.outcome = _reused(pending.record.id)
            else:
                accepted.append(pending)
        if not accepted:
            return
        replies = await self.scripts.pipelined(
            [
                (
                    self.scripts.submit,
                    [
                        self.keys.command_status(p.shard, p.record.tenant_id, p.record.id),
                        self.keys.command_stream(p.shard),
                    ],
                    [
                        p.record.type,
                        p.record.aggregate_id,
                        _encoder.encode(p.record),
                        self.status_ttl_s,
                        p.record.accepted_at.isoformat(),
                    ],
                )
                for p in accepted
            ]
        )
        for pending, reply in zip(accepted, replies, strict=True):
            if isinstance(reply, Exception):
                pending.outcome = Unavailable(f"Redis refused the command: {reply}; retry")
                continue
            kind, status, _type, aggregate_id = (part.decode() for part in reply)
            if kind == "known" and aggregate_id != pending.record.aggregate_id:
                pending.outcome = _reused(pending.record.id)
            else:
                pending.outcome = Accepted(
                    command_id=pending.record.id,
                    status=status,
                    aggregate_id=aggregate_id,
                    new=kind == "new",
                )

    async def status(self, tenant_id: str, command_id: str) -> CommandStatus | None:
        """The command's status, or None if this tenant has no such command."""
        (found,) = await self.statuses(tenant_id, [command_id])
        return found

    async def statuses(self, tenant_id: str, command_ids: list[str]) -> list[CommandStatus | None]:
        """The statuses of many commands of one tenant, in two round trips (the
        locators, then the status hashes); None where `status()` would say None."""
        if not command_ids:
            return []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command_id in command_ids:
                    pipe.get(self.keys.command_locator(tenant_id, command_id))
                wheres: list[bytes | None] = await pipe.execute()
            located = [
                (command_id, where.decode().split(":")[:3])
                for command_id, where in zip(command_ids, wheres, strict=True)
                if where is not None
            ]
            async with self.redis.pipeline(transaction=False) as pipe:
                for command_id, (context, number, _type) in located:
                    shard = Shard(context, int(number))
                    pipe.hgetall(self.keys.command_status(shard, tenant_id, command_id))
                hashes: list[dict[bytes, bytes]] = await pipe.execute()
        except FAILED as exc:
            raise Unavailable(f"Redis unavailable: {exc}") from exc
        found: dict[str, CommandStatus] = {}
        for (command_id, (context, number, command_type)), fields in zip(
            located, hashes, strict=True
        ):
            if not fields:
                continue
            shard = Shard(context, int(number))
            get = {k.decode(): v.decode() for k, v in fields.items()}
            entry = get.get("position")
            found[command_id] = CommandStatus(
                command_id=command_id,
                type=command_type,
                status=get["status"],
                aggregate_id=get.get("aggregate_id", ""),
                error=msgspec.json.decode(get["error"]) if get.get("error") else None,
                events=get["events"].split(",") if get.get("events") else None,
                position=event_position(shard, entry) if entry else None,
                shard=shard,
                entry=entry,
            )
        return [found.get(command_id) for command_id in command_ids]

    async def wait(self, tenant_id: str, command_id: str, timeout_s: float) -> CommandStatus | None:
        """Poll the status until it is final or `timeout_s` passes; return the last seen."""
        return await poll(
            lambda: self.status(tenant_id, command_id),
            lambda status: status is not None and status.status in FINAL,
            within_s=timeout_s,
            first_s=0.002,
            cap_s=0.05,
        )

    async def events_of(self, status: CommandStatus) -> list[Envelope]:
        """The stored envelopes of a processed command (consecutive entries of its shard)."""
        if not (status.events and status.entry and status.shard):
            return []
        try:
            entries: Any = await self.redis.xrevrange(
                self.keys.event_stream(status.shard),
                max=status.entry,
                min="-",
                count=len(status.events),
            )
        except FAILED as exc:
            raise Unavailable(f"Redis unavailable: {exc}") from exc
        shard = status.shard
        return [
            read_event(shard, entry_id.decode(), fields[b"e"], self.catalog)
            for entry_id, fields in reversed(entries)
        ]


async def check_layout(redis: Redis, keys: Keys) -> None:
    """Record the shard count on first start; refuse to run with a different one.

    An aggregate's shard is its hash modulo the shard count: changing the count
    would move aggregates to other streams and break their order.
    """
    meta = keys.meta()
    await redis.hsetnx(meta, "shards", keys.shards)
    recorded = int(await redis.hget(meta, "shards") or keys.shards)
    if recorded != keys.shards:
        raise ConfigurationError(
            f"EDDY_SHARDS is {keys.shards} but this deployment's data uses {recorded} shards"
        )
