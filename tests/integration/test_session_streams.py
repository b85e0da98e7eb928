"""The process manager that stops a closed session's message streams: exactly
once per stream, even when it is killed half-way through a session's streams —
in-process at a chosen submission, and as a real `eddy worker` SIGKILLed."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from app.process_managers import SESSION_STREAMS, stop_command_id
from app.registry import SYSTEM
from core.messages import CommandRecord
from streams.bus import Accepted, CommandBus
from streams.process_managers import run_process_managers
from tests.pipeline import ADMIN, Pipeline, eventually, running
from tests.processes import fleet

STREAMS = 12
KILLED_AFTER = 5


class Killed(Exception):
    """Stands for the process dying between two submissions."""


class DyingBus(CommandBus):
    """A bus whose process dies once, after `KILLED_AFTER` submissions."""

    submitted = 0
    killed = 0

    async def submit(self, record: CommandRecord, shard: Any) -> Accepted:
        if self.submitted == KILLED_AFTER and not self.killed:
            self.killed += 1
            raise Killed
        self.submitted += 1
        return await super().submit(record, shard)


async def records_of(p: Pipeline, type_name: str) -> list[CommandRecord]:
    found = []
    for shard in p.keys.shards_of("message_streams"):
        for _, fields in await p.redis.xrange(p.keys.command_stream(shard)):
            record = msgspec.json.decode(fields[b"c"], type=CommandRecord)
            if record.type == type_name:
                found.append(record)
    return found


async def events_of(p: Pipeline, type_name: str) -> list[dict[str, Any]]:
    found = []
    for shard in p.keys.shards_of("message_streams"):
        for _, fields in await p.redis.xrange(p.keys.event_stream(shard)):
            envelope = msgspec.json.decode(fields[b"e"])
            if envelope["type"] == type_name:
                found.append(envelope)
    return found


async def test_a_process_manager_killed_half_way_stops_every_stream_once(settings) -> None:
    async with running(settings, projector=False, reacting=False) as p:
        created = await p.submit(
            "CreateChatSession",
            {"agent_id": "a", "participants": [{"participant_id": "u1", "role": "agent"}]},
        )
        session_id = created.aggregate_id
        assert (await p.outcome(created.command_id)).status == "processed"
        streams = []
        for _ in range(STREAMS):
            accepted = await p.submit(
                "StartMessageStream", {"session_id": session_id, "participant_id": "u1"}
            )
            assert (await p.outcome(accepted.command_id)).status == "processed"
            streams.append(accepted.aggregate_id)

        bus = DyingBus(p.redis, p.scripts, p.keys, settings.command_ttl_s, SYSTEM.catalog)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                run_process_managers,
                *(p.redis, p.scripts, p.keys, settings, SYSTEM.catalog, [SESSION_STREAMS], bus),
            )
            closed = await p.submit("CloseChatSession", {"session_id": session_id})
            assert (await p.outcome(closed.command_id)).status == "processed"

            async def all_stopped() -> list[dict[str, Any]] | None:
                stopped = await events_of(p, "MessageStreamStopped")
                return stopped if len(stopped) >= STREAMS else None

            stopped = await eventually(all_stopped, within=20)
            tg.cancel_scope.cancel()
        assert bus.killed == 1, "the process manager was never killed"
        assert sorted(e["aggregate_id"] for e in stopped) == sorted(streams)
        assert all(e["payload"]["reason"] == "session_closed" for e in stopped)
        # Killed after 5 submissions, it reacted to the close again from the start:
        # still one stop command per stream, each with the id derived from its stream.
        stops = await records_of(p, "StopMessageStream")
        assert sorted(r.id for r in stops) == sorted(
            stop_command_id(ADMIN.tenant, s) for s in streams
        )
        assert all(r.causation_id for r in stops)
        for s in streams:
            status = await p.bus.status(ADMIN.tenant, stop_command_id(ADMIN.tenant, s))
            assert status is not None and status.status == "processed"


async def test_a_stream_started_as_its_session_closes_is_stopped(settings) -> None:
    """The start is decided while the session is open, and the close is applied
    before the process manager sees the start: the start's reaction stops it."""
    async with running(settings, projector=False, reacting=False) as p:
        created = await p.submit(
            "CreateChatSession",
            {"agent_id": "a", "participants": [{"participant_id": "u1", "role": "agent"}]},
        )
        session_id = created.aggregate_id
        await p.outcome(created.command_id)
        accepted = await p.submit(
            "StartMessageStream", {"session_id": session_id, "participant_id": "u1"}
        )
        await p.outcome(accepted.command_id)
        closed = await p.submit("CloseChatSession", {"session_id": session_id})
        await p.outcome(closed.command_id)
        # Only now does the process manager run: both events are waiting for it,
        # in whatever order its shards deliver them.
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                run_process_managers,
                *(p.redis, p.scripts, p.keys, settings, SYSTEM.catalog, [SESSION_STREAMS]),
            )
            stop_id = stop_command_id(ADMIN.tenant, accepted.aggregate_id)

            async def stopped() -> Any:
                status = await p.bus.status(ADMIN.tenant, stop_id)
                return status if status and status.status == "processed" else None

            await eventually(stopped)
            tg.cancel_scope.cancel()
        assert len(await records_of(p, "StopMessageStream")) == 1


MANY = 600


async def stop_commands(p: Pipeline) -> int:
    """Commands in the message-streams command streams beyond the `MANY` starts."""
    async with p.redis.pipeline(transaction=False) as pipe:
        for shard in p.keys.shards_of("message_streams"):
            pipe.xlen(p.keys.command_stream(shard))
        lengths = await pipe.execute()
    return sum(lengths) - MANY


@pytest.mark.slow
async def test_a_worker_process_sigkilled_while_stopping_streams_stops_each_once(
    settings, redis, tmp_path
) -> None:
    """The real thing: `eddy worker` (which runs the process managers) SIGKILLed
    while it is part-way through stopping a closed session's streams."""
    async with running(settings, projector=False, reacting=False) as p:
        created = await p.submit(
            "CreateChatSession",
            {"agent_id": "a", "participants": [{"participant_id": "u1", "role": "agent"}]},
        )
        session_id = created.aggregate_id
        await p.outcome(created.command_id)
        starts = [
            await p.submit("StartMessageStream", {"session_id": session_id, "participant_id": "u1"})
            for _ in range(MANY)
        ]
        for accepted in starts:
            assert (await p.outcome(accepted.command_id)).status == "processed"
    streams = [a.aggregate_id for a in starts]

    p = Pipeline(settings, redis)
    async with fleet(settings, redis, tmp_path) as f:
        victim = await f.start("worker")
        await p.submit("CloseChatSession", {"session_id": session_id})
        with anyio.fail_after(20):  # kill it once it has issued a third of the stops
            while True:
                if await stop_commands(p) >= MANY // 3:
                    break
                await anyio.sleep(0.001)
        await victim.kill()
        # Measured: killed at 200-202 of the 600 stops.
        assert await stop_commands(p) < MANY, "the process was not killed half-way"
        await f.start("worker")

        async def all_processed() -> bool:
            found = await p.bus.statuses(
                ADMIN.tenant, [stop_command_id(ADMIN.tenant, s) for s in streams]
            )
            return all(s is not None and s.status == "processed" for s in found)

        await eventually(all_processed, within=30)
        stops = await records_of(p, "StopMessageStream")
    assert sorted(r.id for r in stops) == sorted(stop_command_id(ADMIN.tenant, s) for s in streams)
    assert len(await events_of(p, "MessageStreamStopped")) == MANY
