"""What issue #2 promises a client following API.md alone: create, update, close and
archive a chat session over HTTP; watch it live over SSE; resume after a disconnect
without gap or duplicate; read it back with `?after=` — all through the real stack
(uvicorn, worker, projector) on real Redis and Postgres."""

from __future__ import annotations

import msgspec

from tests.feeds import read_events
from tests.sse import frames
from tests.stack import serving


async def test_the_whole_journey_of_one_chat_session(settings, schema) -> None:
    async with serving(settings) as s:
        c, auth = s.client, s.auth()

        async def submit(command: str, body: dict) -> dict:
            r = await c.post(f"/v1/commands/{command}?wait=5", json=body, headers=auth)
            assert r.status_code == 200, r.text
            return r.json()

        # Live: a subscriber on the tenant's chat sessions, from now on.
        async with c.stream(
            "GET", "/v1/events/stream", params={"topic": "chat_sessions"}, headers=auth
        ) as live:
            assert live.headers["content-type"].startswith("text/event-stream")
            feed = frames(live)
            created = await submit(
                "CreateChatSession",
                {"agent_id": "agent-7", "participants": [{"participant_id": "u1", "role": "user"}]},
            )
            session_id = created["session_id"]
            updated = await submit(
                "UpdateChatSessionParticipants",
                {"session_id": session_id, "add": [{"participant_id": "a2", "role": "observer"}]},
            )
            seen, resume_from = await read_events(
                feed, until={created["events"][0]["id"], updated["events"][0]["id"]}
            )
        assert [f.event for f in seen] == ["ChatSessionCreated", "ChatSessionParticipantsUpdated"]
        assert [f.envelope.aggregate_version for f in seen] == [1, 2]

        # Disconnected: more happens meanwhile.
        closed = await submit("CloseChatSession", {"session_id": session_id, "reason": "done"})
        archived = await submit("ArchiveChatSession", {"session_id": session_id})

        # Resumed with Last-Event-ID on the session's own topic: exactly what was missed.
        async with c.stream(
            "GET",
            "/v1/events/stream",
            params={"topic": f"chat_sessions/{session_id}"},
            headers={**auth, "Last-Event-ID": resume_from},
        ) as again:
            missed, _ = await read_events(frames(again), count=2)
        assert [f.envelope.id for f in missed] == [
            closed["events"][0]["id"],
            archived["events"][0]["id"],
        ]
        assert [f.envelope.aggregate_version for f in missed] == [3, 4]
        assert msgspec.json.decode(missed[0].data)["payload"] == {
            "session_id": session_id,
            "reason": "done",
        }

        # Read back, at least as fresh as the last command's position.
        r = await c.get(
            f"/v1/chat-sessions/{session_id}", params={"after": archived["position"]}, headers=auth
        )
        assert r.status_code == 200
        session = r.json()
        assert (session["status"], session["version"], session["agent_id"]) == (
            "archived",
            4,
            "agent-7",
        )
        assert session["participants"] == [
            {"participant_id": "u1", "role": "user"},
            {"participant_id": "a2", "role": "observer"},
        ]


async def test_readyz_is_503_while_postgres_is_unreachable(settings, schema) -> None:
    down = msgspec.structs.replace(settings, database_url="postgresql://postgres@127.0.0.1:1/x")
    async with serving(down, worker=False, projector=False) as s:
        r = await s.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["redis"] == "ok" and r.json()["postgres"].startswith("down")
        q = await s.client.get("/v1/chat-sessions", headers=s.auth())
        assert q.status_code == 503 and q.json()["error"]["code"] == "unavailable"
