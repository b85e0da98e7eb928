"""ARCHITECTURE.md's "Adding a context" walk-through, run as it is written: its
domain module, its read model and its tables are taken from the document's code
blocks, the context is added with the one registry line it shows, and a client
then rates a message and reads the rating back."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import app.contexts
import app.readmodels
from app.registry import PROCESS_MANAGERS, READ_MODELS, VIEWS
from app.runtime import migrate
from app.system import System
from core.settings import Settings
from projections import projection
from tests import services
from tests.stack import serving

DOCUMENT = Path(__file__).resolve().parents[2] / "ARCHITECTURE.md"


def walk_through() -> dict[str, list[str]]:
    """The code blocks of the walk-through, by language, in order."""
    text = DOCUMENT.read_text().partition("## Adding a context")[2]
    blocks: dict[str, list[str]] = {}
    for language, code in re.findall(r"```(\w+)\n(.*?)```", text, re.DOTALL):
        blocks.setdefault(language, []).append(code)
    return blocks


@contextmanager
def module(package: types.ModuleType, name: str, code: str) -> Iterator[types.ModuleType]:
    """`code` as the module `<package>.<name>`, importable while inside."""
    dotted = f"{package.__name__}.{name}"
    made = types.ModuleType(dotted)
    sys.modules[dotted] = made
    setattr(package, name, made)
    try:
        exec(compile(code, f"ARCHITECTURE.md:{dotted}", "exec"), made.__dict__)
        yield made
    finally:
        del sys.modules[dotted]
        delattr(package, name)


@pytest.fixture
def feedback(monkeypatch: pytest.MonkeyPatch) -> Iterator[System]:
    """The system with the walk-through's context added by its one registry line."""
    python, sql = walk_through()["python"], walk_through()["sql"]
    domain, read_model, registry_line = python
    assert "feedback.PROJECTION," in registry_line
    tables = {("app.readmodels", "feedback"): sql[0]}
    monkeypatch.setattr(projection, "tables", lambda package, name: tables[(package, name)])
    with (
        module(app.contexts, "feedback", domain),
        module(app.readmodels, "feedback", read_model) as made,
    ):
        yield System.of((*READ_MODELS, made.PROJECTION), VIEWS, PROCESS_MANAGERS)


@pytest.fixture
async def deployed(settings: Settings, feedback: System) -> AsyncIterator[Settings]:
    await migrate(settings, feedback)
    try:
        yield settings
    finally:
        await services.drop_schema(settings.database_url, settings.db_schema)


async def test_the_walk_through_adds_a_working_context(
    deployed: Settings, feedback: System
) -> None:
    assert [c.name for c in feedback.contexts][-1] == "feedback"
    async with serving(deployed, system=feedback) as stack:
        c, auth = stack.client, stack.auth(roles=("user",))
        r = await c.post(
            "/v1/commands/CreateChatSession?wait=5",
            json={"agent_id": "a", "participants": [{"participant_id": "u1", "role": "user"}]},
            headers=auth,
        )
        session_id = r.json()["session_id"]
        rating: dict[str, Any] = {"session_id": session_id, "stream_id": "s1", "score": 4}
        r = await c.post("/v1/commands/RateMessage?wait=5", json=rating, headers=auth)
        assert r.status_code == 200, r.text
        [event] = r.json()["events"]
        assert event["type"] == "MessageRated" and event["metadata"]["session_id"] == session_id
        r = await c.get(
            "/v1/ratings",
            params={"session_id": session_id, "after": r.json()["position"]},
            headers=auth,
        )
        assert r.status_code == 200, r.text
        assert [(i["stream_id"], i["score"]) for i in r.json()["items"]] == [("s1", 4)]

        # The domain's rules, the roles and the schema, as for any context.
        unknown = {**rating, "session_id": "no-such-session"}
        r = await c.post("/v1/commands/RateMessage?wait=5", json=unknown, headers=auth)
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_not_found"
        observer = stack.auth(roles=("observer",))
        r = await c.post("/v1/commands/RateMessage", json=rating, headers=observer)
        assert r.status_code == 403
        r = await c.post("/v1/commands/RateMessage", json={**rating, "score": 6}, headers=auth)
        assert r.status_code == 422
