"""Dead letters (guarantee 6): entries of a command or event stream that kept
failing, moved out of the way so the stream behind them flows on, and kept until an
operator replays or purges them (`eddy deadletters`, `/v1/admin/dead-letters`).

Each shard has one dead-letter stream (`Keys.dead_letters`, in the shard's slot),
for its command stream and its event stream alike; a dead letter names the consumer
group that gave up on it (`workers`, `projection:<name>`, `reactor:<name>`), the
entry, its error and attempts, and keeps the entry's raw value. Its id is
`<context>.<shard>.<entry id in the dead-letter stream>` (like an event position).

```
consumer: an entry fails alone EDDY_MAX_ATTEMPTS times (streams/consumer.py)
  ─▶ dead_letter.lua: lease still ours · XACK · XADD dead letter ·
                      a command: status `failed`, code `dead_lettered`
replay, a command:  dead_letter_replay.lua: XADD the same record (same command id)
                      · status back to `pending` · XDEL the dead letter
                    ─▶ the worker applies it once (apply.lua's dedup sees `pending`)
replay, an event:   SET NX a replay lock · apply it again for that group only (the
                      caller's `deliver`: one projection, or one process manager)
                      · XDEL the dead letter · release the lock
```

A replayed command goes to the end of its stream: it is decided on the aggregate's
state as it is then, after the commands that passed it while it was dead. A replayed
event is applied once; only a replay cut off between the apply's COMMIT and the XDEL
leaves the dead letter in place although it was applied (the `deliver` of a process
manager is idempotent anyway; a projection's is not: purge it then).

Entries whose record cannot even be decoded are buried at once by the worker (a
second decode would fail the same way); they keep whatever could be read of them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from core.catalog import Catalog
from core.errors import EddyError, NotFound
from core.messages import Envelope
from streams.connection import Redis, Scripts
from streams.consumer import Poison
from streams.entries import Entry, read_written
from streams.keys import COMMAND_GROUP, Keys, Shard
from streams.lease import LeaseLost, ShardLease
from streams.positions import entry_id_of

log = logging.getLogger("eddy.deadletters")

ERROR_CHARS = 2000
"""A dead letter's error is cut to this many characters."""
MAX_READ = 10_000
"""Dead letters read per shard when listing, at most."""
REPLAY_LOCK_MS = 60_000


class DeadLettered(Exception):
    """An entry was moved to the dead letters (recorded as a projection shard's last
    error, `eddy status`)."""


class ReplayRefused(EddyError):
    """A dead letter that cannot be replayed now: `replay_in_progress` (another replay
    of it is running), `already_processed` (its command's status says applied),
    `replay_failed` (applying it failed again; it stays a dead letter)."""

    status = 409

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Known(msgspec.Struct, kw_only=True):
    """What a dead letter can tell of its entry: a command record's or an envelope's ids."""

    id: str = ""
    type: str = ""
    tenant_id: str = ""
    aggregate_id: str = ""


def _known(raw: bytes) -> _Known:
    try:
        return msgspec.json.decode(raw, type=_Known)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _Known()


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One dead letter, as `eddy deadletters` and `/v1/admin/dead-letters` show it."""

    dead_letter_id: str
    kind: str
    """`command` or `event`."""
    consumer: str
    """The consumer group that gave up on it."""
    context: str
    shard: int
    entry_id: str
    """Its entry in the command or event stream."""
    tenant_id: str
    type: str
    aggregate_id: str
    error: str
    attempts: int
    dead_lettered_at: datetime
    command_id: str | None = None
    event_id: str | None = None
    raw: bytes = b""
    """The entry's value: an encoded command record or envelope (or what was there)."""

    @property
    def where(self) -> Shard:
        return Shard(self.context, self.shard)

    @property
    def stream_entry(self) -> str:
        """Its entry id in the shard's dead-letter stream."""
        return self.dead_letter_id.rsplit(".", 1)[1]

    def public(self, *, payload: bool = False) -> dict[str, Any]:
        """Its JSON fields; with `payload`, the entry's value too (as JSON if it is)."""
        shown: dict[str, Any] = msgspec.to_builtins(self)
        shown.pop("raw", None)
        if payload:
            try:
                shown["payload"] = msgspec.json.decode(self.raw)
            except msgspec.DecodeError:
                shown["payload"] = self.raw.decode(errors="replace")
        return shown


def _letter(shard: Shard, stream_entry: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    get = {k.decode(): v for k, v in fields.items()}
    text = {k: v.decode(errors="replace") for k, v in get.items() if k != "raw"}
    kind = text.get("kind", "command")
    ms, _ = entry_id_of(stream_entry)
    message_id = text.get("id") or None
    return DeadLetter(
        dead_letter_id=f"{shard.context}.{shard.number}.{stream_entry.decode()}",
        kind=kind,
        consumer=text.get("group", ""),
        context=shard.context,
        shard=shard.number,
        entry_id=text.get("entry", ""),
        tenant_id=text.get("tenant", ""),
        type=text.get("type", ""),
        aggregate_id=text.get("aggregate", ""),
        error=text.get("error", ""),
        attempts=int(text.get("attempts") or 0),
        dead_lettered_at=datetime.fromtimestamp(ms / 1000, UTC),
        command_id=message_id if kind == "command" else None,
        event_id=message_id if kind == "event" else None,
        raw=get.get("raw", b""),
    )


def _order(letter: DeadLetter) -> tuple[tuple[int, int], str, int]:
    return entry_id_of(letter.stream_entry.encode()), letter.context, letter.shard


class DeadLetters:
    """The dead letters of every shard of the catalog's contexts."""

    def __init__(
        self, redis: Redis, scripts: Scripts, keys: Keys, status_ttl_s: int, catalog: Catalog
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.status_ttl_s = status_ttl_s
        self.catalog = catalog
        self.contexts = catalog.names

    def poison(
        self,
        lease: ShardLease,
        shard: Shard,
        group: str,
        max_attempts: int,
        *,
        then: Callable[[bytes, str, BaseException], Awaitable[None]] | None = None,
    ) -> Poison:
        """A consumer's `Poison` for one shard: bury into this shard's dead letters,
        then `then(entry_id, dead_letter_id, error)` (a projection moves its
        checkpoint past the entry)."""

        async def bury(entry: Entry, error: BaseException, attempts: int) -> None:
            dead = await self.bury(lease, shard, group, entry, error, attempts)
            if dead is not None and then is not None:
                await then(entry[0], dead, error)

        return Poison(bury=bury, max_attempts=max_attempts)

    async def bury(
        self,
        lease: ShardLease,
        shard: Shard,
        group: str,
        entry: Entry,
        error: BaseException,
        attempts: int,
    ) -> str | None:
        """Move `entry` (pending for `group`) to the shard's dead letters; for a command,
        set its status `failed`. Return the dead letter's id, or None if there was
        nothing to bury (already settled). Raises `LeaseLost` if the lease is gone."""
        entry_id, fields = entry
        command = group == COMMAND_GROUP
        name = b"c" if command else b"e"
        raw = fields.get(name)
        if raw is None:  # not an entry Eddy wrote: keep every field
            raw = msgspec.json.encode({k.decode(errors="replace"): v for k, v in fields.items()})
        known = _known(raw)
        status = (
            [self.keys.command_status(shard, known.tenant_id, known.id)]
            if command and known.id and known.tenant_id
            else []
        )
        text = f"{type(error).__name__}: {error}".replace("\x00", "")[:ERROR_CHARS]
        kind = "command" if command else "event"
        source = self.keys.command_stream(shard) if command else self.keys.event_stream(shard)
        reply = await self.scripts.dead_letter(
            keys=[source, self.keys.dead_letters(shard), lease.key, *status],
            args=[
                lease.owner,
                group,
                entry_id,
                self.status_ttl_s,
                f"{shard.context}.{shard.number}.",
                f"dead-lettered after {attempts} attempts: {text}",
                *("kind", kind, "group", group, "entry", entry_id, "tenant", known.tenant_id),
                *("id", known.id, "type", known.type, "aggregate", known.aggregate_id),
                *("error", text, "attempts", attempts, "raw", raw),
            ],
        )
        if reply == b"fenced":
            raise LeaseLost(shard.name)
        if reply in (b"gone", b"final"):
            log.info("dead-letter-skipped shard=%s entry=%s reply=%s", shard.name, entry_id, reply)
            return None
        dead = f"{shard.context}.{shard.number}.{reply.decode()}"
        log.error(
            "dead-lettered id=%s group=%s entry=%s %s=%s attempts=%d error=%s",
            dead,
            group,
            entry_id.decode(),
            kind,
            known.id,
            attempts,
            text,
        )
        return dead

    def _parse(self, dead_letter_id: str) -> tuple[Shard, str]:
        context, _, rest = dead_letter_id.partition(".")
        number, _, entry = rest.partition(".")
        ms, _, seq = entry.partition("-")
        if (
            context not in self.contexts
            or not number.isdigit()
            or int(number) >= self.keys.shards
            or not (ms.isdigit() and seq.isdigit())
        ):
            raise NotFound(f"no dead letter {dead_letter_id[:200]!r}")
        return Shard(context, int(number)), entry

    async def read(
        self, *, tenant_id: str | None = None, after: str | None = None, limit: int | None = None
    ) -> list[DeadLetter]:
        """The dead letters (of one tenant, if given), oldest first; `after` a dead
        letter's id, for paging."""
        shards = [s for context in self.contexts for s in self.keys.shards_of(context)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.xrange(self.keys.dead_letters(shard), count=MAX_READ)
            replies: list[Any] = await pipe.execute()
        letters = [
            _letter(shard, stream_entry, fields)
            for shard, entries in zip(shards, replies, strict=True)
            for stream_entry, fields in entries
        ]
        if tenant_id is not None:
            letters = [d for d in letters if d.tenant_id == tenant_id]
        letters.sort(key=_order)
        if after is not None:
            shard, entry = self._parse(after)
            start = (entry_id_of(entry.encode()), shard.context, shard.number)
            letters = [d for d in letters if _order(d) > start]
        return letters if limit is None else letters[:limit]

    async def get(self, dead_letter_id: str, *, tenant_id: str | None = None) -> DeadLetter:
        """One dead letter (of that tenant, if given); `NotFound` otherwise."""
        shard, entry = self._parse(dead_letter_id)
        found: Any = await self.redis.xrange(self.keys.dead_letters(shard), entry, entry)
        if not found:
            raise NotFound(f"no dead letter {dead_letter_id!r}")
        letter = _letter(shard, found[0][0], found[0][1])
        if tenant_id is not None and letter.tenant_id != tenant_id:
            raise NotFound(f"no dead letter {dead_letter_id!r}")
        return letter

    async def replay_command(self, letter: DeadLetter) -> str:
        """Put a dead command back into its command stream (same command id, status
        `pending`) and delete the dead letter; return its new entry id."""
        shard = letter.where
        status = []
        if letter.command_id and letter.tenant_id:
            status = [self.keys.command_status(shard, letter.tenant_id, letter.command_id)]
            # the id's locator may have expired meanwhile: statuses are found through it
            await self.redis.set(
                self.keys.command_locator(letter.tenant_id, letter.command_id),
                f"{shard.context}:{shard.number}:{letter.type}",
                nx=True,
                ex=self.status_ttl_s,
            )
        reply = await self.scripts.dead_letter_replay(
            keys=[self.keys.dead_letters(shard), self.keys.command_stream(shard), *status],
            args=[letter.stream_entry, self.status_ttl_s, letter.type, letter.aggregate_id],
        )
        if reply == b"gone":
            raise NotFound(f"no dead letter {letter.dead_letter_id!r}")
        if reply == b"processed":
            raise ReplayRefused(
                "already_processed", f"command {letter.command_id} is processed already"
            )
        log.info("dead-letter-replayed id=%s command=%s", letter.dead_letter_id, letter.command_id)
        return str(reply.decode())

    async def replay_event(
        self, letter: DeadLetter, deliver: Callable[[Envelope], Awaitable[None]]
    ) -> None:
        """Give a dead event to `deliver` (its one consumer) again, then delete the
        dead letter. One replay of a dead letter at a time."""
        shard = letter.where
        lock = self.keys.dead_letter_replay(shard, letter.stream_entry)
        token = uuid.uuid4().hex
        if not await self.redis.set(lock, token, nx=True, px=REPLAY_LOCK_MS):
            raise ReplayRefused("replay_in_progress", f"{letter.dead_letter_id} is being replayed")
        try:
            entry = letter.stream_entry
            if not await self.redis.xrange(self.keys.dead_letters(shard), entry, entry):
                raise NotFound(f"no dead letter {letter.dead_letter_id!r}")
            try:
                envelope = read_written(shard, letter.entry_id, letter.raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ReplayRefused("replay_failed", f"the event cannot be read: {exc}") from exc
            await deliver(envelope)
            await self.redis.xdel(self.keys.dead_letters(shard), entry)
            log.info("dead-letter-replayed id=%s event=%s", letter.dead_letter_id, envelope.id)
        finally:
            await self.scripts.lease_release(keys=[lock], args=[token])

    async def purge(self, letter: DeadLetter) -> bool:
        """Delete a dead letter (its command stays `failed`); False if it was gone."""
        deleted = await self.redis.xdel(self.keys.dead_letters(letter.where), letter.stream_entry)
        return bool(deleted)

    async def purge_all(self, *, tenant_id: str | None = None) -> int:
        """Delete every dead letter (of one tenant, if given); return how many."""
        letters = await self.read(tenant_id=tenant_id)
        for letter in letters:
            await self.purge(letter)
        return len(letters)
