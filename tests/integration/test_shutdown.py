"""SIGTERM: a worker or projector stops at once, releases its leases (so another
process takes over without waiting for them to expire) and exits 0; another
process then owns every shard."""

from __future__ import annotations

import signal
import time

import anyio
import msgspec
import pytest

from tests.pipeline import eventually
from tests.processes import ROLE_MEMBERS, fleet


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["worker", "projector"])
async def test_sigterm_releases_leases_at_once(settings, redis, schema, tmp_path, kind) -> None:
    # A long TTL: leases that merely expired would pass to the second process only
    # after 2/3 of it; released ones pass within one balancer tick (1/3 of it).
    settings = msgspec.structs.replace(settings, lease_ttl_ms=6000)
    async with fleet(settings, redis, tmp_path) as f:
        first = await f.start(kind)
        keys = f.keys
        role = ROLE_MEMBERS[kind]
        leases = [keys.lease(shard, role) for shard in keys.shards_of("chat_sessions")]

        async def owned_by(member: str) -> bool:
            return all([await redis.get(lease) == member.encode() for lease in leases])

        await eventually(lambda: owned_by(first.member))
        second = await f.start(kind)
        first.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        with anyio.fail_after(5):
            assert await first.process.wait() == 0
        exited_s = time.monotonic() - stopped
        # Released, not expired: the second takes every shard within about one tick.
        await eventually(lambda: owned_by(second.member), within=6)
        took_s = time.monotonic() - stopped
        assert exited_s < 2, f"exit took {exited_s:.2f} s"
        assert took_s < 3.5, f"takeover took {took_s:.2f} s: leases expired, not released"
        assert first.member.encode() not in await redis.zrange(keys.members(role), 0, -1)
