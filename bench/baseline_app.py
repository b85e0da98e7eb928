"""Baseline (a): the least a command endpoint can do, one plain redis-py XADD per request.

`POST /v1/commands/{type}`: read the body, decode the JSON, XADD a record with
the fields of Eddy's to one stream, answer 202 like Eddy. No token check, no
schema, no idempotency, no sharding.
Run by `bench.run` under uvicorn (uvloop, httptools, one process), configured by
`REDIS_URL` and `BENCH_STREAM`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import msgspec
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
STREAM = os.environ.get("BENCH_STREAM", "bench:baseline:commands")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(dict[str, object])
_client: aioredis.Redis | None = None


async def submit(request: Request) -> Response:
    assert _client is not None
    body = await request.body()
    try:
        _decoder.decode(body)
    except msgspec.DecodeError:
        return Response(b'{"error": {"code": "malformed"}}', 400, media_type="application/json")
    command_id = request.headers.get("idempotency-key") or str(uuid.uuid4())
    record = {  # the fields of Eddy's command record, so entries are the same size
        "id": command_id,
        "type": request.path_params["type"],
        "tenant_id": "bench",
        "actor": "bench",
        "roles": ["admin"],
        "correlation_id": command_id,
        "aggregate_id": str(uuid.uuid4()),
        "accepted_at": datetime.now(UTC),
        "payload": msgspec.Raw(body),
    }
    await _client.xadd(STREAM, {"c": _encoder.encode(record)})
    answer = _encoder.encode({"command_id": command_id, "status": "pending"})
    return Response(answer, 202, media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(b'{"status": "ok"}', media_type="application/json")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global _client
    _client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=10.0)
    try:
        yield
    finally:
        await _client.aclose()


app = Starlette(
    routes=[
        Route("/v1/commands/{type}", submit, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ],
    lifespan=lifespan,
)
