"""Redis clients and the Lua scripts, each loaded once per client.

`redis+cluster://host:port` (or `rediss+cluster://`) selects Redis Cluster; the same
code runs on both because every multi-key step stays inside one shard's slot.

Blocking reads use `BLOCK_MS`, well under the socket timeout: redis-py times out
a `BLOCK` of 5 s or more at its default timeout instead of returning empty.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

BLOCK_MS = 1000
SOCKET_TIMEOUT_S = 10.0

Redis = aioredis.Redis | RedisCluster


def connect(url: str, **options: Any) -> Redis:
    options.setdefault("socket_timeout", SOCKET_TIMEOUT_S)
    options.setdefault("socket_connect_timeout", 3.0)
    options.setdefault("health_check_interval", 15)
    if "+cluster://" in url:
        return RedisCluster.from_url(url.replace("+cluster://", "://", 1), **options)
    options.setdefault("max_connections", 200)
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
        self._client = client

    async def load(self) -> None:
        """Load every script now, so the first command does not pay for it."""
        for script in (
            self.submit,
            self.apply,
            self.lease_extend,
            self.lease_release,
        ):
            script.sha = await self._client.script_load(script.script)
