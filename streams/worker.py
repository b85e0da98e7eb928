"""The command worker: decide each command on its aggregate and apply the outcome
in one atomic Lua step per batch, which also acknowledges it.

```
XREADGROUP batch ─▶ load.lua: mark `consumed`, read the states not cached
      ─▶ decide in order (pure context code)
      ─▶ apply.lua (fenced by the lease; per command: dedup · version · state · XADD ·
         status · XACK) ─▶ conflicts? drop their cached state, decide them again
```

Two hooks of a context run before deciding, outside the shard's slot: `related`
reads another aggregate's state for `decide` (a read, never a write), and
`unique` reserves a value in the tenant for the command (SET NX, held by the
command id, so a redelivered command finds its own reservation); a command that
fails frees what it reserved once its failure is recorded.

The owner of a shard keeps the states of recently used aggregates in memory, so
a batch costs three round trips whatever its size. The XACK is part of the apply
step: no crash can leave an applied command unacknowledged. The cache is only a
guess: `apply.lua` checks every version, and a stale guess is decided again.

A crash in a context's `decide` fails that command (`internal_error`) at once. A
batch whose load or apply step keeps raising is narrowed down to its culprit by
the consumer loop, which buries it after `EDDY_MAX_ATTEMPTS` (`streams/deadletters.py`:
status `failed`, code `dead_lettered`, reservation freed); a record that cannot be
decoded is buried at once.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec

from core.catalog import Catalog
from core.errors import Rejected
from core.messages import (
    CommandRecord,
    Context,
    Envelope,
    Event,
    Issued,
    Metadata,
    new_id,
    record_decoder,
    utcnow,
)
from core.settings import Settings
from streams.connection import Redis, Scripts
from streams.consumer import Poison, consume
from streams.deadletters import DeadLetters
from streams.entries import Entry
from streams.keys import COMMAND_GROUP, Keys, Shard
from streams.lease import Balancer, LeaseLost, ShardLease

log = logging.getLogger("eddy.worker")

ROLE = "worker"
CACHE_SIZE = 10_000
MAX_ROUNDS = 8

_encoder = msgspec.json.Encoder()


class _Command(NamedTuple):
    entry_id: bytes
    record: CommandRecord


class _Prepared(msgspec.Struct):
    """What the context's hooks found for one command before it is decided."""

    related: Any = None
    reserved: str = ""
    """The reservation key this command holds."""
    taken: tuple[str, str] | None = None
    """The `(scope, value)` another command holds."""


class _Decision(msgspec.Struct):
    command: _Command
    status_key: str
    aggregate_key: str
    expected: int
    reserved: str = ""
    outcome: str = "processed"
    state: bytes = b""
    error: bytes = b""
    envelopes: list[bytes] = []
    event_ids: list[str] = []


class ShardWorker:
    """Applies the commands of one shard while this process holds its lease."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        settings: Settings,
        catalog: Catalog,
        shard: Shard,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.settings = settings
        self.catalog = catalog
        self.shard = shard
        self.states: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self.lease: ShardLease | None = None
        self.dead_letters = DeadLetters(redis, scripts, keys, settings.command_ttl_s, catalog)

    async def run(self, lease: ShardLease, consumer: str) -> None:
        self.lease = lease
        await consume(
            self.redis,
            self.keys.command_stream(self.shard),
            COMMAND_GROUP,
            consumer,
            self.handle,
            lease=lease,
            batch=self.settings.batch_size,
            claim_idle_ms=self.settings.claim_idle_ms,
            poison=Poison(bury=self.bury, max_attempts=self.settings.max_attempts),
        )

    async def handle(self, entries: list[Entry]) -> list[bytes]:
        """Apply a batch (`apply.lua` acknowledges it); bury undecodable records."""
        commands: list[_Command] = []
        for entry_id, fields in entries:
            try:
                commands.append(_Command(entry_id, record_decoder.decode(fields[b"c"])))
            except (KeyError, msgspec.DecodeError) as exc:
                log.error("command-undecodable stream=%s entry=%s", self.shard.name, entry_id)
                await self.bury((entry_id, fields), exc, 1)
        pending = commands
        marked = False
        for _ in range(MAX_ROUNDS):
            if not pending:
                return []
            await self._load(pending, mark_consumed=not marked)
            marked = True
            pending = await self._apply_round(pending)
        raise RuntimeError(f"commands kept conflicting on shard {self.shard.name}")

    async def bury(self, entry: Entry, error: BaseException, attempts: int) -> None:
        """Move a command that keeps failing to the shard's dead letters (its status
        `failed`), and free the value it reserved, as a failed command does."""
        assert self.lease is not None
        dead = await self.dead_letters.bury(
            self.lease, self.shard, COMMAND_GROUP, entry, error, attempts
        )
        if dead is None:
            return
        try:
            record = record_decoder.decode(entry[1][b"c"])
            command_type = self.catalog.commands[record.type]
            command = command_type.decoder.decode(record.payload)
        except (KeyError, msgspec.DecodeError):
            return
        unique = command_type.context.unique
        if unique is not None and (claim := unique(command)) is not None:
            key = self.keys.reservation(command_type.context.name, record.tenant_id, *claim)
            await self.scripts.lease_release(keys=[key], args=[record.id])

    def _status_key(self, record: CommandRecord) -> str:
        return self.keys.command_status(self.shard, record.tenant_id, record.id)

    def _aggregate_key(self, record: CommandRecord) -> str:
        return self.keys.aggregate(self.shard, record.tenant_id, record.aggregate_id)

    async def _apply_round(self, commands: Sequence[_Command]) -> list[_Command]:
        """Decide and apply `commands` in order; return those to decide again."""
        prepared = await self._prepare(commands)
        decisions = [self._decide(c, prepared.get(c.entry_id)) for c in commands]
        assert self.lease is not None
        args: list[Any] = [self.lease.owner, self.settings.command_ttl_s, COMMAND_GROUP]
        keys = [
            self.keys.event_stream(self.shard),
            self.lease.key,
            self.keys.command_stream(self.shard),
        ]
        for d in decisions:
            keys += [d.aggregate_key, d.status_key]
            args += [d.command.entry_id, d.outcome, d.expected, d.state, d.error]
            args += [",".join(d.event_ids), len(d.envelopes), *d.envelopes]
        replies = await self.scripts.apply(keys=keys, args=args)
        if replies == b"fenced":
            raise LeaseLost(self.shard.name)
        again: list[_Command] = []
        for decision, reply in zip(decisions, replies, strict=True):
            if reply[0] == b"ok" and decision.outcome == "failed" and decision.reserved:
                await self.scripts.lease_release(
                    keys=[decision.reserved], args=[decision.command.record.id]
                )
            if reply[0] == b"conflict":
                self.states.pop(decision.aggregate_key, None)
                again.append(decision.command)
            elif reply[0] == b"duplicate":
                self.states.pop(decision.aggregate_key, None)
        return again

    async def _prepare(self, commands: Sequence[_Command]) -> dict[bytes, _Prepared]:
        """Run the `related` and `unique` hooks of the commands whose context has them."""
        prepared: dict[bytes, _Prepared] = {}
        for entry_id, record in commands:
            command_type = self.catalog.commands.get(record.type)
            if command_type is None:
                continue
            context = command_type.context
            if context.related is None and context.unique is None:
                continue
            try:
                command = command_type.decoder.decode(record.payload)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue  # `_decide` fails it
            found = prepared[entry_id] = _Prepared()
            if context.related is not None and (ref := context.related(command)) is not None:
                found.related = await self._state_of(record.tenant_id, *ref)
            if context.unique is not None and (claim := context.unique(command)) is not None:
                key = self.keys.reservation(context.name, record.tenant_id, *claim)
                if await self._reserve(key, record.id):
                    found.reserved = key
                else:
                    found.taken = claim
        return prepared

    async def _state_of(self, tenant_id: str, context: str, aggregate_id: str) -> Any:
        shard = self.keys.shard_of(context, tenant_id, aggregate_id)
        raw: Any = await self.redis.hget(
            self.keys.aggregate(shard, tenant_id, aggregate_id), "state"
        )
        return None if raw is None else _decode_state(self.catalog.by_name[context], raw)

    async def _reserve(self, key: str, command_id: str) -> bool:
        """Take `key` for the command unless another command holds it."""
        while True:
            if await self.redis.set(key, command_id, nx=True):
                return True
            holder = await self.redis.get(key)
            if holder is not None:
                return bool(holder == command_id.encode())

    async def _load(self, commands: Sequence[_Command], *, mark_consumed: bool) -> None:
        """Mark the batch `consumed` (once) and load the states the cache lacks."""
        missing = list(
            dict.fromkeys(
                key for c in commands if (key := self._aggregate_key(c.record)) not in self.states
            )
        )
        statuses = [self._status_key(c.record) for c in commands] if mark_consumed else []
        if not (missing or statuses):
            return
        rows = await self.scripts.load_states(keys=[*statuses, *missing], args=[len(statuses)])
        for key, (version, state) in zip(missing, rows, strict=True):
            self._remember(key, int(version or 0), state)

    def _remember(self, key: str, version: int, state: Any) -> None:
        self.states[key] = (version, state)
        self.states.move_to_end(key)
        while len(self.states) > CACHE_SIZE:
            self.states.popitem(last=False)

    def _decide(self, command: _Command, prepared: _Prepared | None) -> _Decision:
        record = command.record
        prepared = prepared or _Prepared()
        aggregate_key = self._aggregate_key(record)
        version, raw_state = self.states[aggregate_key]
        decision = _Decision(
            command=command,
            status_key=self._status_key(record),
            aggregate_key=aggregate_key,
            expected=version,
            reserved=prepared.reserved,
        )
        command_type = self.catalog.commands.get(record.type)
        if command_type is None or command_type.context.name != self.shard.context:
            return _fail(decision, "unknown_command", f"unknown command type {record.type}")
        context = command_type.context
        if prepared.taken is not None:
            scope, value = prepared.taken
            return _fail(decision, f"{scope}_taken", f"{scope} {value!r} is taken in this tenant")
        try:
            state = None if raw_state is None else _decode_state(context, raw_state)
            command = command_type.decoder.decode(record.payload)
            issued = Issued(
                command_id=record.id,
                tenant_id=record.tenant_id,
                actor=record.actor,
                roles=tuple(record.roles),
                now=utcnow(),
                related=prepared.related,
            )
            events = list(context.decide(state, command, issued))
            for n, event in enumerate(events, start=version + 1):
                state = context.evolve(state, event)
                envelope = _envelope(context, record, issued, event, n, state)
                decision.event_ids.append(envelope.id)
                decision.envelopes.append(_encoder.encode(envelope))
            new_state = _encoder.encode(state) if events else b""
        except Rejected as exc:
            decision.error = _encoder.encode({"code": exc.code, "message": exc.message})
            decision.outcome = "failed"
            return decision
        except Exception as exc:
            # A bug in the context's code: this command fails, the shard goes on.
            log.exception("command-handler-crashed type=%s id=%s", record.type, record.id)
            decision.event_ids.clear()
            decision.envelopes.clear()
            return _fail(decision, "internal_error", f"{type(exc).__name__}: {exc}")
        if events:
            decision.state = new_state
            self._remember(aggregate_key, version + len(events), new_state)
        return decision


def _fail(decision: _Decision, code: str, message: str) -> _Decision:
    decision.outcome = "failed"
    decision.expected = -1
    decision.error = _encoder.encode({"code": code, "message": message})
    return decision


_state_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def _decode_state(context: Context, raw: bytes) -> Any:
    decoder = _state_decoders.get(context.state)
    if decoder is None:
        decoder = _state_decoders[context.state] = msgspec.json.Decoder(context.state)
    return decoder.decode(raw)


def _envelope(
    context: Context, record: CommandRecord, issued: Issued, event: Event, version: int, state: Any
) -> Envelope:
    return Envelope(
        id=new_id(),
        type=type(event).__name__,
        schema_version=event.schema_version,
        context=context.name,
        aggregate_id=record.aggregate_id,
        aggregate_version=version,
        tenant_id=record.tenant_id,
        occurred_at=issued.now,
        payload=msgspec.Raw(_encoder.encode(event)),
        metadata=Metadata(
            command_id=record.id,
            correlation_id=record.correlation_id,
            causation_id=record.causation_id or record.id,
            actor=record.actor,
            session_id=context.session_of(state, event),
        ),
    )


async def run_worker(
    redis: Redis, scripts: Scripts, keys: Keys, settings: Settings, catalog: Catalog
) -> None:
    """Own a fair share of every context's command shards until cancelled."""
    member = f"worker-{uuid.uuid4().hex[:12]}"

    async def unit(shard: Shard, lease: ShardLease) -> None:
        await ShardWorker(redis, scripts, keys, settings, catalog, shard).run(lease, member)

    shards = [s for name in catalog.names for s in keys.shards_of(name)]
    await Balancer(
        redis, scripts, keys, ROLE, shards, unit, ttl_ms=settings.lease_ttl_ms, member=member
    ).run()
