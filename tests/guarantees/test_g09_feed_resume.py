"""Guarantee 9: realtime feeds resume without gap or duplicate; a position beyond
retention gets an explicit reset, never a silent gap.

Over real HTTP: uvicorn on a free port serving the SSE route, with the fan-out
in its lifespan; events are appended to the event streams as the worker does.
"""

from __future__ import annotations

from collections import Counter

import httpx
import msgspec

from core.messages import Envelope
from core.settings import Settings
from streams.connection import Redis
from tests.feeds import (
    append,
    bearer,
    event,
    feed_app,
    fence,
    keys_of,
    read_events,
    serve,
)
from tests.sse import Frame, frames

URL = "/v1/events/stream"
AGGREGATES = [
    ("chat_sessions", "s1"),
    ("traces", "t1"),
    ("message_streams", "m1"),
    ("traces", "t2"),
]


class Appender:
    """Appends events of tenant `a` round-robin over a few aggregates, in version order."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.keys = keys_of(settings)
        self.redis = redis
        self.versions = dict.fromkeys(AGGREGATES, 0)
        self.sent: list[Envelope] = []

    async def __call__(self, n: int) -> list[Envelope]:
        appended = []
        for i in range(n):
            context, aggregate_id = AGGREGATES[(len(self.sent) + i) % len(AGGREGATES)]
            self.versions[context, aggregate_id] += 1
            appended.append(event("a", context, aggregate_id, self.versions[context, aggregate_id]))
            await append(self.redis, self.keys, appended[-1])
        self.sent += appended
        return appended


def ids(got: list[Frame]) -> list[str]:
    return [f.envelope.id for f in got]


def assert_per_aggregate_order(got: list[Frame]) -> None:
    last: dict[tuple[str, str], int] = {}
    for frame in got:
        envelope = frame.envelope
        aggregate = (envelope.context, envelope.aggregate_id)
        assert envelope.aggregate_version > last.get(aggregate, 0), aggregate
        last[aggregate] = envelope.aggregate_version


async def test_a_feed_resumes_after_a_disconnect_without_gap_or_duplicate(
    settings: Settings, redis: Redis
) -> None:
    auth = bearer(settings, "a")
    topic = {"topic": "*"}
    append_some = Appender(settings, redis)
    async with (
        serve(feed_app(settings, redis)) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        # Read 5 of 12 events, then drop the connection mid-stream.
        async with client.stream("GET", URL, params=topic, headers=auth) as response:
            assert response.status_code == 200
            stream = frames(response)
            opening = await anext(stream)
            assert opening.id and opening.event is None and opening.data is None
            await append_some(12)
            seen, last_id = await read_events(stream, count=5)
        assert len(seen) == 5

        # Events keep being appended while the client is away.
        await append_some(12)

        # Reconnect with Last-Event-ID: exactly the 19 it has not seen, then the fences.
        headers = {**auth, "Last-Event-ID": last_id}
        async with client.stream("GET", URL, params=topic, headers=headers) as response:
            stream = frames(response)
            assert (await anext(stream)).event is None
            missed = {e.id for e in append_some.sent} - set(ids(seen))
            rest, _ = await read_events(stream, until=missed)
            fences = await fence(redis, append_some.keys, "a")
            tail, _ = await read_events(stream, until=fences)
        assert Counter(ids(seen + rest)) == Counter(e.id for e in append_some.sent)
        assert set(ids(tail)) == fences and len(tail) == len(fences)
        assert_per_aggregate_order(seen + rest)

        # Resume from the middle of that connection with ?last_event_id= instead.
        middle = rest[8]
        assert middle.id
        after_middle = rest[9:] + tail
        later = await append_some(6)
        params = {**topic, "last_event_id": middle.id}
        async with client.stream("GET", URL, params=params, headers=auth) as response:
            stream = frames(response)
            got, _ = await read_events(stream, until={e.id for e in later})
        assert Counter(ids(got)) == Counter(ids(after_middle) + [e.id for e in later])
        assert_per_aggregate_order(rest[:9] + got)


async def test_a_position_beyond_retention_gets_one_reset_frame(
    settings: Settings, redis: Redis
) -> None:
    auth = bearer(settings, "a")
    topic = {"topic": "traces/t1"}
    keys = keys_of(settings)
    stream_key = keys.event_stream(keys.shard_of("traces", "a", "t1"))
    async with (
        serve(feed_app(settings, redis)) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        async with client.stream("GET", URL, params=topic, headers=auth) as response:
            stream = frames(response)
            await anext(stream)
            for n in range(3):
                await append(redis, keys, event("a", "traces", "t1", n + 1))
            _, last_id = await read_events(stream, count=3)
        for n in range(3, 8):
            await append(redis, keys, event("a", "traces", "t1", n + 1))
        await redis.xtrim(stream_key, maxlen=1, approximate=False)

        headers = {**auth, "Last-Event-ID": last_id}
        async with client.stream("GET", URL, params=topic, headers=headers) as response:
            stream = frames(response)
            [reset], _ = await read_events(stream, count=1)
            assert reset.event == "reset" and reset.id and reset.data
            assert msgspec.json.decode(reset.data) == {
                "reason": "beyond_retention",
                "position": reset.id,
            }
            latest = event("a", "traces", "t1", 9)
            await append(redis, keys, latest)
            [frame], _ = await read_events(stream, count=1)
            assert frame.event == "Happened" and frame.envelope.id == latest.id

        # The reset's id is a position like any other: no second reset from it.
        headers = {**auth, "Last-Event-ID": reset.id}
        async with client.stream("GET", URL, params=topic, headers=headers) as response:
            [frame], _ = await read_events(frames(response), count=1)
            assert frame.event == "Happened" and frame.envelope.id == latest.id


async def test_bad_requests_are_refused_before_streaming(settings: Settings, redis: Redis) -> None:
    auth = bearer(settings, "a")
    async with (
        serve(feed_app(settings, redis)) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        cases = [
            ({"topic": "*"}, {}, 401, "unauthenticated"),
            ({}, auth, 400, "bad_request"),
            ({"topic": "nope"}, auth, 400, "bad_request"),
            ({"topic": "traces/"}, auth, 400, "bad_request"),
            ({"topic": "*"}, {**auth, "Last-Event-ID": "garbage!"}, 400, "bad_position"),
            ({"topic": "*", "last_event_id": "Zm9v"}, auth, 400, "bad_position"),
        ]
        for params, headers, status, code in cases:
            response = await client.get(URL, params=params, headers=headers)
            assert response.status_code == status, (params, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["code"] == code
            assert response.json()["error"]["message"]


async def test_a_browser_event_source_can_subscribe(settings: Settings, redis: Redis) -> None:
    """Token in the query, proxy-friendly headers, keep-alive comments."""
    settings = msgspec.structs.replace(settings, sse_keepalive_s=0.1)
    token = bearer(settings, "a")["Authorization"].removeprefix("Bearer ")
    params = {"topic": "*", "access_token": token}
    async with (
        serve(feed_app(settings, redis)) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
        client.stream(
            "GET", URL, params=params, headers={"Accept": "text/event-stream"}
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        stream = frames(response)
        assert (await anext(stream)).id
        assert (await anext(stream)).comment == "keepalive"
        assert (await anext(stream)).comment == "keepalive"
        # A keep-alive interrupts the wait for events, and loses none.
        envelope = event("a", "tools", "x")
        await append(redis, keys_of(settings), envelope)
        [frame], _ = await read_events(stream, count=1)
        assert frame.envelope.id == envelope.id
