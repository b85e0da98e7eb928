"""The HTTP contract of API.md: commands, statuses, queries, errors."""

from __future__ import annotations

import pytest


async def test_a_client_creates_updates_closes_and_archives_a_session(stack) -> None:
    c, auth = stack.client, stack.auth()
    r = await c.post(
        "/v1/commands/CreateChatSession?wait=5",
        json={
            "agent_id": "agent-7",
            "participants": [{"participant_id": "u1", "role": "observer"}],
        },
        headers={**auth, "Idempotency-Key": "create-1", "X-Correlation-ID": "corr-1"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    session_id = body["session_id"]
    assert body["status"] == "processed" and body["command_id"] == "create-1"
    (event,) = body["events"]
    assert event["type"] == "ChatSessionCreated" and event["aggregate_version"] == 1
    assert event["metadata"]["correlation_id"] == "corr-1"
    assert event["metadata"]["session_id"] == session_id
    assert event["position"] == body["position"]

    r = await c.get(
        f"/v1/chat-sessions/{session_id}", params={"after": body["position"]}, headers=auth
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "active" and r.json()["agent_id"] == "agent-7"

    for command, payload in [
        (
            "UpdateChatSessionParticipants",
            {"change_roles": [{"participant_id": "u1", "role": "agent"}]},
        ),
        ("CloseChatSession", {"reason": "done"}),
        ("ArchiveChatSession", {}),
    ]:
        r = await c.post(
            f"/v1/commands/{command}?wait=5",
            json={"session_id": session_id, **payload},
            headers=auth,
        )
        assert r.status_code == 200, r.text
    r = await c.get(
        f"/v1/chat-sessions/{session_id}", params={"after": r.json()["position"]}, headers=auth
    )
    assert r.json()["status"] == "archived" and r.json()["version"] == 4
    assert r.json()["participants"] == [{"participant_id": "u1", "role": "agent"}]

    r = await c.get("/v1/chat-sessions", params={"status": "active"}, headers=auth)
    assert session_id not in [s["session_id"] for s in r.json()["items"]]
    r = await c.get(
        "/v1/chat-sessions", params={"status": "archived", "agent_id": "agent-7"}, headers=auth
    )
    assert [s["session_id"] for s in r.json()["items"]] == [session_id]
    r = await c.get(f"/v1/chat-sessions/{session_id}/transcript", headers=auth)
    assert r.status_code == 200 and r.json() == {
        "session_id": session_id,
        "blocks": [],
        "next_cursor": None,
    }

    r = await c.get("/v1/commands/create-1", headers=auth)
    assert r.json()["status"] == "processed" and r.json()["type"] == "CreateChatSession"
    assert r.json()["events"] == [event["id"]]


async def test_without_wait_the_answer_is_202_then_the_status_moves_on(stack) -> None:
    c, auth = stack.client, stack.auth()
    r = await c.post(
        "/v1/commands/CreateChatSession", json={"agent_id": "a", "participants": []}, headers=auth
    )
    assert r.status_code == 202 and r.json()["status"] == "pending"
    command_id = r.json()["command_id"]
    r = await c.post(
        "/v1/commands/CloseChatSession?wait=5", json={"session_id": "nope"}, headers=auth
    )
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "not_found" and r.json()["status"] == "failed"
    r = await c.get(f"/v1/commands/{command_id}", headers=auth)
    assert r.status_code == 200 and r.json()["status"] in ("pending", "consumed", "processed")


async def test_a_repeated_key_returns_the_original_outcome(stack) -> None:
    c, auth = stack.client, stack.auth()
    headers = {**auth, "Idempotency-Key": "k1"}
    first = await c.post(
        "/v1/commands/CreateChatSession?wait=5",
        json={"agent_id": "a", "participants": []},
        headers=headers,
    )
    again = await c.post(
        "/v1/commands/CreateChatSession",
        json={"agent_id": "a", "participants": []},
        headers=headers,
    )
    assert first.status_code == again.status_code == 200
    assert first.json()["events"] == again.json()["events"]
    other = await c.post("/v1/commands/CloseChatSession", json={"session_id": "x"}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


async def test_a_key_reused_with_another_payload_is_refused_and_the_same_one_answered(
    stack,
) -> None:
    """The IETF Idempotency-Key draft: the same key with another payload is a 422 and
    nothing is accepted; with the same payload, however it is spelled, the first
    command's answer."""
    c, headers = stack.client, {**stack.auth(), "Idempotency-Key": "k-payload"}
    body = {"agent_id": "a", "participants": [], "metadata": {"x": 1, "y": [1, 2]}}
    first = await c.post("/v1/commands/CreateChatSession?wait=5", json=body, headers=headers)
    assert first.status_code == 200, first.text
    respelled = b'{"metadata": {"y": [1, 2], "x": 1}, "participants": [], "agent_id": "a"}'
    same = await c.post(
        "/v1/commands/CreateChatSession?wait=5",
        content=respelled,
        headers={**headers, "Content-Type": "application/json"},
    )
    assert same.status_code == 200 and same.json()["events"] == first.json()["events"]
    changed = {**body, "agent_id": "b"}
    reused = await c.post("/v1/commands/CreateChatSession?wait=5", json=changed, headers=headers)
    assert reused.status_code == 422, reused.text
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    # and with the server-made session id the first answer named: the same command
    session_id = first.json()["session_id"]
    named = await c.post(
        "/v1/commands/CreateChatSession?wait=5",
        json={**body, "session_id": session_id},
        headers=headers,
    )
    assert named.status_code == 200 and named.json()["events"] == first.json()["events"]
    sessions = await c.get("/v1/chat-sessions", params={"agent_id": "b"}, headers=stack.auth())
    assert sessions.json()["items"] == []


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/commands/CreateChatSession", b"{not json", 400, "malformed"),
        ("/v1/commands/CreateChatSession", b"[1, 2]", 400, "malformed"),
        ("/v1/commands/CreateChatSession", b"\xff\xfe", 400, "malformed"),
        ("/v1/commands/CreateChatSession", b'{"participants": []}', 422, "invalid"),
        ("/v1/commands/CreateChatSession", b'{"agent_id": 5, "participants": []}', 422, "invalid"),
        (
            "/v1/commands/CreateChatSession",
            b'{"agent_id": "a", "participants": [], "x": 1}',
            422,
            "invalid",
        ),
        ("/v1/commands/NoSuchCommand", b"{}", 404, "unknown_command"),
        (
            "/v1/commands/CreateChatSession?wait=abc",
            b'{"agent_id": "a", "participants": []}',
            400,
            "bad_request",
        ),
    ],
)
async def test_bad_input_gets_a_precise_error(stack, path, body, status, code) -> None:
    r = await stack.client.post(
        path, content=body, headers={**stack.auth(), "Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


async def test_schema_errors_name_the_field(stack) -> None:
    r = await stack.client.post(
        "/v1/commands/CreateChatSession",
        json={"agent_id": "a", "participants": [{"participant_id": "p", "role": "king"}]},
        headers=stack.auth(),
    )
    assert r.status_code == 422
    (field,) = r.json()["error"]["fields"]
    assert field["path"] == "$.participants[0].role"


async def test_deeply_nested_json_is_refused_and_harms_nothing(stack) -> None:
    c, auth = stack.client, stack.auth()
    deep = b'{"agent_id": "a", "participants": [], "metadata": {"x": ' + b"[" * 5000
    r = await c.post(
        "/v1/commands/CreateChatSession", content=deep + b"]" * 5000 + b"}}", headers=auth
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed"
    nested = b'{"agent_id": "a", "participants": [], "metadata": {"x": ' + b"[" * 40
    r = await c.post(
        "/v1/commands/CreateChatSession", content=nested + b"]" * 40 + b"}}", headers=auth
    )
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "$.metadata"
    ok = b'{"agent_id": "a", "participants": [], "metadata": {"x": ' + b"[" * 30
    r = await c.post(
        "/v1/commands/CreateChatSession?wait=5", content=ok + b"]" * 30 + b"}}", headers=auth
    )
    assert r.status_code == 200, r.text
    r = await c.get(
        f"/v1/chat-sessions/{r.json()['session_id']}",
        params={"after": r.json()["position"]},
        headers=auth,
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"agent_id": "a\u0000b", "participants": []},
        {"agent_id": "a", "participants": [{"participant_id": "p\u0000", "role": "user"}]},
        {"agent_id": "a", "participants": [], "metadata": {"k\u0000": 1}},
        {"agent_id": "a", "participants": [], "routing": {"k": ["\u0000"]}},
    ],
)
async def test_nul_characters_are_refused_before_anything_is_accepted(stack, body) -> None:
    r = await stack.client.post("/v1/commands/CreateChatSession", json=body, headers=stack.auth())
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid"


async def test_oversize_body_is_413(stack) -> None:
    big = b'{"agent_id": "' + b"a" * (stack.settings.max_body_bytes + 1) + b'"}'
    r = await stack.client.post("/v1/commands/CreateChatSession", content=big, headers=stack.auth())
    assert r.status_code == 413


async def test_tokens_and_roles(stack) -> None:
    c = stack.client
    body = {"agent_id": "a", "participants": []}
    assert (await c.post("/v1/commands/CreateChatSession", json=body)).status_code == 401
    bad = {"Authorization": "Bearer not-a-jwt"}
    assert (
        await c.post("/v1/commands/CreateChatSession", json=body, headers=bad)
    ).status_code == 401
    observer = stack.auth(roles=("observer",))
    r = await c.post("/v1/commands/CreateChatSession", json=body, headers=observer)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert (await c.get("/v1/chat-sessions", headers=observer)).status_code == 200


async def test_unknown_routes_and_methods_answer_in_the_error_shape(stack) -> None:
    r = await stack.client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await stack.client.delete("/v1/commands/CreateChatSession", headers=stack.auth())
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    # every method of the path, from both of its routes (RFC 9110: Allow lists them all)
    assert r.headers["allow"] == "GET, HEAD, POST"
    r = await stack.client.put("/v1/admin/dead-letters/x", headers=stack.auth())
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, HEAD"
    r = await stack.client.post("/v1/chat-sessions", headers=stack.auth())
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


async def test_unknown_ids_are_404(stack) -> None:
    auth = stack.auth()
    assert (await stack.client.get("/v1/chat-sessions/nope", headers=auth)).status_code == 404
    assert (await stack.client.get("/v1/commands/nope", headers=auth)).status_code == 404


async def test_pagination_walks_every_session_once(stack) -> None:
    c, auth = stack.client, stack.auth()
    last = None
    for _ in range(7):
        last = await c.post(
            "/v1/commands/CreateChatSession?wait=5",
            json={"agent_id": "pager", "participants": []},
            headers=auth,
        )
    position = last.json()["position"]
    seen, cursor = [], None
    while True:
        params = {
            "agent_id": "pager",
            "limit": 3,
            "after": position,
            **({"cursor": cursor} if cursor else {}),
        }
        page = (await c.get("/v1/chat-sessions", params=params, headers=auth)).json()
        seen += [s["session_id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7
    assert (await c.get("/v1/chat-sessions", params={"limit": 0}, headers=auth)).status_code == 400
    assert (
        await c.get("/v1/chat-sessions", params={"cursor": "@@"}, headers=auth)
    ).status_code == 400


async def test_bad_after_position_is_400(stack) -> None:
    r = await stack.client.get(
        "/v1/chat-sessions/x", params={"after": "garbage"}, headers=stack.auth()
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_position"


async def test_operations_routes(stack) -> None:
    c = stack.client
    assert (await c.get("/healthz")).json() == {"status": "ok"}
    ready = await c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] == "ok"
    schema = (await c.get("/v1/schema")).json()
    assert {"CreateChatSession", "CloseChatSession"} <= set(schema["commands"])
    assert "ChatSessionArchived" in schema["events"]
    spec = (await c.get("/openapi.json")).json()
    assert "/v1/commands/CreateChatSession" in spec["paths"]
    assert "/v1/chat-sessions/{session_id}/transcript" in spec["paths"]
    metrics = (await c.get("/metrics")).text
    assert 'eddy_http_request_seconds_count{endpoint="healthz",status="200"}' in metrics
    assert 'eddy_http_request_seconds_count{endpoint="readyz",status="200"} 1.0' in metrics
