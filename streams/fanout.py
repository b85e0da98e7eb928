"""The event fan-out: a few Redis readers per process, broadcasting in memory.

One `Fanout` per web process runs one reader task per group of event streams
(`reader_groups`: every shard of every context in one `XREAD` on a single Redis,
one group per hash slot on a Redis Cluster, where a command may not span slots).
Each event is decoded, given its `position`, brought to its current shape
(`Catalog.current`) and encoded to JSON once; that one result is shared by every
local subscriber it matches (by tenant, then by topic).
No client holds a Redis connection of its own: only a resuming client borrows a
pooled one, briefly, for its catch-up reads.

Positions. The fan-out keeps the last entry id it has read per shard (the
vector). A subscriber's token after an event is the vector after that event
(`positions.encode_cursor`), one string computed once per event for everyone. A
fresh subscription starts at the current vector: reading the vector and joining
the registry happen in one event-loop step, between two reader batches, so
nothing is missed or doubled. A resuming subscription joins the same way (live
events buffer from then on), reads the gap with XRANGE from its token
(exclusive) to the vector it joined at (inclusive), shards merged by entry id,
and then continues with the buffered live events. A shard missing from a token
starts at the join vector. A token ahead of this process's readers (issued by
a faster process) waits for them up to `AHEAD_WAIT_S`; one still ahead names
history this Redis does not have, and gets a reset.

Resuming from an event's own `position` (what a client holding only envelopes
has: a WebSocket `event` frame's `event.position`, an event of a `?wait=` answer)
is exact when every topic of the subscription can only have events on that one
stream: a `<context>/<aggregate_id>` topic (an aggregate lives on one shard), or a
`<context>` topic of a deployment with one shard. The other shards then start at
the join vector, where the topics have nothing. For any other topic the position
says nothing of the other streams' progress (live events of several streams are
delivered in the order they are read, not by entry id), so it is refused: those
subscriptions resume with a feed token (the SSE `id:`, the `position` of a
WebSocket `event` frame or of `subscribed`).

Retention. Each catch-up page is read in one MULTI with XINFO STREAM and the
trimmer's record of the stream (`Keys.trimmed`): when entries after the page's
start may have been removed, the subscriber gets one `Reset` and continues from
the join vector. XTRIM does not move `max-deleted-entry-id` (Redis 7.0); the
record names the last entry the trimmer removed, and holds while the stream's
count of removed entries is the one it recorded (`streams/retention.py`). Without
a record that holds, a stream that ever lost entries and whose oldest entry is
past the position counts as beyond retention: conservative, since a trim that
ended exactly at the position also resets.

Slow subscribers. A subscription buffers at most `settings.subscriber_buffer`
items; readers append and never wait. One item more cuts the subscriber off: its
buffer is dropped, it leaves the registry and its iteration raises `Lagging`;
its last token still resumes it, from Redis. A consumer takes everything
buffered at once (a batch), so a feed can write once per wake-up.

Readers survive errors: a failed XREAD is logged and retried with capped
backoff; BLOCK stays under the socket timeout (`BLOCK_MS`). An undecodable entry
is logged and skipped. Anything else is a bug and ends `run`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskStatus
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from core.catalog import Catalog
from core.errors import BadPosition, Unavailable
from core.messages import Envelope, envelope_decoder, envelope_encoder
from core.outages import FAILED, Backoff
from core.settings import Settings
from streams.connection import BLOCK_MS, Redis
from streams.entries import Entry, positioned
from streams.keys import Keys, Shard
from streams.positions import (
    TOKEN_VERSION,
    ZERO,
    EntryId,
    Vector,
    decode_cursor,
    encode_cursor,
    entry_id_of,
    format_entry_id,
    parse_event_position,
)
from streams.retention import trimmed_through
from streams.topics import Topics

log = logging.getLogger("eddy.fanout")

READ_COUNT = 500
"""Entries per stream per XREAD of a reader."""
CATCH_UP_PAGE = 500
"""Entries per stream per XRANGE of a catch-up."""
READY_WAIT_S = 5.0
"""How long a new subscription waits for a starting fan-out before `Unavailable`."""
AHEAD_WAIT_S = 2.0
"""How long a token ahead of this process's readers waits for them."""


class Lagging(Exception):
    """The subscriber fell more than `subscriber_buffer` items behind and was cut off."""


class BeyondRetention(Exception):
    """A catch-up found entries it needed already trimmed or deleted."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event for a subscriber: the token to resume after it, the envelope
    (with its `position`) and the envelope's JSON, shared by every subscriber."""

    token: str
    envelope: Envelope
    data: bytes


@dataclass(frozen=True, slots=True)
class Reset:
    """Events were lost to the subscriber (`reason`: `beyond_retention` or
    `unknown_position`); delivery continues after `token`."""

    token: str
    reason: str


Item = Delivery | Reset


def reader_groups(redis: Redis, streams: Mapping[str, Shard]) -> list[dict[str, Shard]]:
    """The streams each reader covers with one XREAD: all of them on a single Redis,
    one group per hash slot on a Redis Cluster."""
    if not isinstance(redis, RedisCluster):
        return [dict(streams)]
    groups: dict[int, dict[str, Shard]] = {}
    for key, shard in streams.items():
        groups.setdefault(redis.keyslot(key), {})[key] = shard
    return list(groups.values())


def beyond_retention(
    after: EntryId, info: Mapping[str, Any], trimmed: Mapping[bytes, bytes] | None = None
) -> bool:
    """Whether a stream (its XINFO STREAM reply, and the trimmer's record of it) may
    have lost entries after `after`."""
    if entry_id_of(info["max-deleted-entry-id"]) > after:
        return True
    if info["entries-added"] <= info["length"]:
        return False  # nothing was ever trimmed or deleted
    through = None if trimmed is None else trimmed_through(trimmed, info)
    if through is not None:
        return through > after  # every removed entry is at or before `through`
    first = info["first-entry"]
    if not first:
        return entry_id_of(info["last-generated-id"]) > after
    return entry_id_of(first[0]) > after


def _decode(shard: Shard, entry: Entry, catalog: Catalog) -> Envelope | None:
    """The entry's envelope in its current shape; None (logged) if it cannot be read."""
    raw_id, fields = entry
    try:
        return catalog.current(envelope_decoder.decode(fields[b"e"]))
    except Exception as exc:  # undecodable, or an upcaster failing: skipped, not fatal
        log.error("event-undecodable shard=%s entry=%s error=%r", shard.name, raw_id, exc)
        return None


def _deliver(shard: Shard, raw_id: bytes, envelope: Envelope, token: str) -> Delivery:
    envelope = positioned(envelope, shard, raw_id.decode())
    return Delivery(token, envelope, envelope_encoder.encode(envelope))


class Fanout:
    """Reads every event stream of the catalog's contexts and broadcasts to local
    subscribers."""

    def __init__(self, redis: Redis, keys: Keys, catalog: Catalog, settings: Settings) -> None:
        self._redis = redis
        self._keys = keys
        self._catalog = catalog
        contexts = self._contexts = catalog.names
        self._buffer = settings.subscriber_buffer
        self._streams = {keys.event_stream(s): s for c in contexts for s in keys.shards_of(c)}
        self._shard_of = {key.encode(): shard for key, shard in self._streams.items()}
        self._vector = Vector({})
        self._tenants: dict[str, set[Subscription]] = {}
        self._state = "starting"
        self._progress = anyio.Event()

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._tenants.values())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read until cancelled; `task_status.started()` once every stream's tail is known."""
        try:
            await self._load_tails()
            self._state = "running"
            self._signal_progress()
            task_status.started()
            async with anyio.create_task_group() as tg:
                for group in reader_groups(self._redis, self._streams):
                    tg.start_soon(self._read, group)
        finally:
            self._state = "stopped"
            self._signal_progress()
            for audience in self._tenants.values():
                for subscription in audience:
                    subscription._close()
            self._tenants.clear()

    def subscribe(
        self, tenant_id: str, topics: Sequence[str], since: str | None = None
    ) -> Subscription:
        """A subscription to `topics` of one tenant, from now, or right after `since`:
        a feed token, or an event's position where the topics allow it (above).

        Raises `BadRequest` (topic) or `BadPosition` (token) at once, before anything
        is streamed. Use it with `async with`, then iterate it for batches of items.
        """
        parsed = Topics.parse(topics, self._catalog)
        cursor = None
        if since is not None:
            cursor = self._resume_at(tenant_id, parsed, since)
        return Subscription(self, tenant_id, parsed, cursor)

    def _resume_at(self, tenant_id: str, topics: Topics, since: str) -> dict[Shard, EntryId]:
        """Where a subscription resumes: a feed token's cursor, or an event position's
        one shard when the topics can have events on that shard only."""
        if since.startswith(f"{TOKEN_VERSION}~"):
            return decode_cursor(since, dict.fromkeys(self._contexts), self._keys.shards)
        shard, entry = parse_event_position(since, self._catalog.by_name, self._keys.shards)
        one_stream = not (topics.everything or topics.sessions) and all(
            context == shard.context and self._keys.shards == 1 for context in topics.contexts
        )
        one_stream = one_stream and all(
            self._keys.shard_of(context, tenant_id, aggregate_id) == shard
            for context, aggregate_id in topics.aggregates
        )
        if not one_stream:
            raise BadPosition(
                "an event's position resumes only a subscription whose topics are on its"
                " one stream (a <context>/<id> topic of that aggregate); resume this one"
                " with a feed token: an SSE id, or the position of a WebSocket event frame"
            )
        return {shard: entry}

    async def _load_tails(self) -> None:
        backoff = Backoff()
        while True:
            try:
                tails = {shard: await self._tail(key) for key, shard in self._streams.items()}
                self._vector = Vector(tails)
                return
            except FAILED as exc:
                log.warning("fanout-start-retry error=%r", exc)
                await backoff.sleep()

    async def _tail(self, key: str) -> EntryId:
        try:
            info = await self._redis.xinfo_stream(key)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return ZERO
            raise
        return entry_id_of(info["last-generated-id"])

    async def _read(self, streams: dict[str, Shard]) -> None:
        """One reader: XREAD BLOCK over `streams` from the vector, publish, repeat."""
        backoff = Backoff()
        while True:
            ids: dict[Any, Any] = {
                k: format_entry_id(self._vector.ids[s]) for k, s in streams.items()
            }
            try:
                reply: Any = await self._redis.xread(ids, count=READ_COUNT, block=BLOCK_MS)
            except FAILED as exc:
                log.warning("fanout-read-retry streams=%d error=%r", len(streams), exc)
                await backoff.sleep()
                continue
            backoff.reset()
            for key, entries in reply or ():
                self._publish(self._shard_of[key], entries)
            self._signal_progress()

    def _publish(self, shard: Shard, entries: list[Entry]) -> None:
        """Hand each entry to the subscribers it matches. Never awaits."""
        for entry in entries:
            self._vector.advance(shard, entry_id_of(entry[0]))
            if not self._tenants:
                continue
            envelope = _decode(shard, entry, self._catalog)
            if envelope is None:
                continue
            audience = self._tenants.get(envelope.tenant_id)
            if not audience:
                continue
            matched = [s for s in audience if s.topics.match(envelope)]
            if not matched:
                continue
            item = _deliver(shard, entry[0], envelope, self._vector.token())
            for subscription in matched:
                if not subscription._offer(item):
                    audience.discard(subscription)
                    log.info("subscriber-lagging tenant=%s", envelope.tenant_id)
            if not audience:
                del self._tenants[envelope.tenant_id]

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    async def _join(self, subscription: Subscription) -> None:
        with anyio.move_on_after(READY_WAIT_S):
            while self._state == "starting":
                await self._progress.wait()
        if self._state != "running":
            raise Unavailable("the event feed is not running; retry shortly")
        since = subscription._since
        if since is not None:
            with anyio.move_on_after(AHEAD_WAIT_S):
                while any(self._vector.ids[s] < e for s, e in since.items()):
                    await self._progress.wait()
        # From here to the end: one step, no await, so no event falls between.
        subscription._begin(dict(self._vector.ids), self._redis, self._keys)
        self._tenants.setdefault(subscription.tenant_id, set()).add(subscription)

    def _leave(self, subscription: Subscription) -> None:
        audience = self._tenants.get(subscription.tenant_id)
        if audience is not None:
            audience.discard(subscription)
            if not audience:
                del self._tenants[subscription.tenant_id]


class Subscription:
    """One subscriber's view of the fan-out: an async context manager (joining and
    leaving) and an async iterator of batches of `Delivery` / `Reset` items.

    Iteration raises `Lagging` once the subscriber was cut off, and ends when the
    fan-out stops. Cancelling a wait for the next batch loses nothing.
    """

    def __init__(
        self,
        fanout: Fanout,
        tenant_id: str,
        topics: Topics,
        since: dict[Shard, EntryId] | None,
    ) -> None:
        self.tenant_id = tenant_id
        self.topics = topics
        self.position = ""
        """The token the subscription started at (set on entering)."""
        self._fanout = fanout
        self._since = since
        self._limit = fanout._buffer
        self._buffer: deque[Item] = deque()
        self._wakeup: anyio.Event | None = None
        self._lagging = False
        self._closed = False
        self._catch_up: CatchUp | None = None
        self._cursor: dict[Shard, EntryId] = {}
        self._joined_at: dict[Shard, EntryId] = {}

    async def __aenter__(self) -> Subscription:
        await self._fanout._join(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._fanout._leave(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> list[Item]:
        if self._lagging:
            raise Lagging(f"more than {self._limit} events behind")
        if self._catch_up is not None:
            batch = await self._replay(self._catch_up)
            if batch:
                return batch
        while not self._buffer:
            if self._lagging:
                raise Lagging(f"more than {self._limit} events behind")
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        batch = list(self._buffer)
        self._buffer.clear()
        return batch

    def _begin(self, vector: dict[Shard, EntryId], redis: Redis, keys: Keys) -> None:
        """Start at `vector` (the fan-out's, at joining), or catch up to it from the token."""
        self._joined_at = vector
        self._cursor = dict(vector)
        if self._since is not None:
            cursor = {s: self._since.get(s, e) for s, e in vector.items()}
            if any(cursor[s] > e for s, e in vector.items()):
                self._buffer.append(Reset(encode_cursor(vector), "unknown_position"))
            elif cursor != vector:
                self._cursor = cursor
                self._catch_up = CatchUp(redis, keys, cursor, vector)
        self.position = encode_cursor(self._cursor)

    async def _replay(self, catch_up: CatchUp) -> list[Item]:
        """The next missed events matching the topics; [] once the gap is closed."""
        items: list[Item] = []
        while True:
            entry = catch_up.pop()
            if entry is None:
                if items or catch_up.done:
                    break
                try:
                    await catch_up.fetch()
                except BeyondRetention:
                    self._catch_up = None
                    self._cursor = dict(self._joined_at)
                    return [Reset(encode_cursor(self._joined_at), "beyond_retention")]
                continue
            shard, entry_id, raw = entry
            self._cursor[shard] = entry_id
            envelope = _decode(shard, raw, self._fanout._catalog)
            if envelope is None or envelope.tenant_id != self.tenant_id:
                continue
            if self.topics.match(envelope):
                items.append(_deliver(shard, raw[0], envelope, encode_cursor(self._cursor)))
        if catch_up.done:
            self._catch_up = None
        return items

    def _offer(self, item: Item) -> bool:
        """Buffer a live item; False (and cut off) when the buffer is full."""
        if len(self._buffer) >= self._limit:
            self._buffer.clear()
            self._lagging = True
        else:
            self._buffer.append(item)
        self._wake()
        return not self._lagging

    def _close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None


class CatchUp:
    """The entries a resuming subscription missed: per shard from its token
    (exclusive) to the vector it joined at (inclusive), in pages, merged across
    shards by entry id. Each page is read with the stream's XINFO in one MULTI."""

    def __init__(
        self, redis: Redis, keys: Keys, start: dict[Shard, EntryId], stop: dict[Shard, EntryId]
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._stop = stop
        self._after = {s: e for s, e in start.items() if e < stop[s]}
        """The shards still to read, and the last entry read from each."""
        self._pages: dict[Shard, deque[tuple[EntryId, Entry]]] = {s: deque() for s in self._after}

    @property
    def done(self) -> bool:
        return not self._after and not any(self._pages.values())

    def pop(self) -> tuple[Shard, EntryId, Entry] | None:
        """The next entry in entry-id order; None when a `fetch` must come first (or done)."""
        if any(not self._pages[s] for s in self._after):
            return None
        heads = [(page[0][0], shard) for shard, page in self._pages.items() if page]
        if not heads:
            return None
        _, shard = min(heads, key=lambda head: head[0])
        entry_id, entry = self._pages[shard].popleft()
        return shard, entry_id, entry

    async def fetch(self) -> None:
        """Read the next page of every shard whose page is used up."""
        for shard in [s for s in self._after if not self._pages[s]]:
            after = self._after[shard]
            key = self._keys.event_stream(shard)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xinfo_stream(key)
                pipe.hgetall(self._keys.trimmed(shard))
                pipe.xrange(
                    key,
                    min=f"({format_entry_id(after)}",
                    max=format_entry_id(self._stop[shard]),
                    count=CATCH_UP_PAGE,
                )
                info, trimmed, entries = await pipe.execute(raise_on_error=False)
            if isinstance(trimmed, Exception):
                raise trimmed
            if isinstance(info, ResponseError) or beyond_retention(after, info, trimmed):
                raise BeyondRetention(key)
            if isinstance(entries, Exception):
                raise entries
            self._pages[shard].extend((entry_id_of(e[0]), e) for e in entries)
            if len(entries) < CATCH_UP_PAGE:
                del self._after[shard]
            else:
                self._after[shard] = entry_id_of(entries[-1][0])
