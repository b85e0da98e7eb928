"""Guarantee 10: tenants are isolated — commands, queries, lists, command statuses.

(Feeds: `test_g10_tenant_isolation_feeds.py`.)
"""

from __future__ import annotations

from tests.stack import serving


async def test_tenant_b_never_sees_or_changes_tenant_a(settings, schema) -> None:
    async with serving(settings) as s:
        c, a, b = s.client, s.auth("tenant-a"), s.auth("tenant-b")
        created = await c.post(
            "/v1/commands/CreateChatSession?wait=5",
            json={"session_id": "shared-id", "agent_id": "agent-a", "participants": []},
            headers={**a, "Idempotency-Key": "same-key"},
        )
        assert created.status_code == 200
        position = created.json()["position"]

        # queries and lists
        assert (
            await c.get("/v1/chat-sessions/shared-id", params={"after": position}, headers=b)
        ).status_code == 404
        listed = await c.get("/v1/chat-sessions", params={"after": position}, headers=b)
        assert listed.json()["items"] == []
        transcript = await c.get("/v1/chat-sessions/shared-id/transcript", headers=b)
        assert transcript.status_code == 404
        # command statuses
        assert (await c.get("/v1/commands/same-key", headers=b)).status_code == 404
        # commands: B's "shared-id" is B's own aggregate, A's is untouched
        closed = await c.post(
            "/v1/commands/CloseChatSession?wait=5", json={"session_id": "shared-id"}, headers=b
        )
        assert closed.status_code == 409 and closed.json()["error"]["code"] == "not_found"
        mine = await c.post(
            "/v1/commands/CreateChatSession?wait=5",
            json={"session_id": "shared-id", "agent_id": "agent-b", "participants": []},
            headers={**b, "Idempotency-Key": "same-key"},
        )
        assert mine.status_code == 200 and mine.json()["events"][0]["tenant_id"] == "tenant-b"
        row_a = await c.get(
            "/v1/chat-sessions/shared-id", params={"after": mine.json()["position"]}, headers=a
        )
        row_b = await c.get(
            "/v1/chat-sessions/shared-id", params={"after": mine.json()["position"]}, headers=b
        )
        assert row_a.json()["agent_id"] == "agent-a" and row_a.json()["status"] == "active"
        assert row_b.json()["agent_id"] == "agent-b"
