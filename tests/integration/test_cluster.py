"""The same code on a Redis Cluster: the core flows of the single-Redis tests, run
again against the throwaway 3-master cluster of `tests/services.py`.

The tests are the single-Redis ones, imported: only the `settings` fixture
differs (its `redis_url` names the cluster), so both deployments are held to one
set of assertions: the pipeline, exactly-once by id, per-aggregate order, the
fan-out with resume and retention, and a client's whole HTTP + SSE journey. The
shards of a test (2 per context, 10 streams) land in different slots, on
different nodes; the cluster is thrown away after the session.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import pytest
from redis.asyncio.cluster import RedisCluster

from core.settings import Settings
from projections import db
from streams.connection import Redis
from streams.fanout import reader_groups
from streams.keys import Keys
from tests.conftest import fresh_settings
from tests.guarantees.test_g02_exactly_once import (
    events_of,
    test_a_redelivered_command_is_applied_once,
    test_the_same_id_submitted_twice_is_one_command,
)
from tests.guarantees.test_g03_order import test_concurrent_submissions_keep_their_acceptance_order
from tests.integration.test_chat_streaming import (
    test_500_chunks_pushed_over_a_websocket_reach_every_subscriber_in_order,
    test_500_chunks_pushed_over_http_reach_every_subscriber_in_order,
)
from tests.integration.test_client_journey import test_the_whole_journey_of_one_chat_session
from tests.integration.test_every_command_and_query import test_every_command_and_every_query
from tests.integration.test_fanout import (
    test_a_position_beyond_retention_gets_one_reset,
    test_a_token_resumes_exactly_from_every_delivery,
    test_events_reach_only_their_tenant_and_topics,
    test_resume_continues_after_the_token_while_events_keep_coming,
)
from tests.integration.test_message_streams import (
    test_a_stream_needs_an_open_session,
    test_closing_a_session_stops_its_active_streams,
)
from tests.integration.test_pipeline import (
    session_row,
    test_create_update_close_archive,
    test_rejected_command_fails_with_its_rule,
)
from tests.integration.test_session_streams import (
    test_a_process_manager_killed_half_way_stops_every_stream_once,
)
from tests.integration.test_tools import (
    test_a_failed_registration_frees_its_name,
    test_a_name_is_unique_in_its_tenant,
)
from tests.pipeline import ADMIN, Pipeline, eventually, running

pytestmark = pytest.mark.cluster

__all__ = [
    "test_500_chunks_pushed_over_a_websocket_reach_every_subscriber_in_order",
    "test_500_chunks_pushed_over_http_reach_every_subscriber_in_order",
    "test_a_failed_registration_frees_its_name",
    "test_a_name_is_unique_in_its_tenant",
    "test_a_position_beyond_retention_gets_one_reset",
    "test_a_process_manager_killed_half_way_stops_every_stream_once",
    "test_a_redelivered_command_is_applied_once",
    "test_a_stream_needs_an_open_session",
    "test_a_token_resumes_exactly_from_every_delivery",
    "test_closing_a_session_stops_its_active_streams",
    "test_concurrent_submissions_keep_their_acceptance_order",
    "test_create_update_close_archive",
    "test_events_reach_only_their_tenant_and_topics",
    "test_every_command_and_every_query",
    "test_rejected_command_fails_with_its_rule",
    "test_resume_continues_after_the_token_while_events_keep_coming",
    "test_the_same_id_submitted_twice_is_one_command",
    "test_the_whole_journey_of_one_chat_session",
]


@pytest.fixture
def settings(redis_cluster_url: str, database_url: str) -> Settings:
    return fresh_settings(redis_cluster_url, database_url)


async def test_the_shards_span_several_slots_and_nodes(settings: Settings, redis: Redis) -> None:
    """What makes the tests above a cluster test: one reader per slot, several nodes."""
    keys = Keys.of(settings)
    streams = {
        keys.event_stream(s): s for c in ("chat_sessions", "traces") for s in keys.shards_of(c)
    }
    groups = reader_groups(redis, streams)
    assert len(groups) == len(streams)
    assert isinstance(redis, RedisCluster)
    await redis.initialize()
    nodes = {redis.get_node_from_key(key).name for key in streams}
    assert len(nodes) > 1


async def test_coalesced_batches_over_every_slot_keep_each_aggregate_in_order(
    settings: Settings, redis: Redis, pool: db.Pool
) -> None:
    """The bus's batches span several slots (one pipeline over several nodes); each
    aggregate's commands are still applied and projected in acceptance order."""
    n = 20
    async with running(settings) as p, anyio.create_task_group() as bus:
        await bus.start(p.bus.run)
        sessions = []
        for s in range(6):
            created = await p.submit(
                "CreateChatSession", {"agent_id": "a", "participants": []}, command_id=f"c-{s}"
            )
            sessions.append(created.aggregate_id)
        assert len({p.keys.shard_of("chat_sessions", ADMIN.tenant, s) for s in sessions}) > 1
        for i in range(n):  # each round: one command per session, submitted together
            async with anyio.create_task_group() as tg:
                for s, session_id in enumerate(sessions):
                    add = {"participant_id": f"p{i:02}", "role": "user"}
                    tg.start_soon(
                        partial(
                            p.submit,
                            "UpdateChatSessionParticipants",
                            {"session_id": session_id, "add": [add]},
                            command_id=f"add-{s}-{i}",
                        )
                    )
        for s, session_id in enumerate(sessions):
            assert (await p.outcome(f"add-{s}-{n - 1}")).status == "processed"
            events = await events_of(p, session_id)
            assert [e.aggregate_version for e in events] == list(range(1, n + 2))

            async def projected(session_id: str = session_id) -> dict[str, Any] | None:
                row = await session_row(pool, session_id)
                return row if row and row["version"] == n + 1 else None

            row = await eventually(projected)
            assert [x["participant_id"] for x in row["participants"]] == [
                f"p{i:02}" for i in range(n)
            ]
        bus.cancel_scope.cancel()


async def test_a_node_that_forgot_the_scripts_gets_them_again(
    settings: Settings, redis: Redis
) -> None:
    """A restarted or failed-over node answers NOSCRIPT to a pipelined EVALSHA: the
    bus loads the scripts again and re-sends what that node refused."""
    p = Pipeline(settings, redis)
    await p.scripts.load()
    await redis.script_flush()  # on every primary
    accepted = await p.submit(
        "CreateChatSession", {"agent_id": "a", "participants": []}, command_id="after-flush"
    )
    assert accepted.new and accepted.status == "pending"
    assert (await p.bus.status(ADMIN.tenant, "after-flush")) is not None
