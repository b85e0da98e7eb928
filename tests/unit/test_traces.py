"""The traces context's rules, pure: no Redis, no Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from app.contexts.traces import (
    AppendTraceSpan,
    FinalizeTrace,
    PurgeTrace,
    Trace,
    TraceFinalized,
    TracePurged,
    TraceSpanAppended,
    decide,
    evolve,
    session_of,
)
from app.registry import SYSTEM
from core.errors import Rejected
from core.messages import Issued

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
ISSUED = Issued(command_id="c1", tenant_id="t", actor="u", roles=("agent",), now=NOW)


def span(span_id: str, **fields: Any) -> AppendTraceSpan:
    return AppendTraceSpan(
        **{"trace_id": "t1", "span_id": span_id, "name": f"op-{span_id}", "started_at": NOW}
        | fields
    )


def run(state: Trace | None, command: Any) -> tuple[Trace | None, list[Any]]:
    events = decide(state, command, ISSUED)
    for event in events:
        state = evolve(state, event)
    return state, events


def opened(session_id: str | None = "s1") -> Trace:
    state, _ = run(None, span("root", session_id=session_id))
    assert state is not None
    return state


def rejected(state: Trace | None, command: Any) -> str:
    with pytest.raises(Rejected) as info:
        decide(state, command, ISSUED)
    return info.value.code


def test_the_first_span_opens_the_trace() -> None:
    state, events = run(
        None,
        span(
            "root",
            session_id="s1",
            ended_at=NOW + timedelta(seconds=1),
            status="ok",
            attributes={"model": "m"},
        ),
    )
    (event,) = events
    assert isinstance(event, TraceSpanAppended)
    assert (event.trace_id, event.session_id, event.span_id) == ("t1", "s1", "root")
    assert event.parent_span_id is None and event.status == "ok"
    assert event.attributes == {"model": "m"}
    assert state == Trace(status="open", session_id="s1", span_ids=("root",))
    assert session_of(state, event) == "s1"


def test_a_span_defaults_to_unset_status_and_no_session() -> None:
    state, events = run(None, span("root"))
    assert events[0].status == "unset" and events[0].session_id is None
    assert session_of(state, events[0]) is None


def test_child_spans_name_a_known_parent_and_inherit_the_session() -> None:
    state, _ = run(opened(), span("child", parent_span_id="root"))
    state, events = run(state, span("grandchild", parent_span_id="child", session_id="s1"))
    assert events[0].session_id == "s1" and events[0].parent_span_id == "child"
    assert state is not None and state.span_ids == ("root", "child", "grandchild")


def test_timestamps_become_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    _, events = run(None, span("root", started_at=datetime(2025, 1, 1, 14, 0, tzinfo=plus_two)))
    assert events[0].started_at == NOW and events[0].started_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (span("root"), "duplicate_span"),
        (span("x", parent_span_id="nobody"), "unknown_parent"),
        (span("x", parent_span_id="x"), "unknown_parent"),
        (span("x", session_id="s2"), "session_mismatch"),
    ],
)
def test_bad_spans_are_rejected(command: AppendTraceSpan, code: str) -> None:
    assert rejected(opened(), command) == code


def test_the_first_span_cannot_have_a_parent() -> None:
    assert rejected(None, span("x", parent_span_id="root")) == "unknown_parent"


def test_a_trace_without_session_does_not_take_one_later() -> None:
    assert rejected(opened(session_id=None), span("x", session_id="s1")) == "session_mismatch"


def test_a_trace_holds_a_bounded_number_of_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.contexts.traces.MAX_SPANS", 2)
    state, _ = run(opened(), span("second"))
    assert state is not None
    assert rejected(state, span("third")) == "too_many_spans"


def test_ended_before_started_is_invalid() -> None:
    with pytest.raises(ValueError, match="ended_at is before started_at"):
        span("x", ended_at=NOW - timedelta(seconds=1))
    decoder = SYSTEM.catalog.commands["AppendTraceSpan"].decoder
    payload = {"trace_id": "t1", "span_id": "x", "name": "n", "started_at": NOW.isoformat()}
    with pytest.raises(msgspec.ValidationError, match="ended_at is before started_at"):
        decoder.decode(msgspec.json.encode(payload | {"ended_at": "2024-12-31T00:00:00Z"}))
    with pytest.raises(msgspec.ValidationError, match="status"):
        decoder.decode(msgspec.json.encode(payload | {"status": "fine"}))
    with pytest.raises(msgspec.ValidationError, match="timezone"):
        decoder.decode(msgspec.json.encode(payload | {"started_at": "2025-01-01T12:00:00"}))
    assert decoder.decode(msgspec.json.encode(payload | {"ended_at": NOW.isoformat()})).ended_at


def test_finalize_makes_the_trace_immutable() -> None:
    state, events = run(opened(), FinalizeTrace(trace_id="t1"))
    assert [type(e) for e in events] == [TraceFinalized]
    assert state is not None and state.status == "finalized"
    assert session_of(state, events[0]) == "s1"
    assert rejected(state, span("late")) == "finalized"
    assert rejected(state, FinalizeTrace(trace_id="t1")) == "finalized"


def test_finalize_needs_a_trace() -> None:
    assert rejected(None, FinalizeTrace(trace_id="t1")) == "not_found"


def test_purge_leaves_a_tombstone_that_rejects_everything() -> None:
    state, events = run(opened(), PurgeTrace(trace_id="t1"))
    assert [type(e) for e in events] == [TracePurged]
    assert state == Trace(status="purged", session_id="s1", span_ids=())
    assert session_of(state, events[0]) == "s1"
    assert rejected(state, span("root")) == "purged"
    assert rejected(state, span("new")) == "purged"
    assert rejected(state, FinalizeTrace(trace_id="t1")) == "purged"
    assert rejected(state, PurgeTrace(trace_id="t1")) == "purged"


def test_a_finalized_trace_can_be_purged() -> None:
    state, _ = run(opened(), FinalizeTrace(trace_id="t1"))
    state, events = run(state, PurgeTrace(trace_id="t1"))
    assert isinstance(events[0], TracePurged)
    assert state is not None and state.status == "purged"


def test_purge_needs_a_trace() -> None:
    assert rejected(None, PurgeTrace(trace_id="t1")) == "not_found"


def test_the_state_survives_its_wire_format() -> None:
    state, _ = run(opened(), span("child", parent_span_id="root"))
    assert msgspec.json.decode(msgspec.json.encode(state), type=Trace) == state
