"""Message streams over HTTP: start in an open session, chunks, stop, the
transcript block, the queries, and streams stopped when their session closes."""

from __future__ import annotations

from typing import Any

from tests.pipeline import eventually
from tests.stack import Stack


async def command(stack: Stack, type_name: str, payload: dict[str, Any], **headers: str) -> Any:
    r = await stack.client.post(
        f"/v1/commands/{type_name}?wait=5", json=payload, headers={**stack.auth(), **headers}
    )
    assert r.status_code in (200, 409), r.text
    return r.json()


async def open_session(stack: Stack) -> str:
    body = await command(
        stack,
        "CreateChatSession",
        {"agent_id": "agent-1", "participants": [{"participant_id": "u1", "role": "agent"}]},
    )
    assert body["status"] == "processed", body
    return str(body["session_id"])


async def start(stack: Stack, session_id: str, participant: str = "u1") -> str:
    body = await command(
        stack, "StartMessageStream", {"session_id": session_id, "participant_id": participant}
    )
    assert body["status"] == "processed", body
    return str(body["stream_id"])


async def test_a_stream_becomes_a_transcript_block_of_its_session(stack) -> None:
    session_id = await open_session(stack)
    stream_id = await start(stack, session_id)
    position = ""
    for seq, chunk in enumerate(["Hel", "lo, ", "world"], start=1):
        body = await command(
            stack, "PushStreamMessage", {"stream_id": stream_id, "seq": seq, "chunk": chunk}
        )
        assert body["status"] == "processed"
        (event,) = body["events"]
        assert event["metadata"]["session_id"] == session_id
        position = body["position"]

    auth = stack.auth()
    r = await stack.client.get(
        f"/v1/message-streams/{stream_id}", params={"after": position}, headers=auth
    )
    assert r.status_code == 200, r.text
    state = r.json()
    assert (state["status"], state["chunk_count"], state["text"]) == ("active", 3, "Hello, world")
    assert state["session_id"] == session_id and state["participant_id"] == "u1"

    body = await command(stack, "StopMessageStream", {"stream_id": stream_id, "reason": "done"})
    assert body["events"][0]["payload"]["chunk_count"] == 3
    r = await stack.client.get(
        f"/v1/chat-sessions/{session_id}/transcript",
        headers={**auth, "X-After-Position": body["position"]},
    )
    assert r.status_code == 200, r.text
    (block,) = r.json()["blocks"]
    assert block["stream_id"] == stream_id and block["text"] == "Hello, world"
    assert block["participant_id"] == "u1" and block["stopped_at"] is not None
    r = await stack.client.get(f"/v1/message-streams/{stream_id}", headers=auth)
    assert r.json()["status"] == "stopped" and r.json()["stopped_at"] is not None


async def test_seq_rules_over_http(stack) -> None:
    session_id = await open_session(stack)
    stream_id = await start(stack, session_id)
    first = await command(
        stack, "PushStreamMessage", {"stream_id": stream_id, "seq": 1, "chunk": "a"}
    )
    assert first["status"] == "processed"
    repeat = await command(
        stack, "PushStreamMessage", {"stream_id": stream_id, "seq": 1, "chunk": "a"}
    )
    assert repeat["status"] == "processed" and repeat["events"] == []
    changed = await command(
        stack, "PushStreamMessage", {"stream_id": stream_id, "seq": 1, "chunk": "b"}
    )
    assert changed["error"]["code"] == "changed_repeat"
    gap = await command(
        stack, "PushStreamMessage", {"stream_id": stream_id, "seq": 3, "chunk": "c"}
    )
    assert gap["error"]["code"] == "seq_gap"
    r = await stack.client.post(
        "/v1/commands/PushStreamMessage",
        json={"stream_id": stream_id, "seq": 0, "chunk": "a"},
        headers=stack.auth(),
    )
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "$.seq"


async def test_a_stream_needs_an_open_session(stack) -> None:
    missing = await command(
        stack, "StartMessageStream", {"session_id": "no-such-session", "participant_id": "u1"}
    )
    assert missing["error"]["code"] == "session_not_found"
    session_id = await open_session(stack)
    await command(stack, "CloseChatSession", {"session_id": session_id})
    closed = await command(
        stack, "StartMessageStream", {"session_id": session_id, "participant_id": "u1"}
    )
    assert closed["status"] == "failed" and closed["error"]["code"] == "session_not_open"


async def test_closing_a_session_stops_its_active_streams(stack) -> None:
    session_id = await open_session(stack)
    other_session = await open_session(stack)
    streams = [await start(stack, session_id) for _ in range(3)]
    untouched = await start(stack, other_session)
    await command(stack, "PushStreamMessage", {"stream_id": streams[0], "seq": 1, "chunk": "hi"})
    await command(stack, "StopMessageStream", {"stream_id": streams[2]})  # stopped already
    closed = await command(stack, "CloseChatSession", {"session_id": session_id})
    assert closed["status"] == "processed"
    auth = stack.auth()

    async def all_stopped() -> Any:
        r = await stack.client.get(
            "/v1/message-streams", params={"session_id": session_id, "active": "all"}, headers=auth
        )
        items = r.json()["items"]
        return items if all(i["status"] == "stopped" for i in items) else None

    items = await eventually(all_stopped)
    assert sorted(i["stream_id"] for i in items) == sorted(streams)
    reasons = {i["stream_id"]: i["stop_reason"] for i in items}
    assert reasons[streams[0]] == reasons[streams[1]] == "session_closed"
    assert reasons[streams[2]] is None
    r = await stack.client.get(f"/v1/chat-sessions/{session_id}/transcript", headers=auth)
    r_blocks = r.json()["blocks"]
    assert {b["stream_id"]: b["text"] for b in r_blocks} == {
        streams[0]: "hi",
        streams[1]: "",
        streams[2]: "",
    }
    r = await stack.client.get(f"/v1/message-streams/{untouched}", headers=auth)
    assert r.json()["status"] == "active"
    transcript = f"/v1/chat-sessions/{session_id}/transcript"
    first = (await stack.client.get(transcript, params={"limit": 2}, headers=auth)).json()
    assert len(first["blocks"]) == 2 and first["next_cursor"]
    params = {"limit": 2, "cursor": first["next_cursor"]}
    second = (await stack.client.get(transcript, params=params, headers=auth)).json()
    assert len(second["blocks"]) == 1 and second["next_cursor"] is None
    assert [b["stream_id"] for b in first["blocks"] + second["blocks"]] == [
        b["stream_id"] for b in r_blocks
    ]


async def test_active_streams_are_listed_in_start_order_page_by_page(stack) -> None:
    session_id = await open_session(stack)
    streams = [await start(stack, session_id) for _ in range(5)]
    body = await command(stack, "StopMessageStream", {"stream_id": streams[1]})
    auth = stack.auth()
    seen: list[str] = []
    cursor = None
    while True:
        params = {"session_id": session_id, "limit": "2", "after": body["position"]}
        if cursor:
            params["cursor"] = cursor
        r = await stack.client.get("/v1/message-streams", params=params, headers=auth)
        assert r.status_code == 200, r.text
        seen += [i["stream_id"] for i in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [s for s in streams if s != streams[1]]
    r = await stack.client.get("/v1/message-streams/nope", headers=auth)
    assert r.status_code == 404
    r = await stack.client.get(f"/v1/message-streams/{streams[0]}", headers=stack.auth("tenant-b"))
    assert r.status_code == 404
