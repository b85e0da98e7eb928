"""Coalescing: what arrives while one batch is on its way to Redis goes as the next.

The command bus (submissions) and the tenant rate limiter (checks) both answer
many concurrent callers with few round trips this way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskStatus

T = TypeVar("T")


class Coalescer(Generic[T]):
    """While `run()` runs, `put` queues an item and waits for its `done`; the items
    that arrived during the previous `flush` go to the next one (at most `limit`).
    Without `run()`, `put` flushes the item alone. Items still queued when `run()`
    ends are handed to `stopped`, which must set their `done`."""

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[None]],
        *,
        stopped: Callable[[list[T]], None],
        limit: int | None = None,
    ) -> None:
        self._flush = flush
        self._stopped = stopped
        self._limit = limit
        self._queue: list[T] = []
        self._arrived = anyio.Event()
        self._running = False

    async def put(self, item: T, done: anyio.Event) -> None:
        if self._running:
            self._queue.append(item)
            self._arrived.set()
            await done.wait()
        else:
            await self._flush([item])

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Flush queued items in batches until cancelled."""
        self._running = True
        task_status.started()
        try:
            while True:
                await self._arrived.wait()
                self._arrived = anyio.Event()
                while self._queue:
                    size = len(self._queue) if self._limit is None else self._limit
                    batch, self._queue = self._queue[:size], self._queue[size:]
                    await self._flush(batch)
        finally:
            self._running = False
            left, self._queue = self._queue, []
            self._stopped(left)
