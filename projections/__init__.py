"""PostgreSQL read models: migrations, checkpoints, the projector and the queries.

Every projection is listed once in `PROJECTIONS`; the projector and the query
routes are built from this list.
"""

from __future__ import annotations

from projections import (
    archive,
    chat_sessions,
    message_streams,
    runtime_config,
    tools,
    traces,
    views,
)
from projections.projection import Projection
from projections.views import View

PROJECTIONS: tuple[Projection, ...] = (
    chat_sessions.PROJECTION,
    traces.PROJECTION,
    message_streams.PROJECTION,
    runtime_config.PROJECTION,
    tools.PROJECTION,
    archive.PROJECTION,
)

VIEWS: tuple[View, ...] = (
    chat_sessions.CHAT_SESSION_SUMMARIES,
    traces.SESSION_TRACE_STATS,
    tools.TOOL_USAGE,
)
"""Materialized views over the projections' tables, declared beside the projection
that owns them (`projections/views.py`): `eddy migrate` creates them, the projector
refreshes them."""

# Each view's queries are served with those of the first projection it reads.
PROJECTIONS = views.serving(PROJECTIONS, VIEWS)
