"""The end-to-end benchmark: real `eddy` processes against plain redis-py (and asyncpg)
baselines, measured in the same run on the same machine, every Eddy figure as a ratio.

    .venv/bin/python -m bench.run [--duration 10] [--rate 200] [--latency-duration 10]

Phases, in order; a phase's servers are stopped (and their exit awaited) before
the next phase starts. Eddy and its baselines go through the same steps:

1. HTTP alone: closed-loop POSTs for `--duration` s. Baseline (a) is
   `bench.baseline_app` (Starlette, one XADD per request) under uvicorn.
2. Drain that backlog; the consumers start only now. Baseline (b) is
   `bench.relay` (XREADGROUP → decode → XADD → XACK, pipelined, COUNT 100);
   Eddy runs `eddy worker` until every event is in the event streams, then
   `eddy projector` until every row is in `chat_sessions`. Between the two,
   baseline (c), `bench.pg_baseline` (XREADGROUP COUNT 200 → one transaction of
   batched upserts + a checkpoint → XACK, asyncpg), drains a copy of those event
   streams into a table shaped like `chat_sessions`.
3. Live: closed-loop POSTs again with everything running, timed from the first
   POST until the last stage (relay output; `chat_sessions` rows) has them all.
4. Latency: one POST per command at `--rate`/s for `--latency-duration` s, until
   an SSE client on topic `chat_sessions` has its event (by
   `metadata.command_id`); the baseline is XADD → relay → XREAD at the same rate.
5. Chat streaming: one message pushed chunk by chunk (`PushStreamMessage` frames
   on a WebSocket) at `--rate` chunks/s for `--latency-duration` s, timed from
   each frame's send until a WebSocket subscriber and an SSE subscriber of the
   stream's topic have its event (`bench/chat.py`); same baseline as 4.

Eddy's processes are configured only by environment variables (`PORT`,
`REDIS_URL`, `DATABASE_URL`, `EDDY_KEY_PREFIX`, `EDDY_DB_SCHEMA`,
`EDDY_JWT_SECRET`). Every run uses a fresh key prefix and schema and removes
them at the end. Drains and catch-ups are timed by polling (Redis every 20 ms,
Postgres every 50 ms), from the last sample before progress to the first sample
that shows all of it, the same way for Eddy and the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec
import redis.asyncio as aioredis
import uvloop

from app.auth import issue_token
from bench import chat, load, pg_baseline
from bench.procs import CpuMeter, Proc, free_port, running, wait_http
from bench.report import Figure, cpu_table, table
from core.messages import CommandRecord
from core.settings import Settings
from streams.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DRAIN_TIMEOUT_S = 120.0
REDIS_POLL_S = 0.02
POSTGRES_POLL_S = 0.05
GRACE_S = 5.0
"""How long to wait for the last events of a latency run."""
LATENCY_CONNECTIONS = 32
TENANT = "bench"
OTHER_LOAD_WARNING = 0.25
"""Cores used by processes outside the run above which a phase's figures are suspect."""

T = TypeVar("T")
Counter = tuple[float, Callable[[], Awaitable[int]]]
"""How often to poll (s), and what: a stage's count of finished commands."""


@dataclass(frozen=True)
class Options:
    duration_s: float
    rate: float
    latency_s: float
    connections: int
    client: str
    redis_url: str
    database_url: str
    output: Path


@dataclass
class Progress:
    """Samples `(time, count, CPU seconds of the stage's process)` of a count polled
    until it reached `target`."""

    target: int
    samples: list[tuple[float, int, float]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.samples) and self.samples[-1][1] >= self.target

    @property
    def done_at(self) -> float:
        return self.samples[-1][0] if self.done else math.nan

    def _start(self) -> tuple[float, int, float] | None:
        """The last sample before progress, if the count got to its target."""
        if not self.done or self.target <= self.samples[0][1]:
            return None
        return [s for s in self.samples if s[1] == self.samples[0][1]][-1]

    def drain_rate(self) -> float:
        """Items per second from the last sample before progress to the first at target."""
        start = self._start()
        return math.nan if start is None else (self.target - start[1]) / (self.done_at - start[0])

    def cpu_us_per_item(self) -> float:
        """CPU µs the stage's process spent per item over the same span (so its start-up
        before the first item is not counted)."""
        start = self._start()
        if start is None:
            return math.nan
        return (self.samples[-1][2] - start[2]) / (self.target - start[1]) * 1e6

    def summary(self) -> dict[str, object]:
        last = self.samples[-1][1] if self.samples else 0
        return {"target": self.target, "reached": last, "done": self.done}


async def watch(
    count: Callable[[], Awaitable[int]],
    target: int,
    interval_s: float,
    procs: Sequence[Proc] = (),
    timeout_s: float = DRAIN_TIMEOUT_S,
) -> Progress:
    """Poll `count()` every `interval_s` until it reaches `target` (or the timeout),
    while every process of `procs` stays up; the last one's CPU time is sampled too."""
    progress = Progress(target)
    deadline = time.perf_counter() + timeout_s
    while True:
        n = await count()
        cpu = procs[-1].cpu_s() if procs else math.nan
        progress.samples.append((time.perf_counter(), n, cpu))
        if n >= target or time.perf_counter() > deadline:
            return progress
        for p in procs:
            p.check()
        await asyncio.sleep(interval_s)


async def ended(task: asyncio.Task[None], timeout_s: float = 5.0) -> None:
    """Wait until `task` (told to stop, or cancelled) has ended; raise its error.

    Bounded, and without `suppress(CancelledError)`, which would also swallow a
    cancellation of the waiting task itself."""
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        raise RuntimeError(f"task {task.get_name()} did not stop")
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error


def awaiting(task: asyncio.Task[Any]) -> list[str]:
    """Where a task is: the chain of coroutines it awaits, outermost first."""
    places: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            places.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return places


@contextlib.asynccontextmanager
async def watchdog(name: str, budget_s: float) -> AsyncIterator[None]:
    """Fail a phase that takes longer than `budget_s`, printing where every task was
    (a hang shows where it hangs instead of running forever)."""
    current = asyncio.current_task()
    assert current is not None

    async def bite() -> None:
        await asyncio.sleep(budget_s)
        print(f"{name} still running after {budget_s:.0f} s; tasks:", file=sys.stderr)
        for task in asyncio.all_tasks():
            print(f"  {task.get_name()}:", *awaiting(task), sep="\n    ", file=sys.stderr)
        current.cancel()

    dog = asyncio.create_task(bite())
    try:
        yield
    except asyncio.CancelledError:
        if dog.done():
            current.uncancel()
            raise TimeoutError(f"{name} took over {budget_s:.0f} s") from None
        raise
    finally:
        dog.cancel()
        await asyncio.wait({dog})


def record(command_id: str) -> bytes:
    """A command record like the one `eddy web` appends for a `CreateChatSession`."""
    return msgspec.json.encode(
        CommandRecord(
            id=command_id,
            type="CreateChatSession",
            tenant_id=TENANT,
            actor="bench",
            roles=["admin"],
            correlation_id=command_id,
            aggregate_id=str(uuid.uuid4()),
            accepted_at=datetime.now(UTC),
            payload=msgspec.Raw(load.BODY),
        )
    )


class Bench:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        tag = uuid.uuid4().hex[:8]
        self.tag = tag
        self.prefix = f"bench-{tag}"
        self.schema = f"bench_{tag}"
        self.secret = secrets.token_urlsafe(36)
        self.logs = RESULTS / "logs"
        self.env = {
            **os.environ,
            "REDIS_URL": opts.redis_url,
            "DATABASE_URL": opts.database_url,
            "EDDY_KEY_PREFIX": self.prefix,
            "EDDY_DB_SCHEMA": self.schema,
            "EDDY_JWT_SECRET": self.secret,
            "EDDY_LOG_LEVEL": "warning",
            # Capacity, not policy: the rate limits (5,000 commands/s per tenant by
            # default) would cap the one-tenant bursts.
            "EDDY_TENANT_COMMANDS_PER_S": "0",
            "EDDY_TENANT_QUERIES_PER_S": "0",
            "EDDY_CONNECTION_REQUESTS_PER_S": "0",
        }
        self.settings = Settings.from_env(self.env)
        self.keys = Keys(self.prefix, self.settings.shards)
        self.token = issue_token(
            self.secret, tenant=TENANT, sub="bench", roles=["admin"], ttl_s=3600
        )
        self.redis = aioredis.Redis.from_url(opts.redis_url, socket_timeout=10.0)
        self.phases: dict[str, dict[str, Any]] = {}
        self.cpu: dict[str, dict[str, float]] = {}
        self.walls: dict[str, float] = {}
        self.began = time.perf_counter()

    def say(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.began:6.1f}s] {message}", file=sys.stderr, flush=True)

    def python(self, name: str, args: Sequence[str], **env: str) -> Proc:
        return Proc(name, [sys.executable, *args], {**self.env, **env}, self.logs / f"{name}.log")

    def eddy_process(self, command: str, **env: str) -> Proc:
        script = Path(sys.executable).with_name("eddy")
        return Proc(command, [str(script), command], {**self.env, **env}, self.logs / "eddy.log")

    async def measure(self, phase: str, procs: Sequence[Proc], work: Awaitable[T]) -> T:
        """Await `work`, recording the cores each process used meanwhile."""
        meter = CpuMeter(self.redis, procs)
        await meter.start()
        result = await work
        self.walls[phase], self.cpu[phase] = await meter.stop()
        return result

    def cpu_us(self, phase: str, proc: str, ops: int) -> float:
        """CPU µs that `proc` spent per operation during `phase`."""
        cores = self.cpu[phase].get(proc, math.nan)
        return cores * self.walls[phase] / ops * 1e6 if ops else math.nan

    # -- the load ------------------------------------------------------------------------

    async def hammer(self, phase: str, port: int, procs: Sequence[Proc]) -> load.Burst:
        """Closed-loop POSTs for `--duration` s from `--connections` clients."""
        async with load.poster(
            self.opts.client, "127.0.0.1", port, self.token, self.opts.connections
        ) as post:
            work = load.closed_loop(
                post, f"{self.tag}-{phase}", self.opts.duration_s, self.opts.connections
            )
            burst = await self.measure(phase, procs, work)
        self.say(f"{phase}: {burst.rate:,.0f} accepted/s, errors {burst.errors or 'none'}")
        if not burst.ok:
            raise RuntimeError(f"{phase}: nothing was accepted; see {self.logs}")
        server_us = self.cpu_us(phase, procs[0].name, burst.ok)
        self.phases[phase] = {**burst.summary(), "server_cpu_us_per_op": server_us}
        return burst

    async def drain(self, phase: str, procs: Sequence[Proc], count: Counter, backlog: int) -> float:
        """Wait until `count` reaches `backlog`; the rate at which it got there."""
        interval, counter = count
        progress = await self.measure(phase, procs, watch(counter, backlog, interval, procs))
        rate = progress.drain_rate()
        cpu_us = progress.cpu_us_per_item()
        self.phases[phase] = {**progress.summary(), "rate_per_s": rate, "cpu_us_per_op": cpu_us}
        if progress.done:
            self.say(f"{phase}: {backlog:,} in {backlog / rate:.2f} s = {rate:,.0f}/s")
        else:
            self.say(f"{phase}: only {progress.summary()['reached']:,} of {backlog:,} in time")
        return rate

    async def live(
        self, phase: str, port: int, procs: Sequence[Proc], stages: dict[str, Counter]
    ) -> None:
        """Closed-loop POSTs with every stage running, then time until each stage
        (`stages`: name → counter, in pipeline order) has seen every command."""
        before = {name: await count() for name, (_, count) in stages.items()}
        burst = await self.hammer(phase, port, procs)
        at_end = {name: await count() for name, (_, count) in stages.items()}
        watches = [
            watch(count, before[name] + burst.ok, interval, procs)
            for name, (interval, count) in stages.items()
        ]
        done = await self.measure(f"{phase}-catch-up", procs, asyncio.gather(*watches))
        last = done[-1]
        through = burst.ok / (last.done_at - burst.started)
        catch_up = f"{phase}-catch-up"
        self.phases[phase] |= {
            "cpu_us_per_command": {
                name: self.cpu_us(phase, name, burst.ok) + self.cpu_us(catch_up, name, burst.ok)
                for name in [p.name for p in procs] + ["redis", "postgres"]
            },
            "behind_when_load_stopped": {
                name: before[name] + burst.ok - at_end[name] for name in stages
            },
            "all_done_after_s": {
                name: round(p.done_at - burst.started, 3)
                for name, p in zip(stages, done, strict=True)
            },
            "through_per_s": through,
        }
        self.say(
            f"{phase}: all {burst.ok:,} through {list(stages)[-1]} after"
            f" {last.done_at - burst.started:.2f} s = {through:,.0f}/s"
        )

    async def paced(
        self,
        phase: str,
        procs: Sequence[Proc],
        submit: Callable[[str], Awaitable[object]],
        received: dict[str, float],
    ) -> None:
        """`submit(key)` at `--rate`/s; latencies from the send to the reply and to `received`."""
        sent: dict[str, float] = {}
        replies: list[float] = []

        async def send(n: int) -> None:
            key = f"{self.tag}-{phase}-{n}"
            began = sent[key] = time.perf_counter()
            await submit(key)
            replies.append(time.perf_counter() - began)

        work = load.at_rate(self.opts.rate, self.opts.latency_s, send)
        calls, late_s = await self.measure(phase, procs, work)
        for _ in range(round(GRACE_S / 0.01)):  # the last events may still be on their way
            if len(received.keys() & sent.keys()) == len(sent):
                break
            await asyncio.sleep(0.01)
        latencies = [received[k] - began for k, began in sent.items() if k in received]
        self.phases[phase] = result = {
            "sent": calls,
            "received": len(latencies),
            "sender_worst_lateness_ms": late_s * 1000,
            "reply_p50_ms": load.percentile(replies, 0.5) * 1000,
            "reply_p99_ms": load.percentile(replies, 0.99) * 1000,
            "p50_ms": load.percentile(latencies, 0.5) * 1000,
            "p99_ms": load.percentile(latencies, 0.99) * 1000,
            "max_ms": max(latencies, default=math.nan) * 1000,
        }
        self.say(
            f"{phase}: {len(latencies)}/{calls} delivered,"
            f" p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
        )

    # -- baselines -------------------------------------------------------------------------

    async def baselines(self) -> None:
        """Baseline (a) alone, then with baseline (b) draining its backlog, then both live."""
        port = free_port()
        source, dest = f"{self.prefix}:baseline:in", f"{self.prefix}:baseline:out"
        server = self.python(
            "baseline-web",
            ["-m", "uvicorn", "bench.baseline_app:app", "--host", "127.0.0.1",
             "--port", str(port), "--loop", "uvloop", "--http", "httptools",
             "--no-access-log", "--log-level", "warning"],
            BENCH_STREAM=source,
        )  # fmt: skip
        relay = self.python("relay", ["-m", "bench.relay", "--source", source, "--dest", dest])
        relayed: Counter = (REDIS_POLL_S, lambda: self.redis.xlen(dest))
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(running(server))
            await wait_http(f"http://127.0.0.1:{port}/healthz", [server])
            alone = await self.hammer("baseline-http-alone", port, [server])
            await stack.enter_async_context(running(relay))
            await self.drain("baseline-drain", [server, relay], relayed, alone.ok)
            await self.live("baseline-http-live", port, [server, relay], {"relay": relayed})
        await self.redis.unlink(source, dest)

    async def baseline_two_hops(self) -> None:
        """XADD → relay → XREAD at `--rate`/s, timed like POST → SSE."""
        source, dest = f"{self.prefix}:hops:in", f"{self.prefix}:hops:out"
        relay = self.python("relay", ["-m", "bench.relay", "--source", source, "--dest", dest])
        received: dict[str, float] = {}

        stop = asyncio.Event()

        async def read() -> None:
            last: bytes | str = "0-0"
            while not stop.is_set():
                reply: Any = await self.redis.xread({dest: last}, block=100, count=500)
                for entry_id, fields in reply[0][1] if reply else []:
                    arrived = time.perf_counter()
                    received[load.frame_decoder.decode(fields[b"e"]).metadata.command_id] = arrived
                    last = entry_id

        async def xadd(key: str) -> None:
            await self.redis.xadd(source, {"c": record(key)})

        async with running(relay):
            while not await self._has_group(source):
                relay.check()
                await asyncio.sleep(0.05)
            reader = asyncio.create_task(read())
            try:
                await self.paced("baseline-two-hops", [relay], xadd, received)
            finally:
                stop.set()
                await ended(reader)
        await self.redis.unlink(source, dest)

    async def _has_group(self, stream: str) -> bool:
        try:
            return bool(await self.redis.xinfo_groups(stream))
        except aioredis.ResponseError:
            return False

    # -- Eddy ------------------------------------------------------------------------------

    async def events(self) -> int:
        """Events in every `chat_sessions` event stream: what the worker has done."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in self.keys.shards_of("chat_sessions"):
            pipe.xlen(self.keys.event_stream(shard))
        return sum(await pipe.execute())

    async def eddy(self) -> None:
        """`eddy web` alone, then `eddy worker` and `eddy projector` draining its
        backlog one after the other, then all three live, then the SSE latency."""
        migrate = self.eddy_process("migrate").start()
        if await migrate.wait() != 0:
            raise RuntimeError(f"eddy migrate failed; see {migrate.log}")
        port = free_port()
        web = self.eddy_process("web", PORT=str(port))
        worker = self.eddy_process("worker")
        projector = self.eddy_process("projector")
        db = await asyncpg.connect(self.opts.database_url)
        rows_sql = f'SELECT count(*) FROM "{self.schema}".chat_sessions'

        async def rows() -> int:
            return int(await db.fetchval(rows_sql))

        applied: Counter = (REDIS_POLL_S, self.events)
        projected: Counter = (POSTGRES_POLL_S, rows)
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(running(web))
                await wait_http(f"http://127.0.0.1:{port}/readyz", [web])
                alone = await self.hammer("eddy-http-alone", port, [web])
                await stack.enter_async_context(running(worker))
                await self.drain("eddy-worker-drain", [web, worker], applied, alone.ok)
                await self.baseline_projector(db, [web, worker], alone.ok)
                await stack.enter_async_context(running(projector))
                procs = [web, worker, projector]
                await self.drain("eddy-projector-drain", procs, projected, alone.ok)
                stages = {"worker": applied, "projector": projected}
                await self.live("eddy-http-live", port, procs, stages)
                await self.sse_latency(port, procs)
                await self.chat_latency(port, procs)
        finally:
            await db.close()

    async def baseline_projector(
        self, db: asyncpg.Connection, procs: Sequence[Proc], backlog: int
    ) -> None:
        """Baseline (c) drains a copy of the event streams the worker just filled (the
        backlog Eddy's projector drains next), with the same processes idling."""
        copies = []
        for shard in self.keys.shards_of("chat_sessions"):
            stream = self.keys.event_stream(shard)
            copy = f"{stream}:pg-baseline"  # the same hash tag: a copy on the same node
            if not await self.redis.copy(stream, copy):
                raise RuntimeError(f"could not copy {stream}")
            copies.append(copy)
        await db.execute(pg_baseline.create_tables(self.schema))
        rows_sql = f'SELECT count(*) FROM "{self.schema}".{pg_baseline.TABLE}'

        async def rows() -> int:
            return int(await db.fetchval(rows_sql))

        streams = [arg for copy in copies for arg in ("--stream", copy)]
        projector = self.python(
            "pg-baseline", ["-m", "bench.pg_baseline", "--schema", self.schema, *streams]
        )
        async with running(projector):
            await self.drain(
                "baseline-pg-drain", [*procs, projector], (POSTGRES_POLL_S, rows), backlog
            )
        await self.redis.unlink(*copies)
        await db.execute(
            f'DROP TABLE "{self.schema}".{pg_baseline.TABLE},'
            f' "{self.schema}".pg_baseline_checkpoints'
        )

    async def sse_latency(self, port: int, procs: Sequence[Proc]) -> None:
        received: dict[str, float] = {}
        ready = asyncio.Event()
        url = f"http://127.0.0.1:{port}/v1/events/stream?topic=chat_sessions"
        feed = asyncio.create_task(load.read_sse(url, self.token, received, ready))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            async with load.poster(
                self.opts.client, "127.0.0.1", port, self.token, LATENCY_CONNECTIONS
            ) as post:
                await self.paced("eddy-sse-latency", procs, post.post, received)
        finally:
            feed.cancel()
            await ended(feed)

    async def chat_latency(self, port: int, procs: Sequence[Proc]) -> None:
        phase = "eddy-chat-ws"

        async def paced(push: Callable[[str], Awaitable[object]], by_ws: dict[str, float]) -> None:
            await self.paced(phase, procs, push, by_ws)

        got = await chat.stream_chunks(f"127.0.0.1:{port}", self.token, paced)
        sse = chat.latencies(got["sent"], got["sse"])
        self.phases[phase] |= {
            "sse_received": len(sse),
            "sse_p50_ms": load.percentile(sse, 0.5) * 1000,
            "sse_p99_ms": load.percentile(sse, 0.99) * 1000,
        }
        result = self.phases[phase]
        self.say(
            f"{phase}: SSE {len(sse)}/{result['sent']} delivered,"
            f" p50 {result['sse_p50_ms']:.2f} ms, p99 {result['sse_p99_ms']:.2f} ms"
        )

    # -- the whole run -------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        shutil.rmtree(self.logs, ignore_errors=True)
        started = datetime.now(UTC)
        machine = await self.machine()
        budget = 3 * (self.opts.duration_s + self.opts.latency_s) + 3 * DRAIN_TIMEOUT_S
        try:
            for phase in (self.baselines, self.baseline_two_hops, self.eddy):
                async with watchdog(phase.__name__, budget):
                    await phase()
        finally:
            self.say("cleaning up")
            await self.cleanup()
        return {
            "started_at": started.isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - self.began, 1),
            "options": {
                k: str(v) if isinstance(v, Path) else v for k, v in vars(self.opts).items()
            },
            "machine": machine,
            "phases": self.phases,
            "cpu_cores": self.cpu,
            "cpu_wall_s": self.walls,
        }

    async def machine(self) -> dict[str, object]:
        info = await self.redis.info("server")
        db = await asyncpg.connect(self.opts.database_url)
        try:
            postgres = await db.fetchval("SHOW server_version")
        finally:
            await db.close()
        return {
            **code_version(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "redis": info.get("redis_version"),
            "postgres": postgres,
            "shards": self.settings.shards,
        }

    async def cleanup(self) -> None:
        keys = [k async for k in self.redis.scan_iter(match=f"{self.prefix}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await self.redis.unlink(*keys[start : start + 500])
        db = await asyncpg.connect(self.opts.database_url)
        try:
            await db.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await db.close()
        await self.redis.aclose()


def code_version() -> dict[str, object]:
    """The commit the processes ran, and the files of theirs changed since (the
    working tree is what runs, and others may be editing it)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return ""
        return done.stdout.rstrip()

    changed = [
        line[3:]
        for line in git("status", "--porcelain", "--", "app", "streams", "projections").splitlines()
    ]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "uncommitted": changed}


def figures(phases: dict[str, Any], rate: float) -> list[Figure]:
    """Every Eddy figure of a run next to its baseline from the same run."""
    a_alone, a_live = phases["baseline-http-alone"], phases["baseline-http-live"]
    b, hops = phases["baseline-drain"], phases["baseline-two-hops"]
    c = phases["baseline-pg-drain"]
    alone, live = phases["eddy-http-alone"], phases["eddy-http-live"]
    worker, projector = phases["eddy-worker-drain"], phases["eddy-projector-drain"]
    sse = phases["eddy-sse-latency"]
    chunks = phases["eddy-chat-ws"]
    live_cpu, a_live_cpu = live["cpu_us_per_command"], a_live["cpu_us_per_command"]
    xadd_http = "Starlette + 1 XADD per request"
    relay = "relay: XREADGROUP→XADD→XACK"
    upsert = "asyncpg: XREADGROUP→upsert+checkpoint→XACK"
    at = f"at {rate:g}/s"

    def figure(name: str, unit: str, eddy: float, baseline: float, baseline_name: str) -> Figure:
        return Figure(
            name=name,
            unit=unit,
            eddy=eddy,
            baseline=baseline,
            baseline_name=baseline_name,
            higher_is_better=unit == "/s",
        )

    return [
        figure("HTTP commands accepted/s, web alone", "/s",
               alone["rate_per_s"], a_alone["rate_per_s"], xadd_http),
        figure("HTTP commands accepted/s, pipeline running", "/s",
               live["rate_per_s"], a_live["rate_per_s"], f"{xadd_http}, relay running"),
        figure("commands/s from POST to read-model row", "/s",
               live["through_per_s"], a_live["through_per_s"], "from POST to relay output"),
        figure("worker drains a backlog, commands/s", "/s",
               worker["rate_per_s"], b["rate_per_s"], relay),
        figure("projector drains a backlog, events/s", "/s",
               projector["rate_per_s"], c["rate_per_s"], upsert),
        figure(f"POST → SSE event p50 {at}", "ms", sse["p50_ms"], hops["p50_ms"],
               "XADD→relay→XREAD"),
        figure(f"POST → SSE event p99 {at}", "ms", sse["p99_ms"], hops["p99_ms"],
               "XADD→relay→XREAD"),
        figure(f"chunk push (WS) → WS subscriber p50 {at}", "ms", chunks["p50_ms"],
               hops["p50_ms"], "XADD→relay→XREAD"),
        figure(f"chunk push (WS) → WS subscriber p99 {at}", "ms", chunks["p99_ms"],
               hops["p99_ms"], "XADD→relay→XREAD"),
        figure(f"chunk push (WS) → SSE subscriber p50 {at}", "ms", chunks["sse_p50_ms"],
               hops["p50_ms"], "XADD→relay→XREAD"),
        figure(f"chunk push (WS) → SSE subscriber p99 {at}", "ms", chunks["sse_p99_ms"],
               hops["p99_ms"], "XADD→relay→XREAD"),
        figure(f"POST → 202 p50 {at}", "ms", sse["reply_p50_ms"], hops["reply_p50_ms"],
               "XADD reply"),
        figure(f"POST → 202 p99 {at}", "ms", sse["reply_p99_ms"], hops["reply_p99_ms"],
               "XADD reply"),
        figure("web CPU per accepted command, alone", "µs", alone["server_cpu_us_per_op"],
               a_alone["server_cpu_us_per_op"], "Starlette + XADD, per request"),
        figure("worker CPU per command, backlog", "µs", worker["cpu_us_per_op"],
               b["cpu_us_per_op"], "relay, per entry"),
        figure("projector CPU per event, backlog", "µs", projector["cpu_us_per_op"],
               c["cpu_us_per_op"], "asyncpg upserts, per event"),
        figure("web CPU per accepted command, live", "µs", live_cpu["web"],
               a_live_cpu["baseline-web"], "Starlette + XADD, relay running"),
        figure("worker CPU per command, live", "µs", live_cpu["worker"],
               a_live_cpu["relay"], "relay, per entry, live"),
        figure("projector CPU per event, live", "µs", live_cpu["projector"],
               a_live_cpu["relay"], "relay, per entry, live"),
    ]  # fmt: skip


def parse(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="s of each closed-loop burst")
    p.add_argument("--rate", type=float, default=200.0, help="commands/s of the latency runs")
    p.add_argument("--latency-duration", type=float, default=10.0, help="s of each latency run")
    p.add_argument("--connections", type=int, default=64, help="concurrent closed-loop clients")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw", help="HTTP load client")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    p.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    a = p.parse_args(argv)
    return Options(
        duration_s=a.duration,
        rate=a.rate,
        latency_s=a.latency_duration,
        connections=a.connections,
        client=a.client,
        redis_url=a.redis_url,
        database_url=a.database_url,
        output=a.output,
    )


def finite(value: Any) -> Any:
    """`value` with NaN and infinities as None (JSON has no NaN), floats rounded."""
    if isinstance(value, float):
        return round(value, 3) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    try:
        result = uvloop.run(Bench(opts).run())
    except KeyboardInterrupt:
        print("interrupted (servers stopped, keys and schema removed)", file=sys.stderr)
        return 130
    figs = figures(result["phases"], opts.rate)
    result["figures"] = [f.to_json() for f in figs]
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(finite(result), indent=2, default=str) + "\n")
    m = result["machine"]
    dirty = f" + uncommitted {', '.join(m['uncommitted'])}" if m["uncommitted"] else ""
    print(
        f"\nEddy bench {result['started_at']}, commit {m['commit']}{dirty}:"
        f" {m['cpus']} CPUs, Redis {m['redis']},"
        f" Postgres {m['postgres']}, {m['shards']} shards, {opts.connections} connections"
        f" ({opts.client} client), {result['wall_s']} s in all\n"
    )
    print(table(figs))
    print("\ncores used per phase (loadgen = this process; other = not ours):\n")
    print(cpu_table(result["cpu_cores"], result["cpu_wall_s"]))
    busy = {
        phase: cores["other"]
        for phase, cores in result["cpu_cores"].items()
        if result["cpu_wall_s"][phase] >= 0.5 and cores["other"] > OTHER_LOAD_WARNING
    }
    if busy:
        listed = ", ".join(f"{phase} {cores:.2f}" for phase, cores in busy.items())
        print(f"\nwarning: processes not in this run used CPU (cores): {listed}; rerun")
    print(f"\nJSON: {opts.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
