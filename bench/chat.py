"""Chat streaming latency: one message streamed chunk by chunk over a WebSocket
at a steady rate, timed from the push frame's send to its event's arrival at a
WebSocket subscriber and at an SSE subscriber (by the chunk's command id)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect

from bench import load

_encoder = msgspec.json.Encoder()


class _EventFrame(msgspec.Struct):
    op: str
    event: load._Frame | None = None


_frame_decoder = msgspec.json.Decoder(_EventFrame)


async def open_stream(base: str, token: str) -> str:
    """A new chat session and a message stream in it; the stream's id."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=f"http://{base}", headers=headers, timeout=10) as http:
        r = await http.post(
            "/v1/commands/CreateChatSession?wait=5",
            json={
                "agent_id": "bench",
                "participants": [{"participant_id": "bot", "role": "agent"}],
            },
        )
        r.raise_for_status()
        r = await http.post(
            "/v1/commands/StartMessageStream?wait=5",
            json={"session_id": r.json()["session_id"], "participant_id": "bot"},
        )
        r.raise_for_status()
        return str(r.json()["stream_id"])


async def _read_ws(socket: ClientConnection, received: dict[str, float]) -> None:
    async for raw in socket:
        frame = _frame_decoder.decode(raw)
        if frame.op == "event" and frame.event is not None:
            received[frame.event.metadata.command_id] = time.perf_counter()


async def _discard(socket: ClientConnection) -> None:
    async for _ in socket:  # accepted / result frames: read, so the server never blocks
        pass


Paced = Callable[[Callable[[str], Awaitable[object]], dict[str, float]], Awaitable[None]]


async def stream_chunks(base: str, token: str, paced: Paced) -> dict[str, dict[str, float]]:
    """Push chunks through `paced(push, received_by_ws)`; every subscriber's arrivals
    and the send times, by command id."""
    stream_id = await open_stream(base, token)
    topic = f"message_streams/{stream_id}"
    by_ws: dict[str, float] = {}
    by_sse: dict[str, float] = {}
    sent: dict[str, float] = {}
    sse_ready = asyncio.Event()
    url = f"ws://{base}/v1/ws?access_token={token}"
    sse_url = f"http://{base}/v1/events/stream?topic={topic}"
    async with connect(url) as subscriber, connect(url) as pusher:
        await subscriber.send(_encoder.encode({"op": "subscribe", "topic": topic}).decode())
        reply = msgspec.json.decode(await subscriber.recv())
        if reply.get("op") != "subscribed":
            raise RuntimeError(f"subscribe failed: {reply}")
        seqs = itertools.count(1)

        async def push(key: str) -> None:
            sent[key] = time.perf_counter()
            payload = {"stream_id": stream_id, "seq": next(seqs), "chunk": "tok "}
            frame = {"op": "command", "type": "PushStreamMessage", "id": key, "payload": payload}
            await pusher.send(_encoder.encode(frame).decode())

        async with asyncio.TaskGroup() as tg:
            readers = [
                tg.create_task(_read_ws(subscriber, by_ws)),
                tg.create_task(_discard(pusher)),
                tg.create_task(load.read_sse(sse_url, token, by_sse, sse_ready)),
            ]
            await asyncio.wait_for(sse_ready.wait(), 10)
            await paced(push, by_ws)
            for _ in range(500):  # the SSE subscriber may still be catching up
                if len(by_sse.keys() & sent.keys()) == len(sent):
                    break
                await asyncio.sleep(0.01)
            for reader in readers:
                reader.cancel()
    return {"sent": sent, "ws": by_ws, "sse": by_sse}


def latencies(sent: dict[str, float], received: dict[str, float]) -> list[float]:
    return [received[k] - t for k, t in sent.items() if k in received]
