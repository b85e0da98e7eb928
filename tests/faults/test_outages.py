"""Crashes and outages with no operator: under a steady load of HTTP commands,
workers and projectors are SIGKILLed at random moments, Redis (AOF on) is stopped
and started again, and Postgres is stopped for 10 s. Every process reconnects by
itself, `/readyz` says 503 while a dependency is down and 200 once it is back,
and the end state is exact.

Real processes: one `eddy web`, two `eddy worker`, two `eddy projector`, on a
throwaway `redis-server` and a throwaway Postgres (`conftest.py`), which the test
stops and starts on the same port and data directory. The load is 250 chat
sessions (create, 8 participant updates, close: 2,500 commands), posted at a
steady rate by clients that send each session's commands in order and retry a
503 or a broken connection with the same Idempotency-Key.

The end state is computed, not recorded: every command was accepted and is
`processed`, each session's events are exactly the expected ones (versions
1..n, one event per command, no duplicates), every `chat_sessions` row equals
what its events say, the event archive holds every event once, and no group of
any stream has an entry pending or undelivered. The processes that were never
killed are still running: they lived through both outages.
"""

from __future__ import annotations

import random
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

from app.auth import issue_token
from app.registry import SYSTEM
from app.web import READY_TIMEOUT_S
from core.messages import Envelope
from core.settings import Settings
from projections import db
from streams.connection import Redis, connect
from streams.keys import Keys
from tests.faults.conftest import Client, PostgresProcess, RedisProcess
from tests.guarantees.test_g05_crash_recovery import (
    ADDS,
    all_events,
    check_events,
    commands_of,
    expected_row,
    session_id,
    statuses,
)
from tests.pipeline import ADMIN, eventually
from tests.processes import EddyProcess, Fleet, fleet
from tests.sse import Frame, frames
from tests.stack import serving

pytestmark = pytest.mark.slow

SESSIONS = 250
CLIENTS = 25
"""Sessions driven at once, each by one client sending its commands in order."""
LOAD_S = 30.0
"""The commands are spread evenly over about this long."""
POSTGRES_DOWN_S = 10.0
REDIS_DOWN_S = 1.0
READY_ANSWER_S = READY_TIMEOUT_S + 1
"""`/readyz` answers within this long, dependency up or down."""
RECOVERY_S = 15.0
"""After an outage, `/readyz` is 200 again within this long."""
SETTLE_S = 30.0
"""After the load, every command is final and every group drained within this long."""
PROCESS_ERRORS = re.compile(
    r" (ERROR|CRITICAL) (eddy|uvicorn)|Task exception was never retrieved|active transaction"
)
"""Log lines that mean a process met an error it did not handle (a dependency
being down is logged as a warning), or cancelled a batch half-way through a
transaction. Not asyncio's "Future exception was never retrieved", which asyncpg
leaves behind when Postgres terminates a connection in the middle of a query."""


@dataclass
class Chaos:
    settings: Settings
    fleet: Fleet
    web: EddyProcess
    redis_server: RedisProcess
    postgres: PostgresProcess
    client: Client
    total: int
    rng: random.Random
    log: list[str] = field(default_factory=list)
    readyz_down: list[float] = field(default_factory=list)
    """How long each `/readyz` took to answer while a dependency was down."""

    def note(self, what: str) -> None:
        self.log.append(f"{time.monotonic():.2f} {what}")

    async def at_progress(self, fraction: float) -> None:
        """Wait until this fraction of the load is accepted (a random moment of it)."""

        async def reached() -> bool:
            return len(self.client.accepted) >= fraction * self.total

        await eventually(reached, within=LOAD_S + RECOVERY_S + POSTGRES_DOWN_S)

    async def kill(self, kind: str) -> None:
        """SIGKILL a random live process of `kind`, and start another."""
        victim = self.rng.choice(self.fleet.live(kind))
        await victim.kill()
        self.note(f"SIGKILL {kind} {victim.member}")
        await self.fleet.start(kind)

    async def readyz(self) -> tuple[int, float]:
        started = time.monotonic()
        with anyio.fail_after(READY_ANSWER_S + 2):
            response = await self.client.http.get(f"{self.web.url}/readyz")
        return response.status_code, time.monotonic() - started

    async def until_ready(self, want: int, within_s: float) -> float:
        started = time.monotonic()
        while True:
            status, took = await self.readyz()
            if want == 503 and status == 503:
                self.readyz_down.append(took)
            if status == want:
                return time.monotonic() - started
            assert time.monotonic() - started < within_s, f"/readyz not {want} in {within_s} s"
            await anyio.sleep(0.05)

    async def restart_redis(self) -> None:
        """SIGTERM redis-server (it fsyncs its AOF), leave it down a moment, start it again."""
        await anyio.to_thread.run_sync(self.redis_server.stop, signal.SIGTERM)
        self.note("redis stopped")
        await self.until_ready(503, READY_ANSWER_S)
        await anyio.sleep(REDIS_DOWN_S)  # the outage itself
        await anyio.to_thread.run_sync(self.redis_server.start)
        self.note("redis started")
        took = await self.until_ready(200, RECOVERY_S)
        self.note(f"readyz 200 after {took:.2f} s")

    async def stop_postgres(self) -> None:
        """Stop Postgres for `POSTGRES_DOWN_S`; /readyz says 503 all along; kill a worker
        meanwhile (workers need no Postgres)."""
        await anyio.to_thread.run_sync(self.postgres.stop)
        down_at = time.monotonic()
        self.note("postgres stopped")
        await self.until_ready(503, READY_ANSWER_S)
        killed = False
        while time.monotonic() - down_at < POSTGRES_DOWN_S:
            status, took = await self.readyz()
            assert status == 503, "/readyz said ready while Postgres was down"
            self.readyz_down.append(took)
            if not killed and time.monotonic() - down_at > POSTGRES_DOWN_S / 2:
                await self.kill("worker")
                killed = True
            await anyio.sleep(0.5)
        await anyio.to_thread.run_sync(self.postgres.start)
        self.note("postgres started")
        took = await self.until_ready(200, RECOVERY_S)
        self.note(f"readyz 200 after {took:.2f} s")

    async def run(self) -> None:
        """The faults, in order, each at a random moment of the load."""
        await self.at_progress(self.rng.uniform(0.03, 0.08))
        await self.kill("worker")
        await self.at_progress(self.rng.uniform(0.10, 0.15))
        await self.kill("projector")
        await self.at_progress(self.rng.uniform(0.18, 0.22))
        await self.restart_redis()
        await self.at_progress(self.rng.uniform(0.30, 0.35))
        await self.kill("projector")
        await self.at_progress(self.rng.uniform(0.40, 0.45))
        await self.stop_postgres()
        await self.kill("projector")
        await self.at_progress(self.rng.uniform(0.85, 0.9))
        await self.kill("worker")


@dataclass
class Follower:
    """An SSE client of the tenant's chat-session events for the whole run, which
    reconnects with its last id whenever the stream ends or cannot start."""

    url: str
    settings: Settings
    events: list[Envelope] = field(default_factory=list)
    resets: int = 0
    connections: int = 0
    last_id: str | None = None

    async def run(self) -> None:
        token = issue_token(
            self.settings.jwt_secret, tenant=ADMIN.tenant, sub="follower", roles=["user"], ttl_s=600
        )
        params = {"topic": "chat_sessions", "access_token": token}
        timeout = httpx.Timeout(5, read=None)  # a quiet feed only sends keep-alives
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout) as http:
            while True:
                headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
                try:
                    async with http.stream(
                        "GET", "/v1/events/stream", params=params, headers=headers
                    ) as response:
                        if response.status_code == 200:
                            self.connections += 1
                            async for frame in frames(response):
                                self.take(frame)
                except httpx.TransportError:
                    pass  # the server went away mid-stream: reconnect
                await anyio.sleep(0.2)  # a client's pause before reconnecting

    def take(self, frame: Frame) -> None:
        if frame.event == "reset":
            self.resets += 1
        elif frame.event is not None:
            self.events.append(frame.envelope)
        if frame.id:
            self.last_id = frame.id


async def drive(client: Client, total: int) -> None:
    """Post every session's commands, in order per session, at a steady overall rate."""
    started = time.monotonic()
    sent = 0

    async def pace() -> None:
        nonlocal sent
        due = started + sent * LOAD_S / total
        sent += 1
        await anyio.sleep(max(0.0, due - time.monotonic()))  # a rate, not synchronisation

    async def session(n: int) -> None:
        for command_id, type_name, payload in commands_of(session_id(n)):
            await pace()
            assert await client.post(command_id, type_name, payload, retry=True)

    async def lane(k: int) -> None:
        for n in range(k, SESSIONS, CLIENTS):
            await session(n)

    async with anyio.create_task_group() as tg:
        for k in range(CLIENTS):
            tg.start_soon(lane, k)


def patient_client(url: str) -> Redis:
    """The test's own Redis client, which retries through a restart of the server
    (Eddy's processes do not need this: their loops retry with backoff)."""
    return connect(
        url,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 40),
        retry_on_error=[ConnectionError, TimeoutError],
    )


async def groups_drained(redis: Redis, keys: Keys) -> list[str]:
    """Every group of every command and event stream with entries pending or unread."""
    busy = []
    for context in SYSTEM.contexts:
        for shard in keys.shards_of(context.name):
            for stream in (keys.command_stream(shard), keys.event_stream(shard)):
                if not await redis.exists(stream):
                    continue
                for g in await redis.xinfo_groups(stream):
                    if g["pending"] or g.get("lag"):
                        busy.append(f"{stream} {g['name']}: pending {g['pending']} lag {g['lag']}")
    return busy


async def settle(redis: Redis, keys: Keys, order: list[tuple[str, str, dict]]) -> None:
    deadline = time.monotonic() + SETTLE_S
    while True:
        found = await statuses(redis, keys, order)
        final = all(s is not None and s.decode() in ("processed", "failed") for s, _ in found)
        busy = await groups_drained(redis, keys)
        if final and not busy:
            return
        assert time.monotonic() < deadline, f"not settled: final={final} busy={busy[:5]}"
        await anyio.sleep(0.2)


@pytest.mark.timeout(150)
async def test_crashes_and_outages_change_nothing(
    outage_settings: Settings,
    redis_everysec: RedisProcess,
    throwaway_postgres: PostgresProcess,
    tmp_path: Path,
) -> None:
    settings = outage_settings
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    order = [planned for n in range(SESSIONS) for planned in commands_of(session_id(n))]
    redis = patient_client(settings.redis_url)
    keys = Keys.of(settings)
    started = time.monotonic()
    try:
        async with fleet(settings, redis, tmp_path) as f:
            web = await f.start("web")
            for kind in ("worker", "worker", "projector", "projector"):
                await f.start(kind)
            client = Client(web.url, settings, ADMIN.tenant, CLIENTS + 5)
            follower = Follower(web.url, settings)
            chaos = Chaos(
                settings, f, web, redis_everysec, throwaway_postgres, client, len(order), rng
            )
            try:
                async with anyio.create_task_group() as feed:
                    feed.start_soon(follower.run)
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(drive, client, len(order))
                        tg.start_soon(chaos.run)
                    loaded = time.monotonic()
                    await settle(redis, keys, order)
                    settled = time.monotonic()
                    await eventually(lambda: followed(follower), within=SETTLE_S)
                    feed.cancel_scope.cancel()
            except BaseException:
                for proc in f.processes:
                    print(f"--- eddy {proc.kind} {proc.member} killed={proc.killed_at}")
                    print(proc.log_tail(60))
                raise
            finally:
                print("\n".join(chaos.log))
                await client.aclose()
            # No process died of an outage: every one not SIGKILLed is still running
            # (the web process, at least, lived through both).
            assert web.process.returncode is None, web.log_tail()
            for proc in f.processes:
                if proc.killed_at is None:
                    assert proc.process.returncode is None, f"{proc.kind}:\n{proc.log_tail()}"
            for proc in f.processes:
                lines = proc.log_path.read_text(errors="replace").splitlines()
                errors = [n for n, line in enumerate(lines) if PROCESS_ERRORS.search(line)]
                context = lines[errors[0] : errors[0] + 40] if errors else []
                assert not errors, f"{proc.kind} {proc.member}:\n" + "\n".join(context)
        print(
            f"{len(order)} commands: load {loaded - started:.1f} s, settled"
            f" {settled - loaded:.1f} s later; 503s {client.unavailable}, broken"
            f" {client.broken}; /readyz while down: max {max(chaos.readyz_down):.2f} s"
        )
        assert not client.unexpected, client.unexpected[:5]
        assert set(client.accepted) == {command_id for command_id, _, _ in order}
        assert client.unavailable > 0, "no request met an outage: the test proved nothing"
        assert max(chaos.readyz_down) < READY_ANSWER_S
        event_of = await check_end_state(settings, redis, keys, order)
        # The live feed, across the outages and its reconnections: every event once,
        # each session's in version order, never a reset.
        assert follower.resets == 0
        assert sorted(e.id for e in follower.events) == sorted(event_of.values())
        versions: dict[str, list[int]] = {}
        for e in follower.events:
            versions.setdefault(e.aggregate_id, []).append(e.aggregate_version)
        assert all(v == list(range(1, ADDS + 3)) for v in versions.values())
        print(f"SSE follower: {len(follower.events)} events over {follower.connections} streams")
    finally:
        await redis.aclose()


async def followed(follower: Follower) -> bool:
    return len(follower.events) >= SESSIONS * (ADDS + 2)


async def check_end_state(
    settings: Settings, redis: Redis, keys: Keys, order: list[tuple[str, str, dict]]
) -> dict[str, str]:
    """Check everything in Redis and Postgres; return each command's event id."""
    final = await statuses(redis, keys, order)
    assert Counter(s.decode() for s, _ in final) == {"processed": len(order)}
    by_session = await all_events(redis, keys)
    assert sorted(by_session) == [session_id(n) for n in range(SESSIONS)]
    event_of: dict[str, str] = {}
    for sid, found in by_session.items():
        check_events(sid, found, keys)
        event_of |= {env.metadata.command_id: env.id for _, _, env in found}
    for (command_id, _, _), (_, events) in zip(order, final, strict=True):
        assert events.decode() == event_of[command_id], command_id
    pool = await db.create_pool(settings.database_url, settings.db_schema)
    try:
        rows = await pool.fetch(
            "SELECT session_id, status, participants, close_reason, version FROM chat_sessions"
            " WHERE tenant_id = $1 ORDER BY session_id",
            ADMIN.tenant,
        )
        assert [dict(r) for r in rows] == [expected_row(session_id(n)) for n in range(SESSIONS)]
        archived = await pool.fetch(
            "SELECT event_id FROM event_archive WHERE context = 'chat_sessions'"
        )
        ids = [r["event_id"] for r in archived]
        assert sorted(ids) == sorted(event_of.values()), "the archive lost or doubled events"
        assert len(ids) == SESSIONS * (ADDS + 2)
    finally:
        await pool.close()
    return event_of


async def test_readyz_answers_503_in_time_while_redis_hangs(
    outage_settings: Settings, redis_everysec: RedisProcess
) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP) is a timeout, not
    a hang: /readyz says 503 within `READY_TIMEOUT_S`, and 200 once it answers again."""
    async with serving(outage_settings, worker=False, projector=False) as s:
        assert (await s.client.get("/readyz")).status_code == 200
        assert redis_everysec.process is not None
        redis_everysec.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            response = await s.client.get("/readyz")
            took = time.monotonic() - started
        finally:
            redis_everysec.process.send_signal(signal.SIGCONT)
        assert response.status_code == 503
        assert response.json() == {
            "status": "unavailable",
            "redis": "down: timeout",
            "postgres": "ok",
        }
        assert took < READY_ANSWER_S, f"/readyz took {took:.2f} s"

        async def ready() -> bool:
            return (await s.client.get("/readyz")).status_code == 200

        await eventually(ready, within=RECOVERY_S)
