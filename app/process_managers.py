"""The agent platform's process managers (`streams/process_managers.py`).

`SESSION_STREAMS`, between chat sessions and message streams: when a session
closes, its active message streams are stopped, by `StopMessageStream` commands
(contexts never write to each other).

It keeps, per session, the set of its streams not known to be stopped (a Redis
set, `Keys.session_streams`), and reacts to three events:

- `MessageStreamStarted`: add the stream to its session's set, *then* read the
  session's state; if the session is no longer open, stop the stream.
- `ChatSessionClosed`: stop every stream in the session's set.
- `MessageStreamStopped`: remove the stream from the set.

The two first reactions can run at the same time on different shards. Because a
start adds to the set before it reads the session, and a session's state says
`closed` before its `ChatSessionClosed` event exists, one of them always sees the
other: either the close finds the stream in the set, or the start finds the
session closed. Both may: the stop's command id is derived from the stream id
alone, so the bus accepts it once and the stream is stopped once, also when the
process manager is killed half-way and reacts to the same event again.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from app.contexts import chat_sessions, message_streams
from app.contexts.chat_sessions import ChatSession
from app.contexts.message_streams import MessageStreamStarted, MessageStreamStopped
from core.messages import CommandRecord, Envelope, derived_id, utcnow
from streams.bus import CommandBus
from streams.connection import Redis
from streams.keys import Keys
from streams.process_managers import ProcessManager, React

log = logging.getLogger("eddy.reactions")

ACTOR = "eddy:session-streams"
STOP_REASON = "session_closed"

_encoder = msgspec.json.Encoder()
_session_decoder = msgspec.json.Decoder(ChatSession)
_started_decoder = msgspec.json.Decoder(MessageStreamStarted)
_stopped_decoder = msgspec.json.Decoder(MessageStreamStopped)


def stop_command_id(tenant_id: str, stream_id: str) -> str:
    """The one id of the command that stops a stream because its session closed."""
    return derived_id(tenant_id, f"stop-with-session\x00{stream_id}")


def _session_streams(redis: Redis, keys: Keys, bus: CommandBus) -> React:
    """The reaction of `SESSION_STREAMS`, bound to a process's clients."""

    async def stop(cause: Envelope, session_id: str, stream_ids: list[str]) -> None:
        for stream_id in stream_ids:
            record = CommandRecord(
                id=stop_command_id(cause.tenant_id, stream_id),
                type="StopMessageStream",
                tenant_id=cause.tenant_id,
                actor=ACTOR,
                roles=["admin"],
                correlation_id=cause.metadata.correlation_id,
                causation_id=cause.id,
                aggregate_id=stream_id,
                accepted_at=utcnow(),
                payload=msgspec.Raw(
                    _encoder.encode({"stream_id": stream_id, "reason": STOP_REASON})
                ),
            )
            shard = keys.shard_of(message_streams.CONTEXT.name, cause.tenant_id, stream_id)
            await bus.submit(record, shard)
            log.info("stream-stop-issued session=%s stream=%s", session_id, stream_id)

    async def session_open(tenant_id: str, session_id: str) -> bool:
        shard = keys.shard_of(chat_sessions.CONTEXT.name, tenant_id, session_id)
        raw: Any = await redis.hget(keys.aggregate(shard, tenant_id, session_id), "state")
        return raw is not None and _session_decoder.decode(raw).status == "active"

    async def react(env: Envelope) -> None:
        match env.type:
            case "MessageStreamStarted":
                started = _started_decoder.decode(env.payload)
                members = keys.session_streams(env.tenant_id, started.session_id)
                await redis.sadd(members, started.stream_id)
                if not await session_open(env.tenant_id, started.session_id):
                    await stop(env, started.session_id, [started.stream_id])
            case "ChatSessionClosed":
                members = keys.session_streams(env.tenant_id, env.aggregate_id)
                found: Any = await redis.smembers(members)
                await stop(env, env.aggregate_id, sorted(m.decode() for m in found))
            case "MessageStreamStopped":
                stopped = _stopped_decoder.decode(env.payload)
                members = keys.session_streams(env.tenant_id, stopped.session_id)
                await redis.srem(members, stopped.stream_id)

    return react


SESSION_STREAMS = ProcessManager(
    "session-streams",
    (chat_sessions.CONTEXT.name, message_streams.CONTEXT.name),
    _session_streams,
)
