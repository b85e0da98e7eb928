"""What a read-model module declares: the contexts it reads, the events it
handles, how it applies a batch of them inside the projector's transaction, its
tables, and the queries it answers.

Each event a projection handles is named once, in the union of `events`:

```python
Handled = ToolRegistered | ToolUpdated | ToolDeactivated

async def apply(conn: Connection, batch: Sequence[tuple[Envelope, Handled]]) -> None:
    for env, event in batch:
        match event:
            case ToolRegistered(): ...
            ...
            case _:
                assert_never(event)  # mypy: a case for every event of the union

PROJECTION = Projection(name="tools", reads=(tools.CONTEXT,), events=Handled, apply=apply, ...)
```

The projector decodes only those events (in their current shape) and hands them
to `apply` with their envelopes; `assert_never` makes mypy refuse an `apply`
without a case for one of them. A new event of a context the projection reads
cannot be forgotten either: every event of its contexts is in `events` or in
`ignores` (a `ConfigurationError` at start-up otherwise), and every cached query
and materialized view reading the projection's tables says, for each event the
projection handles, whether it changes their answers (`Cache`, `View`,
`check_invalidations`).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import msgspec

from core.catalog import Catalog
from core.errors import ConfigurationError
from core.messages import Context, Envelope, Event
from projections.db import Connection
from projections.pagination import QueryArgs

Batch = Sequence[tuple[Envelope, Any]]
"""What `apply` gets: each envelope with its decoded event (None for a projection
of every event, `events=None`)."""


class Statements:
    """SQL statements of one batch, run in order; runs of the same statement go
    to Postgres as one `executemany` (one round trip instead of one each)."""

    def __init__(self) -> None:
        self._runs: list[tuple[str, list[tuple[Any, ...]]]] = []

    def add(self, sql: str, *args: Any) -> None:
        if self._runs and self._runs[-1][0] == sql:
            self._runs[-1][1].append(args)
        else:
            self._runs.append((sql, [args]))

    async def execute(self, conn: Connection) -> None:
        for sql, rows in self._runs:
            if len(rows) == 1:
                await conn.execute(sql, *rows[0])
            else:
                await conn.executemany(sql, rows)


Answer = dict[str, Any] | None
"""A query's answer; None means 404."""


async def one(conn: Connection, select: str, id_column: str, args: QueryArgs) -> Answer:
    """The tenant's row of `select` (`SELECT … FROM …`) whose `id_column` equals the
    path parameter of that name, as a dict; None (404) if there is none."""
    row = await conn.fetchrow(
        f"{select} WHERE tenant_id = $1 AND {id_column} = $2", args.tenant_id, args.path[id_column]
    )
    return None if row is None else dict(row)


@dataclass(frozen=True)
class Invalidation:
    """Events that change a cached query's answers (see `projections/cache.py`)."""

    events: tuple[type[Event], ...]
    scopes: Callable[[Envelope], Sequence[str] | None] | None = None
    """The scopes (`Cache.scope`) whose answers an event changes. Without it, or
    when it returns None, every answer of the event's tenant."""


@dataclass(frozen=True)
class Cache:
    """A query's answers may be kept in Redis for `ttl_s` seconds; one is never
    served once an event of `invalidated_by` that changes it has been projected.

    Every event handled by a projection the query reads (its own, `also_from`) is
    named in `invalidated_by` or in `unaffected_by` (`check_invalidations`);
    `scope` (None: the whole tenant) narrows which answers an `Invalidation` with
    `scopes` drops."""

    ttl_s: float
    invalidated_by: tuple[Invalidation, ...]
    scope: Callable[[QueryArgs], str] | None = None
    unaffected_by: tuple[type[Event], ...] = ()
    """Events of the projections it reads that change none of its answers."""

    @property
    def invalidating(self) -> frozenset[type[Event]]:
        return frozenset(e for rule in self.invalidated_by for e in rule.events)


@dataclass(frozen=True)
class Query:
    name: str
    """The blueprint's name (`GetChatSessionById`)."""
    path: str
    """The HTTP route (`/v1/chat-sessions/{session_id}`)."""
    run: Callable[[Connection, QueryArgs], Awaitable[Answer]]
    also_from: tuple[str, ...] = ()
    """Other projections whose tables the query reads: `?after=` waits for them too."""
    view: str | None = None
    """The materialized view it reads (`projections/views.py`): `?after=` waits until
    the view reflects the position, not only its projections."""
    cache: Cache | None = None
    """How its answers are cached (`projections/cache.py`); None: never."""


def tables(package: str, name: str) -> str:
    """The DDL in `<package>/tables/<name>.sql`: a projection's tables and indexes."""
    return resources.files(package).joinpath("tables", f"{name}.sql").read_text()


def event_classes(events: Any) -> tuple[type[Event], ...]:
    """The classes of an event union (`A | B`), or of one event class."""
    members = typing.get_args(events) if isinstance(events, types.UnionType) else (events,)
    if not members or not all(isinstance(m, type) and issubclass(m, Event) for m in members):
        raise ConfigurationError(f"not an event class or a union of them: {events!r}")
    return tuple(members)


@dataclass(frozen=True)
class Projection:
    name: str
    reads: tuple[Context, ...]
    """The contexts whose event streams it reads."""
    events: Any
    """The events it handles: a union of event classes (`A | B`), one class, or
    None for every event of its contexts, not decoded (the event archive)."""
    apply: Callable[[Connection, Batch], Awaitable[None]]
    queries: tuple[Query, ...] = ()
    tables: str = ""
    """Its tables and indexes (unqualified names): what `eddy migrate` creates, what
    a rebuild builds again, what `eddy drift check` compares with the database."""
    version: int = 1
    """Raise it when the rows' meaning changes: the projection is rebuilt from history."""
    ignores: tuple[type[Event], ...] = ()
    """The events of its contexts it does not apply (each of the others is in `events`)."""
    contexts: tuple[str, ...] = field(init=False)
    handles: tuple[type[Event], ...] = field(init=False)
    """The event classes of `events` (empty for every event)."""
    _decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]] = field(
        init=False, repr=False, compare=False
    )
    """Per event type handled: its decoder and its current `schema_version`."""

    def __post_init__(self) -> None:
        handles = () if self.events is None else event_classes(self.events)
        if self.events is not None:
            account_for(
                f"projection {self.name}",
                f"the contexts it reads ({', '.join(c.name for c in self.reads)})",
                {e for context in self.reads for e in context.events},
                frozenset(handles),
                set(self.ignores),
                what_it="it applies",
            )
        object.__setattr__(self, "contexts", tuple(c.name for c in self.reads))
        object.__setattr__(self, "handles", handles)
        decoders = {e.__name__: (msgspec.json.Decoder(e), e.schema_version) for e in handles}
        object.__setattr__(self, "_decoders", decoders)

    def decoded(
        self, envelopes: Sequence[Envelope], catalog: Catalog
    ) -> list[tuple[Envelope, Any]]:
        """The envelopes of the events it handles, in their current shape, each with
        its event; for a projection of every event, all of them as written."""
        if self.events is None:
            return [(envelope, None) for envelope in envelopes]
        decoders = self._decoders
        batch: list[tuple[Envelope, Any]] = []
        for written in envelopes:
            found = decoders.get(written.type)
            if found is None:
                continue
            decoder, version = found
            envelope = catalog.current(written) if written.schema_version < version else written
            batch.append((envelope, decoder.decode(envelope.payload)))
        return batch

    async def project(
        self, conn: Connection, envelopes: Sequence[Envelope], catalog: Catalog
    ) -> None:
        """Apply the events it handles among `envelopes` (read as written)."""
        if batch := self.decoded(envelopes, catalog):
            await self.apply(conn, batch)


def check_invalidations(projections: Sequence[Projection]) -> None:
    """Refuse a cached query that does not say, of some event handled by a
    projection it reads, whether the event changes its answers; or that names an
    event none of them handles."""
    by_name = {p.name: p for p in projections}
    for projection in projections:
        for query in projection.queries:
            if query.cache is None:
                continue
            readers = [projection, *(by_name[name] for name in query.also_from)]
            handled = {e for reader in readers for e in reader.handles}
            invalidating, unaffected = query.cache.invalidating, set(query.cache.unaffected_by)
            if query.cache.scope is None and any(
                rule.scopes is not None for rule in query.cache.invalidated_by
            ):
                raise ConfigurationError(
                    f"{query.name}: an invalidation with scopes needs a Cache.scope"
                )
            account_for(query.name, "the projections it reads", handled, invalidating, unaffected)


def account_for(
    what: str,
    source: str,
    handled: set[type[Event]],
    named: frozenset[type[Event]],
    unaffected: set[type[Event]],
    *,
    what_it: str = "changes it",
) -> None:
    """Every event of `handled` (those of `source`) named exactly once: in `named`
    (those that do what `what_it` says) or in `unaffected`; no other event named."""
    if strays := sorted(e.__name__ for e in (named | unaffected) - handled):
        raise ConfigurationError(f"{what}: {', '.join(strays)} not handled by {source}")
    if both := sorted(e.__name__ for e in named & unaffected):
        raise ConfigurationError(f"{what}: {', '.join(both)} named both ways")
    if missing := sorted(e.__name__ for e in handled - named - unaffected):
        raise ConfigurationError(
            f"{what}: say whether {', '.join(missing)} (of {source}) {what_it}:"
            " name each among the events that do, or among those that do not"
        )
