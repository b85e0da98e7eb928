"""Event schema evolution (`core/catalog.py`): events written in an old shape are
read in the current one by every reader, through the event type's upcasters.

A small system of notes is deployed twice. Version 1 of `NoteAdded` has one field,
`text`; version 2 replaces it with `title` and `body` (an incompatible change: a
version-1 payload does not decode as version 2) and declares the upcaster from 1.
Its read model fills the same table both times (`notes`: a note's title and body),
version 1 with the whole text as both, version 2 with the event's own fields.

1. Deployed at version 1, notes are added: projected, archived, and streamed;
   then a few more while no projector runs (they wait in the stream).
2. Deployed at version 2: the live projector projects the waiting version-1
   events as version 2; an SSE client resuming from before step 1 receives every
   event as version 2; a command retried with `?wait=` answers its version-1
   event as version 2; `eddy rebuild notes` builds the table again from the
   archive, where the version-1 events are kept as written, all as version 2.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import anyio
import msgspec
import pytest

from app.cli import main
from app.runtime import migrate
from app.system import System
from core.messages import Command, Context, Envelope, Event, Issued, State, Upcaster
from core.settings import Settings
from projections import db
from projections.db import Connection
from projections.pagination import QueryArgs
from projections.projection import Answer, Batch, Projection, Query, Statements, one
from tests import services
from tests.feeds import read_events
from tests.processes import environment
from tests.sse import Frame, frames
from tests.stack import Stack, serving

TABLE = """
CREATE TABLE notes (
    tenant_id text NOT NULL,
    note_id text NOT NULL,
    title text NOT NULL,
    body text NOT NULL,
    PRIMARY KEY (tenant_id, note_id)
);
"""
UPSERT = (
    "INSERT INTO notes (tenant_id, note_id, title, body) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (tenant_id, note_id) DO UPDATE SET title = $3, body = $4"
)


class NoteState(State, frozen=True, kw_only=True):
    pass


async def get_note(conn: Connection, args: QueryArgs) -> Answer:
    return await one(conn, "SELECT note_id, title, body FROM notes", "note_id", args)


class V1:
    class AddNote(Command, frozen=True, kw_only=True):
        note_id: str
        text: str

    class NoteAdded(Event, frozen=True, kw_only=True):
        note_id: str
        text: str


class V2:
    AddNote = V1.AddNote  # the command is the same: only its event changes

    class NoteAdded(Event, frozen=True, kw_only=True):
        note_id: str
        title: str
        body: str

        schema_version: ClassVar[int] = 2
        upcasters: ClassVar[dict[int, Upcaster]] = {
            1: lambda v1: {
                "note_id": v1["note_id"],
                "title": v1["text"].partition("\n")[0],
                "body": v1["text"],
            }
        }


def decide_v1(state: Any, command: Any, issued: Issued) -> list[Event]:
    return [V1.NoteAdded(note_id=command.note_id, text=command.text)]


def decide_v2(state: Any, command: Any, issued: Issued) -> list[Event]:
    title = command.text.partition("\n")[0]
    return [V2.NoteAdded(note_id=command.note_id, title=title, body=command.text)]


async def apply_v1(conn: Connection, batch: Batch) -> None:
    statements = Statements()
    for env, event in batch:
        statements.add(UPSERT, env.tenant_id, event.note_id, event.text, event.text)
    await statements.execute(conn)


async def apply_v2(conn: Connection, batch: Batch) -> None:
    statements = Statements()
    for env, event in batch:
        statements.add(UPSERT, env.tenant_id, event.note_id, event.title, event.body)
    await statements.execute(conn)


def system(version: Any, decide: Any, apply: Any) -> System:
    context = Context(
        name="notes",
        aggregate_field="note_id",
        commands=(version.AddNote,),
        events=(version.NoteAdded,),
        state=NoteState,
        decide=decide,
        evolve=lambda state, event: NoteState(),
    )
    read_model = Projection(
        name="notes",
        reads=(context,),
        events=version.NoteAdded,
        apply=apply,
        tables=TABLE,
        queries=(Query("GetNote", "/v1/notes/{note_id}", get_note),),
    )
    return System.of([read_model])


SYSTEM_V1 = system(V1, decide_v1, apply_v1)
SYSTEM_V2 = system(V2, decide_v2, apply_v2)

TEXTS = {f"n{i}": f"note {i}\nwritten at version 1" for i in range(5)}
PROJECTED_AT_V1 = ["n0", "n1", "n2"]
WAITING_AT_V1 = ["n3", "n4"]


@pytest.fixture
async def deployed(settings: Settings) -> AsyncIterator[Settings]:
    await migrate(settings, SYSTEM_V1)
    try:
        yield settings
    finally:
        await services.drop_schema(settings.database_url, settings.db_schema)


async def add_v1(stack: Stack, note_id: str) -> dict[str, Any]:
    r = await stack.client.post(
        "/v1/commands/AddNote?wait=10",
        json={"note_id": note_id, "text": TEXTS[note_id]},
        headers={**stack.auth(), "Idempotency-Key": f"add-{note_id}"},
    )
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def rows(settings: Settings) -> dict[str, tuple[str, str]]:
    pool = await db.create_pool(settings.database_url, settings.db_schema)
    try:
        found = await pool.fetch("SELECT note_id, title, body FROM notes ORDER BY note_id")
    finally:
        await pool.close()
    return {r["note_id"]: (r["title"], r["body"]) for r in found}


def as_v2(note_id: str) -> tuple[str, str]:
    text = TEXTS[note_id]
    return text.partition("\n")[0], text


async def sse_position(stack: Stack) -> str:
    """The position of a fresh `notes` subscription: before every event."""
    async with stack.client.stream(
        "GET", "/v1/events/stream", params={"topic": "notes"}, headers=stack.auth()
    ) as response:
        first = await anext(frames(response))
    assert first.id is not None
    return first.id


async def resumed_events(stack: Stack, since: str, count: int) -> list[Frame]:
    headers = {**stack.auth(), "Last-Event-ID": since}
    async with stack.client.stream(
        "GET", "/v1/events/stream", params={"topic": "notes"}, headers=headers
    ) as response:
        got, _ = await read_events(frames(response), count=count)
    return got


@pytest.mark.timeout(120)
async def test_every_reader_sees_events_written_at_version_1_as_version_2(
    deployed: Settings,
) -> None:
    settings = deployed
    async with serving(settings, system=SYSTEM_V1) as stack:
        before = await sse_position(stack)
        first = await add_v1(stack, PROJECTED_AT_V1[0])
        for note_id in PROJECTED_AT_V1[1:]:
            await add_v1(stack, note_id)
        r = await stack.client.get(
            f"/v1/notes/{PROJECTED_AT_V1[-1]}",
            params={"after": first["position"]},
            headers=stack.auth(),
        )
        assert r.status_code == 200, r.text
        assert first["events"][0]["schema_version"] == 1
        assert msgspec.json.decode(msgspec.json.encode(first["events"][0]["payload"])) == {
            "note_id": "n0",
            "text": TEXTS["n0"],
        }
    async with serving(settings, projector=False, system=SYSTEM_V1) as stack:
        waiting = [await add_v1(stack, note_id) for note_id in WAITING_AT_V1]
    assert await rows(settings) == {n: (TEXTS[n], TEXTS[n]) for n in PROJECTED_AT_V1}

    async with serving(settings, system=SYSTEM_V2) as stack:
        # The live projector: the version-1 events that waited are projected as version 2.
        r = await stack.client.get(
            f"/v1/notes/{WAITING_AT_V1[-1]}",
            params={"after": waiting[-1]["position"]},
            headers=stack.auth(),
        )
        assert r.status_code == 200, r.text
        assert (r.json()["title"], r.json()["body"]) == as_v2(WAITING_AT_V1[-1])

        # A command added now is version 2 from the start.
        r = await stack.client.post(
            "/v1/commands/AddNote?wait=10",
            json={"note_id": "n5", "text": "note 5\nwritten at version 2"},
            headers=stack.auth(),
        )
        assert r.status_code == 200, r.text

        # An SSE client resuming from before the first note: every event as version 2.
        got = await resumed_events(stack, before, 6)
        envelopes = [frame.envelope for frame in got]
        assert [e.aggregate_id for e in envelopes] == [*TEXTS, "n5"]
        assert {e.schema_version for e in envelopes} == {2}
        assert [payload(e) for e in envelopes[:5]] == [v2_payload(n) for n in TEXTS]

        # `?wait=` on a retried version-1 command answers the event it caused back
        # then, as version 2.
        r = await stack.client.post(
            "/v1/commands/AddNote?wait=10",
            json={"note_id": "n0", "text": TEXTS["n0"]},
            headers={**stack.auth(), "Idempotency-Key": "add-n0"},
        )
        assert r.status_code == 200, r.text
        [event] = r.json()["events"]
        assert (event["schema_version"], event["payload"]) == (2, v2_payload("n0"))

        # `eddy rebuild`: the archive keeps version 1, the rebuilt rows are version 2.
        projected_at_v1 = {n: (TEXTS[n], TEXTS[n]) for n in PROJECTED_AT_V1}
        assert (await rows(settings)).items() >= projected_at_v1.items()
        code = await anyio.to_thread.run_sync(
            lambda: main(["rebuild", "notes"], environment(settings), SYSTEM_V2)
        )
        assert code == 0
        assert await rows(settings) == {
            **{n: as_v2(n) for n in TEXTS},
            "n5": ("note 5", "note 5\nwritten at version 2"),
        }
        pool = await db.create_pool(settings.database_url, settings.db_schema)
        try:
            archived = await pool.fetch(
                "SELECT schema_version, payload FROM event_archive ORDER BY entry_ms, entry_seq"
            )
        finally:
            await pool.close()
        assert [r["schema_version"] for r in archived] == [1] * 5 + [2]


def payload(envelope: Envelope) -> Any:
    return msgspec.json.decode(envelope.payload)


def v2_payload(note_id: str) -> dict[str, str]:
    title, body = as_v2(note_id)
    return {"note_id": note_id, "title": title, "body": body}


def test_without_its_upcasters_a_new_version_of_an_event_type_is_refused() -> None:
    """A raised `schema_version` needs an upcaster from every older version."""
    from core.catalog import Catalog
    from core.errors import ConfigurationError

    class Forgotten(Event, frozen=True, kw_only=True):
        title: str
        schema_version: ClassVar[int] = 3
        upcasters: ClassVar[dict[int, Upcaster]] = {1: lambda v1: v1}

    context = Context(
        name="forgetful",
        aggregate_field="id",
        commands=(),
        events=(Forgotten,),
        state=NoteState,
        decide=decide_v1,
        evolve=lambda state, event: NoteState(),
    )
    with pytest.raises(ConfigurationError, match="no upcaster from version 2"):
        Catalog([context])
