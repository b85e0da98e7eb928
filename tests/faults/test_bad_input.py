"""Guarantee 11, case by case: bad input gets a precise 4xx (or a WebSocket error
frame) and harms nothing else. Each test ends with `still_serving`: a new command
is processed and queryable, no accepted command crashed its handler, nothing is
pending in any consumer group, every projection has caught up with its streams,
and there are no dead letters. The fuzzers (`test_fuzz_http.py`,
`test_fuzz_ws.py`) end with the same check.

What is "by the rules" when a connection ends (API.md): a WebSocket is closed only
for flooding or a missing token (1008) or lagging (1013). Below Eddy, the
protocol layers refuse what is not HTTP or WebSocket at all, as the RFCs require,
and that is accepted here too: uvicorn answers a request it cannot parse (a NUL
or a raw 8-bit byte in the request line or a header, a bad Content-Length) with
its own plain-text 400 and closes the connection; a WebSocket text frame that is
not UTF-8 is failed with 1007 (RFC 6455 §8.1), a frame over 16 MiB with 1009.

Regression tests for the bugs the fuzzing found are marked "found by fuzzing".
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import jwt
import msgspec
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from redis.exceptions import ResponseError
from websockets.asyncio.client import connect as ws_connect
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

from app.registry import SYSTEM
from app.runtime import migrate
from core.settings import Settings
from projections import db
from streams.bus import FINAL, CommandBus
from streams.connection import Redis, Scripts, connect
from streams.keys import Keys
from streams.positions import EntryId, entry_id_of
from tests import services
from tests.pipeline import eventually
from tests.sockets import Client, closed_with, opened, ws_url
from tests.stack import Stack, serving

SECRET = "test-secret-that-is-long-enough-for-hs256"


# -- the system still serves ----------------------------------------------------------


async def still_serving(
    stack: Stack, accepted: Sequence[str] = (), tenant: str = "tenant-a"
) -> None:
    """After bad input: a new command is processed and queryable; every command in
    `accepted` reached a final status and none crashed its handler; nothing is
    pending or undelivered in any consumer group; every projection's checkpoint
    has reached the last entry of every event stream it reads; no dead letters."""
    c, auth = stack.client, stack.auth(tenant)
    r = await c.post(
        f"/v1/commands/CreateChatSession?wait={stack.settings.max_wait_s}",
        json={"agent_id": "still-serving", "participants": []},
        headers=auth,
    )
    assert r.status_code == 200, r.text
    done = r.json()
    r = await c.get(
        f"/v1/chat-sessions/{done['session_id']}", params={"after": done["position"]}, headers=auth
    )
    assert r.status_code == 200 and r.json()["agent_id"] == "still-serving", r.text

    settings = stack.settings
    keys = Keys.of(settings)
    redis = connect(settings.redis_url)
    pool = await db.create_pool(settings.database_url, settings.db_schema)
    try:
        bus = CommandBus(redis, Scripts(redis), keys, settings.command_ttl_s, SYSTEM.catalog)
        ids = list(dict.fromkeys(accepted))

        async def finished() -> list[Any] | None:
            statuses = await bus.statuses(tenant, ids)
            return statuses if all(s is not None and s.status in FINAL for s in statuses) else None

        statuses = await eventually(finished, within=20) if ids else []
        crashed = [s for s in statuses if s.error and s.error.get("code") == "internal_error"]
        assert not crashed, crashed

        async def settled() -> list[str] | None:
            behind = await _behind(redis, pool, keys)
            return None if behind else ["settled"]

        try:
            await eventually(settled, within=20)
        except TimeoutError:
            raise AssertionError(await _behind(redis, pool, keys)) from None
    finally:
        await pool.close()
        await redis.aclose()


async def _behind(redis: Redis, pool: db.Pool, keys: Keys) -> list[str]:
    """What is not settled yet: pending or undelivered entries of a group,
    a projection behind its stream, a dead letter."""
    behind: list[str] = []
    contexts = sorted({c for p in SYSTEM.projections for c in p.contexts})
    for context in contexts:
        for shard in keys.shards_of(context):
            for stream in (keys.command_stream(shard), keys.event_stream(shard)):
                for group in await _groups(redis, stream):
                    if group["pending"] or group.get("lag"):
                        behind.append(f"{stream} {group['name']!r}: {group}")
            if await redis.xlen(keys.dead_letters(shard)):
                behind.append(f"dead letters in {shard.name}")
            last = await _last_id(redis, keys.event_stream(shard))
            async with pool.acquire() as conn:
                for projection in SYSTEM.projections:
                    if context in projection.contexts:
                        at = await db.checkpoint(conn, projection.name, shard)
                        if at < last:
                            behind.append(f"{projection.name} on {shard.name}: {at} < {last}")
    return behind


async def _groups(redis: Redis, stream: str) -> list[dict[str, Any]]:
    try:
        return list(await redis.xinfo_groups(stream))
    except ResponseError as exc:  # no such stream: nothing was ever written to it
        assert "no such key" in str(exc).lower(), exc
        return []


async def _last_id(redis: Redis, stream: str) -> EntryId:
    try:
        info = await redis.xinfo_stream(stream)
    except ResponseError as exc:
        assert "no such key" in str(exc).lower(), exc
        return (0, 0)
    return entry_id_of(info["last-generated-id"])


@contextmanager
def serving_in_a_thread(settings: Settings) -> Iterator[tuple[Stack, BlockingPortal]]:
    """`serving(settings)` on an event loop in a thread of its own (an anyio blocking
    portal), with the schema migrated first and dropped (and the keys deleted)
    after: for synchronous tests (schemathesis, hypothesis) and module-scoped
    fixtures. Call the stack's async helpers through the portal."""
    with start_blocking_portal() as portal:
        portal.call(migrate, settings, SYSTEM)
        try:
            with portal.wrap_async_context_manager(serving(settings)) as stack:
                yield stack, portal
        finally:
            portal.call(_clean_up, settings)


async def _clean_up(settings: Settings) -> None:
    async with services.prefix_deleted(settings.redis_url, settings.key_prefix):
        await services.drop_schema(settings.database_url, settings.db_schema)


# -- helpers ------------------------------------------------------------------------------


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def cursor_of(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def token(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(
        {"sub": "a", "tenant": "tenant-a", "exp": int(time.time()) + 60} | claims,
        secret,
        algorithm=algorithm,
    )


async def raw_http(stack: Stack, request: bytes) -> bytes:
    """Send bytes no HTTP client would, read the answer until the server closes."""
    host, port = stack.url.removeprefix("http://").split(":")
    answer = b""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp(host, int(port)) as sock:
            await sock.send(request)
            try:
                while True:
                    answer += await sock.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    return answer


CREATE = {"agent_id": "a", "participants": []}


# -- HTTP: bodies -------------------------------------------------------------------------


BAD_BODIES: list[tuple[bytes, int, str, str | None]] = [
    (b"", 400, "malformed", None),
    (b"null", 400, "malformed", None),
    (b'"a string"', 400, "malformed", None),
    (b"[1, 2]", 400, "malformed", None),
    (b"{not json", 400, "malformed", None),
    (b"\xff\xfe{}", 400, "malformed", None),
    # found by fuzzing: bytes that are not UTF-8 inside a JSON string were a 500
    (b'{"agent_id": "\xff\xfe", "participants": []}', 400, "malformed", None),
    (b'{"agent_id": "\xed\xa0\x80", "participants": []}', 400, "malformed", None),
    (b'{"agent_id": "\\ud800", "participants": []}', 400, "malformed", None),
    (b"[" * 100_000 + b"]" * 100_000, 400, "malformed", None),
    (b'{"agent_id": 5, "participants": []}', 422, "invalid", "$.agent_id"),
    (b'{"agent_id": "a", "participants": "all"}', 422, "invalid", "$.participants"),
    (b'{"agent_id": "a", "participants": [], "extra": 1}', 422, "invalid", "$.extra"),
    (b'{"agent_id": "a", "participants": [], "metadata": 7}', 422, "invalid", "$.metadata"),
    (b'{"agent_id": "' + b"a" * 129 + b'", "participants": []}', 422, "invalid", "$.agent_id"),
    (b'{"agent_id": "a\\u0000", "participants": []}', 422, "invalid", "$.agent_id"),
    (b'{"agent_id": "a", "participants": [], "metadata": {"n": 1e400}}', 422, "invalid", None),
]


async def test_bad_bodies_get_a_precise_4xx(stack: Stack) -> None:
    for body, status, code, path in BAD_BODIES:
        r = await stack.client.post(
            "/v1/commands/CreateChatSession",
            content=body,
            headers={**stack.auth(), "Content-Type": "application/json"},
        )
        error = refused(r, status, code)
        if path is not None:
            assert error["fields"][0]["path"] == path, (body[:100], error)
    await still_serving(stack)


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
async def test_a_time_utc_cannot_express_is_refused_not_crashed_in_the_worker(
    stack: Stack, at: str
) -> None:
    """Found by fuzzing: accepted (202), then the handler crashed (`internal_error`)."""
    span = {"trace_id": "t1", "span_id": "s1", "name": "n", "started_at": at}
    r = await stack.client.post(
        "/v1/commands/AppendTraceSpan?wait=5", json=span, headers=stack.auth()
    )
    error = refused(r, 422, "invalid")
    assert error["fields"][0]["path"] == "$.started_at", error
    edge = {**span, "started_at": "0001-01-01T00:00:00Z", "ended_at": "9999-12-31T23:59:59Z"}
    r = await stack.client.post(
        "/v1/commands/AppendTraceSpan?wait=5", json=edge, headers=stack.auth()
    )
    assert r.status_code == 200, r.text
    await still_serving(stack, [r.json()["command_id"]])


async def test_oversize_bodies_are_413_however_they_come(stack: Stack) -> None:
    limit = stack.settings.max_body_bytes
    c, auth = stack.client, stack.auth()
    big = b'{"agent_id": "a", "participants": [], "metadata": {"x": "' + b"a" * limit + b'"}}'
    refused(
        await c.post("/v1/commands/CreateChatSession", content=big, headers=auth), 413, "too_large"
    )

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    refused(
        await c.post("/v1/commands/CreateChatSession", content=chunked(), headers=auth),
        413,
        "too_large",
    )
    # a huge string under the limit is fine, all the way to the read model
    fits = {**CREATE, "metadata": {"x": "é" * ((limit - 200) // 2)}}
    r = await c.post("/v1/commands/CreateChatSession?wait=5", json=fits, headers=auth)
    assert r.status_code == 200, r.text
    done = r.json()
    r = await c.get(
        f"/v1/chat-sessions/{done['session_id']}", params={"after": done["position"]}, headers=auth
    )
    assert r.json()["metadata"] == fits["metadata"]
    await still_serving(stack, [done["command_id"]])


async def test_free_form_values_the_read_model_must_take(stack: Stack) -> None:
    """Numbers beyond 64 bits, every escape, 32 levels: accepted, projected as sent."""
    c, auth = stack.client, stack.auth()
    metadata = {
        "big": 10**30,
        "negative": -(10**30),
        "tiny": 5e-324,
        "escapes": '\u0001\u001f"\\/\b\f\n\r\t\u2028\U0001f600',
        "deep": json.loads("[" * 31 + "]" * 31),
        "": None,
    }
    r = await c.post(
        "/v1/commands/CreateChatSession?wait=5", json={**CREATE, "metadata": metadata}, headers=auth
    )
    assert r.status_code == 200, r.text
    done = r.json()
    r = await c.get(
        f"/v1/chat-sessions/{done['session_id']}", params={"after": done["position"]}, headers=auth
    )
    assert r.json()["metadata"] == metadata
    await still_serving(stack, [done["command_id"]])


# -- HTTP: query parameters --------------------------------------------------------------


async def test_bad_query_parameters_get_a_precise_400(stack: Stack) -> None:
    c, auth = stack.client, stack.auth()
    for limit in [
        "0",
        "501",
        "-1",
        "abc",
        "1.5",
        "",
        " 5",
        "²",
        "1\u0000",
    ]:  # "²": found by fuzzing
        r = await c.get("/v1/chat-sessions", params={"limit": limit}, headers=auth)
        refused(r, 400, "bad_request")
    cursors = [
        "@@",
        "bm90IGEgY3Vyc29y",
        cursor_of({"a": 1}),
        cursor_of(["2026-01-01T00:00:00+00:00"]),
        cursor_of(["2026-01-01T00:00:00+00:00", "a", "b"]),
        cursor_of([1, "a"]),
        cursor_of(["not a time", "a"]),
        cursor_of(["2026-01-01T00:00:00", "a"]),  # no offset: Eddy's cursors have one
        # found by fuzzing: each was a 500 from Postgres
        cursor_of(["2026-01-01T00:00:00+00:00", "a\u0000"]),
        cursor_of(["9999-12-31T23:59:59-14:00", "a"]),
        cursor_of(["0001-01-01T00:00:00+14:00", "a"]),
    ]
    for path in ["/v1/chat-sessions", "/v1/traces", "/v1/message-streams"]:
        for cursor in cursors:
            r = await c.get(path, params={"cursor": cursor}, headers=auth)
            refused(r, 400, "bad_request")
    for cursor in [cursor_of(["\u0000", "t"]), cursor_of([5, "t"]), cursor_of(["a"])]:
        refused(
            await c.get("/v1/tools", params={"cursor": cursor}, headers=auth), 400, "bad_request"
        )
    refused(
        await c.get(
            "/v1/runtime-flags", params={"cursor": cursor_of(["m", "\u0000"])}, headers=auth
        ),
        400,
        "bad_request",
    )
    refused(
        await c.get("/v1/traces/t/spans", params={"cursor": cursor_of([2**31])}, headers=auth),
        400,
        "bad_request",
    )
    for params in [{"status": "open"}, {"status": ""}, {"status": "\u0000"}]:
        refused(await c.get("/v1/chat-sessions", params=params, headers=auth), 400, "bad_request")
    for path in ["/v1/tools", "/v1/message-streams", "/v1/tool-usage"]:
        refused(await c.get(path, params={"active": "maybe"}, headers=auth), 400, "bad_request")
    for after in [
        "garbage",
        "chat_sessions",
        "chat_sessions.9.1-0",
        "nope.0.1-0",
        "chat_sessions.0.abc",
        "chat_sessions.0.1-x",
        "chat_sessions.0.-1-0",
        "x" * 10_000,
    ]:
        refused(
            await c.get("/v1/chat-sessions/s", params={"after": after}, headers=auth),
            400,
            "bad_position",
        )
        if after.isprintable():  # a header cannot carry a NUL
            header = {**auth, "X-After-Position": after[:200]}
            refused(await c.get("/v1/chat-sessions/s", headers=header), 400, "bad_position")
    await still_serving(stack)


async def test_nul_characters_in_parameters_are_400_not_500(stack: Stack) -> None:
    """Found by fuzzing: a NUL in a path or query parameter reached Postgres (500)."""
    c, auth = stack.client, stack.auth()
    for path in [
        "/v1/chat-sessions/a%00b",
        "/v1/chat-sessions/%00/transcript",
        "/v1/chat-sessions/%00/trace-stats",
        "/v1/traces/%00",
        "/v1/traces/%00/spans",
        "/v1/message-streams/%00",
        "/v1/runtime-config/%00",
        "/v1/runtime-config/%00/flags",
        "/v1/runtime-config/%00/history",
        "/v1/tools/%00",
        "/v1/tools/%00/usage",
        "/v1/agents/%00/summary",
        "/v1/chat-sessions?agent_id=%00",
        "/v1/traces?session_id=a%00",
        "/v1/message-streams?session_id=%00",
        "/v1/chat-session-summaries?agent_id=%00",
        "/v1/chat-sessions/s?after=%00",
        "/v1/tools?cursor=%00",
    ]:
        refused(await c.get(path, headers=auth), 400, "bad_request")
    # the same ids without the NUL: simply not found
    refused(await c.get("/v1/chat-sessions/ab", headers=auth), 404, "not_found")
    refused(await c.get("/v1/commands/a%00b", headers=auth), 404, "not_found")
    refused(await c.get("/v1/tools/" + "x" * 4000, headers=auth), 404, "not_found")
    await still_serving(stack)


# positions Eddy never issued, beyond what Redis and Postgres can take (a shard like
# '²' that int() refuses, entry ids over 2**63 - 1): 400 `bad_position` at once


@pytest.mark.parametrize(
    "after",
    ["chat_sessions.².1-0", "chat_sessions.0.99999999999999999999-0", "traces.0.1-" + "9" * 30],
)
async def test_after_positions_beyond_range_are_400(stack: Stack, after: str) -> None:
    r = await stack.client.get("/v1/chat-sessions/s", params={"after": after}, headers=stack.auth())
    refused(r, 400, "bad_position")


BEHIND_BUT_TOO_BIG = "2~chat_sessions.1_" + "z" * 20 + ".1_" + "z" * 20
"""Behind every stream's tail, with sequence numbers over 2**64: Redis refuses the
catch-up read (today: the SSE response ends after its first frame, and the client
reconnects with the same token forever; a WebSocket is closed with 1013)."""


async def test_resume_tokens_beyond_redis_ids_are_refused_on_sse(stack: Stack) -> None:
    await stack.client.post(
        "/v1/commands/CreateChatSession?wait=5", json=CREATE, headers=stack.auth()
    )
    params = {"topic": "*", "last_event_id": BEHIND_BUT_TOO_BIG}
    async with stack.client.stream(
        "GET", "/v1/events/stream", params=params, headers=stack.auth()
    ) as r:
        assert r.status_code == 400, r.status_code


async def test_resume_tokens_beyond_redis_ids_are_refused_on_ws(stack: Stack) -> None:
    await stack.client.post(
        "/v1/commands/CreateChatSession?wait=5", json=CREATE, headers=stack.auth()
    )
    async with opened(stack) as c:
        answer = await c.ask({"op": "subscribe", "topic": "*", "since": BEHIND_BUT_TOO_BIG})
        assert answer["op"] == "error", answer
        assert answer["error"]["code"] == "bad_position", answer


# -- HTTP: headers and tokens --------------------------------------------------------------


async def test_bad_headers_and_tokens(stack: Stack) -> None:
    c, auth = stack.client, stack.auth()
    url = "/v1/commands/CreateChatSession"
    for name in ["Idempotency-Key", "X-Correlation-ID"]:
        refused(
            await c.post(url, json=CREATE, headers={**auth, name: "k" * 129}), 400, "bad_request"
        )
        refused(await c.post(url, json=CREATE, headers={**auth, name: ""}), 400, "bad_request")
    r = await c.post(url + "?wait=5", json=CREATE, headers={**auth, "Idempotency-Key": "k" * 128})
    assert r.status_code == 200 and r.json()["command_id"] == "k" * 128, r.text
    accepted = [r.json()["command_id"]]

    now = int(time.time())
    bad = [
        "",
        "Bearer",
        "Bearer not-a-jwt",
        "Basic YTpi",
        "Token " + stack.token(),
        stack.token(),
        "Bearer a.b.c",
        "Bearer ..",
        "Bearer " + "a" * 60_000,
        "Bearer " + token({}, secret="another-secret-that-is-long-enough"),
        "Bearer " + token({"exp": now - 10}),
        "Bearer " + token({"roles": ["admin"]}, secret=SECRET * 2, algorithm="HS512"),
        "Bearer "
        + jwt.encode(
            {"sub": "a", "tenant": "t", "roles": ["admin"], "exp": now + 60}, None, algorithm="none"
        ),
        "Bearer " + token({"roles": "admin"}),
        "Bearer " + token({"roles": ["admin"], "tenant": ""}),
        "Bearer " + token({"roles": ["admin"], "tenant": 5}),
        "Bearer " + token({"roles": ["admin"], "exp": "soon"}),
        "Bearer " + token({"roles": ["admin"], "nbf": now + 600}),
    ]
    for header in bad:
        headers = {"Authorization": header} if header else {}
        for method, path in [
            ("POST", url),
            ("GET", "/v1/chat-sessions"),
            ("GET", "/v1/commands/x"),
        ]:
            r = await c.request(method, path, json=CREATE, headers=headers)
            refused(r, 401, "unauthenticated")
            assert r.headers["www-authenticate"] == "Bearer"
    # the query token is for browsers' SSE and WebSocket only
    r = await c.get("/v1/chat-sessions", params={"access_token": stack.token()})
    refused(r, 401, "unauthenticated")
    r = await c.post(url, json=CREATE, headers=stack.auth(roles=("observer",)))
    refused(r, 403, "forbidden")

    # below Eddy: uvicorn refuses what is not HTTP with its own 400 and closes
    head = f"Host: x\r\nConnection: close\r\nAuthorization: Bearer {stack.token()}\r\n".encode()
    for request in [
        b"GET /v1/chat-sessions HTTP/1.1\r\n" + head + b"X-After-Position: a\x00b\r\n\r\n",
        b"GET /v1/chat-sessions/\xff HTTP/1.1\r\n" + head + b"\r\n",
        b"POST /v1/commands/CreateChatSession HTTP/1.1\r\n"
        + head
        + b"Content-Length: 99999999999999999999999\r\n\r\n{}",
        b"POST /v1/commands/CreateChatSession HTTP/1.1\r\n" + head + b"Content-Length: -1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    ]:
        answer = await raw_http(stack, request)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    # a token of 8-bit bytes is a bad token, not a crash
    answer = await raw_http(
        stack,
        b"GET /v1/chat-sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer \xe9.\xe9.\xe9\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 401 ") and b'"unauthenticated"' in answer, answer
    # an Idempotency-Key of 8-bit bytes is an id like any other
    body = msgspec.json.encode(CREATE)
    answer = await raw_http(
        stack,
        b"POST /v1/commands/CreateChatSession?wait=5 HTTP/1.1\r\n"
        + head
        + b"Idempotency-Key: \xe9\xff\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body,
    )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    accepted.append("\xe9\xff")
    await still_serving(stack, accepted)


# -- SSE ------------------------------------------------------------------------------------


async def test_bad_topics_and_positions_on_the_event_stream(stack: Stack) -> None:
    c, auth = stack.client, stack.auth()
    for params in [
        {},
        {"topic": ""},
        {"topic": "nope"},
        {"topic": "traces/"},
        {"topic": "session/"},
        {"topic": "session/" + "s" * 129},
        {"topic": "x" * 20_000},
        {"topic": ["*"] * 33},
        {"topic": "*", "last_event_id": "garbage"},
        {"topic": "*", "last_event_id": "2~"},
        {"topic": "*", "last_event_id": "2~nope.1"},
        {"topic": "*", "last_event_id": "2~traces.1.1.1.1.1"},
        {"topic": "*", "last_event_id": "2~traces.!"},
        {"topic": "*", "last_event_id": "2~" + "traces.1~" * 2000},
    ]:
        r = await c.get("/v1/events/stream", params=params, headers=auth)
        code = "bad_position" if "last_event_id" in params else "bad_request"
        refused(r, 400, code)
    refused(
        await c.get("/v1/events/stream", params={"topic": "*", "access_token": "x"}),
        401,
        "unauthenticated",
    )
    # a token ahead of every stream: an explicit reset, never a silent gap
    async with c.stream(
        "GET",
        "/v1/events/stream",
        params={"topic": "*", "last_event_id": "2~traces.zzzzzzzzzzz"},
        headers=auth,
    ) as r:
        assert r.status_code == 200
        text = ""
        with anyio.fail_after(10):
            async for chunk in r.aiter_text():
                text += chunk
                if "event: reset" in text:
                    break
        assert '"reason":"unknown_position"' in text, text
    await still_serving(stack)


# -- WebSocket ------------------------------------------------------------------------------


async def test_bad_frames_get_an_error_frame_and_the_socket_stays_open(
    settings: Settings, schema: str
) -> None:
    settings = msgspec.structs.replace(settings, max_body_bytes=64 * 1024)
    create = {"op": "command", "type": "CreateChatSession", "payload": CREATE}
    cases: list[tuple[str | bytes, str]] = [
        ("", "malformed"),
        ("not json", "malformed"),
        ("null", "malformed"),
        ("[]", "malformed"),
        ('"ping"', "malformed"),
        (b"\x00\xff binary", "malformed"),
        (b'{"op": "ping"}', "malformed"),
        ('{"op": "ping", "ref": "\\ud800"}', "malformed"),
        ("[" * 30_000 + "]" * 30_000, "malformed"),
        ('{"op": "ping", "pad": "' + "x" * (65 * 1024) + '"}', "too_large"),
        ('{"op": "ping", "pad": "' + "é" * (33 * 1024) + '"}', "too_large"),
        (json.dumps({"op": "nope"}), "invalid"),
        (json.dumps({"op": 5}), "invalid"),
        (json.dumps({"op": "ping", "ref": {"a": 1}}), "invalid"),
        (json.dumps({"op": "subscribe"}), "invalid"),
        (json.dumps({"op": "subscribe", "topic": ["*"]}), "invalid"),
        (json.dumps({"op": "subscribe", "topic": "*", "since": 5}), "invalid"),
        (json.dumps({"op": "subscribe", "topic": "x" * 10_000}), "bad_request"),
        (json.dumps({"op": "subscribe", "topic": "*", "since": "2~nope.1"}), "bad_position"),
        (json.dumps({"op": "unsubscribe", "topic": "*"}), "not_subscribed"),
        (json.dumps({"op": "command", "type": "Nope", "payload": {}}), "unknown_command"),
        (json.dumps({**create, "payload": "x"}), "malformed"),
        (json.dumps({**create, "payload": {"agent_id": 5, "participants": []}}), "invalid"),
        (json.dumps({**create, "payload": {**CREATE, "extra": 1}}), "invalid"),
        (
            json.dumps(
                {**create, "payload": {**CREATE, "metadata": json.loads("[" * 40 + "]" * 40)}}
            ),
            "invalid",
        ),
        (json.dumps({**create, "id": ""}), "bad_request"),
        (json.dumps({**create, "id": "i" * 129}), "bad_request"),
        # found by fuzzing: accepted, and the event's metadata then stopped the
        # chat_sessions projections at that entry (Postgres refuses \u0000 in jsonb)
        (json.dumps({**create, "id": "a\u0000b"}), "bad_request"),
    ]
    async with serving(settings) as stack, opened(stack) as c:
        for case, code in cases:
            await c.ws.send(case)
            answer = await c.next()
            assert answer["op"] == "error" and answer["error"]["code"] == code, (case[:200], answer)
            await c.pong()
        result = await c.command("CreateChatSession", CREATE, command_id="after-bad-frames")
        assert result["status"] == "processed", result
        await still_serving(stack, ["after-bad-frames"])


async def test_protocol_violations_close_by_the_rfc_and_harm_no_one(stack: Stack) -> None:
    """Not UTF-8 in a text frame: 1007; over 16 MiB: 1009 (the protocol layer, RFC 6455).
    Another socket, open all along, keeps working."""
    async with opened(stack) as bystander:
        async with ws_connect(ws_url(stack), additional_headers=stack.auth()) as ws:
            ws.protocol.send_frame(WsFrame(Opcode.TEXT, b'{"op": "ping", "ref": "\xff"}'))
            ws.send_data()
            code, _, _ = await closed_with(ws)
            assert code == 1007
        async with ws_connect(ws_url(stack), additional_headers=stack.auth(), max_size=None) as ws:
            await ws.send('{"op": "ping", "pad": "' + "x" * (16 * 1024 * 1024) + '"}')
            code, _, _ = await closed_with(ws)
            assert code == 1009
        await bystander.pong()
        result = await bystander.command("CreateChatSession", CREATE)
        assert result["status"] == "processed", result
    async with opened(stack) as fresh:
        await fresh.pong()
    await still_serving(stack)


async def test_a_bad_socket_token_closes_with_1008_and_nothing_else(stack: Stack) -> None:
    for query in ["", "?access_token=", "?access_token=x.y.z", f"?access_token={token({})}"]:
        async with ws_connect(ws_url(stack, query)) as ws:
            code, reason, _ = await closed_with(ws)
            assert code == 1008 and reason, (query, reason)
    async with ws_connect(ws_url(stack, f"?access_token={stack.token()}")) as ws:
        await Client(ws).pong()
    await still_serving(stack)
