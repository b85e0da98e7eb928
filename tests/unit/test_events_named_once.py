"""Each event a projection handles is named once, and a new one cannot be forgotten
in its projection, in the cached queries over its tables or in the materialized
views over them (`projections/projection.py`).

- `apply`: the projection's `events` union is what the projector decodes and
  hands it; mypy (`assert_never`) refuses an `apply` without a case for one of
  them, and every event of the contexts it reads is in `events` or `ignores`;
- `Cache.invalidated_by` / `unaffected_by` and `View.stale_on` / `unaffected_by`:
  each event the projections they read handle is in exactly one of the two.

The checks run when the system is built (`app/registry.py`: at start-up, and in
every test), so what is tested here is that each of them refuses what it should.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.registry import SYSTEM
from app.system import System
from core.errors import ConfigurationError
from core.messages import Command, Context, Event, State
from projections.projection import (
    Batch,
    Cache,
    Invalidation,
    Projection,
    Query,
    check_invalidations,
)
from projections.views import View


class AddNote(Command, frozen=True, kw_only=True):
    note_id: str


class NoteAdded(Event, frozen=True, kw_only=True):
    text: str


class NoteRenamed(Event, frozen=True, kw_only=True):
    title: str


class Note(State, frozen=True, kw_only=True):
    pass


NOTES = Context(
    name="notes",
    aggregate_field="note_id",
    commands=(AddNote,),
    events=(NoteAdded, NoteRenamed),
    state=Note,
    decide=lambda state, command, issued: [],
    evolve=lambda state, event: Note(),
)


async def apply(conn: Any, batch: Batch) -> None:
    return None


async def answer(conn: Any, args: Any) -> dict[str, Any]:
    return {}


def notes(**changes: Any) -> Projection:
    fields: dict[str, Any] = {
        "name": "notes",
        "reads": (NOTES,),
        "events": NoteAdded | NoteRenamed,
        "apply": apply,
    }
    return Projection(**(fields | changes))


def test_a_projection_says_of_every_event_of_its_contexts_whether_it_applies_it() -> None:
    with pytest.raises(ConfigurationError, match="say whether NoteRenamed"):
        notes(events=NoteAdded)
    assert notes(events=NoteAdded, ignores=(NoteRenamed,)).handles == (NoteAdded,)
    with pytest.raises(ConfigurationError, match="named both ways"):
        notes(ignores=(NoteRenamed,))


def test_a_projection_handles_only_events_of_the_contexts_it_reads() -> None:
    with pytest.raises(ConfigurationError, match="ChatSessionCreated not handled"):
        notes(events=NoteAdded | NoteRenamed | SYSTEM.catalog.events["ChatSessionCreated"].cls)


def test_a_view_says_of_every_event_it_reads_whether_it_makes_it_stale() -> None:
    declared: dict[str, Any] = {
        "name": "note_counts",
        "select": "SELECT tenant_id, count(*) AS notes FROM notes GROUP BY tenant_id",
        "unique": ("tenant_id",),
        "reads": (notes(),),
    }
    with pytest.raises(ConfigurationError, match="view note_counts: say whether NoteRenamed"):
        View(**declared, stale_on=(NoteAdded,))
    View(**declared, stale_on=(NoteAdded,), unaffected_by=(NoteRenamed,))
    View(**declared, stale_on=(NoteAdded, NoteRenamed))


def test_a_cached_query_says_of_every_event_it_reads_whether_it_changes_its_answers() -> None:
    def cached(cache: Cache) -> list[Projection]:
        return [notes(queries=(Query("ListNotes", "/v1/notes", answer, cache=cache),))]

    adds = (Invalidation((NoteAdded,)),)
    with pytest.raises(ConfigurationError, match="ListNotes: say whether NoteRenamed"):
        check_invalidations(cached(Cache(ttl_s=1, invalidated_by=adds)))
    check_invalidations(cached(Cache(ttl_s=1, invalidated_by=adds, unaffected_by=(NoteRenamed,))))


def test_the_system_refuses_a_read_model_whose_query_forgets_an_event() -> None:
    """Where the checks run: building the system (`app/registry.py`) fails."""
    forgetful = Cache(ttl_s=1, invalidated_by=(Invalidation((NoteAdded,)),))
    read_model = notes(queries=(Query("ListNotes", "/v1/notes", answer, cache=forgetful),))
    with pytest.raises(ConfigurationError, match="NoteRenamed"):
        System.of([read_model])
    assert System.of([notes()]).catalog.names == ("notes",)


def test_every_event_of_the_system_is_applied_by_its_read_models_or_ignored() -> None:
    handled = {e for p in SYSTEM.projections for e in (*p.handles, *p.ignores)}
    assert {t.cls for t in SYSTEM.catalog.events.values()} <= handled
