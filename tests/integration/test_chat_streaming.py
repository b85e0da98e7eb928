"""Chat streaming end to end: one client pushes 500 chunks of a message; every
other subscriber sees them live, in `seq` order, none lost or repeated, and the
session's transcript holds exactly their concatenation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import msgspec

from tests.sockets import opened
from tests.sse import frames
from tests.stack import Stack

CHUNKS = 500
WITHIN_S = 60


def chunk(seq: int) -> str:
    """Token-like chunks, some multi-byte and some only whitespace."""
    return ("é" if seq % 7 == 0 else "") + (" " if seq % 5 == 0 else f"tok{seq} ")


async def ready_stream(stack: Stack) -> tuple[str, str]:
    c, auth = stack.client, stack.auth()
    r = await c.post(
        "/v1/commands/CreateChatSession?wait=5",
        json={"agent_id": "a", "participants": [{"participant_id": "bot", "role": "agent"}]},
        headers=auth,
    )
    session_id = r.json()["session_id"]
    r = await c.post(
        "/v1/commands/StartMessageStream?wait=5",
        json={"session_id": session_id, "participant_id": "bot"},
        headers=auth,
    )
    assert r.status_code == 200, r.text
    return session_id, r.json()["stream_id"]


@asynccontextmanager
async def sse_subscriber(stack: Stack, topic: str) -> AsyncIterator[AsyncIterator[Any]]:
    """An SSE subscription (subscribed once this yields): its envelopes as dicts."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=WITHIN_S) as client:
        headers = {**stack.auth(roles=("observer",)), "Accept": "text/event-stream"}
        async with client.stream(
            "GET", "/v1/events/stream", params={"topic": topic}, headers=headers
        ) as response:
            assert response.status_code == 200

            async def envelopes() -> AsyncIterator[Any]:
                async for frame in frames(response):
                    if frame.data is not None and frame.event != "reset":
                        yield msgspec.json.decode(frame.data)

            yield envelopes()


async def until_stopped(envelopes: AsyncIterator[Any], stream_id: str) -> list[tuple[int, str]]:
    """The (seq, chunk) of every pushed chunk of the stream, until it stops."""
    seen = []
    async for envelope in envelopes:
        if envelope["aggregate_id"] != stream_id:
            continue
        if envelope["type"] == "StreamMessagePushed":
            seen.append((envelope["payload"]["seq"], envelope["payload"]["chunk"]))
        elif envelope["type"] == "MessageStreamStopped":
            return seen
    raise AssertionError("the feed ended before the stream stopped")


async def check_transcript(stack: Stack, session_id: str, stream_id: str, position: str) -> None:
    r = await stack.client.get(
        f"/v1/chat-sessions/{session_id}/transcript",
        params={"after": position},
        headers=stack.auth(),
    )
    assert r.status_code == 200, r.text
    (block,) = r.json()["blocks"]
    assert block["stream_id"] == stream_id
    assert block["text"] == "".join(chunk(seq) for seq in range(1, CHUNKS + 1))


EXPECTED = [(seq, chunk(seq)) for seq in range(1, CHUNKS + 1)]


async def test_500_chunks_pushed_over_http_reach_every_subscriber_in_order(stack) -> None:
    session_id, stream_id = await ready_stream(stack)
    results: dict[str, list[tuple[int, str]]] = {}
    async with (
        sse_subscriber(stack, f"session/{session_id}") as by_session,
        sse_subscriber(stack, f"message_streams/{stream_id}") as by_stream,
    ):
        with anyio.fail_after(WITHIN_S):
            async with anyio.create_task_group() as tg:

                async def collect(name: str, envelopes: AsyncIterator[Any]) -> None:
                    results[name] = await until_stopped(envelopes, stream_id)

                tg.start_soon(collect, "session", by_session)
                tg.start_soon(collect, "stream", by_stream)
                auth = stack.auth()
                for seq in range(1, CHUNKS + 1):
                    r = await stack.client.post(
                        "/v1/commands/PushStreamMessage",
                        json={"stream_id": stream_id, "seq": seq, "chunk": chunk(seq)},
                        headers=auth,
                    )
                    assert r.status_code == 202, r.text
                r = await stack.client.post(
                    "/v1/commands/StopMessageStream?wait=10",
                    json={"stream_id": stream_id},
                    headers=auth,
                )
                assert r.status_code == 200, r.text
                stopped_at = r.json()["position"]
    assert results["session"] == EXPECTED
    assert results["stream"] == EXPECTED
    await check_transcript(stack, session_id, stream_id, stopped_at)


@asynccontextmanager
async def ws_subscriber(stack: Stack, topic: str) -> AsyncIterator[AsyncIterator[Any]]:
    """A WebSocket subscription (subscribed once this yields): its envelopes."""
    async with opened(stack, roles=("observer",)) as client:
        answer = await client.ask({"op": "subscribe", "topic": topic})
        assert answer["op"] == "subscribed", answer

        async def envelopes() -> AsyncIterator[Any]:
            while True:
                frame = await client.next()
                if frame["op"] == "event":
                    yield frame["event"]

        yield envelopes()


async def test_500_chunks_pushed_over_a_websocket_reach_every_subscriber_in_order(stack) -> None:
    session_id, stream_id = await ready_stream(stack)
    results: dict[str, list[tuple[int, str]]] = {}
    async with (
        ws_subscriber(stack, f"session/{session_id}") as over_ws,
        sse_subscriber(stack, f"message_streams/{stream_id}") as over_sse,
        opened(stack) as pusher,
    ):
        with anyio.fail_after(WITHIN_S):
            async with anyio.create_task_group() as tg:

                async def collect(name: str, envelopes: AsyncIterator[Any]) -> None:
                    results[name] = await until_stopped(envelopes, stream_id)

                tg.start_soon(collect, "ws", over_ws)
                tg.start_soon(collect, "sse", over_sse)
                # Pushed without waiting for any answer, as a token stream would be.
                for seq in range(1, CHUNKS + 1):
                    payload = {"stream_id": stream_id, "seq": seq, "chunk": chunk(seq)}
                    await pusher.send(
                        {"op": "command", "type": "PushStreamMessage", "payload": payload}
                    )
                stopped = await pusher.command("StopMessageStream", {"stream_id": stream_id})
                assert stopped["status"] == "processed", stopped
    results_of_pushes = [f for f in pusher.skipped if f["op"] == "result"]
    assert len(results_of_pushes) == CHUNKS
    assert all(f["status"] == "processed" for f in results_of_pushes)
    assert results["ws"] == EXPECTED
    assert results["sse"] == EXPECTED
    await check_transcript(stack, session_id, stream_id, stopped["position"])
