"""The Starlette application: routes, the one place errors become responses, and
the lifespan that holds the Redis client, the Postgres pool and the fan-out.

The web process starts even while Redis or Postgres is down: requests that need
them answer 503 and `/readyz` says so, until they are back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import admin, commands, sse, ws
from app.cors import Origins
from app.http import json_response
from app.limits import Limits
from app.metrics import Metrics
from app.openapi import openapi, schema_document
from app.queries import query_routes
from app.system import System
from app.webprocess import WebProcess
from core.errors import EddyError, RateLimited, Unavailable
from core.outages import FAILED, POSTGRES_DOWN, REDIS_DOWN
from core.settings import Settings
from projections import db
from projections.cache import QueryCache
from streams.bus import CommandBus
from streams.connection import Scripts, connect
from streams.fanout import Fanout
from streams.keys import Keys

log = logging.getLogger("eddy.web")


async def eddy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EddyError)
    error = {"code": exc.code, "message": exc.message, **exc.details}
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, Unavailable):
        headers = {"Retry-After": "1"}
    return json_response({"error": error}, exc.status, headers)


HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) in Eddy's error shape.

    A 405's `Allow` names every method of every route of the path (RFC 9110
    §15.5.6): Starlette's names those of the first route that matches it only
    (`GET` of `/v1/commands/{command_id}`, not the `POST` of `/v1/commands/{type}`)."""
    assert isinstance(exc, HTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    return json_response({"error": {"code": code, "message": exc.detail}}, exc.status_code, headers)


def allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app answers on this request's path."""
    scope = {**request.scope, "method": "GET"}
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE and isinstance(route, Route) and route.methods:
            methods |= route.methods
    return sorted(methods)


async def unavailable(request: Request, exc: Exception) -> Response:
    """Redis or Postgres `DOWN` (`core/outages.py`), raised as their client's own
    error: 503, retry in a second. Nothing was accepted."""
    log.warning("dependency-unavailable path=%s error=%r", request.url.path, exc)
    error = {"code": "unavailable", "message": f"a dependency is unavailable: {type(exc).__name__}"}
    return json_response({"error": error}, 503, {"Retry-After": "1"})


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


READY_TIMEOUT_S = 2.0
"""`/readyz` answers within this long, whatever its dependencies do."""


async def readyz(request: Request) -> Response:
    """200 when Redis and Postgres both answer; 503 naming the one that does not
    (both are asked at once, so a hung one costs `READY_TIMEOUT_S`, not more)."""
    web: WebProcess = request.app.state.web
    checks = {"redis": "down: timeout", "postgres": "down: timeout"}

    async def redis_up() -> None:
        try:
            await web.redis.ping()
            checks["redis"] = "ok"
        except FAILED as exc:
            checks["redis"] = f"down: {type(exc).__name__}"

    async def postgres_up() -> None:
        try:
            await web.pool.fetchval("SELECT 1")
            checks["postgres"] = "ok"
        except FAILED as exc:
            checks["postgres"] = f"down: {type(exc).__name__}"

    with anyio.move_on_after(READY_TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(redis_up)
            tg.start_soon(postgres_up)
    ready = all(v == "ok" for v in checks.values())
    return json_response(
        {"status": "ready" if ready else "unavailable", **checks}, 200 if ready else 503
    )


async def metrics(request: Request) -> Response:
    web: WebProcess = request.app.state.web
    await web.metrics.projections.refresh(web.redis, web.pool, web.keys, web.system.projections)
    return Response(generate_latest(web.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def schema(request: Request) -> Response:
    web: WebProcess = request.app.state.web
    return json_response(schema_document(web.system.catalog))


async def openapi_json(request: Request) -> Response:
    web: WebProcess = request.app.state.web
    return json_response(openapi(web.system))


class Timing:
    """Records every HTTP request's latency by endpoint and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            # the router puts the matched endpoint in the scope: its name is the label
            name = getattr(scope.get("endpoint"), "__name__", "unmatched")
            self.metrics.requests.labels(name, str(status)).observe(time.perf_counter() - started)


def stop_feeds(app: Starlette) -> None:
    """End every feed of the app at once (a stopping process): the fan-out stops, so
    each SSE response finishes (an `EventSource` reconnects elsewhere and resumes
    with `Last-Event-ID`) and each WebSocket closes with 1012; new subscriptions get
    503. Without it, uvicorn's graceful shutdown would wait for the never-ending SSE
    responses until its deadline, then cancel them mid-write."""
    stop = getattr(app.state, "stop_feeds", None)
    if stop is not None:
        stop()


def create_app(settings: Settings, system: System) -> Starlette:
    """The web process of `system`: its routes, and a lifespan that holds its clients."""
    keys = Keys.of(settings)
    metrics_ = Metrics()
    origins = Origins(settings.cors_origins)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = connect(settings.redis_url)
        scripts = Scripts(redis)
        bus = CommandBus(redis, scripts, keys, settings.command_ttl_s, system.catalog)
        # A mismatch fails start-up; if Redis is down now, the bus checks before it writes.
        with contextlib.suppress(*FAILED):
            await bus.check_layout()
        pool = await db.create_pool(settings.database_url, settings.db_schema, min_size=0)
        web = WebProcess(
            settings=settings,
            system=system,
            keys=keys,
            redis=redis,
            scripts=scripts,
            bus=bus,
            pool=pool,
            fanout=Fanout(redis, keys, system.catalog, settings),
            limits=Limits(settings, redis, scripts, keys, metrics_.registry),
            origins=origins,
            query_cache=QueryCache(),
            metrics=metrics_,
        )
        app.state.web = web
        feeds = anyio.CancelScope()
        app.state.stop_feeds = feeds.cancel

        async def run_feeds() -> None:
            with feeds:
                await web.fanout.run()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_feeds)
                await tg.start(bus.run)
                await tg.start(web.limits.tenants.run)
                yield
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await pool.close()
                await redis.aclose()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"], include_in_schema=False),
        Route("/v1/schema", schema, methods=["GET"]),
        Route("/v1/commands/{command_id}", commands.status, methods=["GET"]),
        Route("/v1/commands/{type}", commands.submit, methods=["POST"]),
        Route("/v1/events/stream", sse.event_stream, methods=["GET"]),
        WebSocketRoute("/v1/ws", ws.endpoint),
        *query_routes(system.projections, system.views),
        *admin.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(Timing, metrics=metrics_), origins.middleware()],
        exception_handlers={
            EddyError: eddy_error,
            HTTPException: http_error,
            **dict.fromkeys((*REDIS_DOWN, *POSTGRES_DOWN, OSError), unavailable),
        },
    )
    return app
