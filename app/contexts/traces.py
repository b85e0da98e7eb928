"""Traces: append spans, finalize, purge.

Pure domain code: no I/O, nothing from `streams` or `projections`.

Choices where API.md is silent:
- a trace's session is fixed by its first span; a later span may omit `session_id`
  but may not name another one (nor one at all when the first span named none);
- a span's parent must be a span already appended to the same trace, so the first
  span of a trace is a root;
- timestamps are turned to UTC in the events, as every timestamp of the API is;
- a trace holds at most `MAX_SPANS` spans: the state keeps every span id (for the
  duplicate and parent rules) and travels with each command;
- a purged trace keeps a small tombstone state (no span ids), so any later command
  on it is rejected `purged` instead of opening it anew.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from core.errors import Rejected
from core.messages import Command, Context, Event, Issued, State

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
SpanStatus = Literal["ok", "error", "unset"]
TraceStatus = Literal["open", "finalized", "purged"]

MAX_SPANS = 10_000


# -- commands ---------------------------------------------------------------


class AppendTraceSpan(Command, frozen=True, kw_only=True):
    trace_id: Id
    session_id: Id | None = None
    span_id: Id
    parent_span_id: Id | None = None
    name: Name
    started_at: Timestamp
    ended_at: Timestamp | None = None
    status: SpanStatus = "unset"
    attributes: dict[str, Any] = {}

    def __post_init__(self) -> None:
        # Raised while decoding, msgspec turns it into a ValidationError: a 422.
        if self.ended_at is not None and self.ended_at < self.started_at:
            raise ValueError("ended_at is before started_at")


class FinalizeTrace(Command, frozen=True, kw_only=True):
    trace_id: Id


class PurgeTrace(Command, frozen=True, kw_only=True):
    trace_id: Id


# -- events -----------------------------------------------------------------


class TraceSpanAppended(Event, frozen=True, kw_only=True):
    trace_id: str
    session_id: str | None
    """The trace's session (set by its first span), whether or not this span named it."""
    span_id: str
    parent_span_id: str | None
    name: str
    started_at: datetime
    ended_at: datetime | None
    status: SpanStatus
    attributes: dict[str, Any]


class TraceFinalized(Event, frozen=True, kw_only=True):
    trace_id: str


class TracePurged(Event, frozen=True, kw_only=True):
    trace_id: str


# -- state and rules --------------------------------------------------------


class Trace(State, frozen=True, kw_only=True):
    status: TraceStatus
    session_id: str | None
    span_ids: tuple[str, ...]
    """In append order; emptied by a purge."""


def decide(state: Trace | None, command: Command, issued: Issued) -> list[Event]:
    match command:
        case AppendTraceSpan():
            return [_append(state, command)]
        case FinalizeTrace():
            _writable(state, command.trace_id)
            return [TraceFinalized(trace_id=command.trace_id)]
        case PurgeTrace():
            trace = _existing(state, command.trace_id)
            if trace.status == "purged":
                raise Rejected("purged", f"trace {command.trace_id} is already purged")
            return [TracePurged(trace_id=command.trace_id)]
    raise TypeError(f"not a traces command: {type(command).__name__}")


def _existing(state: Trace | None, trace_id: str) -> Trace:
    if state is None:
        raise Rejected("not_found", f"no trace {trace_id}")
    return state


def _writable(state: Trace | None, trace_id: str) -> Trace:
    """The trace if it exists and may still change."""
    trace = _existing(state, trace_id)
    if trace.status == "purged":
        raise Rejected("purged", f"trace {trace_id} is purged")
    if trace.status == "finalized":
        raise Rejected("finalized", f"trace {trace_id} is finalized")
    return trace


def _append(state: Trace | None, command: AppendTraceSpan) -> TraceSpanAppended:
    session_id = command.session_id
    if state is not None:
        trace = _writable(state, command.trace_id)
        if session_id is not None and session_id != trace.session_id:
            raise Rejected(
                "session_mismatch",
                f"trace {command.trace_id} belongs to session {trace.session_id}, not {session_id}",
            )
        if command.span_id in trace.span_ids:
            raise Rejected("duplicate_span", f"span {command.span_id} is already in the trace")
        if len(trace.span_ids) >= MAX_SPANS:
            raise Rejected("too_many_spans", f"a trace holds at most {MAX_SPANS} spans")
        session_id = trace.session_id
    parent = command.parent_span_id
    if parent is not None and (state is None or parent not in state.span_ids):
        raise Rejected("unknown_parent", f"span {parent} is not in trace {command.trace_id}")
    return TraceSpanAppended(
        trace_id=command.trace_id,
        session_id=session_id,
        span_id=command.span_id,
        parent_span_id=parent,
        name=command.name,
        started_at=command.started_at.astimezone(UTC),
        ended_at=None if command.ended_at is None else command.ended_at.astimezone(UTC),
        status=command.status,
        attributes=command.attributes,
    )


def evolve(state: Trace | None, event: Event) -> Trace:
    match event:
        case TraceSpanAppended():
            if state is None:
                return Trace(status="open", session_id=event.session_id, span_ids=(event.span_id,))
            return msgspec.structs.replace(state, span_ids=(*state.span_ids, event.span_id))
        case TraceFinalized():
            assert state is not None
            return msgspec.structs.replace(state, status="finalized")
        case TracePurged():
            assert state is not None
            return msgspec.structs.replace(state, status="purged", span_ids=())
    raise TypeError(f"not a traces event: {type(event).__name__}")


def session_of(state: Trace | None, event: Event) -> str | None:
    """The trace's session, so its events reach the `session/<id>` topic."""
    return None if state is None else state.session_id


CONTEXT = Context(
    name="traces",
    aggregate_field="trace_id",
    commands=(AppendTraceSpan, FinalizeTrace, PurgeTrace),
    events=(TraceSpanAppended, TraceFinalized, TracePurged),
    state=Trace,
    decide=decide,
    evolve=evolve,
    session_of=session_of,
)
