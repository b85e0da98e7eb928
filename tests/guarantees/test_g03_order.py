"""Guarantee 3: commands of one aggregate are applied in the order they were
accepted, and its events reach every consumer (stream, read model) in order."""

from __future__ import annotations

import anyio

from tests.guarantees.test_g02_exactly_once import events_of
from tests.integration.test_pipeline import session_row
from tests.pipeline import eventually, running


async def test_one_aggregate_in_acceptance_order(settings, redis, pool) -> None:
    n = 150
    async with running(settings) as p:
        sessions = []
        for s in range(3):
            created = await p.submit(
                "CreateChatSession", {"agent_id": "a", "participants": []}, command_id=f"create-{s}"
            )
            sessions.append(created.aggregate_id)
        # interleave the sessions' commands; each session's must stay in order
        for i in range(n):
            for s, session_id in enumerate(sessions):
                await p.submit(
                    "UpdateChatSessionParticipants",
                    {
                        "session_id": session_id,
                        "add": [{"participant_id": f"p{i:03}", "role": "user"}],
                    },
                    command_id=f"add-{s}-{i}",
                )
        for s in range(3):
            assert (await p.outcome(f"add-{s}-{n - 1}")).status == "processed"

        for session_id in sessions:
            events = await events_of(p, session_id)
            assert [e.aggregate_version for e in events] == list(range(1, n + 2))
            added = [
                e.metadata.command_id for e in events if e.type == "ChatSessionParticipantsUpdated"
            ]
            assert added == [f"add-{sessions.index(session_id)}-{i}" for i in range(n)]

            async def projected(session_id: str = session_id) -> dict | None:
                row = await session_row(pool, session_id)
                return row if row and row["version"] == n + 1 else None

            row = await eventually(projected)
            assert [x["participant_id"] for x in row["participants"]] == [
                f"p{i:03}" for i in range(n)
            ]


async def test_concurrent_submissions_keep_their_acceptance_order(settings, redis) -> None:
    """Commands accepted concurrently are applied in the stream's (acceptance) order."""
    async with running(settings, projector=False) as p:
        created = await p.submit(
            "CreateChatSession", {"agent_id": "a", "participants": []}, command_id="c"
        )
        session_id = created.aggregate_id
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(
                    p.submit,
                    "UpdateChatSessionParticipants",
                    {
                        "session_id": session_id,
                        "add": [{"participant_id": f"p{i}", "role": "user"}],
                    },
                )
        shard = p.keys.shard_of("chat_sessions", "tenant-a", session_id)
        accepted = [f[b"c"] for _, f in await redis.xrange(p.keys.command_stream(shard))]

        async def all_applied() -> list | None:
            events = await events_of(p, session_id)
            return events if len(events) == 61 else None

        events = await eventually(all_applied)
        from core.messages import record_decoder

        order = [
            record_decoder.decode(raw).id
            for raw in accepted
            if record_decoder.decode(raw).aggregate_id == session_id
        ]
        assert [e.metadata.command_id for e in events] == order
