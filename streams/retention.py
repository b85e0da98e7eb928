"""Retention: the streams are trimmed, never past what their readers committed
(guarantee 8).

`eddy projector` runs the trimmer (it has Postgres, where the checkpoints are);
one process at a time holds its lease (`Keys.trimmer_lease`) and makes a pass
every `EDDY_TRIM_INTERVAL_S`. A pass trims each stream with
`XTRIM <stream> MINID <upto>`: every entry before `upto` goes, where `upto` is
the lowest of

- the policy: an entry younger than `EDDY_RETENTION_S` stays (its id's
  milliseconds against this host's clock);
- on an event stream, every projection reading its context, the event archive
  among them: the entry is at or before its checkpoint on that shard
  (`eddy_checkpoints`). A projection without a checkpoint there (never ran, or
  stopped before its first batch) holds the whole stream;
- every consumer group on the stream (XINFO GROUPS, XPENDING summary): the entry
  was delivered to the group and is not pending (delivered and not acknowledged).
  On an event stream the process managers' groups (`reactor:<name>`) must exist:
  one that does not yet holds the whole stream, since it will read from `0`. On a
  command stream the `workers` group must exist the same way.

The fan-out is no constraint: an SSE or WebSocket client resuming from a trimmed
position gets an explicit reset (`streams/fanout.py`).

While a projection is being rebuilt (its scratch schema exists and its advisory
lock is held, `projections/rebuild.py`), no event stream is trimmed: a rebuild
reads the archive, then the streams from where the archive ended when it read
it, and a trim in between could remove entries it had read from neither. The
checkpoints are read before that check, so a rebuild starting after it finds
the archive already holding everything the pass may trim.

Exact trimming (`MINID`, not `MINID ~`). An approximate trim removes only whole
radix-tree nodes, so it never removes more than asked and would be as safe; an
exact one knows the last entry it removed. Each trim that removes something
records that entry (`through`) in `Keys.trimmed(shard)`, with the stream's count
of removed entries right after it (`gone`: `entries-added - length`, read in the
same MULTI). A trim removes a prefix of the stream, so while that count is
unchanged nothing after `through` was removed (an XDEL moves the count, and has
its own `max-deleted-entry-id`), and the fan-out resets only a resume from
before `through`. Without it, a resume would be reset whenever a stream had lost
any entry past its token: that is every feed token naming a quiet shard's last
entry, once that entry was trimmed and a new one arrived. The write of the
record follows the MULTI: a crash in between leaves the count unequal, and the
fan-out falls back to the conservative rule until the next trim.

Cost: a pass with nothing to trim is two Postgres queries and two Redis
pipelines (~2 ms for 40 streams). A long backlog is trimmed in steps of about
`STEP_ENTRIES` (a time window each, growing from 1 ms), so Redis is never held
for long by one XTRIM. Bounds are read, then trims made: a consumer
group created in between starts after the trimmed entries; so does a projection
added to a deployment whose streams were already trimmed (build its history with
`eddy rebuild <projection>`, which replays the archive).

A pass logs each trim (`stream-trimmed stream= upto= removed= held-by=`);
`eddy trim --dry-run` prints what a pass would do.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus
from redis.exceptions import ResponseError

from core.outages import FAILED
from core.settings import Settings
from streams.connection import Redis, Scripts
from streams.keys import COMMAND_GROUP, Keys, Shard, process_manager_group
from streams.lease import ShardLease
from streams.positions import ZERO, EntryId, entry_id_of, format_entry_id

log = logging.getLogger("eddy.retention")

MAX_COUNTED = 10_000
"""A dry run counts the entries a trim would remove up to this many."""
STEP_ENTRIES = 20_000
"""About how many entries one XTRIM removes: Redis does nothing else meanwhile.
Measured here (300-byte entries): 200,000 in one XTRIM held Redis 10 ms; in steps
(17 XTRIMs, the window growing from 1 ms), at most 1.5 ms at a time."""

POLICY = "policy"
REBUILD = "rebuild"


@dataclass(frozen=True)
class Trim:
    """One stream in one pass: how far it may be trimmed, and why no further."""

    stream: str
    shard: Shard
    kind: str
    """`events` or `commands`."""
    length: int
    """Entries in the stream before the trim."""
    upto: EntryId
    """Entries before this id go (`XTRIM MINID`); ZERO: none."""
    held_by: str
    """What set `upto`: `policy`, `projection:<name>`, a group's name, `rebuild`."""
    removed: int
    """Entries removed; in a dry run, those that would be (at most `MAX_COUNTED` + 1)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "kind": self.kind,
            "length": self.length,
            "upto": format_entry_id(self.upto),
            "held_by": self.held_by,
            "removed": self.removed,
        }


def after(entry: EntryId) -> EntryId:
    """The smallest id after `entry`: a MINID that trims `entry` and keeps what follows."""
    ms, seq = entry
    return (ms, seq + 1) if seq < 2**64 - 1 else (ms + 1, 0)


def trimmed_through(record: Mapping[bytes, bytes], info: Mapping[str, Any]) -> EntryId | None:
    """The last entry ever removed from an event stream, if `record` (its
    `Keys.trimmed` hash) still accounts for every removal (its XINFO STREAM `info`
    tells); None when unknown."""
    gone = record.get(b"gone")
    through = record.get(b"through")
    if gone is None or through is None:
        return None
    if int(gone) != info["entries-added"] - info["length"]:
        return None
    return entry_id_of(through)


class Reader(Protocol):
    """A projection or a process manager: what reads the event streams of `contexts`."""

    @property
    def name(self) -> str: ...

    @property
    def contexts(self) -> tuple[str, ...]: ...


Committed = Callable[[], Awaitable[Mapping[tuple[str, Shard], EntryId]]]
"""The projections' checkpoints: `(projection, shard)` → the last entry it committed
there (`projections/db.py`)."""
Rebuilding = Callable[[], Awaitable[bool]]
"""Whether a projection is being rebuilt right now (`projections/rebuild.py`)."""


@dataclass
class _Bound:
    upto: EntryId
    held_by: str

    def lower(self, upto: EntryId, held_by: str) -> None:
        if upto < self.upto:
            self.upto, self.held_by = upto, held_by


@dataclass(frozen=True)
class _Stream:
    key: str
    shard: Shard
    kind: str
    groups: tuple[str, ...]
    """The groups that must exist on it."""
    projections: tuple[str, ...]
    """The projections whose checkpoints bound it."""


class Trimmer:
    """Trims every command and event stream of `contexts` as far as retention allows."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        *,
        contexts: Sequence[str],
        projections: Sequence[Reader],
        process_managers: Sequence[Reader],
        committed: Committed,
        rebuilding: Rebuilding,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._committed = committed
        self._rebuilding = rebuilding
        self._streams: list[_Stream] = []
        for context in contexts:
            readers = tuple(p.name for p in projections if context in p.contexts)
            groups = tuple(
                process_manager_group(m.name) for m in process_managers if context in m.contexts
            )
            for shard in keys.shards_of(context):
                self._streams.append(
                    _Stream(keys.command_stream(shard), shard, "commands", (COMMAND_GROUP,), ())
                )
                self._streams.append(
                    _Stream(keys.event_stream(shard), shard, "events", groups, readers)
                )

    async def run(
        self, scripts: Scripts, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Every `trim_interval_s` (0: never): hold the trimmer's lease, or wait for
        it, and trim. The lease outlives a missed pass or two (3 intervals)."""
        interval = self.settings.trim_interval_s
        task_status.started()
        if interval <= 0:
            return
        ttl_ms = max(self.settings.lease_ttl_ms, int(interval * 3000))
        lease = ShardLease(
            self.redis,
            scripts,
            self.keys.trimmer_lease(),
            f"trimmer-{uuid.uuid4().hex[:12]}",
            ttl_ms,
        )
        try:
            while True:
                try:
                    if await (lease.renew() if lease.held() else lease.acquire()):
                        await self.trim()
                except FAILED as exc:
                    log.warning("trim-failed error=%r", exc)
                await anyio.sleep(interval)
        finally:
            if lease.held():
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    try:
                        await lease.release()
                    except FAILED as exc:
                        log.warning("trimmer-lease-release-failed error=%r", exc)

    async def trim(self, *, dry_run: bool = False, now_ms: int | None = None) -> list[Trim]:
        """One pass over every stream; what was (or, with `dry_run`, would be) trimmed."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        policy = (max(now_ms - self.settings.retention_s * 1000, 0), 0)
        checkpoints = await self._committed()
        rebuilding = await self._rebuilding()
        infos, groups = await self._survey()
        pending = await self._oldest_pending(groups)
        trims: list[Trim] = []
        for stream in self._streams:
            info = infos.get(stream.key)
            if info is None:
                continue  # no such stream yet
            bound = _Bound(policy, POLICY)
            if stream.kind == "events":
                if rebuilding:
                    bound.lower(ZERO, REBUILD)
                for name in stream.projections:
                    committed = checkpoints.get((name, stream.shard), ZERO)
                    bound.lower(
                        after(committed) if committed != ZERO else ZERO, f"projection:{name}"
                    )
            present = groups.get(stream.key, {})
            for name in stream.groups:
                if name not in present:
                    bound.lower(ZERO, name)
            for name, group in present.items():
                bound.lower(after(_entry(group["last-delivered-id"])), name)
                oldest = pending.get((stream.key, name))
                if oldest is not None:
                    bound.lower(oldest, name)
            first = info["first-entry"]
            if bound.upto == ZERO or not first or entry_id_of(first[0]) >= bound.upto:
                removed = 0
            elif dry_run:
                removed = await self._count_before(stream.key, bound.upto)
            else:
                removed = await self._trim(stream, bound.upto, info, bound.held_by)
            trims.append(
                Trim(
                    stream.key,
                    stream.shard,
                    stream.kind,
                    info["length"],
                    bound.upto,
                    bound.held_by,
                    removed,
                )
            )
        return trims

    async def _survey(
        self,
    ) -> tuple[dict[str, Mapping[str, Any]], dict[str, dict[str, Mapping[str, Any]]]]:
        """Every existing stream's XINFO STREAM and its groups by name, in one pipeline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self._streams:
                pipe.xinfo_stream(stream.key)
                pipe.xinfo_groups(stream.key)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        infos: dict[str, Mapping[str, Any]] = {}
        groups: dict[str, dict[str, Mapping[str, Any]]] = {}
        for stream, info, found in zip(self._streams, replies[::2], replies[1::2], strict=True):
            if isinstance(info, ResponseError) and "no such key" in str(info).lower():
                continue
            for reply in (info, found):
                if isinstance(reply, Exception):
                    raise reply
            infos[stream.key] = info
            groups[stream.key] = {_text(g["name"]): g for g in found}
        return infos, groups

    async def _oldest_pending(
        self, groups: Mapping[str, Mapping[str, Mapping[str, Any]]]
    ) -> dict[tuple[str, str], EntryId]:
        """The oldest pending entry of every group that has one."""
        asked = [
            (stream, name)
            for stream, found in groups.items()
            for name, group in found.items()
            if group["pending"]
        ]
        if not asked:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, name in asked:
                pipe.xpending(stream, name)
            replies: list[Any] = await pipe.execute()
        return {
            key: _entry(reply["min"])
            for key, reply in zip(asked, replies, strict=True)
            if reply["min"]
        }

    async def _count_before(self, key: str, upto: EntryId) -> int:
        entries: Any = await self.redis.xrange(
            key, "-", f"({format_entry_id(upto)}", count=MAX_COUNTED + 1
        )
        return len(entries)

    async def _trim(
        self, stream: _Stream, upto: EntryId, info: Mapping[str, Any], held_by: str
    ) -> int:
        """Trim `stream` to `upto`: at once if it holds at most `STEP_ENTRIES`, else in
        steps of a time window from its first entry, starting at 1 ms, then sized from
        what the previous step removed (at most 4 times as wide), so a dense stretch
        after a sparse one cannot make one step much longer than planned."""
        first = entry_id_of(info["first-entry"][0])
        window_ms = 1 if info["length"] > STEP_ENTRIES else upto[0] - first[0] + 1
        total = 0
        while first < upto:
            step = min(upto, (first[0] + window_ms, 0))  # past `first`: removes it at least
            removed, left = await self._trim_to(stream, step)
            total += removed
            if left is None:
                break
            first = left
            grown = window_ms * 4
            window_ms = max(
                1, min(grown, window_ms * STEP_ENTRIES // removed if removed else grown)
            )
        log.info(
            "stream-trimmed stream=%s upto=%s removed=%d held-by=%s",
            stream.key,
            format_entry_id(upto),
            total,
            held_by,
        )
        return total

    async def _trim_to(self, stream: _Stream, upto: EntryId) -> tuple[int, EntryId | None]:
        """One exact XTRIM; the entries it removed and the stream's first entry after."""
        minid = format_entry_id(upto)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xrevrange(stream.key, f"({minid}", "-", count=1)
            pipe.xtrim(stream.key, minid=minid, approximate=False)
            pipe.xinfo_stream(stream.key)
            last, removed, info = await pipe.execute()
        if removed and stream.kind == "events":
            # `last` existed just before the trim, which removed it and everything
            # before it: every entry ever trimmed from this stream is at or before it.
            await self.redis.hset(
                self.keys.trimmed(stream.shard),
                mapping={
                    "through": _text(last[0][0]),
                    "gone": info["entries-added"] - info["length"],
                },
            )
        first = info["first-entry"]
        return int(removed), entry_id_of(first[0]) if first else None


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _entry(raw: bytes | str) -> EntryId:
    return entry_id_of(raw if isinstance(raw, bytes) else raw.encode())
