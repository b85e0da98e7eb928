"""The composition root's lists: what the agent platform is made of.

A context joins the system with its read model: adding one is its two modules
(`app/contexts/<name>.py`, `app/readmodels/<name>.py`, and its tables in
`app/readmodels/tables/<name>.sql`) and its read model's line in `READ_MODELS`.
Its routes, schemas, streams, shards, consumer groups, feed topics, archive and
the projector's work all follow (`app/system.py`). A materialized view or a
process manager is a line in its own list.
"""

from __future__ import annotations

from app.process_managers import SESSION_STREAMS
from app.readmodels import chat_sessions, message_streams, runtime_config, tools, traces
from app.system import System

READ_MODELS = (
    chat_sessions.PROJECTION,
    traces.PROJECTION,
    message_streams.PROJECTION,
    runtime_config.PROJECTION,
    tools.PROJECTION,
)
VIEWS = (
    chat_sessions.CHAT_SESSION_SUMMARIES,
    traces.SESSION_TRACE_STATS,
    tools.TOOL_USAGE,
)
PROCESS_MANAGERS = (SESSION_STREAMS,)

SYSTEM = System.of(READ_MODELS, VIEWS, PROCESS_MANAGERS)
