"""Guarantee 5: a worker or projector killed at any instant loses nothing and
duplicates nothing — a live process takes over its shards (lease) and claims its
pending entries (XAUTOCLAIM), and the end state equals a run without the crash.

Two real `eddy worker` and two real `eddy projector` processes run while the test
submits 3000 commands (300 sessions of create, 8 adds, close; randomly interleaved,
each session's in order, so a reordered or repeated command fails visibly). One
killer per kind SIGKILLs a random process of its kind three times, each aimed at
an instant (`AIMS`): after it committed a batch but before the XACK (a
projector; a worker's apply step acknowledges atomically, so no such instant
exists and the aim falls back to a kill after `AIM_S`), after it read a batch but
before applying it, and anywhere. Aiming freezes the
victim (SIGSTOP) whenever it holds unacked entries, looks, and kills it frozen if
the instant fits — otherwise the dangerous windows are too short to hit by chance.
The killer then measures how long live processes take to own the victim's shards
and claim its entries, and starts a replacement.

The end state is computed, not recorded from a clean run: every command
`processed`, each session's events exactly the expected ones (versions 1..n, each
command's one event, no duplicates), and every read-model row and checkpoint exact.
Not shown here: that a projector skips an event it committed before dying —
chat-session rows are version-guarded, so a second application would not show;
guarantee 7's test shows it with a probe projection.

Deliberately broken, this test fails: without the dedup check in `apply.lua` the
commands applied before a kill fail on redelivery (`already_participant`, ...);
without XAUTOCLAIM the victim's entries are never claimed.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from app.readmodels.chat_sessions import PROJECTION
from app.registry import SYSTEM
from core.messages import Envelope, envelope_decoder, record_decoder
from core.settings import Settings
from projections import db
from streams.bus import FINAL
from streams.connection import Redis
from streams.keys import COMMAND_GROUP, Keys, Shard, projection_group
from streams.positions import format_entry_id, parse_entry_id
from tests.pipeline import ADMIN, Pipeline
from tests.processes import EddyProcess, Fleet, fleet

pytestmark = pytest.mark.slow

CONTEXT = "chat_sessions"
SESSIONS = 300
ADDS = 8
AIMS = ("applied", "read", "anywhere")
"""One kill per aim and kind: after applying (committing) a batch but before its XACK,
after reading a batch but before applying it, and at a random instant."""
AIM_S = 2.0
"""How long a killer waits for an instant matching its aim before killing anyway."""
SHARDS = 4
SUBMIT_S = 12.0
"""Submissions are spread over about this long, so the kills land while they flow."""
BURSTS = 40
"""Each burst is submitted concurrently (one command per session at a time), so the
processes read real batches, not one entry at a time."""
SETTLE_S = 30.0
"""Deadline for every command to be final and every projection to catch up."""

Payload = dict[str, Any]
Planned = tuple[str, str, Payload]
"""A command to submit: its id, its type and its payload."""


# -- the workload and its expected outcome ----------------------------------


def session_id(n: int) -> str:
    return f"crash-{n:03}"


def owner() -> Payload:
    return {"participant_id": "owner", "role": "agent"}


def added(j: int) -> Payload:
    return {"participant_id": f"p{j}", "role": "user"}


def commands_of(sid: str) -> list[Planned]:
    """(command id, type, payload) of one session, in the order they must apply."""
    return [
        (
            f"{sid}:create",
            "CreateChatSession",
            {"session_id": sid, "agent_id": "agent", "participants": [owner()]},
        ),
        *(
            (
                f"{sid}:add:{j}",
                "UpdateChatSessionParticipants",
                {"session_id": sid, "add": [added(j)]},
            )
            for j in range(ADDS)
        ),
        (f"{sid}:close", "CloseChatSession", {"session_id": sid, "reason": f"done {sid}"}),
    ]


def interleave(rng: random.Random) -> list[Planned]:
    """Every session's commands, randomly interleaved, each session's kept in order."""
    queues = [commands_of(session_id(n)) for n in range(SESSIONS)]
    heads = [0] * SESSIONS
    active = list(range(SESSIONS))
    order = []
    while active:
        i = rng.randrange(len(active))
        n = active[i]
        order.append(queues[n][heads[n]])
        heads[n] += 1
        if heads[n] == len(queues[n]):
            active[i] = active[-1]
            active.pop()
    return order


def waves(burst: list[Planned]) -> list[list[Planned]]:
    """Split a burst into runs with at most one command per session, keeping order."""
    runs: list[list[Planned]] = [[]]
    seen: set[str] = set()
    for planned in burst:
        sid = planned[2]["session_id"]
        if sid in seen:
            runs.append([])
            seen.clear()
        runs[-1].append(planned)
        seen.add(sid)
    return runs


def expected_events(sid: str) -> list[tuple[str, str, Payload]]:
    """(type, command id, the payload fields that matter) of a session's events, in order."""
    participants = [owner()]
    events: list[tuple[str, str, Payload]] = [
        ("ChatSessionCreated", f"{sid}:create", {"participants": list(participants)})
    ]
    for j in range(ADDS):
        participants.append(added(j))
        events.append(
            (
                "ChatSessionParticipantsUpdated",
                f"{sid}:add:{j}",
                {"added": [added(j)], "participants": list(participants)},
            )
        )
    events.append(("ChatSessionClosed", f"{sid}:close", {"reason": f"done {sid}"}))
    return events


def expected_row(sid: str) -> Payload:
    return {
        "session_id": sid,
        "status": "closed",
        "participants": [owner(), *(added(j) for j in range(ADDS))],
        "close_reason": f"done {sid}",
        "version": ADDS + 2,
    }


# -- killing and watching ---------------------------------------------------


@dataclass
class Kill:
    kind: str
    aim: str
    member: str
    shards: list[int]
    """The shards whose lease it held."""
    unacked: int
    """Entries it had read but not acknowledged when it died."""
    done_unacked: int
    """Of those, how many it had already applied (worker) or committed (projector)."""
    at: float
    """`time.monotonic()` of the SIGKILL."""
    takeover_s: float = 0.0
    recovered_s: float = 0.0


@dataclass
class Role:
    kind: str
    group: str
    lease_role: str
    keys: Keys

    def stream(self, shard: Shard) -> str:
        if self.kind == "worker":
            return self.keys.command_stream(shard)
        return self.keys.event_stream(shard)


@dataclass
class Chaos:
    settings: Settings
    redis: Redis
    pool: db.Pool
    fleet: Fleet
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys.of(self.settings)

    def role(self, kind: str) -> Role:
        if kind == "worker":
            return Role(kind, COMMAND_GROUP, "worker", self.keys)
        group = projection_group(PROJECTION.name)
        return Role(kind, group, group, self.keys)

    @property
    def shards(self) -> list[Shard]:
        return self.keys.shards_of(CONTEXT)

    async def owners(self, role: Role) -> list[str | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in self.shards:
                pipe.get(self.keys.lease(shard, role.lease_role))
            raw = await pipe.execute()
        return [None if o is None else o.decode() for o in raw]

    async def pending_of(self, role: Role, member: str) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in self.shards:
                pipe.xpending(role.stream(shard), role.group)
            summaries = await pipe.execute()
        return sum(
            c["pending"]
            for s in summaries
            for c in s["consumers"]
            if (c["name"].decode() if isinstance(c["name"], bytes) else c["name"]) == member
        )

    async def balanced(self, kind: str) -> bool:
        """Every shard is leased by a live process, and every live process holds one."""
        live = {p.member for p in self.fleet.live(kind)}
        owners = await self.owners(self.role(kind))
        return all(o in live for o in owners) and live <= set(owners)

    async def until(
        self, what: str, check: Callable[[], Awaitable[bool]], within_s: float
    ) -> float:
        """Poll `check()` until true; return how long it took, fail after `within_s`."""
        started = time.monotonic()
        while not await check():
            if time.monotonic() - started > within_s:
                raise AssertionError(f"{what}: not within {within_s:.1f} s")
            await anyio.sleep(0.02)
        return time.monotonic() - started

    async def killer(self, kind: str) -> None:
        """Kill a process of `kind` once per aim (in random order), replacing each."""
        role = self.role(kind)
        ttl_s = self.settings.lease_ttl_ms / 1000
        takeover_limit_s = 2 * ttl_s + 1.5
        recovery_limit_s = takeover_limit_s + self.settings.claim_idle_ms / 1000 + 1.5
        for aim in self.rng.sample(AIMS, len(AIMS)):
            await self.until(f"{kind}s balanced", lambda: self.balanced(kind), 10)
            await anyio.sleep(self.rng.uniform(0.2, 1.0))
            victim = self.rng.choice(self.fleet.live(kind))
            kill = await self.aim_and_kill(role, victim, aim)
            self.kills.append(kill)
            held = [s for s in self.shards if s.number in kill.shards]

            async def taken_over(held: list[Shard] = held) -> bool:
                live = {p.member for p in self.fleet.live(kind)}
                owners = await self.owners(role)
                return all(owners[s.number] in live for s in held)

            async def claimed(victim: EddyProcess = victim) -> bool:
                return not await self.pending_of(role, victim.member)

            await self.until(
                f"{kind} shards {kill.shards} taken over", taken_over, takeover_limit_s
            )
            kill.takeover_s = time.monotonic() - kill.at
            await self.until(f"{kind} pending entries claimed", claimed, recovery_limit_s)
            kill.recovered_s = time.monotonic() - kill.at
            await self.fleet.start(kind)

    async def aim_and_kill(self, role: Role, victim: EddyProcess, aim: str) -> Kill:
        """SIGKILL `victim` at an instant matching `aim` if one comes within `AIM_S`.

        `anywhere` kills at once. Otherwise: whenever the victim holds unacked entries,
        freeze it (SIGSTOP) and look; kill it frozen if the instant fits, else let it go on.
        """
        deadline = time.monotonic() + AIM_S
        while aim != "anywhere" and time.monotonic() < deadline:
            if not await self.pending_of(role, victim.member):
                continue
            await victim.pause()
            unacked, done = await self.unacked(role, victim)
            if done if aim == "applied" else unacked > done:
                break
            victim.resume()
        at = await victim.kill()
        owners = await self.owners(role)
        unacked, done = await self.unacked(role, victim)
        shards = [n for n, o in enumerate(owners) if o == victim.member]
        return Kill(role.kind, aim, victim.member, shards, unacked, done, at)

    async def unacked(self, role: Role, victim: EddyProcess) -> tuple[int, int]:
        """How many entries the victim has read but not acked, and how many of those it
        has already applied (worker: the command's status is final) or committed
        (projector: at or below the checkpoint)."""
        unacked = done = 0
        for shard in self.shards:
            stream = role.stream(shard)
            pending = await self.redis.xpending_range(
                stream, role.group, min="-", max="+", count=10_000, consumername=victim.member
            )
            unacked += len(pending)
            if not pending:
                continue
            ids = [p["message_id"] for p in pending]
            if role.kind == "projector":
                # Not `db.checkpoint`: its FOR UPDATE would wait for a frozen victim's lock.
                row = await self.pool.fetchrow(
                    "SELECT entry_ms, entry_seq FROM eddy_checkpoints"
                    " WHERE projection = $1 AND context = $2 AND shard = $3",
                    PROJECTION.name,
                    shard.context,
                    shard.number,
                )
                committed = (row["entry_ms"], row["entry_seq"]) if row else (0, 0)
                done += sum(parse_entry_id(i.decode()) <= committed for i in ids)
                continue
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.xrange(stream, min=i, max=i)
                entries = await pipe.execute()
            records = [record_decoder.decode(e[0][1][b"c"]) for e in entries]
            async with self.redis.pipeline(transaction=False) as pipe:
                for r in records:
                    pipe.hget(self.keys.command_status(shard, r.tenant_id, r.id), "status")
                found = await pipe.execute()
            done += sum(s is not None and s.decode() in FINAL for s in found)
        return unacked, done


# -- the end state ----------------------------------------------------------


async def statuses(redis: Redis, keys: Keys, order: list[Planned]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for command_id, _, payload in order:
            shard = keys.shard_of(CONTEXT, ADMIN.tenant, payload["session_id"])
            pipe.hmget(keys.command_status(shard, ADMIN.tenant, command_id), ["status", "events"])
        return list(await pipe.execute())


async def all_events(redis: Redis, keys: Keys) -> dict[str, list[tuple[Shard, str, Envelope]]]:
    by_session: dict[str, list[tuple[Shard, str, Envelope]]] = {}
    for shard in keys.shards_of(CONTEXT):
        for entry_id, fields in await redis.xrange(keys.event_stream(shard)):
            env = envelope_decoder.decode(fields[b"e"])
            by_session.setdefault(env.aggregate_id, []).append((shard, entry_id.decode(), env))
    return by_session


async def projected(redis: Redis, pool: db.Pool, keys: Keys) -> bool:
    """Every shard's checkpoint is at its stream's last entry and nothing is pending."""
    group = projection_group(PROJECTION.name)
    for shard in keys.shards_of(CONTEXT):
        stream = keys.event_stream(shard)
        last = await redis.xrevrange(stream, count=1)
        async with pool.acquire() as conn:
            committed = await db.checkpoint(conn, PROJECTION.name, shard)
        if last and committed != parse_entry_id(last[0][0].decode()):
            return False
        if (await redis.xpending(stream, group))["pending"]:
            return False
    return True


def check_events(sid: str, found: list[tuple[Shard, str, Envelope]], keys: Keys) -> None:
    want = expected_events(sid)
    got = [(env.type, env.metadata.command_id) for _, _, env in found]
    assert got == [(t, c) for t, c, _ in want], f"{sid}: events {got}"
    assert [env.aggregate_version for _, _, env in found] == list(range(1, len(want) + 1))
    for (shard, _, env), (_, _, fields) in zip(found, want, strict=True):
        assert shard == keys.shard_of(CONTEXT, ADMIN.tenant, sid)
        payload = msgspec.to_builtins(SYSTEM.catalog.events[env.type].decoder.decode(env.payload))
        assert {k: payload[k] for k in fields} == fields, f"{sid} v{env.aggregate_version}"


# -- the test ---------------------------------------------------------------


async def submit_all(p: Pipeline, order: list[Planned]) -> None:
    """Submit `order` in bursts spread over `SUBMIT_S`, each session's in order."""
    size = -(-len(order) // BURSTS)
    for b in range(0, len(order), size):
        burst_started = time.monotonic()
        for wave in waves(order[b : b + size]):
            async with anyio.create_task_group() as tg:
                for command_id, type_name, payload in wave:
                    tg.start_soon(submit_one, p, command_id, type_name, payload)
        await anyio.sleep(max(0.0, SUBMIT_S / BURSTS - (time.monotonic() - burst_started)))


async def submit_one(p: Pipeline, command_id: str, type_name: str, payload: Payload) -> None:
    accepted = await p.submit(type_name, payload, command_id=command_id)
    assert accepted.new, command_id


async def run_chaos(chaos: Chaos, p: Pipeline, order: list[Planned]) -> None:
    """Submit everything while killing; return once every effect has settled."""
    for kind in ("worker", "worker", "projector", "projector"):
        await chaos.fleet.start(kind)
    async with anyio.create_task_group() as tg:
        tg.start_soon(submit_all, p, order)
        tg.start_soon(chaos.killer, "worker")
        tg.start_soon(chaos.killer, "projector")

    async def all_final() -> bool:
        found = await statuses(p.redis, p.keys, order)
        return all(s is not None and s.decode() in FINAL for s, _ in found)

    async def caught_up() -> bool:
        return await projected(p.redis, chaos.pool, p.keys)

    await chaos.until("every command final", all_final, SETTLE_S)
    await chaos.until("projections caught up", caught_up, SETTLE_S)


async def check_end_state(p: Pipeline, pool: db.Pool, order: list[Planned]) -> None:
    redis, keys = p.redis, p.keys
    # Every command processed exactly once: its status, and exactly one event naming it.
    final = await statuses(redis, keys, order)
    outcomes = Counter(s.decode() for s, _ in final)
    failed = [
        await p.bus.status(ADMIN.tenant, command_id)
        for (command_id, _, _), (s, _) in zip(order, final, strict=True)
        if s != b"processed"
    ]
    assert outcomes == {"processed": len(order)}, "\n".join([str(outcomes), *map(str, failed[:10])])
    by_session = await all_events(redis, keys)
    assert sorted(by_session) == [session_id(n) for n in range(SESSIONS)]
    event_of: dict[str, str] = {}
    for sid, found in by_session.items():
        check_events(sid, found, keys)
        event_of |= {env.metadata.command_id: env.id for _, _, env in found}
    for (command_id, _, _), (_, events) in zip(order, final, strict=True):
        assert events.decode() == event_of[command_id], command_id
    for n in range(SESSIONS):
        sid = session_id(n)
        shard = keys.shard_of(CONTEXT, ADMIN.tenant, sid)
        version = await redis.hget(keys.aggregate(shard, ADMIN.tenant, sid), "version")
        assert int(version) == ADDS + 2, sid
    for shard in keys.shards_of(CONTEXT):
        assert (await redis.xpending(keys.command_stream(shard), COMMAND_GROUP))["pending"] == 0

    # Every read-model row exact; every checkpoint at its stream's last entry.
    rows = await pool.fetch(
        "SELECT session_id, status, participants, close_reason, version FROM chat_sessions"
        " WHERE tenant_id = $1 ORDER BY session_id",
        ADMIN.tenant,
    )
    assert [dict(r) for r in rows] == [expected_row(session_id(n)) for n in range(SESSIONS)]
    for shard in keys.shards_of(CONTEXT):
        last = max(
            (entry for found in by_session.values() for s, entry, _ in found if s == shard),
            key=parse_entry_id,
        )
        async with pool.acquire() as conn:
            assert format_entry_id(await db.checkpoint(conn, PROJECTION.name, shard)) == last


def print_kills(kills: list[Kill]) -> None:
    print(
        f"{'kind':<10} {'aim':<9} {'shards':<8} {'unacked':>8} {'done':>5}"
        f" {'takeover':>9} {'claimed':>8}"
    )
    for k in kills:
        print(
            f"{k.kind:<10} {k.aim:<9} {k.shards!s:<8} {k.unacked:>8} {k.done_unacked:>5}"
            f" {k.takeover_s:>8.2f}s {k.recovered_s:>7.2f}s"
        )


@pytest.mark.timeout(120)
async def test_killed_workers_and_projectors_change_nothing(
    settings: Settings, redis: Redis, pool: db.Pool, tmp_path: Path
) -> None:
    settings = msgspec.structs.replace(settings, shards=SHARDS)
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    order = interleave(rng)
    p = Pipeline(settings, redis)
    started = time.monotonic()

    async with fleet(settings, redis, tmp_path) as processes:
        chaos = Chaos(settings, redis, pool, processes, rng)
        try:
            await run_chaos(chaos, p, order)
        except BaseException:
            for proc in processes.processes:
                print(f"--- eddy {proc.kind} {proc.member} killed={proc.killed_at is not None}")
                print(proc.log_tail())
            raise
        finally:
            print_kills(chaos.kills)
    print(f"{len(order)} commands settled {time.monotonic() - started:.1f} s after the start")

    await check_end_state(p, pool, order)

    # Every victim held shards, and live processes took them over within the lease bound.
    assert len(chaos.kills) == 2 * len(AIMS)
    assert all(k.shards for k in chaos.kills)
    assert max(k.takeover_s for k in chaos.kills) <= 2 * settings.lease_ttl_ms / 1000 + 1.5
