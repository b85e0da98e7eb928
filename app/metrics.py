"""The web process's Prometheus metrics (`/metrics`), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from projections.status import StatusCollector


class Metrics:
    """Every metric of one web process."""

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
