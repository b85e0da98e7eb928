"""The message-streams context's rules, pure: no Redis, no Postgres."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from app.contexts.chat_sessions import ChatSession, Participant
from app.contexts.message_streams import (
    CONTEXT,
    MessageStream,
    MessageStreamStarted,
    MessageStreamStopped,
    PushStreamMessage,
    StartMessageStream,
    StopMessageStream,
    StreamMessagePushed,
    decide,
    evolve,
)
from core.errors import Rejected
from core.messages import Issued

OPEN = ChatSession(
    status="active",
    agent_id="a",
    participants=(Participant(participant_id="u1", role="agent"),),
)


def issued(related: Any = None) -> Issued:
    return Issued(
        command_id="c1",
        tenant_id="t",
        actor="u",
        roles=("agent",),
        now=datetime.now(UTC),
        related=related,
    )


def run(
    state: MessageStream | None, command: Any, related: Any = None
) -> tuple[MessageStream | None, list[Any]]:
    events = decide(state, command, issued(related))
    for event in events:
        state = evolve(state, event)
    return state, events


def started() -> MessageStream:
    state, _ = run(
        None, StartMessageStream(stream_id="m1", session_id="s1", participant_id="u1"), OPEN
    )
    assert state is not None
    return state


def pushed(*chunks: str) -> MessageStream:
    state: MessageStream | None = started()
    for seq, chunk in enumerate(chunks, start=1):
        state, _ = run(state, PushStreamMessage(stream_id="m1", seq=seq, chunk=chunk))
    assert state is not None
    return state


def test_a_stream_starts_in_an_open_session_and_names_it() -> None:
    state, events = run(
        None, StartMessageStream(stream_id="m1", session_id="s1", participant_id="u1"), OPEN
    )
    assert events == [MessageStreamStarted(stream_id="m1", session_id="s1", participant_id="u1")]
    assert state is not None and state.status == "active"
    assert CONTEXT.session_of(state, events[0]) == "s1"
    assert CONTEXT.related is not None
    assert CONTEXT.related(
        StartMessageStream(stream_id="m1", session_id="s1", participant_id="u1")
    ) == ("chat_sessions", "s1")
    assert CONTEXT.related(StopMessageStream(stream_id="m1")) is None


@pytest.mark.parametrize(
    ("session", "code"),
    [
        (None, "session_not_found"),
        (msgspec.structs.replace(OPEN, status="closed"), "session_not_open"),
        (msgspec.structs.replace(OPEN, status="archived"), "session_not_open"),
    ],
)
def test_a_stream_does_not_start_unless_its_session_is_open(session: Any, code: str) -> None:
    with pytest.raises(Rejected) as caught:
        run(None, StartMessageStream(stream_id="m1", session_id="s1", participant_id="u1"), session)
    assert caught.value.code == code


def test_a_stream_starts_once() -> None:
    with pytest.raises(Rejected) as caught:
        run(
            started(),
            StartMessageStream(stream_id="m1", session_id="s1", participant_id="u1"),
            OPEN,
        )
    assert caught.value.code == "already_exists"


def test_chunks_follow_seq_from_one_without_gaps() -> None:
    state, events = run(started(), PushStreamMessage(stream_id="m1", seq=1, chunk="Hel"))
    assert events == [StreamMessagePushed(stream_id="m1", seq=1, chunk="Hel")]
    with pytest.raises(Rejected) as caught:
        run(state, PushStreamMessage(stream_id="m1", seq=3, chunk="o"))
    assert caught.value.code == "seq_gap"
    with pytest.raises(Rejected) as caught:
        run(started(), PushStreamMessage(stream_id="m1", seq=2, chunk="x"))
    assert caught.value.code == "seq_gap"


def test_a_repeated_chunk_is_a_no_op_and_a_changed_one_is_rejected() -> None:
    state = pushed("Hel", "lo", " world")
    for seq, chunk in ((1, "Hel"), (2, "lo"), (3, " world")):
        again, events = run(state, PushStreamMessage(stream_id="m1", seq=seq, chunk=chunk))
        assert events == [] and again == state
    with pytest.raises(Rejected) as caught:
        run(state, PushStreamMessage(stream_id="m1", seq=2, chunk="LO"))
    assert caught.value.code == "changed_repeat"


def test_stopping_reports_the_chunk_count_and_ends_the_stream() -> None:
    state, events = run(pushed("a", "b"), StopMessageStream(stream_id="m1", reason="done"))
    assert events == [
        MessageStreamStopped(stream_id="m1", session_id="s1", chunk_count=2, reason="done")
    ]
    for command in (
        PushStreamMessage(stream_id="m1", seq=3, chunk="c"),
        StopMessageStream(stream_id="m1"),
    ):
        with pytest.raises(Rejected) as caught:
            run(state, command)
        assert caught.value.code == "not_active"


def test_commands_on_an_unknown_stream_are_rejected() -> None:
    for command in (
        PushStreamMessage(stream_id="x", seq=1, chunk="a"),
        StopMessageStream(stream_id="x"),
    ):
        with pytest.raises(Rejected) as caught:
            run(None, command)
        assert caught.value.code == "not_found"


def test_a_seq_below_one_breaks_the_schema() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"stream_id": "m1", "seq": 0, "chunk": "a"}', type=PushStreamMessage)
