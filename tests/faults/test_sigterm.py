"""SIGTERM under load: a worker or projector that is stopped while it holds a
batch finishes that batch (applies or commits it, and acknowledges it), exits 0
within the grace period, leaves nothing pending under its consumer name and
releases its leases at once, so the other process takes its shards without
waiting for them to expire.

The victim runs alone (a projector: with one worker) and is frozen (SIGSTOP) at
an instant when it holds entries it has read but not yet applied or committed,
then sent SIGTERM and let go (SIGCONT). No other process of its kind runs, so
what is done by the time the victim has exited was done by the victim: its
entries in hand are applied (worker: the commands' statuses are final) or
committed (projector: at or below the checkpoint), nothing is pending under its
name, and no lease key names it any more. (A second process frozen meanwhile
would not do: frozen inside a Postgres transaction, it blocks the victim's.)
Then a new process of its kind owns every shard as soon as it has started, well
before the victim's leases would have expired, and once the load stops every
command is processed exactly once.

Deliberately broken, this fails: without the shield around the batch in hand
(`GroupReader._handle`) the victim's entries stay pending for the next owner;
without the release in `Balancer._leave` its leases linger until they expire.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import msgspec
import pytest
from redis.exceptions import ResponseError

from app.readmodels.chat_sessions import PROJECTION
from app.registry import SYSTEM
from core.settings import Settings
from projections import db
from streams.bus import FINAL
from streams.connection import Redis
from streams.keys import COMMAND_GROUP, Keys, Shard, projection_group
from streams.lease import STOP_GRACE_S
from streams.positions import parse_entry_id
from tests.pipeline import ADMIN, Pipeline, eventually
from tests.processes import EddyProcess, fleet

pytestmark = pytest.mark.slow

CONTEXT = "chat_sessions"
BURST = 25
"""Commands submitted at once, every `BURST_EVERY_S`, while the test runs."""
BURST_EVERY_S = 0.05
AIM_S = 8.0
"""How long the test looks for an instant when the victim holds a batch."""
EXIT_S = 3.0
"""A stopped process with a healthy Redis and Postgres exits within this long."""


def streams_of(kind: str, keys: Keys) -> list[tuple[Shard, str, str]]:
    """(shard, stream, group) of the chat-session shards a process of `kind` reads."""
    group = COMMAND_GROUP if kind == "worker" else projection_group(PROJECTION.name)
    return [
        (
            shard,
            keys.command_stream(shard) if kind == "worker" else keys.event_stream(shard),
            group,
        )
        for shard in keys.shards_of(CONTEXT)
    ]


async def in_hand(redis: Redis, kind: str, keys: Keys, member: str) -> dict[Shard, list[bytes]]:
    """The entries delivered to `member` and not acknowledged, by shard."""
    held: dict[Shard, list[bytes]] = {}
    for shard, stream, group in streams_of(kind, keys):
        try:
            pending = await redis.xpending_range(
                stream, group, min="-", max="+", count=10_000, consumername=member
            )
        except ResponseError as exc:  # the group is made when its first reader starts
            if "NOGROUP" not in str(exc):
                raise
            continue
        if pending:
            held[shard] = [p["message_id"] for p in pending]
    return held


async def done_with(
    redis: Redis, pool: db.Pool, kind: str, keys: Keys, held: dict[Shard, list[bytes]]
) -> bool:
    """Whether every entry of `held` is applied (worker) or committed (projector)."""
    for shard, ids in held.items():
        if kind == "projector":
            row = await pool.fetchrow(
                "SELECT entry_ms, entry_seq FROM eddy_checkpoints"
                " WHERE projection = $1 AND context = $2 AND shard = $3",
                PROJECTION.name,
                shard.context,
                shard.number,
            )
            committed = (row["entry_ms"], row["entry_seq"]) if row else (0, 0)
            if any(parse_entry_id(i.decode()) > committed for i in ids):
                return False
            continue
        for entry_id in ids:
            ((_, fields),) = await redis.xrange(keys.command_stream(shard), entry_id, entry_id)
            record = msgspec.json.decode(fields[b"c"])
            status = await redis.hget(
                keys.command_status(shard, record["tenant_id"], record["id"]), "status"
            )
            if status is None or status.decode() not in FINAL:
                return False
    return True


async def aim(
    redis: Redis, pool: db.Pool, kind: str, keys: Keys, victim: EddyProcess
) -> dict[Shard, list[bytes]]:
    """Freeze the victim at an instant when it holds entries it has read but not yet
    applied (or committed); return the entries it holds."""
    deadline = time.monotonic() + AIM_S
    while time.monotonic() < deadline:
        if not await in_hand(redis, kind, keys, victim.member):
            continue
        await victim.pause()
        held = await in_hand(redis, kind, keys, victim.member)
        if held and not await done_with(redis, pool, kind, keys, held):
            return held
        victim.resume()
    raise AssertionError(f"the {kind} never held an unfinished batch in {AIM_S} s")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["worker", "projector"])
async def test_sigterm_finishes_the_batch_in_hand_and_releases_at_once(
    settings: Settings, redis: Redis, pool: db.Pool, tmp_path: Path, kind: str
) -> None:
    # Long enough that an expired lease would show: released ones pass within a tick.
    # Nothing is claimed for being idle: only the victim may handle what it holds.
    settings = msgspec.structs.replace(settings, lease_ttl_ms=6000, claim_idle_ms=120_000)
    keys = Keys.of(settings)
    role = "worker" if kind == "worker" else projection_group(PROJECTION.name)
    contexts = [c.name for c in SYSTEM.contexts] if kind == "worker" else PROJECTION.contexts
    leases = [keys.lease(shard, role) for c in contexts for shard in keys.shards_of(c)]
    p = Pipeline(settings, redis)
    submitted: list[str] = []

    async def create(sid: str) -> None:
        payload = {"session_id": sid, "agent_id": "agent", "participants": []}
        await p.submit("CreateChatSession", payload, command_id=f"{sid}:create")

    async def load(stop: anyio.Event) -> None:
        while not stop.is_set():
            async with anyio.create_task_group() as tg:
                for _ in range(BURST):
                    sid = f"term-{len(submitted):05}"
                    submitted.append(sid)
                    tg.start_soon(create, sid)
            await anyio.sleep(BURST_EVERY_S)  # a steady rate, not synchronisation

    async def leases_of(member: str) -> list[str]:
        """Every lease key (of any role, any shard) that `member` holds."""
        held = []
        async for key in redis.scan_iter(match=f"{settings.key_prefix}:*:lease:*", count=1000):
            if await redis.get(key) == member.encode():
                held.append(key.decode())
        return held

    async def owned_by(member: str) -> bool:
        return all([await redis.get(lease) == member.encode() for lease in leases])

    async with fleet(settings, redis, tmp_path) as f:
        if kind == "projector":
            await f.start("worker")
        victim = await f.start(kind)
        await eventually(lambda: owned_by(victim.member), within=10)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(load, stop)
            try:
                held = await aim(redis, pool, kind, keys, victim)
                victim.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                victim.resume()
                with anyio.fail_after(STOP_GRACE_S + 2):
                    code = await victim.process.wait()
                exited_s = time.monotonic() - signalled

                # No other process of its kind runs: what is done now, the victim did.
                assert code == 0, victim.log_tail()
                assert exited_s < EXIT_S, f"exit took {exited_s:.2f} s"
                assert await done_with(redis, pool, kind, keys, held), held
                assert not await in_hand(redis, kind, keys, victim.member)
                # Released, not left to expire (they were renewed < 2 s ago, TTL 6 s).
                assert not await leases_of(victim.member)
                assert victim.member.encode() not in await redis.zrange(keys.members(role), 0, -1)

                # A new process takes every shard on its first tick: they are free.
                other = await f.start(kind)
                ready = time.monotonic()
                await eventually(lambda: owned_by(other.member), within=6)
                took_s = time.monotonic() - ready
                assert took_s < 2, f"takeover took {took_s:.2f} s after the start"
            finally:
                stop.set()

        # Every command processed exactly once; nothing pending in any group.
        async def settled() -> bool:
            statuses = [await p.bus.status(ADMIN.tenant, f"{sid}:create") for sid in submitted]
            if not all(s is not None and s.status in FINAL for s in statuses):
                return False
            for _, stream, group in streams_of(kind, keys):
                if (await redis.xpending(stream, group))["pending"]:
                    return False
            if kind == "projector":
                count = await pool.fetchval("SELECT count(*) FROM chat_sessions")
                return bool(count == len(submitted))
            return True

        await eventually(settled, within=20)
        for sid in submitted:
            status = await p.bus.status(ADMIN.tenant, f"{sid}:create")
            assert status is not None and status.status == "processed", status
            assert status.events is not None and len(status.events) == 1
        for shard in keys.shards_of(CONTEXT):
            events = await redis.xrange(keys.event_stream(shard))
            ids = [msgspec.json.decode(fields[b"e"])["aggregate_id"] for _, fields in events]
            assert len(ids) == len(set(ids)), "a command was applied twice"
        log = victim.log_path.read_text()
        assert "shutdown-requested signal=SIGTERM" in log
        assert " ERROR " not in log, victim.log_tail(40)
        print(
            f"{kind}: held {sum(map(len, held.values()))} entries at SIGTERM; exited in"
            f" {exited_s:.2f} s; a new one owned every shard {took_s:.2f} s after its start;"
            f" {len(submitted)} commands"
        )
