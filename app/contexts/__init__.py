"""The bounded contexts. Adding one is a module here, one in `projections`, and a
line in `CONTEXTS`; everything else (routes, schemas, streams, shards) follows.
"""

from __future__ import annotations

from typing import Any

import msgspec

from app.contexts import chat_sessions, message_streams, runtime_config, tools, traces
from app.messages import Command, Context, Event

CONTEXTS: tuple[Context, ...] = (
    chat_sessions.CONTEXT,
    traces.CONTEXT,
    message_streams.CONTEXT,
    runtime_config.CONTEXT,
    tools.CONTEXT,
)


class CommandType(msgspec.Struct, frozen=True):
    name: str
    context: Context
    cls: type[Command]
    decoder: msgspec.json.Decoder[Any]


class EventType(msgspec.Struct, frozen=True):
    name: str
    context: Context
    cls: type[Event]
    decoder: msgspec.json.Decoder[Any]


COMMANDS: dict[str, CommandType] = {
    cls.__name__: CommandType(cls.__name__, ctx, cls, msgspec.json.Decoder(cls))
    for ctx in CONTEXTS
    for cls in ctx.commands
}
EVENTS: dict[str, EventType] = {
    cls.__name__: EventType(cls.__name__, ctx, cls, msgspec.json.Decoder(cls))
    for ctx in CONTEXTS
    for cls in ctx.events
}
BY_NAME: dict[str, Context] = {ctx.name: ctx for ctx in CONTEXTS}
