"""How far behind each projection is, per shard: what `eddy status` prints and the
web process exports on `/metrics`.

For each projection and each shard of the contexts it reads:

- the checkpoint (the last entry committed, `eddy_checkpoints`);
- lag in events: entries of the shard's event stream after the checkpoint. Redis 7
  keeps, per consumer group, the `lag` after its last delivered entry (XINFO
  GROUPS); entries delivered but not yet committed (a batch in flight, or a dead
  consumer's pending ones) are counted with a bounded XRANGE between the two, so
  the figure is the checkpoint's lag, not the group's. Without a group (the
  projection never ran) or a `lag` (Redis < 7), entries after the checkpoint are
  counted directly, at most `MAX_COUNTED`;
- lag in seconds: the age of the oldest entry after the checkpoint (its id's
  milliseconds against this host's clock), 0 when caught up;
- the last error of a failed batch on that shard (`record_failure`, written by the
  projector outside the failed batch's rolled-back transaction), cleared when the
  shard's checkpoint next advances (`db.advance`).

One read costs one Postgres query and two Redis pipelines, whatever the number of
shards. `StatusCollector` serves it to Prometheus, cached for a second, so scrapes
cannot hammer Redis or Postgres.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import asyncpg
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import ResponseError

from core.errors import ConfigurationError
from core.outages import FAILED
from core.settings import Settings
from projections import db
from projections.projection import Projection
from streams.connection import Redis, connect
from streams.keys import Keys, Shard, projection_group
from streams.positions import ZERO, EntryId, entry_id_of, format_entry_id

log = logging.getLogger("eddy.status")

MAX_COUNTED = 10_000
"""Entries one XRANGE counts, at most: beyond it the lag is a lower bound."""
ERROR_CHARS = 2000
"""A recorded error is cut to this many characters."""
RECORD_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ShardStatus:
    projection: str
    context: str
    shard: int
    checkpoint: EntryId
    checkpoint_at: datetime | None
    """When the checkpoint last moved (None: nothing committed yet)."""
    lag_events: int
    lag_seconds: float
    last_error: str | None
    last_error_at: datetime | None

    @property
    def failing(self) -> bool:
        return self.last_error is not None

    def as_json(self) -> dict[str, Any]:
        return {
            "projection": self.projection,
            "context": self.context,
            "shard": self.shard,
            "checkpoint": format_entry_id(self.checkpoint),
            "checkpoint_at": _iso(self.checkpoint_at),
            "lag_events": self.lag_events,
            "lag_seconds": self.lag_seconds,
            "failing": self.failing,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
        }


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


@dataclass
class _Pair:
    """One projection on one shard, while its status is being read."""

    projection: str
    shard: Shard
    stream: str
    checkpoint: EntryId
    row: asyncpg.Record | None
    first: EntryId | None = None
    lag_events: int = 0


async def read(
    redis: Redis,
    postgres: db.Pool | db.Connection,
    keys: Keys,
    projections: Sequence[Projection],
    *,
    now_ms: int | None = None,
) -> list[ShardStatus]:
    """The status of every projection on every shard it reads, in the order of
    `projections`, their contexts and the shards."""
    rows = await postgres.fetch(
        "SELECT projection, context, shard, entry_ms, entry_seq, updated_at,"
        " last_error, last_error_at FROM eddy_checkpoints WHERE projection = ANY($1::text[])",
        [p.name for p in projections],
    )
    found = {(r["projection"], r["context"], r["shard"]): r for r in rows}
    pairs: list[_Pair] = []
    for projection in projections:
        for context in projection.contexts:
            for shard in keys.shards_of(context):
                row = found.get((projection.name, context, shard.number))
                pairs.append(
                    _Pair(
                        projection=projection.name,
                        shard=shard,
                        stream=keys.event_stream(shard),
                        checkpoint=ZERO if row is None else (row["entry_ms"], row["entry_seq"]),
                        row=row,
                    )
                )
    streams = sorted({pair.stream for pair in pairs})

    # 1. every stream's groups, and the first entry after each checkpoint
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        for pair in pairs:
            pipe.xrange(pair.stream, f"({format_entry_id(pair.checkpoint)}", "+", count=1)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    groups = {
        stream: _groups(reply)
        for stream, reply in zip(streams, replies[: len(streams)], strict=True)
    }
    for pair, reply in zip(pairs, replies[len(streams) :], strict=True):
        _raise(reply)
        pair.first = entry_id_of(reply[0][0]) if reply else None

    # 2. what XINFO does not say: entries between the checkpoint and the group's cursor
    counts: list[tuple[_Pair, int, int]] = []  # lag = base + sign * (entries counted)
    async with redis.pipeline(transaction=False) as pipe:
        for pair in pairs:
            if pair.first is None:
                continue  # nothing after the checkpoint: caught up
            group = groups[pair.stream].get(projection_group(pair.projection).encode())
            lag = None if group is None else group.get("lag")
            checkpoint = format_entry_id(pair.checkpoint)
            if group is not None and lag is not None:
                delivered = _entry(group["last-delivered-id"])
                cursor = format_entry_id(delivered)
                if delivered > pair.checkpoint:  # delivered, not committed yet
                    pipe.xrange(pair.stream, f"({checkpoint}", cursor, count=MAX_COUNTED)
                    counts.append((pair, lag, 1))
                elif delivered < pair.checkpoint:  # committed, not delivered to this group
                    pipe.xrange(pair.stream, f"({cursor}", checkpoint, count=MAX_COUNTED)
                    counts.append((pair, lag, -1))
                else:
                    pair.lag_events = lag
            elif pair.checkpoint == ZERO:
                pipe.xlen(pair.stream)
                counts.append((pair, 0, 0))
            else:
                pipe.xrange(pair.stream, f"({checkpoint}", "+", count=MAX_COUNTED)
                counts.append((pair, 0, 1))
        replies = await pipe.execute(raise_on_error=False) if counts else []
    for (pair, base, sign), reply in zip(counts, replies, strict=True):
        _raise(reply)
        pair.lag_events = int(reply) if sign == 0 else base + sign * len(reply)

    now = time.time() * 1000 if now_ms is None else now_ms
    return [_status(pair, now) for pair in pairs]


def _status(pair: _Pair, now_ms: float) -> ShardStatus:
    row = pair.row
    age_ms = 0.0 if pair.first is None else max(now_ms - pair.first[0], 0.0)
    return ShardStatus(
        projection=pair.projection,
        context=pair.shard.context,
        shard=pair.shard.number,
        checkpoint=pair.checkpoint,
        checkpoint_at=None if row is None or pair.checkpoint == ZERO else row["updated_at"],
        # an entry after the checkpoint exists (phase 1): the lag is at least one
        lag_events=0 if pair.first is None else max(pair.lag_events, 1),
        lag_seconds=age_ms / 1000,
        last_error=None if row is None else row["last_error"],
        last_error_at=None if row is None else row["last_error_at"],
    )


def _groups(reply: Any) -> dict[bytes, dict[str, Any]]:
    """XINFO GROUPS by group name; none for a stream that does not exist yet."""
    if isinstance(reply, ResponseError) and "no such key" in str(reply).lower():
        return {}
    _raise(reply)
    return {group["name"]: group for group in reply}


def _raise(reply: Any) -> None:
    if isinstance(reply, Exception):
        raise reply


def _entry(raw: bytes | str) -> EntryId:
    return entry_id_of(raw if isinstance(raw, bytes) else raw.encode())


async def record_failure(
    pool: db.Pool, projection: str, shard: Shard, error: BaseException
) -> None:
    """Record why a batch of `projection` on `shard` failed, in a transaction of its
    own (the batch's was rolled back); the next checkpoint advance clears it.

    Best effort and bounded: if Postgres cannot take it either, it is logged."""
    text = f"{type(error).__name__}: {error}".replace("\x00", "")[:ERROR_CHARS]  # text has no NUL
    with anyio.move_on_after(RECORD_TIMEOUT_S) as scope:
        try:
            await pool.execute(
                "INSERT INTO eddy_checkpoints (projection, context, shard, entry_ms, entry_seq,"
                " last_error, last_error_at) VALUES ($1, $2, $3, 0, 0, $4, now())"
                " ON CONFLICT (projection, context, shard) DO UPDATE"
                " SET last_error = excluded.last_error, last_error_at = excluded.last_error_at",
                projection,
                shard.context,
                shard.number,
                text,
            )
            return
        except FAILED as exc:
            log.warning(
                "projection-error-not-recorded projection=%s shard=%s error=%r",
                projection,
                shard.name,
                exc,
            )
    if scope.cancelled_caught:
        log.warning("projection-error-not-recorded projection=%s shard=%s", projection, shard.name)


async def report(settings: Settings, projections: Sequence[Projection]) -> list[ShardStatus]:
    """`eddy status`: read the status once, with connections of its own."""
    keys = Keys.of(settings)
    redis = connect(settings.redis_url)
    try:
        recorded = await redis.hget(keys.meta(), "shards")
        if recorded is not None and int(recorded) != keys.shards:
            raise ConfigurationError(
                f"EDDY_SHARDS is {keys.shards} but this deployment's data uses"
                f" {int(recorded)} shards"
            )
        conn = await asyncpg.connect(
            settings.database_url,
            server_settings={"search_path": settings.db_schema},
            timeout=10,
        )
        try:
            return await read(redis, conn, keys, projections)
        finally:
            await conn.close()
    finally:
        await redis.aclose()


def table(statuses: Sequence[ShardStatus]) -> str:
    """A readable table, one line per projection and shard."""
    header = ("projection", "context", "shard", "checkpoint", "lag", "lag (s)", "last error")
    lines = [
        (
            s.projection,
            s.context,
            str(s.shard),
            format_entry_id(s.checkpoint),
            str(s.lag_events),
            f"{s.lag_seconds:.1f}",
            "-" if s.last_error is None else _error_line(s),
        )
        for s in statuses
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header) - 1)]
    right = {2, 4, 5}
    out = []
    for line in [header, *lines]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=False))
        ]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out)


def to_json(statuses: Sequence[ShardStatus]) -> str:
    """`eddy status --json`: a list of objects, one per projection and shard."""
    return json.dumps([s.as_json() for s in statuses], indent=2)


def _error_line(status: ShardStatus) -> str:
    text = " ".join((status.last_error or "").split())
    text = text if len(text) <= 80 else text[:77] + "..."
    at = "" if status.last_error_at is None else f" (at {status.last_error_at:%Y-%m-%d %H:%M:%S})"
    return text + at


class StatusCollector(Collector):
    """Prometheus gauges of every projection's status, per shard.

    A collector's `collect` cannot wait for Redis or Postgres, so `/metrics` awaits
    `refresh(...)` first: it reads at most once per `max_age_s` (concurrent
    scrapes share one read) and gives up after `timeout_s`. When the read fails,
    the gauges are left out (their absence is what to alert on) until the next one.
    """

    def __init__(self, max_age_s: float = 1.0, timeout_s: float = 5.0) -> None:
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self._statuses: list[ShardStatus] = []
        self._read_at = -math.inf
        self._lock = anyio.Lock()

    async def refresh(
        self,
        redis: Redis,
        postgres: db.Pool | db.Connection,
        keys: Keys,
        projections: Sequence[Projection],
    ) -> None:
        """`read` the status again unless the last read is younger than `max_age_s`."""
        async with self._lock:
            if time.monotonic() - self._read_at < self.max_age_s:
                return
            try:
                with anyio.fail_after(self.timeout_s):
                    self._statuses = await read(redis, postgres, keys, projections)
            except FAILED as exc:
                log.warning("projection-status-unavailable error=%r", exc)
                self._statuses = []
            self._read_at = time.monotonic()

    def describe(self) -> Iterable[Metric]:
        return self._families([])

    def collect(self) -> Iterable[Metric]:
        return self._families(self._statuses)

    @staticmethod
    def _families(statuses: Sequence[ShardStatus]) -> list[Metric]:
        labels = ["projection", "context", "shard"]
        lag = GaugeMetricFamily(
            "eddy_projection_lag_events",
            "Entries of the shard's event stream after the projection's checkpoint.",
            labels=labels,
        )
        lag_s = GaugeMetricFamily(
            "eddy_projection_lag_seconds",
            "Age of the oldest entry after the projection's checkpoint (0 when caught up).",
            labels=labels,
        )
        checkpoint = GaugeMetricFamily(
            "eddy_projection_checkpoint_ms",
            "Milliseconds part of the last entry id the projection committed on the shard.",
            labels=labels,
        )
        failing = GaugeMetricFamily(
            "eddy_projection_failing",
            "1 while the projection's last batch on the shard failed, else 0.",
            labels=labels,
        )
        for s in statuses:
            values = [s.projection, s.context, str(s.shard)]
            lag.add_metric(values, s.lag_events)
            lag_s.add_metric(values, s.lag_seconds)
            checkpoint.add_metric(values, s.checkpoint[0])
            failing.add_metric(values, 1 if s.failing else 0)
        return [lag, lag_s, checkpoint, failing]
