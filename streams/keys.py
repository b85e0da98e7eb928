"""Every Redis key Eddy uses, and the shard of every aggregate.

A shard's keys share the hash tag `{<context>:<shard>}`, so one Lua step over a
shard's command stream, event stream, aggregate states, command statuses and lease
lives in one Redis Cluster slot. Nothing outside this module builds a key.

Tenant and aggregate ids are length-prefixed inside keys, so no choice of ids with
`:` in them can make two keys collide.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from core.settings import Settings

COMMAND_GROUP = "workers"


def _part(value: str) -> str:
    return f"{len(value)}:{value}"


@dataclass(frozen=True)
class Shard:
    """One shard of one context: a command stream and an event stream."""

    context: str
    number: int

    @property
    def name(self) -> str:
        return f"{self.context}:{self.number}"


@dataclass(frozen=True)
class Keys:
    prefix: str
    shards: int

    @classmethod
    def of(cls, settings: Settings) -> Keys:
        """The keys of a deployment: `EDDY_KEY_PREFIX`, `EDDY_SHARDS` shards per context."""
        return cls(settings.key_prefix, settings.shards)

    def shard_of(self, context: str, tenant_id: str, aggregate_id: str) -> Shard:
        """The stable shard of an aggregate (crc32 of tenant and id)."""
        digest = zlib.crc32(f"{tenant_id}\x00{aggregate_id}".encode())
        return Shard(context, digest % self.shards)

    def shards_of(self, context: str) -> list[Shard]:
        return [Shard(context, n) for n in range(self.shards)]

    def _tag(self, shard: Shard) -> str:
        return f"{self.prefix}:{{{shard.context}:{shard.number}}}"

    def command_stream(self, shard: Shard) -> str:
        return f"{self._tag(shard)}:commands"

    def event_stream(self, shard: Shard) -> str:
        return f"{self._tag(shard)}:events"

    def aggregate(self, shard: Shard, tenant_id: str, aggregate_id: str) -> str:
        return f"{self._tag(shard)}:agg:{_part(tenant_id)}:{aggregate_id}"

    def command_status(self, shard: Shard, tenant_id: str, command_id: str) -> str:
        return f"{self._tag(shard)}:cmd:{_part(tenant_id)}:{command_id}"

    def lease(self, shard: Shard, role: str) -> str:
        """The lease of one shard for one role (`worker`, or `projection:<name>`)."""
        return f"{self._tag(shard)}:lease:{role}"

    def trimmed(self, shard: Shard) -> str:
        """How far the trimmer has trimmed the shard's event stream: a hash of `through`
        (the last entry id trimmed) and `gone` (`streams/retention.py`)."""
        return f"{self._tag(shard)}:events:trimmed"

    def trimmer_lease(self) -> str:
        """The lease of the one process that trims the streams (`streams/retention.py`)."""
        return f"{self.prefix}:lease:trimmer"

    def dead_letters(self, shard: Shard) -> str:
        """The shard's dead letters: entries of its command or event stream that kept
        failing, moved out of the way (`streams/deadletters.py`)."""
        return f"{self._tag(shard)}:dead-letters"

    def dead_letter_replay(self, shard: Shard, dead_letter: str) -> str:
        """Held while one dead event is replayed, so two replays never overlap."""
        return f"{self._tag(shard)}:dead-letter-replay:{dead_letter}"

    def command_locator(self, tenant_id: str, command_id: str) -> str:
        """Where a command id lives: `<context>:<shard>:<type>` (its own slot)."""
        return f"{self.prefix}:cmdloc:{_part(tenant_id)}:{command_id}"

    def reservation(self, context: str, tenant_id: str, scope: str, value: str) -> str:
        """A value unique in a tenant (a tool's name), held by the command that took it."""
        return f"{self.prefix}:unique:{_part(context)}:{_part(tenant_id)}:{_part(scope)}:{value}"

    def session_streams(self, tenant_id: str, session_id: str) -> str:
        """The message streams started in a chat session that are not known stopped
        (a set kept by the process manager of `app/process_managers.py`)."""
        return f"{self.prefix}:session-streams:{_part(tenant_id)}:{session_id}"

    def rate_limit(self, kind: str, tenant_id: str) -> str:
        """A tenant's rate limit of one kind (`commands`, `queries`): one GCRA value
        (`streams/lua/rate_limit.lua`), a key of its own, so in a slot of its own."""
        return f"{self.prefix}:rate:{_part(kind)}:{_part(tenant_id)}"

    def members(self, role: str) -> str:
        """Sorted set of live processes of one role, scored by their last heartbeat (ms)."""
        return f"{self.prefix}:members:{role}"

    def meta(self) -> str:
        """Deployment facts that must not change once data exists (the shard count)."""
        return f"{self.prefix}:meta"

    def query_cache(
        self, query: str, tenant_id: str, scope: str, generation: int, arguments: str
    ) -> str:
        """A cached query answer at one generation (`projections/cache.py`);
        `arguments`: a digest of the query's path and query-string parameters."""
        return (
            f"{self.prefix}:qcache:{_part(query)}:{_part(tenant_id)}:{_part(scope)}"
            f":{generation}:{arguments}"
        )


def projection_group(projection: str) -> str:
    return f"projection:{projection}"


def process_manager_group(name: str) -> str:
    """The consumer group of a process manager (named `reactor:` since it was first
    deployed: a new name would be a new group, reading every event again)."""
    return f"reactor:{name}"
