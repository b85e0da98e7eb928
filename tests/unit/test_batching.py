"""The coalescer behind the command bus and the tenant rate limiter."""

from __future__ import annotations

import anyio

from streams.batching import Coalescer


async def test_what_arrives_during_a_flush_goes_as_the_next_batch() -> None:
    batches: list[list[int]] = []
    done = {n: anyio.Event() for n in range(7)}
    release = anyio.Event()

    async def flush(batch: list[int]) -> None:
        batches.append(batch)
        if len(batches) == 1:
            await release.wait()  # the first batch is on its way while others arrive
        for n in batch:
            done[n].set()

    coalescer = Coalescer(flush, stopped=lambda left: None, limit=4)
    async with anyio.create_task_group() as tg:
        await tg.start(coalescer.run)
        tg.start_soon(coalescer.put, 0, done[0])
        await anyio.wait_all_tasks_blocked()
        for n in range(1, 7):
            tg.start_soon(coalescer.put, n, done[n])
        await anyio.wait_all_tasks_blocked()
        release.set()
        for event in done.values():
            await event.wait()
        tg.cancel_scope.cancel()
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]


async def test_without_run_each_item_is_flushed_alone_and_leftovers_are_handed_back() -> None:
    flushed: list[list[str]] = []

    async def flush(batch: list[str]) -> None:
        flushed.append(batch)

    left: list[list[str]] = []
    coalescer = Coalescer(flush, stopped=left.append)
    await coalescer.put("a", anyio.Event())
    assert flushed == [["a"]]

    blocked = anyio.Event()

    async def stuck(batch: list[str]) -> None:
        await blocked.wait()

    waiting = Coalescer(stuck, stopped=left.append)
    async with anyio.create_task_group() as tg:
        await tg.start(waiting.run)
        tg.start_soon(waiting.put, "x", anyio.Event())
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiting.put, "y", anyio.Event())
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert left == [["y"]]
