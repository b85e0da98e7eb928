"""Chat sessions: create, change participants, close, archive.

Pure domain code: no I/O, nothing from `streams` or `projections`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from core.errors import Rejected
from core.messages import Command, Context, Event, Issued, State

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Text = Annotated[str, msgspec.Meta(max_length=2000)]
Role = Literal["agent", "observer", "user"]
SessionStatus = Literal["active", "closed", "archived"]


class Participant(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    participant_id: Id
    role: Role


class RoleChange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    participant_id: Id
    role: Role


# -- commands ---------------------------------------------------------------


class CreateChatSession(Command, frozen=True, kw_only=True):
    session_id: Id | None = None
    agent_id: Id
    participants: Annotated[list[Participant], msgspec.Meta(max_length=1000)]
    metadata: dict[str, Any] = {}
    routing: dict[str, Any] = {}


class UpdateChatSessionParticipants(Command, frozen=True, kw_only=True):
    session_id: Id
    add: Annotated[list[Participant], msgspec.Meta(max_length=1000)] = []
    remove: Annotated[list[Id], msgspec.Meta(max_length=1000)] = []
    change_roles: Annotated[list[RoleChange], msgspec.Meta(max_length=1000)] = []


class CloseChatSession(Command, frozen=True, kw_only=True):
    session_id: Id
    reason: Text | None = None


class ArchiveChatSession(Command, frozen=True, kw_only=True):
    session_id: Id


# -- events -----------------------------------------------------------------


class ChatSessionCreated(Event, frozen=True, kw_only=True):
    session_id: str
    agent_id: str
    participants: list[Participant]
    metadata: dict[str, Any]
    routing: dict[str, Any]


class RoleTransition(msgspec.Struct, frozen=True, kw_only=True):
    participant_id: str
    from_role: Role
    to_role: Role


class ChatSessionParticipantsUpdated(Event, frozen=True, kw_only=True):
    session_id: str
    added: list[Participant]
    removed: list[str]
    role_changes: list[RoleTransition]
    participants: list[Participant]
    """The whole list after the change."""


class ChatSessionClosed(Event, frozen=True, kw_only=True):
    session_id: str
    reason: str | None = None


class ChatSessionArchived(Event, frozen=True, kw_only=True):
    session_id: str


# -- state and rules --------------------------------------------------------


class ChatSession(State, frozen=True, kw_only=True):
    status: SessionStatus
    agent_id: str
    participants: tuple[Participant, ...]


ROLE_TRANSITIONS = {("observer", "agent"), ("agent", "observer")}


def decide(state: ChatSession | None, command: Command, issued: Issued) -> list[Event]:
    match command:
        case CreateChatSession():
            if state is not None:
                raise Rejected("already_exists", f"chat session {command.session_id} exists")
            ids = [p.participant_id for p in command.participants]
            if len(set(ids)) != len(ids):
                raise Rejected("duplicate_participant", "a participant is listed twice")
            assert command.session_id is not None  # filled in on submission
            return [
                ChatSessionCreated(
                    session_id=command.session_id,
                    agent_id=command.agent_id,
                    participants=command.participants,
                    metadata=command.metadata,
                    routing=command.routing,
                )
            ]
        case UpdateChatSessionParticipants():
            session = _existing(state, command.session_id)
            if session.status != "active":
                raise Rejected("not_open", f"chat session is {session.status}")
            return [_change_participants(session, command)]
        case CloseChatSession():
            session = _existing(state, command.session_id)
            if session.status != "active":
                raise Rejected("not_open", f"chat session is {session.status}")
            return [ChatSessionClosed(session_id=command.session_id, reason=command.reason)]
        case ArchiveChatSession():
            session = _existing(state, command.session_id)
            if session.status != "closed":
                raise Rejected("not_closed", "only a closed chat session can be archived")
            return [ChatSessionArchived(session_id=command.session_id)]
    raise TypeError(f"not a chat-sessions command: {type(command).__name__}")


def _existing(state: ChatSession | None, session_id: str) -> ChatSession:
    if state is None:
        raise Rejected("not_found", f"no chat session {session_id}")
    return state


def _change_participants(
    session: ChatSession, command: UpdateChatSessionParticipants
) -> ChatSessionParticipantsUpdated:
    if not (command.add or command.remove or command.change_roles):
        raise Rejected("empty_update", "nothing to add, remove or change")
    roles = {p.participant_id: p.role for p in session.participants}
    touched = [p.participant_id for p in command.add] + command.remove
    touched += [c.participant_id for c in command.change_roles]
    if len(set(touched)) != len(touched):
        raise Rejected("duplicate_participant", "a participant is named twice in one update")
    for participant in command.add:
        if participant.participant_id in roles:
            raise Rejected("already_participant", f"{participant.participant_id} takes part")
        roles[participant.participant_id] = participant.role
    for participant_id in command.remove:
        if participant_id not in roles:
            raise Rejected("unknown_participant", f"{participant_id} does not take part")
        del roles[participant_id]
    transitions = []
    for change in command.change_roles:
        current = roles.get(change.participant_id)
        if current is None:
            raise Rejected("unknown_participant", f"{change.participant_id} does not take part")
        if (current, change.role) not in ROLE_TRANSITIONS:
            raise Rejected(
                "bad_role_transition",
                f"{current} → {change.role} is not allowed (observer ↔ agent)",
            )
        roles[change.participant_id] = change.role
        transitions.append(
            RoleTransition(
                participant_id=change.participant_id, from_role=current, to_role=change.role
            )
        )
    return ChatSessionParticipantsUpdated(
        session_id=command.session_id,
        added=command.add,
        removed=command.remove,
        role_changes=transitions,
        participants=[Participant(participant_id=i, role=r) for i, r in roles.items()],
    )


def evolve(state: ChatSession | None, event: Event) -> ChatSession:
    match event:
        case ChatSessionCreated():
            return ChatSession(
                status="active", agent_id=event.agent_id, participants=tuple(event.participants)
            )
        case ChatSessionParticipantsUpdated():
            assert state is not None
            return msgspec.structs.replace(state, participants=tuple(event.participants))
        case ChatSessionClosed():
            assert state is not None
            return msgspec.structs.replace(state, status="closed")
        case ChatSessionArchived():
            assert state is not None
            return msgspec.structs.replace(state, status="archived")
    raise TypeError(f"not a chat-sessions event: {type(event).__name__}")


CONTEXT = Context(
    name="chat_sessions",
    aggregate_field="session_id",
    commands=(
        CreateChatSession,
        UpdateChatSessionParticipants,
        CloseChatSession,
        ArchiveChatSession,
    ),
    events=(
        ChatSessionCreated,
        ChatSessionParticipantsUpdated,
        ChatSessionClosed,
        ChatSessionArchived,
    ),
    state=ChatSession,
    decide=decide,
    evolve=evolve,
    session_of=lambda state, event: event.session_id,
    sessions=True,
)
