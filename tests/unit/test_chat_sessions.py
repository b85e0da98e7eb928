"""The chat-sessions context's rules, pure: no Redis, no Postgres."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from app.contexts.chat_sessions import (
    ArchiveChatSession,
    ChatSession,
    ChatSessionArchived,
    ChatSessionClosed,
    ChatSessionCreated,
    ChatSessionParticipantsUpdated,
    CloseChatSession,
    CreateChatSession,
    Participant,
    RoleChange,
    UpdateChatSessionParticipants,
    decide,
    evolve,
)
from core.errors import Rejected
from core.messages import Issued

ISSUED = Issued(command_id="c1", tenant_id="t", actor="u", roles=("agent",), now=datetime.now(UTC))


def run(state: ChatSession | None, command: Any) -> tuple[ChatSession | None, list[Any]]:
    events = decide(state, command, ISSUED)
    for event in events:
        state = evolve(state, event)
    return state, events


def created() -> ChatSession:
    state, _ = run(
        None,
        CreateChatSession(
            session_id="s1",
            agent_id="a1",
            participants=[
                Participant(participant_id="p1", role="user"),
                Participant(participant_id="p2", role="observer"),
            ],
        ),
    )
    assert state is not None
    return state


def rejected(state: ChatSession | None, command: Any) -> str:
    with pytest.raises(Rejected) as info:
        decide(state, command, ISSUED)
    return info.value.code


def test_create_opens_an_active_session() -> None:
    state, events = run(
        None,
        CreateChatSession(session_id="s1", agent_id="a1", participants=[], metadata={"k": 1}),
    )
    assert [type(e) for e in events] == [ChatSessionCreated]
    assert events[0].metadata == {"k": 1}
    assert state is not None and state.status == "active" and state.agent_id == "a1"


def test_create_twice_is_rejected() -> None:
    command = CreateChatSession(session_id="s1", agent_id="a1", participants=[])
    assert rejected(created(), command) == "already_exists"


def test_duplicate_participants_on_create_are_rejected() -> None:
    p = Participant(participant_id="p1", role="user")
    command = CreateChatSession(session_id="s1", agent_id="a1", participants=[p, p])
    assert rejected(None, command) == "duplicate_participant"


def test_participants_are_added_removed_and_change_role() -> None:
    state, events = run(
        created(),
        UpdateChatSessionParticipants(
            session_id="s1",
            add=[Participant(participant_id="p3", role="agent")],
            remove=["p1"],
            change_roles=[RoleChange(participant_id="p2", role="agent")],
        ),
    )
    (event,) = events
    assert isinstance(event, ChatSessionParticipantsUpdated)
    assert event.role_changes[0].from_role == "observer"
    assert state is not None
    assert {(p.participant_id, p.role) for p in state.participants} == {
        ("p2", "agent"),
        ("p3", "agent"),
    }


@pytest.mark.parametrize(
    ("update", "code"),
    [
        (UpdateChatSessionParticipants(session_id="s1"), "empty_update"),
        (UpdateChatSessionParticipants(session_id="s1", remove=["nobody"]), "unknown_participant"),
        (
            UpdateChatSessionParticipants(
                session_id="s1", change_roles=[RoleChange(participant_id="nobody", role="agent")]
            ),
            "unknown_participant",
        ),
        (
            UpdateChatSessionParticipants(
                session_id="s1", add=[Participant(participant_id="p1", role="user")]
            ),
            "already_participant",
        ),
        (
            UpdateChatSessionParticipants(
                session_id="s1", change_roles=[RoleChange(participant_id="p1", role="agent")]
            ),
            "bad_role_transition",
        ),
    ],
)
def test_bad_participant_updates_are_rejected(
    update: UpdateChatSessionParticipants, code: str
) -> None:
    assert rejected(created(), update) == code


def test_close_then_archive() -> None:
    state, events = run(created(), CloseChatSession(session_id="s1", reason="done"))
    assert isinstance(events[0], ChatSessionClosed) and events[0].reason == "done"
    assert state is not None and state.status == "closed"
    assert rejected(state, CloseChatSession(session_id="s1")) == "not_open"
    assert (
        rejected(
            state,
            UpdateChatSessionParticipants(
                session_id="s1", add=[Participant(participant_id="p9", role="user")]
            ),
        )
        == "not_open"
    )
    state, events = run(state, ArchiveChatSession(session_id="s1"))
    assert isinstance(events[0], ChatSessionArchived)
    assert state is not None and state.status == "archived"
    assert rejected(state, ArchiveChatSession(session_id="s1")) == "not_closed"


def test_only_a_closed_session_can_be_archived() -> None:
    assert rejected(created(), ArchiveChatSession(session_id="s1")) == "not_closed"


def test_commands_on_a_missing_session_are_rejected() -> None:
    assert rejected(None, CloseChatSession(session_id="nope")) == "not_found"
