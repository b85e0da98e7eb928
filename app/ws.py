"""`GET /v1/ws`: subscriptions and command submission over one WebSocket (API.md,
section "WebSocket").

Deliberate choices:

- The token is checked once, when the socket opens (header or `?access_token=`).
  A missing or bad one is accepted and then closed with 1008, so a browser sees
  the code (a refused handshake shows as 1006). A token that expires later does
  not end an open socket.
- Client frames are one tagged union decoded once by one `msgspec` decoder; a
  command's payload stays `Raw` until its type is known, then goes through the
  same pipeline as `POST /v1/commands/{type}` (`app/submission.py`): same checks in
  the same order, same error codes, same idempotency by id.
  A bad frame gets an error frame and the socket stays open; `error_frame` is the
  one place an error becomes a frame. The WS-only refusals (`already_subscribed`,
  `not_subscribed`, `too_many_subscriptions`, `too_many_pending`) are `Refused`.
- One task group per socket: the receive loop (the socket's own task), one pump
  per subscription, one result watcher. Leaving the group (disconnect, close,
  send timeout) cancels them all, and each pump's `async with subscription`
  takes it out of the fan-out. Unsubscribing cancels that pump and waits for it,
  so `unsubscribed` follows the topic's last event frame.
- Frames are handled one at a time: a command frame's submission is awaited
  before the next frame is read, so the commands one socket sends for an
  aggregate are accepted (and applied) in the order sent. A socket's commands
  take one bus round trip each; the bus batches those of all sockets together.
  A subscribe is answered once the subscription has joined the fan-out: a
  command sent after `subscribed` has its events delivered.
- Results: no task per command. One watcher per socket polls the statuses of
  its pending commands in one batch (`bus.statuses`), every ~2 ms while results
  keep coming, backing off to 50 ms while none do, and sends `result` frames in
  the order it sees commands finish (bounded by `EDDY_WS_MAX_PENDING`).
- Event frames are built around the envelope JSON the fan-out encoded once per
  event, without decoding or encoding it again. `position` (an extension) is
  the subscription's resumable token after that event, for `since`; a `Reset`
  of the fan-out becomes a `reset` frame (extension) with where delivery goes on.
- All sends go through one writer (`_send`): one lock, each send bounded by
  `send_timeout_s`. A send that times out ends the socket without a close frame
  (it would stall too). A subscription more than `subscriber_buffer` events
  behind (`Lagging`), or whose catch-up read fails, closes the socket with 1013:
  the client reconnects and resumes each topic with `since`. Either way the
  connection is then aborted (`app.transport.abort`): a plain close waits for a
  stalled client to read what is still unsent, forever. A client over its frame rate (token bucket:
  `EDDY_WS_FRAMES_PER_S`, burst `EDDY_WS_BURST`) is closed with 1008; the burst
  lets a client push hundreds of chunks at once.
- A command frame also counts against the tenant's rate of commands, shared with
  HTTP and every web process (`app/limits.py`), checked first as over HTTP: over
  it, a `rate_limited` error frame (with `retry_after_s`) and the socket stays
  open; the tenant's other clients must not lose their sockets to one flooding.
- Frames over `EDDY_MAX_BODY_BYTES` get `too_large`; uvicorn's own limit
  (16 MiB) closes the socket with 1009 above that. A text frame that is not
  UTF-8 is closed by the WebSocket protocol layer with 1007 before Eddy sees it
  (RFC 6455 §8.1 requires failing the connection): a protocol violation, not a
  bad frame, so it is the one bad input that costs a socket besides those.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from anyio.lowlevel import checkpoint
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.auth import Principal, authenticate
from app.cors import websocket_allowed
from app.limits import TokenBucket
from app.submission import accept
from app.submission import decode as decode_json
from app.transport import abort
from app.webprocess import WebProcess
from core.errors import (
    EddyError,
    Invalid,
    Malformed,
    Refused,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from core.outages import FAILED
from streams.bus import FINAL, CommandStatus
from streams.fanout import Delivery, Item, Lagging, Reset, Subscription

log = logging.getLogger("eddy.ws")

POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
SERVICE_RESTART = 1012
MAX_REASON_BYTES = 123
"""The longest close reason a close frame can carry."""
POLL_FIRST_S = 0.002
POLL_CAP_S = 0.05


# -- client frames ------------------------------------------------------------


class Frame(msgspec.Struct, frozen=True, kw_only=True, tag_field="op"):
    ref: str | None = None


class Subscribe(Frame, frozen=True, kw_only=True, tag="subscribe"):
    topic: str
    since: str | None = None


class Unsubscribe(Frame, frozen=True, kw_only=True, tag="unsubscribe"):
    topic: str


class SubmitCommand(Frame, frozen=True, kw_only=True, tag="command"):
    type: str
    payload: msgspec.Raw
    id: str | None = None


class Ping(Frame, frozen=True, kw_only=True, tag="ping"):
    pass


class Ref(msgspec.Struct, frozen=True):
    """Just the `ref` of a frame that did not decode, for its error frame."""

    ref: Any = None


ClientFrame = Subscribe | Unsubscribe | SubmitCommand | Ping
_decoder: msgspec.json.Decoder[ClientFrame] = msgspec.json.Decoder(ClientFrame)
_ref_decoder = msgspec.json.Decoder(Ref)
_encoder = msgspec.json.Encoder()


def decode(message: Message, limit: int) -> ClientFrame:
    """The frame in a `websocket.receive` message; `Malformed`, `TooLarge` or `Invalid`."""
    text: str | None = message.get("text")
    if text is None:
        raise Malformed("binary frames are not accepted: send JSON text frames")
    size = len(text) if text.isascii() else len(text.encode())
    if size > limit:
        raise TooLarge(f"frame is {size} bytes; the limit is {limit}")
    return decode_json(_decoder, text, "a frame", "bad frame")


def ref_of(message: Message) -> str | None:
    """The `ref` of a frame that did not decode as a whole, if it has a string one."""
    try:
        ref = _ref_decoder.decode(message.get("text") or b"").ref
    except msgspec.DecodeError:  # ValidationError included
        return None
    return ref if isinstance(ref, str) else None


# -- server frames --------------------------------------------------------------


def error_frame(exc: EddyError, ref: str | None) -> dict[str, Any]:
    """The one place an error becomes a frame: the code and details HTTP would answer."""
    frame: dict[str, Any] = {"op": "error"}
    if ref is not None:
        frame["ref"] = ref
    frame["error"] = {"code": exc.code, "message": exc.message, **exc.details}
    return frame


def result_frame(status: CommandStatus, ref: str | None) -> dict[str, Any]:
    """What `GET /v1/commands/{id}` answers, as a `result` frame."""
    return {"op": "result", "ref": ref, **status.public()}


def render(head: bytes, topic: bytes, item: Item) -> bytes:
    """An `event` frame around the envelope JSON as the fan-out encoded it
    (`head` is the frame's start up to `"event":`), or a `reset` frame."""
    match item:
        case Delivery(token=token, data=data):
            return b"".join((head, data, b',"position":', _encoder.encode(token), b"}"))
        case Reset(token=token, reason=reason):
            return b"".join(
                (
                    b'{"op":"reset","topic":',
                    topic,
                    b',"position":',
                    _encoder.encode(token),
                    b',"reason":',
                    _encoder.encode(reason),
                    b"}",
                )
            )


def close_reason(text: str) -> str:
    return text.encode()[:MAX_REASON_BYTES].decode(errors="ignore")


# -- the socket --------------------------------------------------------------------


@dataclass
class Pump:
    """A running subscription: cancel `scope` to end it; `done` once it has left."""

    scope: anyio.CancelScope
    done: anyio.Event


class Endpoint:
    """`GET /v1/ws` as an ASGI app (Starlette hands a function a `WebSocket` only):
    the socket keeps the connection's `receive`, to abort it (`app.transport`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        web: WebProcess = websocket.app.state.web
        if not websocket_allowed(web.origins, websocket.headers, websocket.url.scheme):
            log.info("ws-origin-refused origin=%s", websocket.headers.get("origin", "")[:200])
            await websocket.close(POLICY_VIOLATION)  # before accepting: HTTP 403
            return
        await websocket.accept()
        try:
            principal = authenticate(websocket, web.settings.jwt_secret, allow_query_token=True)
        except Unauthenticated as exc:
            with contextlib.suppress(WebSocketDisconnect):
                await websocket.close(POLICY_VIOLATION, close_reason(exc.message))
            return
        web.metrics.ws_connections.inc()
        try:
            await Socket(websocket, receive, principal, web).run()
        finally:
            web.metrics.ws_connections.dec()


endpoint = Endpoint()


class Socket:
    """One authenticated WebSocket: its subscriptions, pending commands and writer."""

    def __init__(
        self, websocket: WebSocket, receive: Receive, principal: Principal, web: WebProcess
    ) -> None:
        self.websocket = websocket
        self.receive = receive
        self.principal = principal
        self.web = web
        self.settings = web.settings
        self._pumps: dict[str, Pump] = {}
        self._pending: dict[str, list[str | None]] = {}
        """Command id → the refs of the command frames awaiting its result."""
        self._pending_count = 0
        self._arrived = anyio.Event()
        self._lock = anyio.Lock(fast_acquire=True)
        self._open = True
        """Whether frames may still be sent."""
        self._closing: tuple[int, str] | None = None
        self._tg: TaskGroup | None = None
        self._frames_in = web.metrics.ws_frames.labels("in")
        self._frames_out = web.metrics.ws_frames.labels("out")

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._watch_results)
            await self._receive()
            tg.cancel_scope.cancel()
        if self._closing is not None and self._open:
            code, reason = self._closing
            self._open = False
            with anyio.move_on_after(self.settings.send_timeout_s) as timeout:
                with contextlib.suppress(WebSocketDisconnect):
                    await self.websocket.close(code, close_reason(reason))
            if timeout.cancelled_caught or code == TRY_AGAIN_LATER:
                abort(self.receive)  # a client behind: what it has not taken is gone

    def _end(self, code: int | None, reason: str = "") -> None:
        """End the socket: close it with `code` (None: without a close frame)."""
        if code is None:
            self._open = False
        elif self._closing is None:
            self._closing = (code, reason)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def _send(self, frame: bytes) -> None:
        """The one writer: one frame at a time, each within `send_timeout_s`."""
        async with self._lock:
            if not self._open:
                await checkpoint()
                return
            with anyio.move_on_after(self.settings.send_timeout_s) as timeout:
                try:
                    await self.websocket.send({"type": "websocket.send", "text": frame.decode()})
                except WebSocketDisconnect:
                    self._end(None)
            if timeout.cancelled_caught:
                log.info("ws-send-timeout tenant=%s", self.principal.tenant)
                abort(self.receive)
                self._end(None)
        if self._open:
            self._frames_out.inc()
        else:
            await checkpoint()  # we are cancelled: stop here

    async def _reply(self, frame: dict[str, Any]) -> None:
        await self._send(_encoder.encode(frame))

    async def _receive(self) -> None:
        bucket = TokenBucket(self.settings.ws_frames_per_s, self.settings.ws_burst)
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                self._open = False
                return
            self._frames_in.inc()
            if not bucket.take():
                log.info("ws-flooding tenant=%s", self.principal.tenant)
                limit = f"{self.settings.ws_frames_per_s:g}/s, burst {self.settings.ws_burst}"
                self._end(POLICY_VIOLATION, f"too many frames: over {limit}")
                return
            frame: ClientFrame | None = None
            try:
                frame = decode(message, self.settings.max_body_bytes)
                await self._handle(frame)
            except Invalid as exc:
                await self._reply(error_frame(exc, ref_of(message) if frame is None else frame.ref))
            except EddyError as exc:
                await self._reply(error_frame(exc, None if frame is None else frame.ref))

    async def _handle(self, frame: ClientFrame) -> None:
        match frame:
            case Ping(ref=ref):
                await self._reply({"op": "pong", "ref": ref})
            case Subscribe(topic=topic, since=since, ref=ref):
                await self._subscribe(topic, since, ref)
            case Unsubscribe(topic=topic, ref=ref):
                await self._unsubscribe(topic, ref)
            case SubmitCommand():
                await self._submit(frame)

    # -- subscriptions -------------------------------------------------------------

    async def _subscribe(self, topic: str, since: str | None, ref: str | None) -> None:
        if topic in self._pumps:
            raise Refused("already_subscribed", f"already subscribed to {topic!r}")
        if len(self._pumps) >= self.settings.ws_max_subscriptions:
            limit = self.settings.ws_max_subscriptions
            raise Refused("too_many_subscriptions", f"at most {limit} subscriptions per socket")
        subscription = self.web.fanout.subscribe(self.principal.tenant, [topic], since)
        pump = Pump(anyio.CancelScope(), anyio.Event())
        self._pumps[topic] = pump
        assert self._tg is not None
        await self._tg.start(self._pump, topic, subscription, ref, pump)

    async def _unsubscribe(self, topic: str, ref: str | None) -> None:
        pump = self._pumps.pop(topic, None)
        if pump is None:
            raise Refused("not_subscribed", f"not subscribed to {topic!r}")
        pump.scope.cancel()
        await pump.done.wait()
        await self._reply({"op": "unsubscribed", "ref": ref, "topic": topic})

    async def _pump(
        self,
        topic: str,
        subscription: Subscription,
        ref: str | None,
        pump: Pump,
        *,
        task_status: TaskStatus[None],
    ) -> None:
        """Join the fan-out, say `subscribed`, then send every item as it comes."""
        tenant = self.principal.tenant
        try:
            with pump.scope:
                async with subscription:
                    await self._reply(
                        {
                            "op": "subscribed",
                            "ref": ref,
                            "topic": topic,
                            "position": subscription.position,
                        }
                    )
                    task_status.started()
                    encoded = _encoder.encode(topic)
                    head = b'{"op":"event","topic":' + encoded + b',"event":'
                    async for batch in subscription:
                        for item in batch:
                            await self._send(render(head, encoded, item))
                # the fan-out stopped: this process is shutting down
                self._end(SERVICE_RESTART, "the server is restarting; reconnect, resume with since")
        except Lagging:
            log.info("ws-lagging tenant=%s topic=%s", tenant, topic)
            limit = self.settings.subscriber_buffer
            self._end(TRY_AGAIN_LATER, f"{topic}: over {limit} events behind; resume with since")
        except FAILED as exc:
            log.warning("ws-catch-up-failed tenant=%s topic=%s error=%r", tenant, topic, exc)
            self._end(TRY_AGAIN_LATER, f"{topic}: catching up failed; resume with since")
        finally:
            pump.done.set()
            if self._pumps.get(topic) is pump:
                del self._pumps[topic]

    # -- commands --------------------------------------------------------------------

    async def _submit(self, frame: SubmitCommand) -> None:
        """Accept a command as `POST /v1/commands/{type}` does (`app/submission.py`),
        once the tenant's rate and the socket's pending commands allow it."""
        await self.web.limits.tenants.take("commands", self.principal.tenant)
        if self._pending_count >= self.settings.ws_max_pending:
            limit = self.settings.ws_max_pending
            raise Refused("too_many_pending", f"at most {limit} commands awaiting their result")
        accepted = await accept(
            self.web,
            self.principal,
            frame.type,
            bytes(frame.payload),
            command_id=None if frame.id is None else (frame.id, "id"),
        )
        command_id = accepted.command_id
        await self._reply(
            {"op": "accepted", "ref": frame.ref, "command_id": command_id, **accepted.ids()}
        )
        self._pending.setdefault(command_id, []).append(frame.ref)
        self._pending_count += 1
        self._arrived.set()

    async def _watch_results(self) -> None:
        """Poll the pending commands' statuses in batches; send each final one's result."""
        bus, tenant = self.web.bus, self.principal.tenant
        delay = POLL_FIRST_S
        while True:
            with anyio.move_on_after(delay if self._pending else math.inf):
                await self._arrived.wait()
                delay = POLL_FIRST_S
                await anyio.sleep(POLL_FIRST_S)  # let a burst gather before polling
            self._arrived = anyio.Event()
            if not self._pending:
                continue
            ids = list(self._pending)
            try:
                statuses = await bus.statuses(tenant, ids)
            except Unavailable as exc:
                log.warning("ws-results-unavailable tenant=%s error=%s", tenant, exc.message)
                delay = POLL_CAP_S
                continue
            finished = [s for s in statuses if s is not None and s.status in FINAL]
            for status in finished:
                refs = self._pending.pop(status.command_id)
                self._pending_count -= len(refs)
                for ref in refs:
                    await self._reply(result_frame(status, ref))
            delay = POLL_FIRST_S if finished else min(delay * 2, POLL_CAP_S)
