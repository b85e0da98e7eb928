"""Floods (DESIGN.md guarantee 11, API.md's 429): per-tenant limits in Redis, shared
by HTTP and WebSocket; per-connection limits in memory; refusals that accept
nothing; a quiet tenant's latency while another floods; the limiter's Lua step.

The isolation bounds (`ISOLATION_BOUND`, 3x on p50; `TAIL_BOUND`, 4x on p99): the
flooding tenant
offers 500 commands/s, 10x its limit, over 8 keep-alive connections (at least 4x
must reach the server: a flooder at `nice 19` on a slow 2-core machine managed
300-380/s of the 1,000/s this test first offered). The web process refuses each
in about 0.1 ms of CPU (measured: 61-106 µs, against 285 µs to accept one, before
the worker's and projector's share), so the flood costs it about a twentieth of a
core, plus the 50 commands/s it may still have accepted. On
this 2-core machine, shared with Redis, Postgres, the flooder and the client,
that extra CPU is what the quiet tenant feels: 1.2-1.8x measured while other test
runs loaded the machine (2.0-2.5x with no limit, the flood all accepted). 3x
leaves room for a noisy machine; refusals as costly as acceptance, or a leak
past the limit (also asserted: the flooder's 202s), exceed it. The p99 of 360
samples is set by its four slowest, and on a slower 2-core machine measured
2.1-3.0x (3.04x once) in consecutive runs of the same code, so it is bounded at
4x: a tail that refusals really slowed shows there as well as at p50. The flooder runs
at `nice 19`, standing for clients on other machines, and alternates with quiet
windows so the machine's other load weighs on both measurements alike.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import CollectorRegistry, Counter

from app.limits import Rate, TenantLimiter
from core.errors import RateLimited
from core.settings import Settings
from devserver.embedded import free_port
from streams.connection import Redis, Scripts, connect
from streams.keys import Keys
from tests.conftest import fresh_settings
from tests.pipeline import eventually
from tests.processes import EDDY, environment, fleet
from tests.sockets import Client, opened
from tests.stack import Stack, serving

CREATE = {"agent_id": "agent-1", "participants": []}
PER_S = 1.0
ROOT = Path(__file__).parents[2]
BURST = 5


def limited(settings: Settings, **changes: Any) -> Settings:
    return msgspec.structs.replace(settings, **changes)


async def post(stack: Stack, tenant: str, command_id: str, body: Any = CREATE) -> httpx.Response:
    headers = {**stack.auth(tenant), "Idempotency-Key": command_id}
    if isinstance(body, bytes):
        return await stack.client.post(
            "/v1/commands/CreateChatSession", content=body, headers=headers
        )
    return await stack.client.post("/v1/commands/CreateChatSession", json=body, headers=headers)


async def command_streams_length(redis: Redis, settings: Settings) -> int:
    keys = Keys.of(settings)
    return sum([await redis.xlen(keys.command_stream(s)) for s in keys.shards_of("chat_sessions")])


def assert_refused(r: httpx.Response, limit: str, at_most_s: int) -> int:
    """A well-formed 429: `Retry-After` whole seconds in [1, at_most_s], the same in the body."""
    assert r.status_code == 429, r.text
    retry = r.headers["retry-after"]
    assert retry.isdigit() and 1 <= int(retry) <= at_most_s, retry
    error = r.json()["error"]
    assert error["code"] == "rate_limited" and error["limit"] == limit, error
    assert error["retry_after_s"] == int(retry)
    return int(retry)


# -- the Lua step, directly ------------------------------------------------------------


async def take(scripts: Scripts, key: str, per_s: float, burst: int, wanted: int) -> list[int]:
    reply = await scripts.rate_limit(keys=[key], args=[1e6 / per_s, burst, wanted])
    return [int(v) for v in reply]


async def test_the_script_grants_a_burst_then_one_token_per_interval(settings, redis) -> None:
    keys, scripts = Keys.of(settings), Scripts(redis)
    key, other = keys.rate_limit("commands", "t1"), keys.rate_limit("commands", "t2")
    assert await take(scripts, key, 10, 5, 3) == [3, 0]
    granted, retry_us = await take(scripts, key, 10, 5, 3)  # 2 left of the burst
    assert granted == 2 and 90_000 < retry_us <= 100_000  # one token each 100 ms
    granted, retry_us = await take(scripts, key, 10, 5, 1)
    assert granted == 0 and 0 < retry_us <= 100_000
    assert 0 < await redis.pttl(key) <= 501  # kept only until it is full again
    assert await take(scripts, other, 10, 5, 5) == [5, 0]  # another tenant: its own bucket

    refused_at = time.monotonic()

    async def granted() -> int:
        return (await take(scripts, key, 10, 5, 1))[0]

    await eventually(granted, within=5)
    assert time.monotonic() - refused_at >= (retry_us - 5_000) / 1e6  # not before its time
    assert (await take(scripts, key, 10, 5, 1))[0] == 0  # and exactly one token came


async def test_an_idle_limit_leaves_no_key(settings, redis) -> None:
    keys, scripts = Keys.of(settings), Scripts(redis)
    key = keys.rate_limit("queries", "idle")
    assert await take(scripts, key, 1000, 20, 20) == [20, 0]  # full again in 20 ms

    async def gone() -> bool:
        return not await redis.exists(key)

    await eventually(gone, within=2)
    assert await take(scripts, key, 1000, 20, 21) == [20, 1000]


@pytest.mark.cluster
async def test_the_script_on_a_cluster(redis_cluster_url, database_url) -> None:
    settings = fresh_settings(redis_cluster_url, database_url)
    keys = Keys.of(settings)
    client = connect(settings.redis_url)
    try:
        scripts = Scripts(client)
        tenants = [f"tenant-{n}" for n in range(8)]  # their keys land on several nodes
        calls = [
            (scripts.rate_limit, [keys.rate_limit("commands", t)], [1e5, 3, 2]) for t in tenants
        ]
        assert await scripts.pipelined(calls) == [[2, 0]] * 8
        replies = await scripts.pipelined(calls)
        assert [r[0] for r in replies] == [1] * 8 and all(0 < r[1] <= 100_000 for r in replies)
    finally:
        await client.aclose()


async def test_a_refused_tenant_is_refused_from_memory_until_its_token_is_due(
    settings, redis
) -> None:
    keys = Keys.of(settings)
    rates = {"commands": Rate(1.0, 2), "queries": Rate(0, 1)}
    refused = Counter("refused", "", ["limit", "kind"], registry=CollectorRegistry())
    limiter = TenantLimiter(redis, Scripts(redis), keys, rates, refused)
    await limiter.take("commands", "t")
    await limiter.take("commands", "t")
    with pytest.raises(RateLimited) as first:
        await limiter.take("commands", "t")
    assert first.value.retry_after_s == 1
    await redis.delete(keys.rate_limit("commands", "t"))  # Redis would grant now...
    with pytest.raises(RateLimited):  # ...but the bucket cannot have a token yet: not asked
        await limiter.take("commands", "t")
    for _ in range(50):
        await limiter.take("queries", "t")  # 0: no limit
    assert refused.labels("tenant", "commands")._value.get() == 2


# -- HTTP ---------------------------------------------------------------------------------


@pytest.fixture
def stack_settings(settings: Settings) -> Settings:
    return limited(settings, tenant_commands_per_s=PER_S, tenant_commands_burst=BURST)


@pytest.fixture
def stack_processes() -> tuple[str, ...]:
    return ()


async def test_a_tenant_over_its_limit_gets_429_and_nothing_is_accepted(
    stack: Stack, redis
) -> None:
    run = uuid.uuid4().hex[:8]
    answers = [await post(stack, "tenant-a", f"a-{run}-{n}") for n in range(BURST + 3)]
    assert [r.status_code for r in answers] == [202] * BURST + [429] * 3
    retry = max(assert_refused(r, "tenant", at_most_s=1) for r in answers[BURST:])
    # refused before its body is read: not even a malformed body gets further
    assert_refused(await post(stack, "tenant-a", f"a-{run}-bad", b"{not json"), "tenant", 1)
    # another tenant is not affected
    others = [await post(stack, "tenant-b", f"b-{run}-{n}") for n in range(BURST)]
    assert [r.status_code for r in others] == [202] * BURST

    # nothing of a refused command exists: no status, no stream entry
    auth = stack.auth("tenant-a")
    for n in range(BURST + 3):
        r = await stack.client.get(f"/v1/commands/a-{run}-{n}", headers=auth)
        assert r.status_code == (200 if n < BURST else 404), (n, r.text)
    assert await command_streams_length(redis, stack.settings) == 2 * BURST

    await anyio.sleep(retry)  # what the client was told to do
    again = await post(stack, "tenant-a", f"a-{run}-{BURST}")  # a refused id, sent again
    assert again.status_code == 202, again.text
    assert await command_streams_length(redis, stack.settings) == 2 * BURST + 1


async def test_a_connection_over_its_limit_gets_429_before_its_token_is_read(
    settings: Settings, schema: str
) -> None:
    changed = limited(settings, connection_requests_per_s=1.0, connection_burst=4)
    async with (
        serving(changed, worker=False, projector=False) as stack,
        httpx.AsyncClient(base_url=stack.url, limits=httpx.Limits(max_connections=1)) as one,
        httpx.AsyncClient(base_url=stack.url, limits=httpx.Limits(max_connections=1)) as two,
    ):
        auth = stack.auth("tenant-a")
        answers = [await one.get(f"/v1/commands/c{n}", headers=auth) for n in range(5)]
        assert [r.status_code for r in answers] == [404] * 4 + [429]
        assert_refused(answers[-1], "connection", at_most_s=1)
        assert_refused(await one.get("/v1/commands/c", headers={}), "connection", 1)  # no token
        assert_refused(await one.get("/v1/chat-sessions/s", headers=auth), "connection", 1)
        assert_refused(
            await one.post("/v1/commands/CreateChatSession", json=CREATE, headers=auth),
            "connection",
            1,
        )
        for path in ("/healthz", "/readyz", "/metrics"):  # never limited
            assert (await one.get(path)).status_code == 200, path
        # the same tenant on another connection is not affected
        assert (await two.get("/v1/commands/c", headers=auth)).status_code == 404
        assert (await two.get("/v1/chat-sessions/s", headers=auth)).status_code == 404
        metrics = (await two.get("/metrics")).text
        assert 'eddy_rate_limited_total{kind="requests",limit="connection"} 4.0' in metrics


async def test_queries_have_their_own_tenant_limit(settings: Settings, schema: str) -> None:
    changed = limited(settings, tenant_queries_per_s=1.0, tenant_queries_burst=3)
    async with serving(changed, worker=False, projector=False) as stack:
        auth = stack.auth("tenant-a")
        answers = [await stack.client.get("/v1/chat-sessions/s", headers=auth) for _ in range(4)]
        assert [r.status_code for r in answers] == [404] * 3 + [429]
        assert_refused(answers[-1], "tenant", at_most_s=1)
        assert_refused(await stack.client.get("/v1/commands/c", headers=auth), "tenant", 1)
        # commands are another budget, and another tenant has its own
        assert (await post(stack, "tenant-a", "c1")).status_code == 202
        other = await stack.client.get("/v1/chat-sessions/s", headers=stack.auth("tenant-b"))
        assert other.status_code == 404


async def test_redis_down_fails_the_limiter_open_never_500(settings: Settings, schema: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = limited(settings, redis_url=f"redis://127.0.0.1:{port}/0", tenant_commands_burst=1)
    async with serving(down, worker=False, projector=False) as stack:
        auth = stack.auth("tenant-a")
        for n in range(3):  # over the burst: the limiter is skipped, the bus answers 503
            r = await post(stack, "tenant-a", f"c{n}")
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
        r = await stack.client.get("/v1/chat-sessions/s", headers=auth)  # from Postgres
        assert r.status_code == 404, r.text


# -- WebSocket ------------------------------------------------------------------------------


async def test_a_websocket_command_over_the_tenant_limit_gets_an_error_frame(
    stack: Stack, redis
) -> None:
    run = uuid.uuid4().hex[:8]
    async with opened(stack, "tenant-a") as a, opened(stack, "tenant-b") as b:
        for n in range(BURST + 2):
            frame = {"op": "command", "type": "CreateChatSession", "payload": CREATE}
            await a.send({**frame, "id": f"ws-{run}-{n}", "ref": f"r{n}"})
        answers = [await a.expect("error" if n >= BURST else "accepted") for n in range(BURST + 2)]
        assert [f["ref"] for f in answers] == [f"r{n}" for n in range(BURST + 2)]
        for refused in answers[BURST:]:
            error = refused["error"]
            assert error["code"] == "rate_limited" and error["limit"] == "tenant", refused
            assert error["retry_after_s"] == 1
        await a.pong()  # the socket stays open
        # one budget with HTTP
        assert_refused(await post(stack, "tenant-a", f"http-{run}"), "tenant", 1)
        # another tenant's socket is not affected
        for n in range(BURST):
            frame = {"op": "command", "type": "CreateChatSession", "payload": CREATE}
            assert (await b.ask({**frame, "id": f"b-{run}-{n}"}))["op"] == "accepted"

    auth = stack.auth("tenant-a")
    for n in range(BURST + 2):
        r = await stack.client.get(f"/v1/commands/ws-{run}-{n}", headers=auth)
        assert r.status_code == (200 if n < BURST else 404), (n, r.text)
    assert await command_streams_length(redis, stack.settings) == 2 * BURST


# -- a quiet tenant's latency while another floods ----------------------------------------

FLOOD_CONNECTIONS = 8
FLOOD_PER_S = 500.0
FLOODER_LIMIT_PER_S = 50.0
FLOODER_BURST = 50
ISOLATION_BOUND = 3.0
TAIL_BOUND = 4.0
NICE = ["nice", "-n", "19"] if shutil.which("nice") else []
"""The flooder stands for clients on other machines: on this one it yields the CPU
to the processes under test."""
WINDOWS = 6
WINDOW_SAMPLES = 60
QUIET_PACE_S = 0.015


def flood_main() -> None:
    """The flooder's process (`python -c`): argv port, token, requests/s offered.
    Reads `on` / `off` lines on stdin (answering each once it holds: `on` after a
    first answer, `off` once nothing is in flight); at EOF prints its counts as JSON."""
    port, token, per_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    print(json.dumps(anyio.run(_flood, port, token, per_s)), flush=True)


class _Switch:
    def __init__(self) -> None:
        self.on = False
        self.resumed = anyio.Event()
        self.answered = anyio.Event()
        self.in_flight = 0
        self.idle = anyio.Event()
        self.on_s = 0.0


async def _flood(port: int, token: str, per_s: float) -> dict[str, Any]:
    body = json.dumps(CREATE).encode()
    request = (
        f"POST /v1/commands/CreateChatSession HTTP/1.1\r\nHost: eddy\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    counts: dict[str, int] = {}
    switch = _Switch()
    period = FLOOD_CONNECTIONS / per_s

    async def connection(offset: float) -> None:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            answers = BufferedByteReceiveStream(stream)
            while True:
                await switch.resumed.wait()
                await anyio.sleep(offset)  # spread out, not in step
                next_at = anyio.current_time()
                while switch.on:
                    switch.in_flight += 1
                    await stream.send(request)
                    head = await answers.receive_until(b"\r\n\r\n", 65536)
                    length = re.search(rb"(?i)content-length: *(\d+)", head)
                    await answers.receive_exactly(int(length[1]) if length else 0)
                    counts[head[9:12].decode()] = counts.get(head[9:12].decode(), 0) + 1
                    switch.in_flight -= 1
                    switch.answered.set()
                    if not switch.in_flight:
                        switch.idle.set()
                    next_at += period
                    now = anyio.current_time()
                    if next_at > now:
                        await anyio.sleep(next_at - now)
                    else:
                        next_at = now  # behind: no burst to catch up

    async with anyio.create_task_group() as tg:
        for n in range(FLOOD_CONNECTIONS):
            tg.start_soon(connection, period * n / FLOOD_CONNECTIONS)
        async for line in anyio.wrap_file(sys.stdin):
            if line.strip() == "on":
                switch.on, switch.answered = True, anyio.Event()
                switch.resumed.set()
                await switch.answered.wait()
                began = anyio.current_time()
            else:
                switch.on, switch.resumed = False, anyio.Event()
                while switch.in_flight:
                    switch.idle = anyio.Event()
                    await switch.idle.wait()
                switch.on_s += anyio.current_time() - began
            print(line.strip(), flush=True)
        tg.cancel_scope.cancel()
    return {"counts": counts, "on_s": switch.on_s}


class Flooder:
    """A flooder process of one tenant: `on()`, `off()`; `result` once closed."""

    def __init__(self, process: Process) -> None:
        assert process.stdout is not None and process.stdin is not None
        self.stdin = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)
        self.result: dict[str, Any] = {}

    async def _switch(self, to: bytes) -> None:
        await self.stdin.send(to + b"\n")
        with anyio.fail_after(15):
            assert await self.stdout.receive_until(b"\n", 100) == to

    async def on(self) -> None:
        await self._switch(b"on")

    async def off(self) -> None:
        await self._switch(b"off")


@asynccontextmanager
async def flooder(stack: Stack, tenant: str, per_s: float) -> AsyncIterator[Flooder]:
    port = stack.url.rsplit(":", 1)[1]
    code = "from tests.faults.test_floods import flood_main; flood_main()"
    command = [*NICE, sys.executable, "-c", code, port, stack.token(tenant), str(per_s)]
    async with await anyio.open_process(command, cwd=ROOT) as process:
        flood = Flooder(process)
        try:
            yield flood
        finally:
            await flood.stdin.aclose()
            with anyio.fail_after(15):
                flood.result = json.loads(await flood.stdout.receive_until(b"\n", 1 << 20))


@dataclass
class Latencies:
    accepted: list[float] = field(default_factory=list)
    """POST → 202, seconds."""
    delivered: list[float] = field(default_factory=list)
    """POST → the command's event on the tenant's WebSocket subscription, seconds."""

    @staticmethod
    def percentiles(samples: list[float]) -> tuple[float, float]:
        cuts = statistics.quantiles(samples, n=100, method="inclusive")
        return cuts[49], cuts[98]

    def summary(self) -> dict[str, tuple[float, float]]:
        return {
            "accepted": self.percentiles(self.accepted),
            "delivered": self.percentiles(self.delivered),
        }


async def quiet(stack: Stack, ws: Client, tenant: str, samples: int, into: Latencies) -> None:
    """`samples` commands of `tenant`, one at a time, `QUIET_PACE_S` apart."""
    auth, run = stack.auth(tenant), uuid.uuid4().hex[:8]
    for n in range(samples):
        session_id = f"quiet-{run}-{n}"
        began = time.perf_counter()
        r = await stack.client.post(
            "/v1/commands/CreateChatSession",
            json={**CREATE, "session_id": session_id},
            headers=auth,
        )
        into.accepted.append(time.perf_counter() - began)
        assert r.status_code == 202, r.text
        await ws.expect("event", lambda f, s=session_id: f["event"]["aggregate_id"] == s)
        into.delivered.append(time.perf_counter() - began)
        await anyio.sleep(QUIET_PACE_S)  # pacing: a quiet tenant


@asynccontextmanager
async def web_process(settings: Settings, log_dir: Path) -> AsyncIterator[Stack]:
    """A real `eddy web` process configured like `settings` (limits included)."""
    port = free_port()
    env = environment(settings) | {
        "PORT": str(port),
        "EDDY_HOST": "127.0.0.1",
        "EDDY_LOG_LEVEL": "warning",
        "EDDY_TENANT_COMMANDS_PER_S": str(settings.tenant_commands_per_s),
        "EDDY_TENANT_COMMANDS_BURST": str(settings.tenant_commands_burst),
    }
    url = f"http://127.0.0.1:{port}"
    with (log_dir / "web.log").open("wb") as log:
        process = await anyio.open_process(
            [str(EDDY), "web"], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        async with process, httpx.AsyncClient(base_url=url, timeout=10) as client:
            try:
                stack = Stack(settings, url, client)
                await eventually(lambda: healthy(client), within=15)
                yield stack
            finally:
                process.kill()


async def healthy(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def isolation(
    settings: Settings, redis: Redis, log_dir: Path, flood_per_s: float
) -> tuple[Latencies, Latencies, dict[str, Any]]:
    """A quiet tenant's latencies alone and while another tenant floods, in
    alternating windows (so the machine's other load weighs on both alike); every
    process real: web, worker, projector, the flooder and this test's client."""
    alone, during = Latencies(), Latencies()
    async with fleet(settings, redis, log_dir) as processes:
        await processes.start("worker")
        await processes.start("projector")
        async with web_process(settings, log_dir) as stack, opened(stack, "quiet") as ws:
            assert (await ws.ask({"op": "subscribe", "topic": "*"}))["op"] == "subscribed"
            await quiet(stack, ws, "quiet", 20, Latencies())  # warm up
            async with flooder(stack, "flood", flood_per_s) as flood:
                for _ in range(WINDOWS):
                    await quiet(stack, ws, "quiet", WINDOW_SAMPLES, alone)
                    await flood.on()
                    await quiet(stack, ws, "quiet", WINDOW_SAMPLES, during)
                    await flood.off()
    return alone, during, flood.result


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_flooding_tenant_does_not_slow_a_quiet_one(
    settings: Settings, schema: str, redis: Redis, tmp_path: Path
) -> None:
    """The flooding tenant sends `FLOOD_PER_S` commands/s, 10x its limit; the quiet
    one's p50 and p99 (POST → 202, and POST → its event on a WebSocket) may rise by
    at most `ISOLATION_BOUND` over its own latency alone, measured in the same run."""
    changed = limited(
        settings, tenant_commands_per_s=FLOODER_LIMIT_PER_S, tenant_commands_burst=FLOODER_BURST
    )
    began = time.monotonic()
    alone, during, flood = await isolation(changed, redis, tmp_path, FLOOD_PER_S)
    elapsed = time.monotonic() - began
    counts, on_s = flood["counts"], flood["on_s"]
    report = {
        name: {
            "alone_ms": [round(v * 1000, 2) for v in alone.summary()[name]],
            "flooded_ms": [round(v * 1000, 2) for v in during.summary()[name]],
            "ratio": [
                round(f / a, 2)
                for a, f in zip(alone.summary()[name], during.summary()[name], strict=True)
            ],
        }
        for name in ("accepted", "delivered")
    }
    report["flood"] = {"answers": counts, "per_s": round(sum(counts.values()) / on_s)}
    print("isolation", json.dumps(report))
    # a real flood, refused: at least 4x its limit reached the server, and no more
    # than the limit allows was accepted
    assert sum(counts.values()) / on_s >= 4 * FLOODER_LIMIT_PER_S, report
    assert set(counts) <= {"202", "429"}, report
    assert counts.get("202", 0) <= FLOODER_BURST + FLOODER_LIMIT_PER_S * elapsed, report
    for name in ("accepted", "delivered"):
        p50, p99 = report[name]["ratio"]
        assert p50 <= ISOLATION_BOUND and p99 <= TAIL_BOUND, report
