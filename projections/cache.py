"""Query caching: answers in Redis under a generation that the projector moves in
the very transaction that changes the rows behind them.

```
projector batch: BEGIN ─▶ rows ─▶ checkpoint ─▶ move the generations its rules name ─▶ COMMIT
query:  generation g (one SELECT) ─▶ GET <query, tenant, scope, g, arguments>  ── hit: the bytes
        miss: BEGIN REPEATABLE READ READ ONLY ─▶ generation g' ─▶ run the query ─▶ COMMIT
              ─▶ SET <…, g', …> PX ttl ─▶ the bytes
```

A query opts in with a `Cache` on its `Query`, naming the events that change its
answers (`Invalidation`). Its answer's generation is the sum of up to three
counters of `eddy_cache_generations` (migration 003): the query's own (moved by
`Generations.forget` when a rebuild swaps its tables in), the tenant's (moved by
a rule without scopes) and the answer's scope's (a rule with scopes). Counters
only go up, so two reads of the same sum saw the same rows: the generation and
the rows a miss caches come from one snapshot, and a hit needs only the
generation. Nothing is lost to a crash: the generation moves with the rows or
not at all, and `?after=` waits for the checkpoint that commits both.

Redis failing (an error, or no answer within a quarter second) is not an error
for the client: the cache is skipped for a second (a `Breaker`, logged once per
outage) and the answer comes from Postgres. 404s and answers over `MAX_CACHED_BYTES` are not
kept. The projector moves generations whether or not `EDDY_QUERY_CACHE` is on, so
turning it on again never finds an answer older than its generation.

Known window: a rebuild swaps tables with `ALTER TABLE … SET SCHEMA`, which is not
MVCC-safe; a miss whose snapshot predates the swap but whose query waited for it
reads the new tables with the old snapshot. `forget` runs in the swap's
transaction, so such an answer is only ever found by requests that read the
generation before the swap committed (its own moment), never after.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from core.messages import Envelope
from core.outages import Breaker, Bypassed
from projections import db
from projections.db import Connection
from projections.pagination import QueryArgs
from projections.projection import Invalidation, Projection, Query
from streams.connection import Redis
from streams.keys import Keys, Shard

log = logging.getLogger("eddy.cache")

MAX_CACHED_BYTES = 1 << 20
"""Answers larger than this are served but not kept."""
NOT_ARGUMENTS = frozenset({"after", "access_token"})
"""Query-string parameters that do not change an answer (so not part of its key)."""

Outcome = Literal["hit", "miss", "bypass"]
"""`hit`: served from Redis; `miss`: from Postgres (and kept, if it fits);
`bypass`: from Postgres because Redis is failing."""

TENANT = ""
"""The scope of a counter that covers every answer of a tenant (or, with tenant
`TENANT`, every answer of the query)."""

_encoder = msgspec.json.Encoder()

GENERATION = (
    "SELECT coalesce(sum(generation), 0)::bigint FROM eddy_cache_generations"
    " WHERE (query, tenant_id, scope) IN (($1, '', ''), ($1, $2, ''), ($1, $2, $3))"
)
MOVE = (
    "INSERT INTO eddy_cache_generations (query, tenant_id, scope, generation)"
    " SELECT query, tenant_id, scope, 1"
    " FROM unnest($1::text[], $2::text[], $3::text[]) AS moved (query, tenant_id, scope)"
    " ORDER BY query, tenant_id, scope"
    " ON CONFLICT (query, tenant_id, scope)"
    " DO UPDATE SET generation = eddy_cache_generations.generation + 1"
)
"""Rows are locked in one order by every projector, so two batches never deadlock."""


@dataclass(frozen=True)
class _Rule:
    query: str
    events: frozenset[str]
    invalidation: Invalidation


class Generations:
    """The invalidation rules of every cached query, by the projection whose
    batches move them: a query's own, and those it reads with `also_from`."""

    def __init__(self, projections: Sequence[Projection]) -> None:
        self._rules: dict[str, list[_Rule]] = {p.name: [] for p in projections}
        self._cached: dict[str, list[str]] = {p.name: [] for p in projections}
        by_name = {p.name: p for p in projections}
        for projection in projections:
            for query in projection.queries:
                if query.cache is None:
                    continue
                readers = [by_name[name] for name in (projection.name, *query.also_from)]
                for reader in readers:
                    self._cached[reader.name].append(query.name)
                for invalidation in query.cache.invalidated_by:
                    events = frozenset(e.__name__ for e in invalidation.events)
                    for reader in readers:
                        if set(invalidation.events) & set(reader.handles):
                            self._rules[reader.name].append(_Rule(query.name, events, invalidation))

    def moved(
        self, projection: Projection, envelopes: Sequence[Envelope]
    ) -> set[tuple[str, str, str]]:
        """(query, tenant, scope) of every counter a batch of `projection` moves."""
        moved: set[tuple[str, str, str]] = set()
        for rule in self._rules.get(projection.name, ()):
            for env in envelopes:
                if env.type not in rule.events:
                    continue
                scopes = rule.invalidation.scopes
                named = None if scopes is None else scopes(env)
                for scope in (TENANT,) if named is None else named:
                    moved.add((rule.query, env.tenant_id, scope))
        return moved

    async def advance(
        self, conn: Connection, projection: Projection, shard: Shard, envelopes: list[Envelope]
    ) -> None:
        """The projector's `in_transaction` hook: move the generations of every
        answer the batch changes, in the batch's transaction."""
        if moved := sorted(self.moved(projection, envelopes)):
            await conn.execute(MOVE, *(list(column) for column in zip(*moved, strict=True)))

    async def forget(self, conn: Connection, projection: Projection) -> None:
        """Move the generation of every query reading `projection`'s tables, for
        every tenant (a rebuild's `after_swap` step, inside the swap's transaction)."""
        if queries := sorted(set(self._cached.get(projection.name, ()))):
            await conn.execute(MOVE, queries, [TENANT] * len(queries), [TENANT] * len(queries))


async def generation(conn: Connection | db.Pool, query: str, tenant_id: str, scope: str) -> int:
    """The generation of the answers of `query` for (`tenant_id`, `scope`)."""
    value = await conn.fetchval(GENERATION, query, tenant_id, scope)
    return int(value)


def arguments(args: QueryArgs) -> str:
    """A digest of what selects an answer: the path and query-string parameters."""
    params = sorted((k, v) for k, v in args.params.items() if k not in NOT_ARGUMENTS)
    raw = _encoder.encode([sorted(args.path.items()), params])
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


class QueryCache:
    """Answers of cached queries in Redis, for the routes of one web process.

    Holds only whether Redis is failing: the clients are passed in per request."""

    def __init__(self, pause_s: float = 1.0) -> None:
        self.breaker = Breaker("query-cache", "answering from Postgres", log, pause_s=pause_s)

    async def answer(
        self, pool: db.Pool, redis: Redis, keys: Keys, query: Query, args: QueryArgs
    ) -> tuple[bytes | None, Outcome]:
        """The encoded answer of `query` (None: 404), and where it came from."""
        policy = query.cache
        assert policy is not None, f"{query.name} is not cached"
        scope = TENANT if policy.scope is None else policy.scope(args)
        digest = arguments(args)

        def key(at: int) -> str:
            return keys.query_cache(query.name, args.tenant_id, scope, at, digest)

        if self.breaker.open:
            return await _uncached(pool, query, args), "bypass"
        seen = await generation(pool, query.name, args.tenant_id, scope)
        try:
            cached = await self.breaker.call(lambda: redis.get(key(seen)))
        except Bypassed:
            return await _uncached(pool, query, args), "bypass"
        if cached is not None:
            assert isinstance(cached, bytes)  # the clients do not decode responses
            return cached, "hit"
        async with (
            pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            at = await generation(conn, query.name, args.tenant_id, scope)
            result = await query.run(conn, args)
        if result is None:
            return None, "miss"
        body = _encoder.encode(result)
        if len(body) <= MAX_CACHED_BYTES:
            ttl_ms = max(1, round(policy.ttl_s * 1000))
            with contextlib.suppress(Bypassed):  # served all the same, just not kept
                await self.breaker.call(lambda: redis.set(key(at), body, px=ttl_ms))
        return body, "miss"


async def _uncached(pool: db.Pool, query: Query, args: QueryArgs) -> bytes | None:
    async with pool.acquire() as conn:
        result = await query.run(conn, args)
    return None if result is None else _encoder.encode(result)
