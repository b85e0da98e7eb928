"""Redis clients and the Lua scripts, each loaded once per client.

`redis+cluster://host:port` (or `rediss+cluster://`) selects Redis Cluster; the same
code runs on both because every multi-key step stays inside one shard's slot.
The one difference is a batch of script calls in one pipeline (`Scripts.pipelined`):
redis-py's cluster pipeline refuses `EVALSHA` by name and cannot load scripts
first, so there the calls are sent as raw `EVALSHA` commands (routed by their
first key) and a node that answers NOSCRIPT (restarted, failed over) gets every
script again and the calls it refused once more, in their order.

Blocking reads use `BLOCK_MS`, well under the socket timeout: redis-py times out
a `BLOCK` of 5 s or more at its default timeout instead of returning empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, NoScriptError

BLOCK_MS = 1000
SOCKET_TIMEOUT_S = 10.0

Redis = aioredis.Redis | RedisCluster
ScriptCall = tuple[AsyncScript, Sequence[Any], Sequence[Any]]
"""A script, its keys and its args."""


class RedisConnection(Connection):
    """redis-py's connection, except that under uvloop a write to a socket the server
    has just closed (Redis stopping, with our connect in its backlog) raises
    RuntimeError ("the handler is closed", uvloop#506) where asyncio raises an
    OSError: make it the ConnectionError every loop here retries, not a crash.
    (redis-py's cluster client makes its own connections and does not get this.)"""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:  # redis-py has disconnected already
            if "handler is closed" not in str(exc):
                raise
            raise ConnectionError(f"Error while writing to socket. {exc}") from exc


def connect(url: str, **options: Any) -> Redis:
    options.setdefault("socket_timeout", SOCKET_TIMEOUT_S)
    options.setdefault("socket_connect_timeout", 3.0)
    options.setdefault("health_check_interval", 15)
    if "+cluster://" in url:
        return RedisCluster.from_url(url.replace("+cluster://", "://", 1), **options)
    options.setdefault("max_connections", 200)
    options.setdefault("connection_class", RedisConnection)
    return aioredis.Redis.from_url(url, **options)


def _source(name: str) -> str:
    return resources.files("streams").joinpath("lua", f"{name}.lua").read_text()


class Scripts:
    """The Lua steps of `streams/lua/`, registered on one client."""

    def __init__(self, client: Redis) -> None:
        self.submit: AsyncScript = client.register_script(_source("submit"))
        self.load_states: AsyncScript = client.register_script(_source("load"))
        self.apply: AsyncScript = client.register_script(_source("apply"))
        self.lease_extend: AsyncScript = client.register_script(_source("lease_extend"))
        self.lease_release: AsyncScript = client.register_script(_source("lease_release"))
        self.dead_letter: AsyncScript = client.register_script(_source("dead_letter"))
        self.dead_letter_replay: AsyncScript = client.register_script(_source("dead_letter_replay"))
        self.rate_limit: AsyncScript = client.register_script(_source("rate_limit"))
        self._client = client

    async def load(self) -> None:
        """Load every script now, so the first command does not pay for it."""
        for script in [v for v in vars(self).values() if isinstance(v, AsyncScript)]:
            script.sha = await self._client.script_load(script.script)

    async def pipelined(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run script calls in one pipeline (no transaction), in order; return each
        call's reply, or the exception it raised."""
        if not isinstance(self._client, RedisCluster):
            async with self._client.pipeline(transaction=False) as pipe:
                for script, keys, args in calls:
                    await script(keys=keys, args=args, client=pipe)  # the pipeline loads it first
                return list(await pipe.execute(raise_on_error=False))
        replies = await self._cluster_evalsha(calls)
        refused = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if refused:
            await self.load()
            again = await self._cluster_evalsha([calls[i] for i in refused])
            for i, reply in zip(refused, again, strict=True):
                replies[i] = reply
        return replies

    async def _cluster_evalsha(self, calls: Sequence[ScriptCall]) -> list[Any]:
        assert isinstance(self._client, RedisCluster)
        async with self._client.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))
