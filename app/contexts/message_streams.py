"""Chat message streaming: a participant's message arrives as numbered chunks.

Pure domain code: no I/O, nothing from `streams` or `projections`.

- `seq` starts at 1 and has no gaps. A repeated `seq` with the same chunk is a
  no-op (processed, no event): a client that retries a push without an
  `Idempotency-Key` cannot double a chunk. A gap or a changed repeat is rejected.
- The state keeps an 8-byte BLAKE2b digest per chunk, not the text, packed in
  one `bytes` (base64 in JSON, 10.7 bytes per chunk): deciding a push loads the
  state, and a stream can have thousands of chunks. The text is assembled by the
  projection, which writes the transcript block when the stream stops.
- A stream may only start in an open chat session: `related` hands `decide` the
  session's state. The session can close right after; the process manager in
  `app/reactions.py` then stops the stream, as it stops every stream that is
  active when its session closes.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

import msgspec

from app.contexts.chat_sessions import ChatSession
from core.errors import Rejected
from core.messages import Command, Context, Event, Issued, State

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Text = Annotated[str, msgspec.Meta(max_length=2000)]
Chunk = Annotated[str, msgspec.Meta(max_length=65536)]
Seq = Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]
StreamStatus = Literal["active", "stopped"]


# -- commands ---------------------------------------------------------------


class StartMessageStream(Command, frozen=True, kw_only=True):
    stream_id: Id | None = None
    session_id: Id
    participant_id: Id


class PushStreamMessage(Command, frozen=True, kw_only=True):
    stream_id: Id
    seq: Seq
    chunk: Chunk


class StopMessageStream(Command, frozen=True, kw_only=True):
    stream_id: Id
    reason: Text | None = None


# -- events -----------------------------------------------------------------


class MessageStreamStarted(Event, frozen=True, kw_only=True):
    stream_id: str
    session_id: str
    participant_id: str


class StreamMessagePushed(Event, frozen=True, kw_only=True):
    stream_id: str
    seq: int
    chunk: str


class MessageStreamStopped(Event, frozen=True, kw_only=True):
    stream_id: str
    session_id: str
    chunk_count: int
    reason: str | None = None


# -- state and rules --------------------------------------------------------


class MessageStream(State, frozen=True, kw_only=True):
    status: StreamStatus
    session_id: str
    participant_id: str
    digests: bytes = b""
    """`DIGEST_SIZE` bytes per chunk pushed, in `seq` order."""

    @property
    def chunk_count(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def digest_of(self, seq: int) -> bytes:
        return self.digests[(seq - 1) * DIGEST_SIZE : seq * DIGEST_SIZE]


DIGEST_SIZE = 8


def digest(chunk: str) -> bytes:
    return hashlib.blake2b(chunk.encode(), digest_size=DIGEST_SIZE).digest()


def decide(state: MessageStream | None, command: Command, issued: Issued) -> list[Event]:
    match command:
        case StartMessageStream():
            if state is not None:
                raise Rejected("already_exists", f"message stream {command.stream_id} exists")
            session = issued.related
            if not isinstance(session, ChatSession):
                raise Rejected("session_not_found", f"no chat session {command.session_id}")
            if session.status != "active":
                raise Rejected("session_not_open", f"chat session is {session.status}")
            assert command.stream_id is not None  # filled in on submission
            return [
                MessageStreamStarted(
                    stream_id=command.stream_id,
                    session_id=command.session_id,
                    participant_id=command.participant_id,
                )
            ]
        case PushStreamMessage():
            stream = _active(state, command.stream_id)
            count = stream.chunk_count
            if command.seq <= count:
                if stream.digest_of(command.seq) == digest(command.chunk):
                    return []  # a repeat: already there
                raise Rejected("changed_repeat", f"chunk {command.seq} was pushed with other text")
            if command.seq > count + 1:
                raise Rejected("seq_gap", f"expected seq {count + 1}, got {command.seq}")
            return [
                StreamMessagePushed(
                    stream_id=command.stream_id, seq=command.seq, chunk=command.chunk
                )
            ]
        case StopMessageStream():
            stream = _active(state, command.stream_id)
            return [
                MessageStreamStopped(
                    stream_id=command.stream_id,
                    session_id=stream.session_id,
                    chunk_count=stream.chunk_count,
                    reason=command.reason,
                )
            ]
    raise TypeError(f"not a message-streams command: {type(command).__name__}")


def _active(state: MessageStream | None, stream_id: str) -> MessageStream:
    if state is None:
        raise Rejected("not_found", f"no message stream {stream_id}")
    if state.status != "active":
        raise Rejected("not_active", f"message stream {stream_id} is {state.status}")
    return state


def evolve(state: MessageStream | None, event: Event) -> MessageStream:
    match event:
        case MessageStreamStarted():
            return MessageStream(
                status="active", session_id=event.session_id, participant_id=event.participant_id
            )
        case StreamMessagePushed():
            assert state is not None
            return msgspec.structs.replace(state, digests=state.digests + digest(event.chunk))
        case MessageStreamStopped():
            assert state is not None
            return msgspec.structs.replace(state, status="stopped")
    raise TypeError(f"not a message-streams event: {type(event).__name__}")


def _related(command: Any) -> tuple[str, str] | None:
    if isinstance(command, StartMessageStream):
        return ("chat_sessions", command.session_id)
    return None


CONTEXT = Context(
    name="message_streams",
    aggregate_field="stream_id",
    commands=(StartMessageStream, PushStreamMessage, StopMessageStream),
    events=(MessageStreamStarted, StreamMessagePushed, MessageStreamStopped),
    state=MessageStream,
    decide=decide,
    evolve=evolve,
    session_of=lambda state, event: state.session_id if state is not None else None,
    related=_related,
)
