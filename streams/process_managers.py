"""Process managers: react to events by issuing commands, never by writing to
another context.

A `ProcessManager` names the contexts whose events it reads; it gets its own
consumer group on their event streams (`process_manager_group`), one owner per
shard through leases (like a projection), and sees each shard's events in order.
Delivery is at least once: an entry is acknowledged after its reaction returns,
so a process manager killed half-way reacts to the same event again. Reactions
must therefore be idempotent, which a process manager gets by deriving each
command id from what it reacts to: the bus accepts a command id once, and the
worker applies it once.

A process manager is declared once (its name and contexts are all the trimmer and
the operator's tools need to know of it); `start(redis, keys, bus)` binds it to a
process's clients and returns its reaction.

An event whose reaction keeps failing (not for want of Redis) is moved, after
`EDDY_MAX_ATTEMPTS`, to its shard's dead letters for this process manager only
(`streams/deadletters.py`); replaying it calls the reaction again.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio

from core.catalog import Catalog
from core.messages import Envelope
from core.settings import Settings
from streams.bus import CommandBus
from streams.connection import Redis, Scripts
from streams.consumer import Handle, Poison, event_consumers
from streams.deadletters import DeadLetters
from streams.entries import Entry, read_event
from streams.keys import Keys, Shard, process_manager_group
from streams.lease import Balancer, ShardLease

React = Callable[[Envelope], Awaitable[None]]


@dataclass(frozen=True)
class ProcessManager:
    name: str
    contexts: tuple[str, ...]
    start: Callable[[Redis, Keys, CommandBus], React]
    """Its reaction to one event, bound to a process's Redis client, keys and bus."""

    @property
    def group(self) -> str:
        return process_manager_group(self.name)


async def run_process_managers(
    redis: Redis,
    scripts: Scripts,
    keys: Keys,
    settings: Settings,
    catalog: Catalog,
    managers: Sequence[ProcessManager],
    bus: CommandBus | None = None,
) -> None:
    """Own a fair share of every process manager's shards until cancelled; their
    commands go through `bus` (by default one of their own)."""
    member = f"reactor-{uuid.uuid4().hex[:12]}"
    dead_letters = DeadLetters(redis, scripts, keys, settings.command_ttl_s, catalog)
    bus = bus or CommandBus(redis, scripts, keys, settings.command_ttl_s, catalog)

    def balancer(manager: ProcessManager) -> Balancer:
        react = manager.start(redis, keys, bus)

        def poison(shard: Shard, lease: ShardLease) -> Poison:
            return dead_letters.poison(lease, shard, manager.group, settings.max_attempts)

        def handler(shard: Shard) -> Handle:
            async def handle(entries: list[Entry]) -> list[bytes]:
                for entry_id, fields in entries:
                    await react(read_event(shard, entry_id.decode(), fields[b"e"], catalog))
                return [entry_id for entry_id, _ in entries]

            return handle

        return event_consumers(
            redis,
            scripts,
            keys,
            settings,
            group=manager.group,
            contexts=manager.contexts,
            member=member,
            handler=handler,
            poison=poison,
        )

    async with anyio.create_task_group() as tg:
        for manager in managers:
            tg.start_soon(balancer(manager).run)
