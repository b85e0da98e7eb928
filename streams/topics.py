"""Feed topics: what a subscription wants of its tenant's events (API.md:
`*`, `<context>`, `<context>/<aggregate_id>`, `session/<session_id>`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.catalog import Catalog
from core.errors import BadRequest
from core.messages import MAX_ID_LENGTH, Envelope

MAX_TOPICS = 32


@dataclass(frozen=True)
class Topics:
    """What a subscription wants of its tenant's events: `*` (everything),
    `<context>`, `<context>/<aggregate_id>`, `session/<session_id>` (events whose
    metadata names the session, and the session's own events: those of the context
    of sessions, `Catalog.session_context`)."""

    everything: bool = False
    contexts: frozenset[str] = frozenset()
    aggregates: frozenset[tuple[str, str]] = frozenset()
    sessions: frozenset[str] = frozenset()
    session_context: str | None = None

    @classmethod
    def parse(cls, topics: Sequence[str], catalog: Catalog) -> Topics:
        """Raise `BadRequest` naming the first topic that is not one of the four kinds."""
        if not topics:
            raise BadRequest("at least one topic is required, e.g. ?topic=*")
        if len(topics) > MAX_TOPICS:
            raise BadRequest(f"at most {MAX_TOPICS} topics per subscription")
        everything = False
        names: set[str] = set()
        aggregates: set[tuple[str, str]] = set()
        sessions: set[str] = set()
        contexts = catalog.names
        for topic in topics:
            kind, slash, rest = topic.partition("/")
            if topic == "*":
                everything = True
            elif not slash and topic in contexts:
                names.add(topic)
            elif slash and (kind == "session" or kind in contexts):
                if not 0 < len(rest) <= MAX_ID_LENGTH:
                    raise BadRequest(
                        f"bad topic {topic[:200]!r}: the id after '/' must be 1 to "
                        f"{MAX_ID_LENGTH} characters",
                        topic=topic[:200],
                    )
                if kind == "session":
                    sessions.add(rest)
                else:
                    aggregates.add((kind, rest))
            else:
                raise BadRequest(
                    f"unknown topic {topic[:200]!r}: use '*', a context "
                    f"({', '.join(sorted(contexts))}), '<context>/<id>' or 'session/<id>'",
                    topic=topic[:200],
                )
        return cls(
            everything,
            frozenset(names),
            frozenset(aggregates),
            frozenset(sessions),
            catalog.session_context,
        )

    def match(self, envelope: Envelope) -> bool:
        if self.everything or envelope.context in self.contexts:
            return True
        if (envelope.context, envelope.aggregate_id) in self.aggregates:
            return True
        if not self.sessions:
            return False
        if envelope.context == self.session_context and envelope.aggregate_id in self.sessions:
            return True
        return envelope.metadata.session_id in self.sessions
