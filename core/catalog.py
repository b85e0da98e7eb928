"""The messages of a system's contexts, by name, and how old events are read.

A `Catalog` is built once, in the composition root, from the contexts of the
system (`app/registry.py`), and handed to the framework: the worker looks up
command types in it, every reader of events (projector, fan-out, rebuild, `?wait=`
answers, dead-letter replays, process managers) passes what it read through
`current`.

Schema evolution (msgspec's rules, https://jcristharif.com/msgspec/schema-evolution.html):
a new field gets a default and an annotation never changes, so old payloads still
decode. A change that cannot be made that way — a field renamed, split, its type
or meaning changed — raises the event's `schema_version` and declares, for each
older version `v`, an upcaster that turns a version-`v` payload (a JSON object)
into a version-`v + 1` one:

```python
class NoteAdded(Event, frozen=True, kw_only=True):
    note_id: str
    title: str  # version 1 had `text` instead of `title` and `body`
    body: str

    schema_version: ClassVar[int] = 2
    upcasters: ClassVar[dict[int, Upcaster]] = {
        1: lambda v1: {"note_id": v1["note_id"], "title": v1["text"][:80], "body": v1["text"]}
    }
```

Stored events are never rewritten: the streams and the event archive keep what
was written; `current` upcasts, one step at a time, as the event is read, so every
reader sees the current shape and its `schema_version`. An event already current
costs one dict lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from core.errors import ConfigurationError
from core.messages import Command, Context, Envelope, Event

_encoder = msgspec.json.Encoder()


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

    @property
    def version(self) -> int:
        return self.cls.schema_version


class Catalog:
    """Every context of a system, its command types and its event types, by name."""

    def __init__(self, contexts: Sequence[Context]) -> None:
        self.contexts = tuple(contexts)
        self.by_name: dict[str, Context] = {}
        self.commands: dict[str, CommandType] = {}
        self.events: dict[str, EventType] = {}
        for context in self.contexts:
            if context.name in self.by_name:
                raise ConfigurationError(f"two contexts named {context.name!r}")
            self.by_name[context.name] = context
            for command in context.commands:
                self._unique(command.__name__)
                self.commands[command.__name__] = CommandType(
                    command.__name__, context, command, msgspec.json.Decoder(command)
                )
            for event in context.events:
                self._unique(event.__name__)
                _check_upcasters(event)
                self.events[event.__name__] = EventType(
                    event.__name__, context, event, msgspec.json.Decoder(event)
                )
        self.names = tuple(self.by_name)
        sessions = [c.name for c in self.contexts if c.sessions]
        if len(sessions) > 1:
            raise ConfigurationError(f"more than one context of sessions: {sessions}")
        self.session_context: str | None = sessions[0] if sessions else None
        """The context whose aggregates are the sessions of `session/<id>` topics."""

    def _unique(self, name: str) -> None:
        if name in self.commands or name in self.events:
            raise ConfigurationError(f"two messages named {name!r}")

    def current(self, envelope: Envelope) -> Envelope:
        """The envelope with its payload in its event type's current shape (a type
        this catalog does not know, or a version it does not know yet, as it is)."""
        known = self.events.get(envelope.type)
        if known is None or envelope.schema_version >= known.version:
            return envelope
        payload = upcast(known.cls, envelope.schema_version, msgspec.json.decode(envelope.payload))
        return msgspec.structs.replace(
            envelope,
            schema_version=known.version,
            payload=msgspec.Raw(_encoder.encode(payload)),
        )


def upcast(event: type[Event], version: int, payload: Any) -> Any:
    """A version-`version` payload of `event`, brought to its current version."""
    for step in range(max(version, 1), event.schema_version):
        payload = event.upcasters[step](payload)
    return payload


def _check_upcasters(event: type[Event]) -> None:
    missing = [v for v in range(1, event.schema_version) if v not in event.upcasters]
    if missing:
        raise ConfigurationError(
            f"{event.__name__} is at schema_version {event.schema_version}"
            f" but has no upcaster from version {', '.join(map(str, missing))}"
        )
