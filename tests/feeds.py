"""Feeding and reading the fan-out inside a test: events appended straight to the
event streams (as the worker does), a running `Fanout`, fences, a real uvicorn
server with the SSE route, and reading its events (`tests/sse.py` parses them)."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from types import SimpleNamespace

import anyio
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import sse
from app.auth import issue_token
from app.registry import SYSTEM
from core.catalog import Catalog
from core.errors import EddyError
from core.messages import Envelope, Metadata, utcnow
from core.settings import Settings
from streams.connection import Redis
from streams.fanout import Delivery, Fanout, Item, Subscription
from streams.keys import Keys
from tests.sse import Frame

CONTEXTS = ("chat_sessions", "message_streams", "tools", "traces")
"""The contexts these tests' fan-outs read (not every one of the system's)."""
WAIT_S = 10
"""How long a test waits for what it expects before it fails."""


def keys_of(settings: Settings) -> Keys:
    return Keys.of(settings)


def catalog_of(contexts: Sequence[str]) -> Catalog:
    """A catalog of the system's contexts named in `contexts`."""
    return Catalog([c for c in SYSTEM.contexts if c.name in contexts])


def event(
    tenant: str,
    context: str,
    aggregate_id: str,
    version: int = 1,
    *,
    session_id: str | None = None,
    type_name: str = "Happened",
    payload: bytes = b'{"n":1}',
) -> Envelope:
    return Envelope(
        id=str(uuid.uuid4()),
        type=type_name,
        schema_version=1,
        context=context,
        aggregate_id=aggregate_id,
        aggregate_version=version,
        tenant_id=tenant,
        occurred_at=utcnow(),
        payload=msgspec.Raw(payload),
        metadata=Metadata(
            command_id="c", correlation_id="c", causation_id="c", actor="t", session_id=session_id
        ),
    )


async def append(redis: Redis, keys: Keys, envelope: Envelope) -> str:
    """XADD an envelope to its aggregate's event stream; the entry id."""
    shard = keys.shard_of(envelope.context, envelope.tenant_id, envelope.aggregate_id)
    entry_id = await redis.xadd(keys.event_stream(shard), {"e": msgspec.json.encode(envelope)})
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


async def fence(
    redis: Redis,
    keys: Keys,
    tenant: str,
    contexts: Sequence[str] = CONTEXTS,
    *,
    session_id: str | None = None,
) -> set[str]:
    """Append one `Fence` event of `tenant` to every shard of every context.

    Streams are read in order, so once a `*` (or `session/<session_id>`)
    subscriber of `tenant` has every fence, every event appended before them has
    been published.
    """
    ids: set[str] = set()
    for context in contexts:
        missing = set(range(keys.shards))
        n = 0
        while missing:
            aggregate_id = f"fence-{n}"
            n += 1
            shard = keys.shard_of(context, tenant, aggregate_id)
            if shard.number in missing:
                missing.discard(shard.number)
                envelope = event(
                    tenant, context, aggregate_id, session_id=session_id, type_name="Fence"
                )
                await append(redis, keys, envelope)
                ids.add(envelope.id)
    return ids


@asynccontextmanager
async def running(
    redis: Redis, settings: Settings, contexts: Sequence[str] = CONTEXTS
) -> AsyncIterator[Fanout]:
    fanout = Fanout(redis, keys_of(settings), catalog_of(contexts), settings)
    async with anyio.create_task_group() as tg:
        await tg.start(fanout.run)
        yield fanout
        tg.cancel_scope.cancel()


def deliveries(items: Sequence[Item]) -> list[Delivery]:
    return [item for item in items if isinstance(item, Delivery)]


async def take(subscription: Subscription, n: int) -> list[Item]:
    """At least `n` items (whole batches), waiting up to `WAIT_S`."""
    items: list[Item] = []
    with anyio.fail_after(WAIT_S):
        while len(items) < n:
            items += await anext(subscription)
    return items


async def take_until(subscription: Subscription, ids: set[str]) -> list[Item]:
    """Items until every event id in `ids` has arrived."""
    items: list[Item] = []
    missing = set(ids)
    with anyio.fail_after(WAIT_S):
        while missing:
            batch = await anext(subscription)
            items += batch
            missing -= {d.envelope.id for d in deliveries(batch)}
    return items


async def drain(subscription: Subscription) -> list[Item]:
    """Whatever is buffered now, without waiting for more."""
    items: list[Item] = []
    while True:
        batch: list[Item] | None = None
        with anyio.move_on_after(0):
            batch = await anext(subscription)
        if batch is None:
            return items
        items += batch


# -- a real server ---------------------------------------------------------------


async def eddy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EddyError)
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, exc.status)


def feed_app(settings: Settings, redis: Redis, contexts: Sequence[str] = CONTEXTS) -> Starlette:
    """The SSE route and the fan-out in the lifespan, as `app.web` has them."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fanout = Fanout(redis, keys_of(settings), catalog_of(contexts), settings)
        app.state.web = SimpleNamespace(settings=settings, fanout=fanout)
        async with anyio.create_task_group() as tg:
            await tg.start(fanout.run)
            yield
            tg.cancel_scope.cancel()

    return Starlette(
        routes=[Route("/v1/events/stream", sse.event_stream, methods=["GET"])],
        lifespan=lifespan,
        exception_handlers={EddyError: eddy_error},
    )


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (the test owns the process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on a free port; the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    config = uvicorn.Config(
        app, lifespan="on", ws="none", log_level="warning", timeout_graceful_shutdown=2
    )
    server = _Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 (uvicorn offers no event)
                await anyio.sleep(0.01)
        try:
            yield f"http://{host}:{port}"
        finally:
            server.should_exit = True


def bearer(settings: Settings, tenant: str) -> dict[str, str]:
    token = issue_token(settings.jwt_secret, tenant=tenant, sub="tester", roles=["user"], ttl_s=600)
    return {"Authorization": f"Bearer {token}"}


async def read_events(
    stream: AsyncIterator[Frame], *, until: set[str] | None = None, count: int | None = None
) -> tuple[list[Frame], str]:
    """Event frames until every id in `until` (or `count` frames) arrived, and the
    id to resume from after the last frame read."""
    got: list[Frame] = []
    last = ""
    missing = set(until or ())
    with anyio.fail_after(WAIT_S):
        while missing or (count is not None and len(got) < count):
            frame = await anext(stream)
            last = frame.id or last
            if frame.event is not None and frame.data is not None:
                got.append(frame)
                if frame.event != "reset":
                    missing.discard(frame.envelope.id)
    return got, last
