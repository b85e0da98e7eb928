"""Wire messages: the event envelope, the command record, and the base classes of
every context's commands, events and aggregate states.

All are frozen, kw-only msgspec Structs. Schema evolution follows msgspec's rules:
a new field gets a default, an annotation never changes; an incompatible change
bumps the event's `schema_version` and adds an upcaster (`core/catalog.py`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import msgspec

from core.errors import BadRequest

Upcaster = Callable[[Any], Any]
"""Turns an event's payload (a decoded JSON object) of one `schema_version` into the next."""


class Command(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every command payload. The class name is the command type."""


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every event payload. The class name is the event type.

    An incompatible change raises `schema_version` and adds, for every older
    version `v`, `upcasters[v]`: a version-`v` payload to a version-`v + 1` one.
    """

    schema_version: ClassVar[int] = 1
    upcasters: ClassVar[Mapping[int, Upcaster]] = {}


class State(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every aggregate state (kept in Redis, never shown to clients)."""


class Metadata(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    command_id: str
    correlation_id: str
    causation_id: str
    actor: str
    session_id: str | None = None


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """The one DTO of an event, for HTTP, SSE, WebSocket and the streams.

    In the stream the `position` is empty: it is the entry's id, filled in by readers.
    """

    id: str
    type: str
    schema_version: int
    context: str
    aggregate_id: str
    aggregate_version: int
    tenant_id: str
    occurred_at: datetime
    position: str = ""
    payload: msgspec.Raw
    metadata: Metadata


class CommandRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A command as it travels through its command stream."""

    id: str
    type: str
    tenant_id: str
    actor: str
    roles: list[str]
    correlation_id: str
    aggregate_id: str
    accepted_at: datetime
    payload: msgspec.Raw
    causation_id: str | None = None
    """The event that caused this command, when a process manager issued it."""


class Issued(msgspec.Struct, frozen=True, kw_only=True):
    """Who issued a command and when: what `decide` may know besides the state."""

    command_id: str
    tenant_id: str
    actor: str
    roles: tuple[str, ...]
    now: datetime
    related: Any = None
    """The state of the aggregate the context's `related(command)` names (None if
    it does not exist): a read of another context, never a write to it."""


Decide = Callable[[Any, Any, Issued], Sequence[Event]]
Evolve = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class Context:
    """A bounded context: its messages and its pure decision functions.

    `decide(state | None, command, issued)` returns the events a command causes or
    raises `Rejected`; `evolve(state | None, event)` folds one event into the state.
    `session_of(state, event)` names the chat session an event is tied to, if any.
    """

    name: str
    aggregate_field: str
    commands: tuple[type[Command], ...]
    events: tuple[type[Event], ...]
    state: type[State]
    decide: Decide
    evolve: Evolve
    roles: dict[str, frozenset[str]] = field(default_factory=dict)
    """Roles allowed per command type; a type not listed allows `DEFAULT_ROLES`."""
    session_of: Callable[[Any, Any], str | None] = lambda state, event: None
    related: Callable[[Any], tuple[str, str] | None] | None = None
    """`(context, aggregate_id)` whose current state `decide` needs (as `issued.related`).

    Read when the command is decided; it can change right after, so a rule that
    must hold afterwards needs a process manager as well (see `app/process_managers.py`)."""
    unique: Callable[[Any], tuple[str, str] | None] | None = None
    """`(scope, value)` that must be unique in the tenant (a tool's name): the worker
    reserves it for the command before deciding, refuses the command with
    `<scope>_taken` if another command holds it, and frees it if the command fails."""
    sessions: bool = False
    """Its aggregates are the sessions of `session/<id>` feed topics: a topic gets the
    session's own events, and every event whose `metadata.session_id` names it."""

    def allowed_roles(self, command_type: str) -> frozenset[str]:
        return self.roles.get(command_type, DEFAULT_ROLES)


DEFAULT_ROLES = frozenset({"admin", "agent", "user"})
ROLES = frozenset({"admin", "agent", "user", "observer"})

MAX_ID_LENGTH = 128
"""The longest id a client may choose: a command id, a topic's aggregate id."""


def check_id(value: str, name: str) -> str:
    """A client's id (`Idempotency-Key`, `X-Correlation-ID`, a WebSocket command's
    `id`): 1 to `MAX_ID_LENGTH` characters and no NUL, which would reach Postgres
    in every event's metadata (and stop the projections there)."""
    if not 0 < len(value) <= MAX_ID_LENGTH:
        raise BadRequest(f"{name} must be 1 to {MAX_ID_LENGTH} characters")
    if "\x00" in value:
        raise BadRequest(f"{name} holds a NUL character (\\u0000)")
    return value


ID_NAMESPACE = uuid.UUID("5b0c3a52-3f51-4e0b-9a43-6e6479000001")


def derived_id(tenant_id: str, command_id: str) -> str:
    """The id the server makes for an omitted aggregate id.

    Derived from the command id, so a retried submission names the same aggregate.
    """
    return str(uuid.uuid5(ID_NAMESPACE, f"{tenant_id}\x00{command_id}"))


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


envelope_encoder = msgspec.json.Encoder()
envelope_decoder = msgspec.json.Decoder(Envelope)
record_decoder = msgspec.json.Decoder(CommandRecord)
