"""When Redis or Postgres is down: what counts as down, how long to wait before
trying again, and how to do without the one that is not needed for an answer.

Two words, used everywhere:

- `DOWN`: the server cannot be reached or cannot serve right now — a lost or
  refused connection, a timeout, a cluster failing over or moving a slot, a replica
  that is read-only, a server loading or out of memory or connections, a script
  cache that was flushed, a Postgres shutting down or rolling back a deadlocked
  transaction, and Eddy's own `Unavailable`. It says nothing about what was being
  done: the same thing tried again later can succeed. A consumer never counts it
  as an attempt of an entry (`streams/consumer.py`), the web answers it with 503
  and `Retry-After`, a process starting up waits for it to pass.
- `FAILED`: `DOWN`, or any other refusal of Redis or Postgres — a constraint
  violation, a Lua error, an undefined table. Something about what was sent, so
  trying the same thing again may fail the same way: a loop that must outlive it
  (a reader, a refresher, the trimmer) logs it, backs off and goes on; a consumer
  counts it against the entry and, in the end, dead-letters the entry.

A constraint violation is therefore never "down": it does not answer 503, and it
is not waited out at start-up.

`Backoff` (exponential, jittered, capped) and `poll` (a check repeated until it
holds or time is up) are the two ways to wait; `Breaker` is the fail-open switch
of what only speeds answers up (the query cache, the tenant rate limits).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import asyncpg
from asyncpg import exceptions as pg
from redis import exceptions as rd

from core.errors import Unavailable

T = TypeVar("T")

REDIS_DOWN: tuple[type[BaseException], ...] = (
    rd.ConnectionError,  # refused, reset, closed; also loading, max connections
    rd.TimeoutError,
    rd.ClusterError,  # cluster down, master down
    rd.TryAgainError,  # a slot moving
    rd.AskError,  # also MovedError
    rd.ReadOnlyError,  # a replica, or a master demoted under us
    rd.OutOfMemoryError,
    rd.NoScriptError,  # a restarted or promoted node without the scripts
)
POSTGRES_DOWN: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,  # connection lost, pool closed
    pg.PostgresConnectionError,
    pg.OperatorInterventionError,  # shutting down, cannot connect now, statement cancelled
    pg.InsufficientResourcesError,  # too many connections, disk full
    pg.TransactionRollbackError,  # deadlock, serialization failure
)
DOWN: tuple[type[BaseException], ...] = (*REDIS_DOWN, *POSTGRES_DOWN, OSError, Unavailable)
"""A dependency is away: try the same thing again later (OSError includes TimeoutError)."""
FAILED: tuple[type[BaseException], ...] = (*DOWN, rd.RedisError, pg.PostgresError)
"""A dependency is away or refused what was sent."""


class Backoff:
    """Exponential backoff with jitter, capped; reset after a success."""

    def __init__(self, first_s: float = 0.05, cap_s: float = 5.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.next_s = first_s

    def reset(self) -> None:
        self.next_s = self.first_s

    async def sleep(self) -> None:
        await anyio.sleep(self.next_s * random.uniform(0.5, 1.0))
        self.next_s = min(self.next_s * 2, self.cap_s)


async def poll(
    check: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    *,
    within_s: float,
    first_s: float,
    cap_s: float,
) -> T:
    """Call `check` until `ok(result)` or `within_s` has passed, pausing a little
    longer each time (from `first_s` up to `cap_s`); return the last result."""
    result = await check()
    delay = first_s
    with anyio.move_on_after(within_s):
        while not ok(result):
            await anyio.sleep(delay)
            delay = min(delay * 1.5, cap_s)
            result = await check()
    return result


async def waiting_out(what: str, attempt: Callable[[], Awaitable[T]], log: logging.Logger) -> T:
    """`attempt()` until it is not `DOWN` (a process starting before its servers)."""
    backoff = Backoff(first_s=0.2, cap_s=5)
    while True:
        try:
            return await attempt()
        except DOWN as exc:
            log.warning("waiting-for-dependency what=%s error=%r", what, exc)
            await backoff.sleep()


class Bypassed(Exception):
    """A `Breaker` is open, or the call it guarded just failed: do without."""


class Breaker:
    """Fail open around a dependency that only makes answers faster: a call that
    fails or takes longer than `timeout_s` opens the breaker for `pause_s`, during
    which callers do without (`Bypassed`); one line is logged per outage, saying
    what is done meanwhile (`doing`)."""

    def __init__(
        self,
        what: str,
        doing: str,
        log: logging.Logger,
        *,
        pause_s: float = 1.0,
        timeout_s: float = 0.25,
    ) -> None:
        self.what = what
        self.doing = doing
        self.log = log
        self.pause_s = pause_s
        self.timeout_s = timeout_s
        self._until = 0.0
        self._failing = False

    @property
    def open(self) -> bool:
        """Whether callers do without the dependency now."""
        return time.monotonic() < self._until

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()` within `timeout_s`; `Bypassed` if the breaker is open or the
        call fails (which opens it)."""
        if self.open:
            raise Bypassed(self.what)
        try:
            with anyio.fail_after(self.timeout_s):
                result = await attempt()
        except FAILED as exc:
            self.failed(exc)
            raise Bypassed(self.what) from exc
        self.working()
        return result

    def failed(self, exc: BaseException) -> None:
        self._until = time.monotonic() + self.pause_s
        if not self._failing:
            self._failing = True
            self.log.warning("%s-unavailable error=%r (%s)", self.what, exc, self.doing)

    def working(self) -> None:
        if self._failing:
            self._failing = False
            self.log.info("%s-back", self.what)
