"""Guarantee 10, feeds: an SSE subscriber never sees another tenant's events, live
or while catching up, whatever topics it names."""

from __future__ import annotations

import httpx

from core.settings import Settings
from streams.connection import Redis
from tests.feeds import append, bearer, event, feed_app, fence, keys_of, read_events, serve
from tests.sse import frames

URL = "/v1/events/stream"


async def test_a_tenant_b_feed_never_shows_tenant_a_events(
    settings: Settings, redis: Redis
) -> None:
    keys = keys_of(settings)
    # Both tenants use the same aggregate and session ids.
    a_events = [
        event("a", "chat_sessions", "s1"),
        event("a", "traces", "t1", session_id="s1"),
        event("a", "message_streams", "m1", session_id="s1"),
    ]
    b_events = [
        event("b", "chat_sessions", "s1"),
        event("b", "traces", "t1", session_id="s1"),
    ]
    b_topics = {"topic": ["chat_sessions/s1", "session/s1", "traces"]}
    async with (
        serve(feed_app(settings, redis)) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
        client.stream("GET", URL, params={"topic": "*"}, headers=bearer(settings, "b")) as b_all,
        client.stream("GET", URL, params=b_topics, headers=bearer(settings, "b")) as b_named,
        client.stream("GET", URL, params={"topic": "*"}, headers=bearer(settings, "a")) as a_all,
    ):
        streams = {
            name: frames(r) for name, r in [("b", b_all), ("b-named", b_named), ("a", a_all)]
        }
        openings = {name: (await anext(stream)).id for name, stream in streams.items()}
        for envelope in [a_events[0], b_events[0], a_events[1], b_events[1], a_events[2]]:
            await append(redis, keys, envelope)
        b_fences = await fence(redis, keys, "b", session_id="s1")
        a_fences = await fence(redis, keys, "a")

        b_got, _ = await read_events(streams["b"], until=b_fences)
        named_got, _ = await read_events(streams["b-named"], until=b_fences)
        a_got, _ = await read_events(streams["a"], until=a_fences)
    expected_b = {e.id for e in b_events} | b_fences
    for got in (b_got, named_got):
        assert {f.envelope.tenant_id for f in got} == {"b"}
        assert {f.envelope.id for f in got} == expected_b
    assert {f.envelope.tenant_id for f in a_got} == {"a"}
    assert {f.envelope.id for f in a_got} == {e.id for e in a_events} | a_fences

    # Catching up over the same stretch of the streams shows tenant B only B's events too.
    async with (
        serve(feed_app(settings, redis)) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        headers = {**bearer(settings, "b"), "Last-Event-ID": openings["b"] or ""}
        async with client.stream("GET", URL, params={"topic": "*"}, headers=headers) as response:
            replayed, _ = await read_events(frames(response), until=b_fences)
    assert {f.envelope.id for f in replayed} == expected_b
    assert len(replayed) == len(expected_b)
