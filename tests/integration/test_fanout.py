"""The fan-out against real Redis: filtering, resuming, retention, slow subscribers,
reader errors."""

from __future__ import annotations

import logging
import socket
import uuid

import anyio
import httpx
import msgspec
import pytest

from core.errors import BadPosition, BadRequest
from core.messages import envelope_encoder
from core.settings import Settings
from streams import fanout as fanout_module
from streams.connection import Redis, connect
from streams.fanout import Delivery, Lagging, Reset
from streams.keys import Keys, Shard
from streams.positions import Vector, encode_cursor
from streams.topics import Topics
from tests.feeds import (
    CONTEXTS,
    WAIT_S,
    append,
    bearer,
    catalog_of,
    deliveries,
    drain,
    event,
    feed_app,
    fence,
    keys_of,
    read_events,
    running,
    serve,
    take,
    take_until,
)
from tests.sse import frames


def ids(items: list[Delivery]) -> list[str]:
    return [d.envelope.id for d in items]


async def test_events_reach_only_their_tenant_and_topics(settings: Settings, redis: Redis) -> None:
    keys = keys_of(settings)
    async with (
        running(redis, settings) as fanout,
        fanout.subscribe("a", ["*"]) as everything,
        fanout.subscribe("a", ["traces"]) as traces,
        fanout.subscribe("a", ["chat_sessions/s1"]) as aggregate,
        fanout.subscribe("a", ["session/s1"]) as session,
        fanout.subscribe("a", ["chat_sessions/s2", "traces/t1"]) as two,
        fanout.subscribe("b", ["*"]) as other_tenant,
        fanout.subscribe("probe", ["*"]) as probe,
    ):
        session_created = event("a", "chat_sessions", "s1")
        span_of_session = event("a", "traces", "t1", session_id="s1")
        span_alone = event("a", "traces", "t2")
        chunk_of_session = event("a", "message_streams", "m1", session_id="s1")
        other_session = event("a", "chat_sessions", "s2")
        trace_named_s1 = event("a", "traces", "s1")
        b_session = event("b", "chat_sessions", "s1")
        b_span = event("b", "traces", "t1", session_id="s1")
        appended = [
            session_created,
            span_of_session,
            span_alone,
            chunk_of_session,
            other_session,
            trace_named_s1,
            b_session,
            b_span,
        ]
        for envelope in appended:
            await append(redis, keys, envelope)
        await take_until(probe, await fence(redis, keys, "probe"))

        got = {
            name: deliveries(await drain(sub))
            for name, sub in [
                ("everything", everything),
                ("traces", traces),
                ("aggregate", aggregate),
                ("session", session),
                ("two", two),
                ("other_tenant", other_tenant),
            ]
        }
        expected = {
            "everything": [e for e in appended if e.tenant_id == "a"],
            "traces": [span_of_session, span_alone, trace_named_s1],
            "aggregate": [session_created],
            "session": [session_created, span_of_session, chunk_of_session],
            "two": [span_of_session, other_session],
            "other_tenant": [b_session, b_span],
        }
        for name, items in got.items():
            assert len(items) == len(set(ids(items))), f"{name}: a duplicate delivery"
            assert set(ids(items)) == {e.id for e in expected[name]}, name

    # Decoded and encoded once per event: every subscriber gets the same item,
    # with the position filled in.
    shared = next(d for d in got["everything"] if d.envelope.id == session_created.id)
    assert next(d for d in got["session"] if d.envelope.id == session_created.id) is shared
    assert shared.envelope.position.startswith("chat_sessions.")
    assert shared.data == envelope_encoder.encode(shared.envelope)
    assert msgspec.structs.replace(shared.envelope, position="") == session_created


async def test_bad_topics_and_tokens_are_refused_at_once(settings: Settings, redis: Redis) -> None:
    fanout = fanout_module.Fanout(redis, keys_of(settings), catalog_of(CONTEXTS), settings)
    for topics in ([], ["nope"], ["chat_sessions/"], ["session/"], ["x/1"], ["*"] * 33):
        with pytest.raises(BadRequest):
            fanout.subscribe("a", topics)
    other = encode_cursor({Shard("chat_sessions", settings.shards): (1, 0)})
    for token in ("", "!!!", "bm90IGEgdG9rZW4", other):
        with pytest.raises(BadPosition):
            fanout.subscribe("a", ["*"], token)


def test_vector_tokens_equal_encode_cursor() -> None:
    keys = Keys("x", 3)
    shards = [s for c in ("traces", "chat_sessions", "tools") for s in keys.shards_of(c)]
    vector = Vector(dict.fromkeys(shards, (0, 0)))
    assert vector.token() == encode_cursor(vector.ids)
    for n, shard in enumerate(shards * 3):
        vector.advance(shard, (1_700_000_000_000 + n, n % 3))
        assert vector.token() == encode_cursor(vector.ids)


def test_topics_parse() -> None:
    topics = Topics.parse(["traces", "traces/t1", "session/s"], catalog_of(CONTEXTS))
    assert topics == Topics(
        contexts=frozenset({"traces"}),
        aggregates=frozenset({("traces", "t1")}),
        sessions=frozenset({"s"}),
        session_context="chat_sessions",
    )
    assert Topics.parse(["*"], catalog_of(CONTEXTS)).everything


async def test_resume_continues_after_the_token_while_events_keep_coming(
    settings: Settings, redis: Redis
) -> None:
    keys = keys_of(settings)
    aggregates = [("chat_sessions", "s1"), ("traces", "t1"), ("message_streams", "m1")]
    versions = dict.fromkeys(aggregates, 0)

    async def append_some(n: int) -> list[str]:
        appended = []
        for i in range(n):
            context, aggregate_id = aggregates[i % len(aggregates)]
            versions[context, aggregate_id] += 1
            envelope = event("a", context, aggregate_id, versions[context, aggregate_id])
            await append(redis, keys, envelope)
            appended.append(envelope.id)
        return appended

    async with running(redis, settings) as fanout:
        async with fanout.subscribe("a", ["*"]) as first:
            sent = await append_some(12)
            seen = deliveries(await take(first, 5))
        token = seen[4].token
        sent += await append_some(12)
        async with fanout.subscribe("a", ["*"], token) as resumed, anyio.create_task_group() as tg:
            tg.start_soon(append_some, 12)  # live events while catching up
            rest = deliveries(await take(resumed, len(sent) + 12 - 5))
    got = ids(seen[:5]) + ids(rest)
    assert len(got) == len(set(got)), "a duplicate delivery"
    assert len(got) == 36
    for context, aggregate_id in aggregates:
        mine = [
            d.envelope.aggregate_version
            for d in seen[:5] + rest
            if (d.envelope.context, d.envelope.aggregate_id) == (context, aggregate_id)
        ]
        assert mine == list(range(1, 13)), (context, mine)


async def test_a_token_resumes_exactly_from_every_delivery(
    settings: Settings, redis: Redis
) -> None:
    keys = keys_of(settings)
    appended = [event("a", c, f"x{i}") for i in range(4) for c in CONTEXTS]
    async with running(redis, settings) as fanout:
        async with fanout.subscribe("a", ["*"]) as live:
            for envelope in appended:
                await append(redis, keys, envelope)
            delivered = deliveries(await take(live, len(appended)))
        order = ids(delivered)
        for i, delivery in enumerate(delivered):
            async with fanout.subscribe("a", ["*"], delivery.token) as resumed:
                if i + 1 < len(delivered):
                    rest = deliveries(await take(resumed, len(delivered) - i - 1))
                    assert sorted(ids(rest)) == sorted(order[i + 1 :])
                assert await drain(resumed) == []


async def test_a_stalled_subscriber_is_cut_off_and_the_others_keep_going(
    settings: Settings, redis: Redis
) -> None:
    settings = msgspec.structs.replace(settings, subscriber_buffer=5)
    keys = keys_of(settings)
    async with (
        running(redis, settings) as fanout,
        fanout.subscribe("a", ["*"]) as stalled,
        fanout.subscribe("a", ["*"]) as active,
    ):
        received = []
        for n in range(20):
            envelope = event("a", "traces", "t1", n + 1)
            await append(redis, keys, envelope)
            received += ids(deliveries(await take(active, 1)))
            assert received[-1] == envelope.id
        assert fanout.subscribers == 1
        with pytest.raises(Lagging):
            await anext(stalled)
    assert len(received) == 20


async def test_a_position_beyond_retention_gets_one_reset(settings: Settings, redis: Redis) -> None:
    keys = keys_of(settings)
    stream = keys.event_stream(keys.shard_of("traces", "a", "t1"))
    async with running(redis, settings) as fanout:
        async with fanout.subscribe("a", ["*"]) as sub:
            for n in range(3):
                await append(redis, keys, event("a", "traces", "t1", n + 1))
            token = deliveries(await take(sub, 3))[-1].token
            for n in range(3, 8):
                await append(redis, keys, event("a", "traces", "t1", n + 1))
            await take(sub, 5)  # the fan-out has read them: the resume below joins after them
        await redis.xtrim(stream, maxlen=2, approximate=False)

        async with fanout.subscribe("a", ["*"], token) as resumed:
            [reset] = await take(resumed, 1)
            assert isinstance(reset, Reset)
            assert reset.reason == "beyond_retention"
            latest = event("a", "traces", "t1", 9)
            await append(redis, keys, latest)
            assert ids(deliveries(await take(resumed, 1))) == [latest.id]
        async with fanout.subscribe("a", ["*"], reset.token) as after_reset:
            [delivery] = deliveries(await take(after_reset, 1))
            assert delivery.envelope.id == latest.id


async def test_a_trim_that_spares_the_gap_does_not_reset(settings: Settings, redis: Redis) -> None:
    keys = keys_of(settings)
    stream = keys.event_stream(keys.shard_of("traces", "a", "t1"))
    async with running(redis, settings) as fanout:
        async with fanout.subscribe("a", ["traces"]) as sub:
            for n in range(3):
                await append(redis, keys, event("a", "traces", "t1", n + 1))
            last = deliveries(await take(sub, 3))[-1]
        missed = [event("a", "traces", "t1", n + 1) for n in range(3, 6)]
        for envelope in missed:
            await append(redis, keys, envelope)
        kept_from = last.envelope.position.rsplit(".", 1)[1]
        await redis.xtrim(stream, minid=kept_from, approximate=False)
        async with fanout.subscribe("a", ["traces"], last.token) as resumed:
            items = await take(resumed, 3)
            assert ids(deliveries(items)) == [e.id for e in missed]
            assert len(items) == 3


async def test_a_position_unknown_to_the_streams_gets_a_reset(
    settings: Settings, redis: Redis
) -> None:
    keys = keys_of(settings)
    future = {s: (2**60, 0) for c in CONTEXTS for s in keys.shards_of(c)}
    async with (
        running(redis, settings) as fanout,
        fanout.subscribe("a", ["*"], encode_cursor(future)) as sub,
    ):
        [reset] = await take(sub, 1)
        assert isinstance(reset, Reset)
        assert reset.reason == "unknown_position"
        envelope = event("a", "traces", "t1")
        await append(redis, keys, envelope)
        assert ids(deliveries(await take(sub, 1))) == [envelope.id]


class Retries(logging.Handler):
    """Sets `seen` when the fan-out logs a failed read."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("fanout-read-retry"):
            self.seen.set()


async def test_the_reader_survives_a_redis_error(settings: Settings, redis: Redis) -> None:
    keys = keys_of(settings)
    broken = keys.event_stream(keys.shard_of("traces", "a", "t1"))
    retries = Retries()
    logging.getLogger("eddy.fanout").addHandler(retries)
    try:
        async with running(redis, settings) as fanout, fanout.subscribe("a", ["*"]) as sub:
            await redis.set(broken, "not a stream")  # every XREAD now fails: WRONGTYPE
            with anyio.fail_after(WAIT_S):
                await retries.seen.wait()
            await redis.delete(broken)
            envelope = event("a", "traces", "t1")
            await append(redis, keys, envelope)
            assert ids(deliveries(await take(sub, 1))) == [envelope.id]
    finally:
        logging.getLogger("eddy.fanout").removeHandler(retries)


async def test_the_reader_survives_a_killed_connection(settings: Settings, redis: Redis) -> None:
    keys = keys_of(settings)
    name = f"fanout-{uuid.uuid4().hex[:8]}"
    own = connect(settings.redis_url, client_name=name)
    try:
        async with running(own, settings) as fanout, fanout.subscribe("a", ["*"]) as sub:
            for n in range(3):
                killed = 0
                with anyio.fail_after(WAIT_S):
                    while not killed:
                        clients = await redis.client_list()
                        for client in clients:
                            if client["name"] == name:
                                killed += await redis.client_kill_filter(_id=client["id"])
                envelope = event("a", "traces", "t1", n + 1)
                await append(redis, keys, envelope)
                assert ids(deliveries(await take(sub, 1))) == [envelope.id]
    finally:
        await own.aclose()


async def test_stopping_the_fanout_ends_every_subscription(
    settings: Settings, redis: Redis
) -> None:
    fanout = fanout_module.Fanout(redis, keys_of(settings), catalog_of(CONTEXTS), settings)
    async with anyio.create_task_group() as tg:
        await tg.start(fanout.run)
        async with fanout.subscribe("a", ["*"]) as sub:
            tg.cancel_scope.cancel()
            with (
                anyio.CancelScope(shield=True),
                anyio.fail_after(5),
                pytest.raises(StopAsyncIteration),
            ):
                await anext(sub)


@pytest.mark.parametrize("buffer", [20, 100_000], ids=["buffer-overflow", "send-timeout"])
async def test_a_stalled_sse_client_is_cut_off_and_others_keep_receiving(
    settings: Settings, redis: Redis, buffer: int
) -> None:
    settings = msgspec.structs.replace(settings, subscriber_buffer=buffer, send_timeout_s=0.5)
    keys = keys_of(settings)
    app = feed_app(settings, redis)
    auth = bearer(settings, "a")
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        host, port = base.removeprefix("http://").split(":")
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.settimeout(10)
        stalled.connect((host, int(port)))
        try:
            request = f"GET /v1/events/stream?topic=*&access_token={auth['Authorization'][7:]}"
            stalled.sendall(f"{request} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            async with client.stream(
                "GET", "/v1/events/stream", params={"topic": "*"}, headers=auth
            ) as active:
                stream = frames(active)
                await anext(stream)
                with anyio.fail_after(WAIT_S):
                    while app.state.web.fanout.subscribers < 2:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                big = b'{"text":"' + b"x" * 32_000 + b'"}'
                sent: list[str] = []
                got: list[str] = []
                for n in range(300):  # paced, so the active client is never 20 behind
                    envelope = event("a", "traces", "t1", n + 1, payload=big)
                    await append(redis, keys, envelope)
                    sent.append(envelope.id)
                    if n % 10 == 9:
                        frames_got, _ = await read_events(stream, until=set(sent) - set(got))
                        got += [f.envelope.id for f in frames_got]
                assert got == sent
                with anyio.fail_after(WAIT_S):
                    while app.state.web.fanout.subscribers > 1:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
            # The stalled response was ended (or its connection closed), after a part.
            received = await anyio.to_thread.run_sync(_read_to_end, stalled)
            assert 0 < received < 300 * 32_000
        finally:
            stalled.close()


def _read_to_end(sock: socket.socket) -> int:
    """Bytes read until the response's last chunk, or until the server closed."""
    total = 0
    tail = b""
    while chunk := sock.recv(1 << 16):
        total += len(chunk)
        tail = (tail + chunk)[-5:]
        if tail == b"0\r\n\r\n":
            break
    return total
