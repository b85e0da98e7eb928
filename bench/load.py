"""The load generator: POSTs in a closed loop or at a fixed rate, and an SSE reader.

Deliberate choices:

- The default client is a minimal keep-alive HTTP/1.1 client on an asyncio
  `Protocol` (`RawPoster`), not httpx. Load generator and servers share 2 cores:
  httpx spends several times more CPU per request than the server under test, so
  it would mostly measure itself. `--client httpx` (`HttpxPoster`) is kept to
  cross-check that ratios do not depend on the client. The raw client only
  understands what uvicorn sends to a POST: a status line, headers with
  `content-length`, and a body.
- Every request carries its own `Idempotency-Key` (`<run tag>-<n>`), so a
  command can be matched with its event (`metadata.command_id`).
- The fixed-rate sender is open loop: each request is sent when due, whether or
  not earlier ones were answered, and latency runs from the moment it is sent.
  How late the sender ever was against its schedule is reported with the
  figures (event-loop timers have 1 ms resolution; a sender that falls behind
  would show there).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import httpx
import msgspec

from tests.sse import frames

BODY = msgspec.json.encode(
    {
        "agent_id": "agent-bench",
        "participants": [
            {"participant_id": "user-1", "role": "user"},
            {"participant_id": "agent-bench", "role": "agent"},
        ],
        "metadata": {"channel": "bench"},
    }
)
PATH = "/v1/commands/CreateChatSession"


class Poster(Protocol):
    """Sends one `POST PATH` with `BODY`; answers the status code."""

    async def post(self, key: str) -> int: ...

    async def aclose(self) -> None: ...


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self.waiter.set_exception(ConnectionError("answer without content-length"))
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buffer) >= total:
            del self.buffer[:total]
            self.waiter.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))
        self.transport = None

    async def request(self, data: bytes) -> int:
        if self.transport is None:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class RawPoster:
    """A pool of `connections` raw keep-alive connections to `host:port`."""

    def __init__(self, host: str, port: int, token: str, connections: int) -> None:
        self.host, self.port, self.size = host, port, connections
        self.head = (
            f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\nIdempotency-Key: "
        ).encode()
        self.idle: asyncio.Queue[_Connection] = asyncio.Queue()
        self.all: list[_Connection] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        self.all.append(conn)
        return conn

    async def open(self) -> RawPoster:
        for _ in range(self.size):
            self.idle.put_nowait(await self._connect())
        return self

    async def post(self, key: str) -> int:
        """POST on an idle connection; a broken one is replaced (and the error raised)."""
        conn = await self.idle.get()
        try:
            return await conn.request(self.head + key.encode() + b"\r\n\r\n" + BODY)
        except ConnectionError:
            conn = await self._connect()
            raise
        finally:
            self.idle.put_nowait(conn)

    async def aclose(self) -> None:
        for conn in self.all:
            if conn.transport is not None:
                conn.transport.close()


class HttpxPoster:
    """The same requests through one `httpx.AsyncClient` with a pool of `connections`."""

    def __init__(self, host: str, port: int, token: str, connections: int) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(
            base_url=f"http://{host}:{port}", limits=limits, timeout=30.0
        )
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def open(self) -> HttpxPoster:
        return self

    async def post(self, key: str) -> int:
        headers = {**self.headers, "Idempotency-Key": key}
        response = await self.client.post(PATH, content=BODY, headers=headers)
        return response.status_code

    async def aclose(self) -> None:
        await self.client.aclose()


@contextlib.asynccontextmanager
async def poster(
    kind: str, host: str, port: int, token: str, connections: int
) -> AsyncIterator[Poster]:
    """An open `Poster` of `kind` (`raw` or `httpx`), closed afterwards."""
    made: RawPoster | HttpxPoster = (
        RawPoster(host, port, token, connections)
        if kind == "raw"
        else HttpxPoster(host, port, token, connections)
    )
    try:
        yield await made.open()
    finally:
        await made.aclose()


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-quantile (0..1) of `values`, nearest rank; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Burst:
    """What a closed-loop run did."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    started: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "rate_per_s": round(self.rate, 1),
            "latency_p50_ms": round(percentile(self.latencies_s, 0.5) * 1000, 2),
            "latency_p99_ms": round(percentile(self.latencies_s, 0.99) * 1000, 2),
        }


async def closed_loop(
    post: Poster, tag: str, duration_s: float, concurrency: int, ok_status: int = 202
) -> Burst:
    """`concurrency` clients POST back to back for `duration_s`; in-flight ones finish."""
    burst = Burst()
    keys = itertools.count()
    deadline = 0.0

    async def client() -> None:
        while time.perf_counter() < deadline:
            key = f"{tag}-{next(keys)}"
            sent = time.perf_counter()
            try:
                status = await post.post(key)
            except (ConnectionError, OSError, httpx.HTTPError) as exc:
                name = type(exc).__name__
                burst.errors[name] = burst.errors.get(name, 0) + 1
                continue
            if status == ok_status:
                burst.ok += 1
                burst.latencies_s.append(time.perf_counter() - sent)
            else:
                burst.errors[str(status)] = burst.errors.get(str(status), 0) + 1

    burst.started = time.perf_counter()
    deadline = burst.started + duration_s
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(client())
    burst.elapsed_s = time.perf_counter() - burst.started
    return burst


async def at_rate(
    rate: float, duration_s: float, send: Callable[[int], Coroutine[Any, Any, None]]
) -> tuple[int, float]:
    """Call `send(n)` for n = 0, 1, … at `rate` per second for `duration_s`, each in its
    own task; wait for them all. Returns (calls, worst lateness of a call in seconds)."""
    total = round(rate * duration_s)
    start = time.perf_counter()
    late = 0.0
    async with asyncio.TaskGroup() as tg:
        for n in range(total):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late = max(late, -delay)
            tg.create_task(send(n))
    return total, late


class _Meta(msgspec.Struct):
    command_id: str


class _Frame(msgspec.Struct):
    metadata: _Meta


frame_decoder = msgspec.json.Decoder(_Frame)


async def read_sse(url: str, token: str, received: dict[str, float], ready: asyncio.Event) -> None:
    """Follow an SSE feed: `received[command_id] = arrival time` for every event.

    `ready` is set at the first frame (Eddy sends its position first), i.e. once
    the subscription is live. Runs until cancelled.
    """
    headers = {"Accept": "text/event-stream", "Authorization": f"Bearer {token}"}
    timeout = httpx.Timeout(10.0, read=None)
    async with (
        httpx.AsyncClient(timeout=timeout) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        response.raise_for_status()
        async for frame in frames(response):
            if frame.data is not None:
                arrived = time.perf_counter()
                received[frame_decoder.decode(frame.data).metadata.command_id] = arrived
            elif frame.id is not None:
                ready.set()
