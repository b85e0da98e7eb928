"""Small HTTP helpers shared by the routes: JSON answers, bodies, headers."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from core.errors import BadRequest, TooLarge

_encoder = msgspec.json.Encoder()


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        _encoder.encode(content), status_code=status, headers=headers, media_type="application/json"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` without reading it all."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise TooLarge(f"body is {length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def wait_seconds(request: Request, limit: float) -> float:
    raw = request.query_params.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        raise BadRequest("wait must be a number of seconds") from None
    if not 0 <= wait <= limit:
        raise BadRequest(f"wait must be between 0 and {limit} seconds")
    return wait
