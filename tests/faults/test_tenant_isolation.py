"""Guarantee 10 across the whole public surface: a token of tenant B never sees or
changes anything of tenant A.

One journey through the real stack (uvicorn, worker, projector). Tenant A makes one
of everything (a session with participants, a finished and a live message stream, a
trace whose span calls a tool, a runtime config, a tool, a dead letter); every id
and every text A writes carries A's tag (`A<run>`), so any of it in an answer to B
is found by looking for the tag. Tenant B has data of its own under other ids.
Then B, with an admin token, tries A's ids everywhere:

- every query route, taken from `SYSTEM.projections` (so a new one is walked without
  being listed here), plain and with A's ids as filters. A asks first, twice, so
  the cached queries hold A's answers when B asks. For each request: A's answer
  is a 200 that B's is not (the probe means something); B's answer equals B's
  answer for ids nobody has (A's ids swapped for them) — 404, an empty list or
  B's own rows, never A's counts; and it holds A's tag only where B's own URL
  put it.
- commands naming A's ids, every command type, over WebSocket and over HTTP:
  those that need an existing aggregate fail (B has none under those ids), those
  that create one make B's own; afterwards every answer A gets is exactly what it
  was before.
- command statuses: A's command ids are 404 to B; B reusing A's idempotency key
  (HTTP and WebSocket) gets a command of its own, and A's status stays as it was.
- feeds: B's SSE feeds and WebSocket subscriptions of `*`, of every context and
  of `<context>/<A's id>` and `session/<A's id>`, opened before A did anything,
  show only B's events (each gets every B event it matches); B catching up from
  before it all (SSE `Last-Event-ID`, WebSocket `since`) too. A's own `*` feed
  shows A's events and none of B's.
- dead letters (`/v1/admin/dead-letters…`): A's is not in B's list, and showing,
  replaying or purging it as B is a 404.

`test_every_route_is_walked` fails when the app gets a route this walk does not
cover.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from starlette.routing import Route, WebSocketRoute
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.registry import SYSTEM
from app.web import create_app
from core.messages import Envelope
from core.settings import Settings
from streams.connection import Redis
from streams.keys import Keys
from streams.positions import parse_entry_id
from streams.topics import Topics
from tests.pipeline import eventually
from tests.sockets import opened, ws_url
from tests.sse import Frame, frames
from tests.stack import Stack, serving

WAIT_S = 15
CONTEXT_NAMES = [c.name for c in SYSTEM.contexts]
Json = dict[str, Any]


@dataclass(frozen=True)
class Ids:
    """The ids of one tenant's things; every one (and every text it writes) holds `tag`."""

    tag: str

    @property
    def session(self) -> str:
        return f"{self.tag}-session"

    @property
    def stream(self) -> str:
        return f"{self.tag}-stream"

    @property
    def live(self) -> str:
        return f"{self.tag}-live"

    @property
    def trace(self) -> str:
        return f"{self.tag}-trace"

    @property
    def module(self) -> str:
        return f"{self.tag}-module"

    @property
    def tool(self) -> str:
        return f"{self.tag}-tool"

    @property
    def tool_name(self) -> str:
        return f"{self.tag}-search"

    @property
    def agent(self) -> str:
        return f"{self.tag}-agent"

    @property
    def path(self) -> dict[str, str]:
        """The value of every path parameter of a query route."""
        return {
            "session_id": self.session,
            "stream_id": self.live,
            "trace_id": self.trace,
            "module": self.module,
            "tool_id": self.tool,
            "agent_id": self.agent,
        }

    @property
    def filters(self) -> dict[str, str]:
        """Query-string filters naming these ids (and widening every status filter)."""
        return {
            "agent_id": self.agent,
            "session_id": self.session,
            "status": "all",
            "active": "all",
        }

    @property
    def aggregates(self) -> dict[str, str]:
        """An aggregate id of each context, for `<context>/<id>` topics."""
        return {
            "chat_sessions": self.session,
            "traces": self.trace,
            "message_streams": self.live,
            "runtime_config": self.module,
            "tools": self.tool,
        }

    def swap(self, text: str, other: Ids) -> str:
        """`text` with every id of these swapped for `other`'s."""
        return text.replace(self.tag, other.tag)


def fill(path: str, ids: Ids) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in ids.path, f"{path}: add an id for {{{name}}} to Ids.path"
        return ids.path[name]

    return re.sub(r"\{(\w+)\}", value, path)


def script_of_a(a: Ids) -> list[tuple[str, Json]]:
    """What tenant A does: one of everything, all of it holding A's tag."""
    bot, user = f"{a.tag}-bot", f"{a.tag}-user"
    return [
        (
            "CreateChatSession",
            {
                "session_id": a.session,
                "agent_id": a.agent,
                "participants": [
                    {"participant_id": user, "role": "user"},
                    {"participant_id": bot, "role": "agent"},
                ],
                "metadata": {"note": f"{a.tag} metadata"},
                "routing": {"queue": f"{a.tag}-queue"},
            },
        ),
        (
            "UpdateChatSessionParticipants",
            {
                "session_id": a.session,
                "add": [{"participant_id": f"{a.tag}-observer", "role": "observer"}],
            },
        ),
        (
            "StartMessageStream",
            {"stream_id": a.stream, "session_id": a.session, "participant_id": bot},
        ),
        ("PushStreamMessage", {"stream_id": a.stream, "seq": 1, "chunk": f"{a.tag} says hello"}),
        ("StopMessageStream", {"stream_id": a.stream}),
        (
            "StartMessageStream",
            {"stream_id": a.live, "session_id": a.session, "participant_id": bot},
        ),
        ("PushStreamMessage", {"stream_id": a.live, "seq": 1, "chunk": f"{a.tag} is typing"}),
        (
            "RegisterTool",
            {
                "tool_id": a.tool,
                "name": a.tool_name,
                "description": f"{a.tag} tool",
                "input_schema": {"type": "object", "title": f"{a.tag} input"},
            },
        ),
        ("UpdateToolDefinition", {"tool_id": a.tool, "description": f"{a.tag} searches"}),
        (
            "AppendTraceSpan",
            {
                "trace_id": a.trace,
                "session_id": a.session,
                "span_id": f"{a.tag}-span",
                "name": f"{a.tag}-run",
                "started_at": "2026-11-25T10:00:00Z",
                "ended_at": "2026-11-25T10:00:01Z",
                "status": "error",
                "attributes": {"tool": a.tool_name},
            },
        ),
        ("SetRuntimeFlag", {"module": a.module, "flag": f"{a.tag}-flag", "enabled": True}),
        ("UpdateRuntimeConfig", {"module": a.module, "settings": {"note": f"{a.tag} setting"}}),
    ]


def script_of_b(b: Ids) -> list[tuple[str, Json]]:
    """B's own data, under B's ids: so B's lists are not empty."""
    user = f"{b.tag}-user"
    return [
        (
            "CreateChatSession",
            {
                "session_id": b.session,
                "agent_id": b.agent,
                "participants": [{"participant_id": user, "role": "user"}],
            },
        ),
        (
            "StartMessageStream",
            {"stream_id": b.live, "session_id": b.session, "participant_id": user},
        ),
        (
            "RegisterTool",
            {"tool_id": b.tool, "name": b.tool_name, "input_schema": {"type": "object"}},
        ),
        (
            "AppendTraceSpan",
            {
                "trace_id": b.trace,
                "session_id": b.session,
                "span_id": "s1",
                "name": "run",
                "started_at": "2026-11-25T10:00:00Z",
                "attributes": {"tool": b.tool_name},
            },
        ),
        ("SetRuntimeFlag", {"module": b.module, "flag": "streaming", "enabled": True}),
    ]


def needing_an_aggregate(a: Ids, b: Ids) -> list[tuple[str, Json]]:
    """B's commands naming A's ids that need the aggregate to exist: B has none
    under those ids, so every one fails, and nothing of A's moves."""
    return [
        (
            "UpdateChatSessionParticipants",
            {"session_id": a.session, "remove": [f"{a.tag}-user"]},
        ),
        ("CloseChatSession", {"session_id": a.session}),
        ("ArchiveChatSession", {"session_id": a.session}),
        (
            "StartMessageStream",
            {"stream_id": f"{b.tag}-other", "session_id": a.session, "participant_id": "p"},
        ),
        ("PushStreamMessage", {"stream_id": a.live, "seq": 2, "chunk": "from b"}),
        ("StopMessageStream", {"stream_id": a.live}),
        ("FinalizeTrace", {"trace_id": a.trace}),
        ("PurgeTrace", {"trace_id": a.trace}),
        ("ResetRuntimeConfig", {"module": a.module}),
        ("UpdateToolDefinition", {"tool_id": a.tool, "description": "from b"}),
        ("DeactivateTool", {"tool_id": a.tool}),
    ]


def creating(a: Ids, b: Ids) -> list[tuple[str, Json]]:
    """B's commands naming A's ids that create an aggregate: B's own, under A's ids."""
    user = f"{b.tag}-user"
    return [
        (
            "CreateChatSession",
            {
                "session_id": a.session,
                "agent_id": b.agent,
                "participants": [{"participant_id": user, "role": "user"}],
            },
        ),
        (
            "StartMessageStream",
            {"stream_id": a.live, "session_id": a.session, "participant_id": user},
        ),
        ("PushStreamMessage", {"stream_id": a.live, "seq": 1, "chunk": "b's own"}),
        (
            "AppendTraceSpan",
            {
                "trace_id": a.trace,
                "session_id": a.session,
                "span_id": "s1",
                "name": "b-run",
                "started_at": "2026-11-25T10:00:00Z",
                "attributes": {"tool": a.tool_name},
            },
        ),
        ("SetRuntimeFlag", {"module": a.module, "flag": "b-flag", "enabled": False}),
        ("UpdateRuntimeConfig", {"module": a.module, "settings": {"b": 1}}),
        (
            "RegisterTool",
            {"tool_id": a.tool, "name": a.tool_name, "input_schema": {"type": "object"}},
        ),
    ]


@dataclass
class Tenant:
    stack: Stack
    name: str
    headers: dict[str, str]
    positions: dict[str, str]
    """The last position seen per shard (`<context>.<shard>`), shared by both tenants."""
    commands: list[str] = field(default_factory=list)
    """Ids of the commands it submitted over HTTP."""
    events: list[Json] = field(default_factory=list)
    """The envelopes its HTTP commands made."""

    async def submit(self, type_name: str, payload: Json, key: str | None = None) -> Json:
        """POST the command and wait for its outcome (200 or 409)."""
        headers = dict(self.headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        r = await self.stack.client.post(
            f"/v1/commands/{type_name}?wait=10", json=payload, headers=headers
        )
        assert r.status_code in (200, 409), (type_name, r.status_code, r.text)
        outcome: Json = r.json()
        self.commands.append(outcome["command_id"])
        for envelope in outcome.get("events", []):
            self.events.append(envelope)
            shard, _, entry = envelope["position"].rpartition(".")
            known = self.positions.get(shard)
            if known is None or parse_entry_id(entry) > parse_entry_id(known.rpartition(".")[2]):
                self.positions[shard] = envelope["position"]
        return outcome

    async def run(self, script: list[tuple[str, Json]]) -> list[Json]:
        return [await self.submit(type_name, payload) for type_name, payload in script]

    async def get(self, path: str, params: dict[str, str] | None = None) -> httpx.Response:
        r = await self.stack.client.get(path, params=params, headers=self.headers)
        assert r.status_code not in (429, 500, 503, 504), (path, r.status_code, r.text)
        return r


# -- queries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    query: str
    path: str
    filtered: bool

    def request(self, ids: Ids) -> tuple[str, dict[str, str]]:
        return fill(self.path, ids), (ids.filters if self.filtered else {})


def probes() -> list[Probe]:
    """Every query route of every projection, plain and with filters."""
    return [
        Probe(q.name, q.path, filtered)
        for p in SYSTEM.projections
        for q in p.queries
        for filtered in (False, True)
    ]


async def settle(tenant: Tenant, probe: Probe, ids: Ids) -> None:
    """Ask once with `?after=` each known position: the answers that follow reflect
    every event made so far (views included)."""
    path, params = probe.request(ids)
    for position in list(tenant.positions.values()):
        await tenant.get(path, {**params, "after": position})


async def answers_of(tenant: Tenant, ids: Ids) -> dict[Probe, tuple[int, str]]:
    found = {}
    for probe in probes():
        await settle(tenant, probe, ids)
        path, params = probe.request(ids)
        r = await tenant.get(path, params)
        found[probe] = (r.status_code, r.text)
    return found


async def walk_queries(
    a: Tenant, b: Tenant, a_ids: Ids, fresh: Ids
) -> dict[Probe, tuple[int, str]]:
    """The three checks on every probe; A's answers, for comparing later."""
    snapshot = {}
    for probe in probes():
        await settle(a, probe, a_ids)
        path, params = probe.request(a_ids)
        first, second = await a.get(path, params), await a.get(path, params)
        assert first.status_code == 200, (probe, first.text)
        assert first.text == second.text, probe
        snapshot[probe] = (first.status_code, first.text)

        as_b = await b.get(path, params)
        fresh_path, fresh_params = probe.request(fresh)
        as_b_fresh = await b.get(fresh_path, fresh_params)
        # 1. The probe means something: A sees something there that B does not.
        assert as_b.text != first.text, (probe, as_b.text)
        # 2. What B sees does not depend on anything of A's.
        assert (as_b.status_code, a_ids.swap(as_b.text, fresh)) == (
            as_b_fresh.status_code,
            as_b_fresh.text,
        ), probe
        # 3. Nothing of A's in it, beyond the ids B itself put in the URL.
        shown = as_b.text
        for asked in [path, *params.values()]:
            for value in a_ids.path.values():
                if value in asked:
                    shown = shown.replace(value, "")
        assert a_ids.tag not in shown, (probe, as_b.text)
    return snapshot


# -- feeds -------------------------------------------------------------------------------


def topics_of(ids: Ids) -> list[str]:
    """Every kind of topic, with `ids` where a topic names an id."""
    named = ids.aggregates
    assert set(named) == set(CONTEXT_NAMES), "add an aggregate id of each context to Ids"
    return [
        "*",
        f"session/{ids.session}",
        *CONTEXT_NAMES,
        *(f"{context}/{named[context]}" for context in CONTEXT_NAMES),
    ]


def matching(topic: str, events: list[Json]) -> set[str]:
    """Ids of the events a subscription to `topic` gets."""
    topics = Topics.parse([topic], SYSTEM.catalog)
    envelopes = [msgspec.json.decode(msgspec.json.encode(e), type=Envelope) for e in events]
    return {e.id for e in envelopes if topics.match(e)}


@dataclass
class Feeds:
    """Everything some SSE responses and one WebSocket delivered, by topic."""

    sse: dict[str, list[Frame]] = field(default_factory=dict)
    ws: dict[str, list[Json]] = field(default_factory=dict)
    openings: dict[str, str] = field(default_factory=dict)
    """Each SSE feed's first id, the WebSocket's `subscribed` positions (`ws:<topic>`)."""

    def seen(self, kind: str, topic: str) -> list[tuple[str, str]]:
        """(tenant, event id) of every event the feed of `topic` delivered."""
        if kind == "sse":
            return [
                (f.envelope.tenant_id, f.envelope.id)
                for f in self.sse[topic]
                if f.data is not None and f.event != "reset"
            ]
        return [(e["event"]["tenant_id"], e["event"]["id"]) for e in self.ws[topic]]


async def read_sse(response: httpx.Response, into: list[Frame], opened: anyio.Event) -> None:
    stream = frames(response)
    first = await anext(stream)
    into.append(first)
    opened.set()
    with contextlib.suppress(httpx.ReadError):  # closed when the test ends
        async for frame in stream:
            if frame.data is not None:
                into.append(frame)


async def read_ws(ws: ClientConnection, feeds: Feeds) -> None:
    with contextlib.suppress(ConnectionClosed):  # closed when the test ends
        async for raw in ws:
            frame = json.loads(raw)
            if frame["op"] == "event":
                feeds.ws[frame["topic"]].append(frame)
            elif frame["op"] == "subscribed":
                feeds.openings[f"ws:{frame['topic']}"] = frame["position"]


async def open_feeds(
    stack: Stack, exits: AsyncExitStack, tg: Any, tenant: str, topics: list[str], *, ws: bool
) -> Feeds:
    """Subscribe `tenant` to each of `topics`: one SSE response each, and (with `ws`)
    one WebSocket with every topic; readers run in `tg` until cancelled."""
    feeds = Feeds()
    token = stack.token(tenant)
    client = await exits.enter_async_context(httpx.AsyncClient(base_url=stack.url, timeout=30))
    for topic in topics:
        response = await exits.enter_async_context(
            client.stream(
                "GET", "/v1/events/stream", params={"topic": topic, "access_token": token}
            )
        )
        assert response.status_code == 200, topic
        feeds.sse[topic] = []
        opened = anyio.Event()
        tg.start_soon(read_sse, response, feeds.sse[topic], opened)
        await opened.wait()
        feeds.openings[topic] = feeds.sse[topic][0].id or ""
    if ws:
        socket = await exits.enter_async_context(
            connect(ws_url(stack), additional_headers=stack.auth(tenant))
        )
        for topic in topics:
            feeds.ws[topic] = []
            await socket.send(json.dumps({"op": "subscribe", "topic": topic}))
        tg.start_soon(read_ws, socket, feeds)
        await eventually(lambda: _all_subscribed(feeds, topics))
    return feeds


async def _all_subscribed(feeds: Feeds, topics: list[str]) -> bool:
    return all(f"ws:{topic}" in feeds.openings for topic in topics)


async def until_delivered(
    feeds: Feeds, kind: str, topic: str, tenant: str, expected: set[str]
) -> list[tuple[str, str]]:
    """Wait until the feed has delivered `expected` (event ids), failing at once on
    an event of any other tenant; everything it delivered."""

    async def delivered() -> list[tuple[str, str]] | None:
        seen = feeds.seen(kind, topic)
        strangers = [event for event in seen if event[0] != tenant]
        assert not strangers, f"{kind} {topic}: events of another tenant: {strangers}"
        return seen if expected <= {event for _, event in seen} else None

    return await eventually(delivered, within=WAIT_S)


# -- the journey ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_tenant_b_never_sees_or_changes_anything_of_tenant_a(
    settings: Settings, schema: str, redis: Redis
) -> None:
    run = uuid.uuid4().hex[:8]
    a_ids, b_ids, fresh = Ids(f"A{run}"), Ids(f"B{run}"), Ids(f"F{run}")
    settings = msgspec.structs.replace(settings, max_attempts=2)
    async with serving(settings) as stack, AsyncExitStack() as exits:
        positions: dict[str, str] = {}
        a = Tenant(stack, "tenant-a", stack.auth("tenant-a"), positions)
        b = Tenant(stack, "tenant-b", stack.auth("tenant-b"), positions)
        tg = await exits.enter_async_context(anyio.create_task_group())
        exits.callback(tg.cancel_scope.cancel)
        b_feeds = await open_feeds(stack, exits, tg, "tenant-b", topics_of(a_ids), ws=True)
        a_feeds = await open_feeds(stack, exits, tg, "tenant-a", ["*"], ws=False)

        # -- A makes one of everything; B makes things of its own
        for i, (type_name, payload) in enumerate(script_of_a(a_ids)):
            outcome = await a.submit(type_name, payload, key=f"{a_ids.tag}-command-{i}")
            assert outcome["status"] == "processed", (type_name, outcome)
        letter = await dead_letter_of(a, redis, settings, a_ids)
        for outcome in await b.run(script_of_b(b_ids)):
            assert outcome["status"] == "processed", outcome

        # -- queries (and the query cache)
        before = await walk_queries(a, b, a_ids, fresh)
        await every_cached_query_was_hit(stack)

        # -- command statuses and idempotency keys
        await statuses_and_keys(stack, a, b, b_ids)

        # -- commands naming A's ids, over WebSocket, then HTTP
        async with opened(stack, "tenant-b") as ws_b:
            for type_name, payload in needing_an_aggregate(a_ids, b_ids):
                result = await ws_b.command(type_name, payload)
                assert result["status"] == "failed", (type_name, result)
        for type_name, payload in needing_an_aggregate(a_ids, b_ids):
            outcome = await b.submit(type_name, payload)
            assert outcome["status"] == "failed", (type_name, outcome)
        for type_name, payload in creating(a_ids, b_ids):
            outcome = await b.submit(type_name, payload)
            assert outcome["status"] == "processed", (type_name, outcome)
            assert {e["tenant_id"] for e in outcome["events"]} <= {"tenant-b"}
        async with opened(stack, "tenant-b") as ws_b:
            for type_name, payload in creating(a_ids, b_ids):  # again: B's own, once more
                result = await ws_b.command(type_name, payload)
                assert result["status"] in ("processed", "failed"), (type_name, result)
        covered = {t for t, _ in needing_an_aggregate(a_ids, b_ids) + creating(a_ids, b_ids)}
        assert covered == set(SYSTEM.catalog.commands), (
            f"commands not tried: {set(SYSTEM.catalog.commands) - covered}"
        )
        mine = await b.get(f"/v1/chat-sessions/{a_ids.session}")
        assert mine.json()["agent_id"] == b_ids.agent

        # -- A's answers are exactly what they were
        assert await answers_of(a, a_ids) == before

        # -- feeds, live: every topic gets B's events it matches, and nothing of A's
        for topic in topics_of(a_ids):
            expected = matching(topic, b.events)
            assert expected, f"{topic}: B made no event for it"
            for kind in ("sse", "ws"):
                await until_delivered(b_feeds, kind, topic, "tenant-b", expected)
        await until_delivered(a_feeds, "sse", "*", "tenant-a", {e["id"] for e in a.events})

        # -- feeds, catching up from before it all
        await caught_up_sees_only_b(stack, exits, tg, b_feeds, b.events)

        # -- dead letters
        await dead_letters_stay_with_a(a, b, letter)
    tg.cancel_scope.cancel()


async def dead_letter_of(a: Tenant, redis: Redis, settings: Settings, a_ids: Ids) -> str:
    """A's command that can never be applied (its aggregate's state in Redis is
    broken, as in guarantee 6's test) ends as a dead letter of A's: its id."""
    poisoned = f"{a_ids.tag}-poisoned"
    created = await a.submit(
        "CreateChatSession", {"session_id": poisoned, "agent_id": a_ids.agent, "participants": []}
    )
    assert created["status"] == "processed"
    keys = Keys.of(settings)
    state = keys.aggregate(keys.shard_of("chat_sessions", a.name, poisoned), a.name, poisoned)
    await redis.delete(state)
    await redis.set(state, "not a hash")
    failed = await a.submit("CloseChatSession", {"session_id": poisoned})
    assert failed["error"]["code"] == "dead_lettered", failed
    return str(failed["error"]["dead_letter_id"])


async def dead_letters_stay_with_a(a: Tenant, b: Tenant, letter: str) -> None:
    mine = await a.get("/v1/admin/dead-letters")
    assert letter in [d["dead_letter_id"] for d in mine.json()["items"]]
    assert (await a.get(f"/v1/admin/dead-letters/{letter}")).status_code == 200
    listed = await b.get("/v1/admin/dead-letters")
    assert listed.status_code == 200 and a.name not in listed.text, listed.text
    assert letter not in listed.text
    client, headers = b.stack.client, b.headers
    assert (
        await client.get(f"/v1/admin/dead-letters/{letter}", headers=headers)
    ).status_code == 404
    replayed = await client.post(f"/v1/admin/dead-letters/{letter}/replay", headers=headers)
    assert replayed.status_code == 404, replayed.text
    purged = await client.delete(f"/v1/admin/dead-letters/{letter}", headers=headers)
    assert purged.status_code == 404, purged.text
    still = await a.get(f"/v1/admin/dead-letters/{letter}")
    assert still.status_code == 200 and still.json()["tenant_id"] == a.name


async def every_cached_query_was_hit(stack: Stack) -> None:
    """A asked every query twice before B asked: each cached query's second answer
    came from Redis, so B asked while A's answers were there to be (wrongly) found."""
    metrics = (await stack.client.get("/metrics")).text
    cached = {q.name for p in SYSTEM.projections for q in p.queries if q.cache is not None}
    assert cached
    for name in cached:
        hits = re.findall(
            rf'eddy_query_cache_total{{[^}}]*outcome="hit"[^}}]*query="{name}"', metrics
        )
        hits += re.findall(
            rf'eddy_query_cache_total{{[^}}]*query="{name}"[^}}]*outcome="hit"', metrics
        )
        assert hits, f"{name}: no cache hit"


async def statuses_and_keys(stack: Stack, a: Tenant, b: Tenant, b_ids: Ids) -> None:
    for command_id in a.commands:
        assert (await b.get(f"/v1/commands/{command_id}")).status_code == 404, command_id
        assert (await a.get(f"/v1/commands/{command_id}")).status_code == 200, command_id
    a_before = {k: (await a.get(f"/v1/commands/{k}")).json() for k in a.commands[:2]}
    # B reuses A's first key over HTTP, A's second over WebSocket: commands of B's own.
    first, second = a.commands[:2]
    own = await b.submit(
        "CreateChatSession", {"agent_id": b_ids.agent, "participants": []}, key=first
    )
    assert own["status"] == "processed" and own["command_id"] == first
    assert {e["tenant_id"] for e in own["events"]} == {"tenant-b"}
    assert not {e["id"] for e in own["events"]} & set(a_before[first].get("events", []))
    async with opened(stack, "tenant-b") as ws_b:
        payload = {"agent_id": b_ids.agent, "participants": []}
        result = await ws_b.command("CreateChatSession", payload, command_id=second)
        assert result["status"] == "processed", result
    status = (await b.get(f"/v1/commands/{second}")).json()
    assert status["type"] == "CreateChatSession"
    assert not set(status["events"]) & set(a_before[second]["events"])
    for key, seen in a_before.items():  # A's statuses did not move
        assert (await a.get(f"/v1/commands/{key}")).json() == seen


async def caught_up_sees_only_b(
    stack: Stack, exits: AsyncExitStack, tg: Any, live: Feeds, b_events: list[Json]
) -> None:
    """B resumes `*` from its very first position, over SSE and over a WebSocket:
    the catch-up reads the streams (both tenants' entries) and shows only B's."""
    expected = matching("*", b_events)
    client = await exits.enter_async_context(httpx.AsyncClient(base_url=stack.url, timeout=30))
    headers = {**stack.auth("tenant-b"), "Last-Event-ID": live.openings["*"]}
    response = await exits.enter_async_context(
        client.stream("GET", "/v1/events/stream", params={"topic": "*"}, headers=headers)
    )
    replayed = Feeds(sse={"*": []})
    opened = anyio.Event()
    tg.start_soon(read_sse, response, replayed.sse["*"], opened)
    socket = await exits.enter_async_context(
        connect(ws_url(stack), additional_headers=stack.auth("tenant-b"))
    )
    replayed.ws["*"] = []
    since = live.openings["ws:*"]
    await socket.send(json.dumps({"op": "subscribe", "topic": "*", "since": since}))
    tg.start_soon(read_ws, socket, replayed)
    for kind in ("sse", "ws"):
        seen = await until_delivered(replayed, kind, "*", "tenant-b", expected)
        assert len(seen) == len(set(seen)), f"{kind}: an event twice"


# -- the surface -------------------------------------------------------------------------------

TENANT_FREE = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/schema"),
}
"""Routes that show nothing of any tenant."""
WALKED = {
    ("POST", "/v1/commands/{type}"),
    ("GET", "/v1/commands/{command_id}"),
    ("GET", "/v1/events/stream"),
    ("WEBSOCKET", "/v1/ws"),
    ("GET", "/v1/admin/dead-letters"),
    ("GET", "/v1/admin/dead-letters/{id}"),
    ("DELETE", "/v1/admin/dead-letters/{id}"),
    ("POST", "/v1/admin/dead-letters/{id}/replay"),
}
"""Routes the journey above walks by name (query routes it takes from `SYSTEM.projections`)."""


async def test_every_route_is_walked(settings: Settings) -> None:
    routes: set[tuple[str, str]] = set()
    for route in create_app(settings, SYSTEM).routes:
        if isinstance(route, WebSocketRoute):
            routes.add(("WEBSOCKET", route.path))
        elif isinstance(route, Route):
            routes |= {(m, route.path) for m in route.methods or () if m != "HEAD"}
    queries = {("GET", q.path) for p in SYSTEM.projections for q in p.queries}
    missing = routes - TENANT_FREE - WALKED - queries
    assert not missing, f"routes the tenant walk does not cover: {sorted(missing)}"
