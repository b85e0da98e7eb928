"""`GET /v1/events/stream`: Server-Sent Events from the fan-out (API.md, section
"Server-Sent Events").

Deliberate choices:

- Not sse-starlette. Its `EventSourceResponse` writes once per event (25-30k
  deliveries/s in LIMITS.md); `EventStream` writes everything a subscription has
  queued in one `send` per wake-up (~300k/s there), and renders frames from the
  envelope JSON the fan-out encoded once per event.
- Everything that can be refused is refused before the response starts, as a JSON
  error: the token (401), the topics and the position (400), a fan-out that is not
  running yet (503). The subscription joins the fan-out before the response
  starts too, so a client that has the headers is subscribed.
- The first frame is `id: <position>` with no data: a browser `EventSource` takes
  the id (and sends it back as `Last-Event-ID`) without dispatching an event, so
  even a client that saw no event yet reconnects without a gap. `Last-Event-ID`
  wins over `?last_event_id=`, because an EventSource reconnects to its original
  URL with the header.
- A position beyond retention gets one `event: reset` frame whose id is where
  delivery continues and whose data is `{"reason", "position"}`.
- Every send is bounded by `send_timeout_s`. A stalled client is cut off when a
  send times out, or when its subscription's buffer overflows (`Lagging`): the
  response just ends, and an EventSource reconnects with its last id and catches
  up from Redis. A client cut off has its connection aborted (`abort`) after
  the last write (none after a send timeout: it would stall too): a plain close
  waits for the unsent data to drain, which for a client that stopped reading is
  never, and would keep its socket and buffers forever. What the kernel already
  holds still goes out before the end, to a client that reads.
- One task group per response: the stream, and a listener for `http.disconnect`;
  whichever ends first cancels the other, and leaving the subscription's
  `async with` takes it out of the fan-out.
"""

from __future__ import annotations

import logging

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.auth import authenticate
from app.transport import abort
from core.outages import FAILED
from core.settings import Settings
from streams.fanout import Delivery, Fanout, Item, Lagging, Reset, Subscription

log = logging.getLogger("eddy.sse")

KEEPALIVE = b": keepalive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def event_stream(request: Request) -> Response:
    """`GET /v1/events/stream?topic=T[&topic=T2]`, resumable with `Last-Event-ID`."""
    settings: Settings = request.app.state.web.settings
    principal = authenticate(request, settings.jwt_secret, allow_query_token=True)
    fanout: Fanout = request.app.state.web.fanout
    since = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    topics = request.query_params.getlist("topic")
    subscription = fanout.subscribe(principal.tenant, topics, since or None)
    return EventStream(subscription, settings.sse_keepalive_s, settings.send_timeout_s)


def render(batch: list[Item]) -> bytes:
    """Every item of a batch as SSE frames, in one buffer.

    Tokens, event types and compact JSON never contain a newline, so no field
    needs splitting.
    """
    parts: list[bytes] = []
    for item in batch:
        match item:
            case Delivery(token=token, envelope=envelope, data=data):
                parts += (b"id: ", token.encode(), b"\nevent: ", envelope.type.encode())
                parts += (b"\ndata: ", data, b"\n\n")
            case Reset(token=token, reason=reason):
                data = msgspec.json.encode({"reason": reason, "position": token})
                parts += (b"id: ", token.encode(), b"\nevent: reset\ndata: ", data, b"\n\n")
    return b"".join(parts)


class EventStream(Response):
    """The streaming response of one subscription."""

    media_type = "text/event-stream"

    def __init__(self, subscription: Subscription, keepalive_s: float, send_timeout_s: float):
        self.subscription = subscription
        self.keepalive_s = keepalive_s
        self.send_timeout_s = send_timeout_s
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.subscription:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with anyio.create_task_group() as tg:

                async def stream_then_cancel() -> None:
                    if await self._stream(send):
                        abort(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream_then_cancel)
                await _disconnected(receive)
                tg.cancel_scope.cancel()

    async def _stream(self, send: Send) -> bool:
        """Stream until the subscription ends; True if the client is cut off (a
        write timed out, or it fell too far behind)."""
        subscription = self.subscription
        chunk = b"id: %s\n\n" % subscription.position.encode()
        try:
            while await self._write(send, chunk):
                batch: list[Item] | None = None
                with anyio.move_on_after(self.keepalive_s):
                    batch = await anext(subscription)
                chunk = KEEPALIVE if batch is None else render(batch)
            log.info("sse-send-timeout tenant=%s", subscription.tenant_id)
            return True
        except Lagging:
            log.info("sse-lagging tenant=%s", subscription.tenant_id)
            await self._write(send, b"", more_body=False)
            return True
        except StopAsyncIteration:
            pass  # the fan-out stopped: end the response, the client reconnects
        except FAILED as exc:
            log.warning("sse-catch-up-failed tenant=%s error=%r", subscription.tenant_id, exc)
        return not await self._write(send, b"", more_body=False)

    async def _write(self, send: Send, body: bytes, *, more_body: bool = True) -> bool:
        """Send one chunk within the send timeout; False if it did not go out in time."""
        with anyio.move_on_after(self.send_timeout_s):
            await send({"type": "http.response.body", "body": body, "more_body": more_body})
            return True
        return False


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
