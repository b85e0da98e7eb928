"""Process managers: react to events by issuing commands, never by writing to
another context.

A `Reactor` names the contexts whose events it reads; it gets its own consumer
group on their event streams, one owner per shard through leases (like a
projection), and sees each shard's events in order. Delivery is at least once: an
entry is acknowledged after its reaction returns, so a reactor killed half-way
reacts to the same event again. Reactions must therefore be idempotent, which a
reactor gets by deriving each command id from what it reacts to: the bus accepts a
command id once, and the worker applies it once.

An event whose reaction keeps failing (not for want of Redis) is moved, after
`EDDY_MAX_ATTEMPTS`, to its shard's dead letters for this reactor only
(`streams/deadletters.py`); replaying it calls `react` again.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio

from app.errors import Unavailable
from app.messages import Envelope
from app.settings import Settings
from streams.bus import stamp
from streams.connection import Redis, Scripts
from streams.consumer import RETRYABLE, TRANSIENT, Entry, Handle, Poison, event_consumers
from streams.deadletters import DeadLetters
from streams.keys import Keys, Shard, reactor_group
from streams.lease import Balancer, ShardLease

React = Callable[[Envelope], Awaitable[None]]


@dataclass(frozen=True)
class Reactor:
    name: str
    contexts: tuple[str, ...]
    react: React


async def run_reactors(
    redis: Redis,
    scripts: Scripts,
    keys: Keys,
    settings: Settings,
    reactors: Sequence[Reactor],
) -> None:
    """Own a fair share of every reactor's shards until cancelled."""
    member = f"reactor-{uuid.uuid4().hex[:12]}"
    dead_letters = DeadLetters(redis, scripts, keys, settings.command_ttl_s)

    def balancer(reactor: Reactor) -> Balancer:
        def poison(shard: Shard, lease: ShardLease) -> Poison:
            return dead_letters.poison(
                lease,
                shard,
                reactor_group(reactor.name),
                settings.max_attempts,
                transient=(*TRANSIENT, Unavailable),
            )

        def handler(shard: Shard) -> Handle:
            async def handle(entries: list[Entry]) -> list[bytes]:
                for entry_id, fields in entries:
                    await reactor.react(stamp(shard, entry_id.decode(), fields[b"e"]))
                return [entry_id for entry_id, _ in entries]

            return handle

        return event_consumers(
            redis,
            scripts,
            keys,
            settings,
            group=reactor_group(reactor.name),
            contexts=reactor.contexts,
            member=member,
            handler=handler,
            retry_on=(*RETRYABLE, Unavailable),
            poison=poison,
        )

    async with anyio.create_task_group() as tg:
        for reactor in reactors:
            tg.start_soon(balancer(reactor).run)
