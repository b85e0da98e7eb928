"""PostgreSQL read models: migrations, checkpoints, the projector and the queries.

Every projection is listed once in `PROJECTIONS`; the projector and the query
routes are built from this list.
"""

from __future__ import annotations

from projections import chat_sessions, message_streams, runtime_config, tools, traces
from projections.projection import Projection

PROJECTIONS: tuple[Projection, ...] = (
    chat_sessions.PROJECTION,
    traces.PROJECTION,
    message_streams.PROJECTION,
    runtime_config.PROJECTION,
    tools.PROJECTION,
)
