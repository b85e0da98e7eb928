"""One typed settings object, read once from the environment and passed explicitly.

Every field is documented in the README (section "Configuration"). Tests build
`Settings(...)` directly instead of touching `os.environ`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import msgspec

from core.errors import ConfigurationError


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Eddy's configuration. Units are in the field names (`_s`, `_ms`, `_bytes`)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """`REDIS_URL`: the Redis (or Valkey) server. `redis+cluster://` selects Redis Cluster."""
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    """`DATABASE_URL`: the PostgreSQL database holding read models and checkpoints."""
    port: int = 8000
    """`PORT`: the HTTP port of `eddy web`."""
    host: str = "127.0.0.1"
    """`EDDY_HOST`: the interface `eddy web` binds (use 0.0.0.0 in a container)."""
    jwt_secret: str = ""
    """`EDDY_JWT_SECRET`: the HS256 secret of client tokens. Required outside `eddy dev`."""
    key_prefix: str = "eddy"
    """`EDDY_KEY_PREFIX`: prefix of every Redis key, so several deployments can share a server."""
    db_schema: str = "public"
    """`EDDY_DB_SCHEMA`: the Postgres schema of Eddy's tables."""
    shards: int = 4
    """`EDDY_SHARDS`: command/event stream shards per context. Fixed once data exists."""
    lease_ttl_ms: int = 5000
    """`EDDY_LEASE_TTL_MS`: a shard lease expires this long after its owner stopped renewing it."""
    batch_size: int = 200
    """`EDDY_BATCH_SIZE`: entries a worker or projector reads per round trip."""
    claim_idle_ms: int = 30000
    """`EDDY_CLAIM_IDLE_MS`: a pending entry idle this long is claimed again (XAUTOCLAIM)."""
    max_attempts: int = 5
    """`EDDY_MAX_ATTEMPTS`: a command or event that fails this many times (an error that is
    not a server being away) moves to its shard's dead letters (`streams/deadletters.py`)."""
    command_ttl_s: int = 7 * 24 * 3600
    """`EDDY_COMMAND_TTL_S`: how long a command's status (and its id's dedup record) is kept."""
    retention_s: int = 7 * 24 * 3600
    """`EDDY_RETENTION_S`: stream entries younger than this are never trimmed; older ones
    are, once every projection, the event archive and every consumer group has committed
    them (`streams/retention.py`)."""
    trim_interval_s: float = 60.0
    """`EDDY_TRIM_INTERVAL_S`: how often `eddy projector` trims the streams (one process at
    a time); 0: never."""
    max_body_bytes: int = 256 * 1024
    """`EDDY_MAX_BODY_BYTES`: the largest accepted command body (413 above it)."""
    max_wait_s: float = 30.0
    """`EDDY_MAX_WAIT_S`: upper bound for `?wait=` on command submission."""
    after_timeout_s: float = 5.0
    """`EDDY_AFTER_TIMEOUT_S`: how long a query with `?after=` waits for its read model."""
    view_debounce_s: float = 2.0
    """`EDDY_VIEW_DEBOUNCE_S`: a projector refreshes a materialized view this long after
    the first change that made it stale, at most once per this interval (seconds)."""
    query_cache: Literal["on", "off"] = "on"
    """`EDDY_QUERY_CACHE`: `on` keeps the answers of cached queries in Redis
    (`projections/cache.py`); `off` answers every query from Postgres."""
    sse_keepalive_s: float = 15.0
    """`EDDY_SSE_KEEPALIVE_S`: interval of SSE keep-alive comments."""
    subscriber_buffer: int = 1000
    """`EDDY_SUBSCRIBER_BUFFER`: events buffered per SSE/WS client before it is cut off."""
    send_timeout_s: float = 10.0
    """`EDDY_SEND_TIMEOUT_S`: a write to a client that takes longer cuts the client off."""
    ws_frames_per_s: float = 200.0
    """`EDDY_WS_FRAMES_PER_S`: frames a WebSocket client may send per second, sustained
    (a token bucket per connection); a client over it is closed with 1008."""
    ws_burst: int = 1000
    """`EDDY_WS_BURST`: frames a WebSocket client may send at once above the sustained rate."""
    ws_max_subscriptions: int = 32
    """`EDDY_WS_MAX_SUBSCRIPTIONS`: topics one WebSocket may subscribe to at a time."""
    ws_max_pending: int = 1000
    """`EDDY_WS_MAX_PENDING`: commands one WebSocket may have awaiting their result."""
    tenant_commands_per_s: float = 5000.0
    """`EDDY_TENANT_COMMANDS_PER_S`: commands a tenant may submit per second, sustained,
    over HTTP and WebSocket together, counted in Redis across every web process
    (`app/limits.py`); over it: 429 (`rate_limited` frames on a WebSocket). 0: no limit.
    The default leaves room for a tenant streaming tokens in dozens of conversations
    at once (a chunk is a command)."""
    tenant_commands_burst: int = 10000
    """`EDDY_TENANT_COMMANDS_BURST`: commands a tenant may submit at once above that rate."""
    tenant_queries_per_s: float = 10000.0
    """`EDDY_TENANT_QUERIES_PER_S`: queries (and command-status reads) a tenant may make
    per second, sustained, across every web process; over it: 429. 0: no limit."""
    tenant_queries_burst: int = 20000
    """`EDDY_TENANT_QUERIES_BURST`: queries a tenant may make at once above that rate."""
    connection_requests_per_s: float = 1000.0
    """`EDDY_CONNECTION_REQUESTS_PER_S`: command, status and query requests one HTTP
    connection may make per second, sustained (in memory, checked before the token);
    over it: 429. 0: no limit."""
    connection_burst: int = 2000
    """`EDDY_CONNECTION_BURST`: requests one HTTP connection may make at once above that rate."""
    cors_origins: str = ""
    """`EDDY_CORS_ORIGINS`: the web pages (origins, comma-separated) that may call Eddy
    from a browser: `https://app.example.com`, `http://localhost:*` (any port),
    `https://*.example.com`, or `*` (any). Empty: none but Eddy's own pages. The
    WebSocket refuses a page of any other origin (`app/cors.py`)."""
    log_level: str = "info"
    """`EDDY_LOG_LEVEL`: debug, info, warning or error."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read `PORT`, `REDIS_URL`, `DATABASE_URL` and every `EDDY_*` variable."""
        env = os.environ if env is None else env
        raw: dict[str, str] = {}
        for name in ("PORT", "REDIS_URL", "DATABASE_URL"):
            if name in env:
                raw[name.lower()] = env[name]
        fields = set(cls.__struct_fields__)
        for name, value in env.items():
            if name.startswith("EDDY_") and not name.startswith("EDDY_TEST_"):
                key = name[len("EDDY_") :].lower()
                if key in fields:
                    raw[key] = value
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"bad environment: {exc}") from exc

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ConfigurationError("EDDY_SHARDS must be at least 1")
        if self.max_attempts < 1:
            raise ConfigurationError("EDDY_MAX_ATTEMPTS must be at least 1")
        if not self.key_prefix or "{" in self.key_prefix or "}" in self.key_prefix:
            raise ConfigurationError("EDDY_KEY_PREFIX must be non-empty and contain no braces")
        if not self.db_schema.isidentifier():
            raise ConfigurationError("EDDY_DB_SCHEMA must be a plain identifier")
        if self.retention_s < 0 or self.trim_interval_s < 0:
            raise ConfigurationError("EDDY_RETENTION_S and EDDY_TRIM_INTERVAL_S must be at least 0")
        for rate, burst in (
            ("tenant_commands_per_s", "tenant_commands_burst"),
            ("tenant_queries_per_s", "tenant_queries_burst"),
            ("connection_requests_per_s", "connection_burst"),
        ):
            if getattr(self, rate) < 0 or getattr(self, burst) < 1:
                raise ConfigurationError(
                    f"EDDY_{rate.upper()} must be at least 0 and EDDY_{burst.upper()} at least 1"
                )
