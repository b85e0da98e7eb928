"""Baseline (b): a hand-written stream consumer, XREADGROUP → decode → XADD → XACK.

Reads up to `--count` (100) command records per XREADGROUP, decodes each, XADDs
one event per record (an envelope-like JSON whose `metadata.command_id` names
the record) and XACKs the batch, all of it in one pipeline. The group is created
at `0`, so entries added before the start are read too. It is both the drain
baseline (a pre-filled source stream) and the middle hop of the two-hop latency
baseline. Runs until SIGTERM or SIGINT, which end the loop between two reads
(a flag, not a cancellation, so no blocking read is interrupted half-way):

    python -m bench.relay --source S --dest D    # REDIS_URL from the environment
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import RedisError, ResponseError

GROUP = "relay"
BLOCK_MS = 1000  # well under the socket timeout (LIMITS.md pitfall)


class Record(msgspec.Struct):
    id: str
    type: str
    payload: msgspec.Raw


class Metadata(msgspec.Struct):
    command_id: str


class Event(msgspec.Struct):
    id: str
    type: str
    payload: msgspec.Raw
    metadata: Metadata


_decoder = msgspec.json.Decoder(Record)
_encoder = msgspec.json.Encoder()


Entries = list[tuple[bytes, dict[bytes, bytes]]]


async def batches(
    client: aioredis.Redis,
    stream: str,
    group: str,
    consumer: str,
    count: int,
    stop: asyncio.Event,
) -> AsyncIterator[Entries]:
    """The group's new entries of `stream`, one XREADGROUP's batch at a time, until
    `stop` is set (checked between reads, so within `BLOCK_MS`); the group is
    created at the stream's start if it does not exist."""
    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    while not stop.is_set():
        try:
            reply: Any = await client.xreadgroup(
                group, consumer, {stream: ">"}, count=count, block=BLOCK_MS
            )
        except (RedisError, OSError):
            await asyncio.sleep(0.1)
            continue
        if reply:
            yield reply[0][1]


async def relay(
    client: aioredis.Redis, source: str, dest: str, count: int, stop: asyncio.Event
) -> None:
    """Relay until `stop` is set."""
    async for entries in batches(client, source, GROUP, "relay-1", count, stop):
        pipe = client.pipeline(transaction=False)
        for _, fields in entries:
            record = _decoder.decode(fields[b"c"])
            event = Event(
                id=str(uuid.uuid4()),
                type=f"{record.type}Done",
                payload=record.payload,
                metadata=Metadata(command_id=record.id),
            )
            pipe.xadd(dest, {"e": _encoder.encode(event)})
        pipe.xack(source, GROUP, *(entry_id for entry_id, _ in entries))
        await pipe.execute()


async def main(source: str, dest: str, count: int) -> None:
    client = aioredis.Redis.from_url(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), socket_timeout=10.0
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await relay(client, source, dest, count, stop)
    finally:
        await client.aclose()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--count", type=int, default=100)
    args = p.parse_args()
    uvloop.run(main(args.source, args.dest, args.count))
