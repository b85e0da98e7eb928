"""What a web process holds while it runs: clients, the bus, the fan-out, metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.responses import Response

from app.settings import Settings
from projections.db import Pool
from projections.status import StatusCollector
from streams.bus import CommandBus
from streams.connection import Redis, Scripts
from streams.keys import Keys

if TYPE_CHECKING:
    from streams.fanout import Fanout

_encoder = msgspec.json.Encoder()


class Metrics:
    """The web process's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.commands = Counter(
            "eddy_commands_submitted",
            "Commands submitted over HTTP and WebSocket, by type and outcome.",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.requests = Histogram(
            "eddy_http_request_seconds",
            "HTTP request latency by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ws_connections = Gauge(
            "eddy_ws_connections",
            "Open WebSocket connections.",
            registry=self.registry,
        )
        self.ws_frames = Counter(
            "eddy_ws_frames",
            "WebSocket frames received (`in`) and sent (`out`).",
            ["direction"],
            registry=self.registry,
        )
        self.projections = StatusCollector()
        """Every projection's lag and last error per shard (`projections/status.py`),
        read at scrape time: `/metrics` awaits `projections.refresh` first."""
        self.registry.register(self.projections)
        self.query_cache = Counter(
            "eddy_query_cache",
            "Answers of cached queries: from Redis (`hit`), from Postgres (`miss`),"
            " from Postgres while Redis fails (`bypass`).",
            ["query", "outcome"],
            registry=self.registry,
        )


@dataclass
class Services:
    settings: Settings
    keys: Keys
    redis: Redis
    scripts: Scripts
    bus: CommandBus
    pool: Pool
    fanout: Fanout
    metrics: Metrics


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        _encoder.encode(content), status_code=status, headers=headers, media_type="application/json"
    )
