"""Rate limits: per tenant, in Redis (shared by every web process), and per HTTP
connection, in memory (a connection lives in one process).

```
request ─▶ connection's bucket ─▶ token ─▶ tenant known to be over? ─▶ Redis (GCRA)
           (memory) 429             401      (memory) 429               429, or on
```

Deliberate choices:

- What counts. Per tenant: commands (`POST /v1/commands/{type}` and WebSocket
  `command` frames share one budget, `EDDY_TENANT_COMMANDS_*`) and queries (every
  query route and `GET /v1/commands/{id}`, a higher budget, `EDDY_TENANT_QUERIES_*`).
  Per connection (client address and port, i.e. one keep-alive connection): the
  same requests, `EDDY_CONNECTION_*`. Never `/healthz`, `/readyz`, `/metrics`, the
  schemas, SSE or the WebSocket handshake (a WebSocket has its own frame bucket,
  `app/ws.py`). A request is counted before its body is read: a flood costs the
  token check and, at most, one Redis round trip per batch.
- The tenant limit is one GCRA value per tenant and kind (`streams/lua/rate_limit.lua`,
  Redis's clock, so web processes need no synchronised clocks). Concurrent checks
  are coalesced like the bus's submissions: whatever arrives during one round trip
  goes in the next, one script call per tenant and kind asking for as many tokens
  as requests wait. A refusal says when the next token comes; until then the
  process refuses that tenant locally, without asking Redis (the bucket cannot fill
  sooner, whoever else takes from it): a flooding tenant costs Redis about one call
  per token, not one per request.
- Redis failing (an error, or no answer within a quarter second) fails open: the
  tenant limits are skipped for a second (a `Breaker`, logged once per outage). Commands then
  get the bus's 503 if Redis is really gone; queries are answered from Postgres.
  The per-connection limit still holds.
- `Retry-After` is whole seconds, at least 1 (HTTP allows nothing finer), rounded
  up from the exact wait; the error body and WebSocket frame carry the same
  `retry_after_s` and which `limit` (`tenant` or `connection`) refused.
- A WebSocket command over the tenant's limit gets a `rate_limited` error frame and
  the socket stays open: the budget is shared by all of the tenant's clients, so
  one client's flood must not close the others' sockets. A socket over its own
  frame rate is still closed with 1008.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, Counter
from starlette.requests import Request

from app.auth import Principal, authenticate
from core.errors import RateLimited
from core.outages import Breaker, Bypassed
from core.settings import Settings
from streams.batching import Coalescer
from streams.connection import Redis, Scripts
from streams.keys import Keys

log = logging.getLogger("eddy.limits")

Kind = Literal["commands", "queries"]

SWEEP_FROM = 1024
"""Connection buckets kept before full (idle) ones are dropped."""


@dataclass(frozen=True)
class Rate:
    """`per_s` tokens a second, at most `burst` saved up; `per_s == 0`: no limit."""

    per_s: float
    burst: int

    def describe(self, unit: str) -> str:
        return f"{self.per_s:g} {unit}/s (burst {self.burst})"


def retry_after(wait_s: float) -> int:
    """`Retry-After` for a wait: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait_s))


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; one per request or frame."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self) -> bool:
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def wait_s(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1 - self.tokens) / self.rate)

    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.burst


class ConnectionLimit:
    """A token bucket per HTTP connection (client address and port). Idle buckets
    (refilled to the burst, so no different from a new one) are dropped whenever
    the map doubles, so it holds about the connections active lately."""

    def __init__(self, rate: Rate, refused: Counter) -> None:
        self.rate = rate
        self._refused = refused.labels("connection", "requests")
        self._buckets: dict[Any, TokenBucket] = {}
        self._sweep_at = SWEEP_FROM

    def take(self, client: Any) -> None:
        """Count one request of `client` (the ASGI scope's; None over a Unix socket:
        not limited); `RateLimited` if the connection is over its rate."""
        if not self.rate.per_s or client is None:
            return
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._buckets = {c: b for c, b in self._buckets.items() if not b.full()}
                self._sweep_at = max(SWEEP_FROM, 2 * len(self._buckets))
            bucket = self._buckets[client] = TokenBucket(self.rate.per_s, self.rate.burst)
        if not bucket.take():
            self._refused.inc()
            raise RateLimited(
                f"this connection is over its limit of {self.rate.describe('requests')}",
                retry_after_s=retry_after(bucket.wait_s()),
                limit="connection",
            )


class _Ask:
    """One request waiting for the batch it rides in; `wait_s` set if refused."""

    __slots__ = ("done", "kind", "tenant", "wait_s")

    def __init__(self, kind: Kind, tenant: str) -> None:
        self.kind = kind
        self.tenant = tenant
        self.done = anyio.Event()
        self.wait_s: float | None = None


def _let_through(left: list[_Ask]) -> None:
    for ask in left:  # stopping: let them through, the bus answers 503
        ask.done.set()


class TenantLimiter:
    """Per-tenant limits in Redis, one per `Kind`. While `run()` runs, concurrent
    checks go to Redis together; without it, each check is a round trip of its own."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        rates: Mapping[Kind, Rate],
        refused: Counter,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.rates = rates
        self._refused = refused
        self._batches = Coalescer(self._flush, stopped=_let_through)
        self._over: dict[tuple[Kind, str], float] = {}
        """(kind, tenant) → `time.monotonic()` before which the tenant has no token."""
        self._sweep_at = SWEEP_FROM
        self.breaker = Breaker("rate-limiter", "tenant limits skipped", log)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send waiting checks in batches until cancelled."""
        await self._batches.run(task_status=task_status)

    async def take(self, kind: Kind, tenant: str) -> None:
        """Count one request of `tenant`; `RateLimited` if it is over its `kind` rate."""
        rate = self.rates[kind]
        if not rate.per_s:
            return
        now = time.monotonic()
        until = self._over.get((kind, tenant))
        if until is not None:
            if now < until:
                raise self._refusal(kind, until - now)
            del self._over[(kind, tenant)]
        if self.breaker.open:
            return
        ask = _Ask(kind, tenant)
        await self._batches.put(ask, ask.done)
        if ask.wait_s is not None:
            raise self._refusal(kind, ask.wait_s)

    def _refusal(self, kind: Kind, wait_s: float) -> RateLimited:
        self._refused.labels("tenant", kind).inc()
        return RateLimited(
            f"the tenant is over its limit of {self.rates[kind].describe(kind)}",
            retry_after_s=retry_after(wait_s),
            limit="tenant",
        )

    async def _flush(self, batch: list[_Ask]) -> None:
        """One script call per (kind, tenant) of `batch`, for as many tokens as it asks."""
        groups: dict[tuple[Kind, str], list[_Ask]] = {}
        for ask in batch:
            groups.setdefault((ask.kind, ask.tenant), []).append(ask)
        calls = []
        for (kind, tenant), asks in groups.items():
            rate = self.rates[kind]
            args = [1e6 / rate.per_s, rate.burst, len(asks)]
            calls.append((self.scripts.rate_limit, [self.keys.rate_limit(kind, tenant)], args))
        try:
            try:
                with anyio.CancelScope(shield=True):
                    replies = await self.breaker.call(lambda: self.scripts.pipelined(calls))
            except Bypassed:
                return  # fail open
            now = time.monotonic()
            for (key, asks), reply in zip(groups.items(), replies, strict=True):
                if isinstance(reply, Exception):  # fail open
                    self.breaker.failed(reply)
                    continue
                granted, retry_us = int(reply[0]), int(reply[1])
                if granted < len(asks):
                    for ask in asks[granted:]:
                        ask.wait_s = retry_us / 1e6
                    self._remember(key, now + retry_us / 1e6)
        finally:
            for ask in batch:
                ask.done.set()

    def _remember(self, key: tuple[Kind, str], until: float) -> None:
        """No token for `key` before `until`; forgotten once past."""
        if len(self._over) >= self._sweep_at:
            now = time.monotonic()
            self._over = {k: t for k, t in self._over.items() if t > now}
            self._sweep_at = max(SWEEP_FROM, 2 * len(self._over))
        self._over[key] = until


class Limits:
    """A web process's limits, read by `authenticate_within_limits` (HTTP) and `app.ws`."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        registry: CollectorRegistry,
    ) -> None:
        refused = Counter(
            "eddy_rate_limited",
            "Requests and WebSocket commands refused by a rate limit, by limit and kind.",
            ["limit", "kind"],
            registry=registry,
        )
        self.jwt_secret = settings.jwt_secret
        self.connections = ConnectionLimit(
            Rate(settings.connection_requests_per_s, settings.connection_burst), refused
        )
        rates: dict[Kind, Rate] = {
            "commands": Rate(settings.tenant_commands_per_s, settings.tenant_commands_burst),
            "queries": Rate(settings.tenant_queries_per_s, settings.tenant_queries_burst),
        }
        self.tenants = TenantLimiter(redis, scripts, keys, rates, refused)


async def authenticate_within_limits(request: Request, kind: Kind) -> Principal:
    """Count a request against its connection's limit, authenticate it, then count it
    against its tenant's `kind` limit; its principal. `RateLimited` (429) or
    `Unauthenticated` (401), before anything of the request is read."""
    limits: Limits = request.app.state.web.limits
    client = request.scope.get("client")
    limits.connections.take(None if client is None else tuple(client))
    principal = authenticate(request, limits.jwt_secret)
    await limits.tenants.take(kind, principal.tenant)
    return principal
