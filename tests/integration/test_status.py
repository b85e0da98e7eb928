"""Lag you can see: every projection's checkpoint, lag and last error per shard,
from `projections.status`, `eddy status` and `/metrics`."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.cli import main
from app.contexts import chat_sessions
from app.registry import SYSTEM
from app.runtime import migrate
from projections import db, status
from projections.projection import Batch, Projection
from projections.projector import ShardProjector
from projections.status import ShardStatus
from streams.connection import Redis, connect
from streams.keys import Keys, Shard, projection_group
from streams.positions import entry_id_of, format_entry_id
from tests import services
from tests.conftest import fresh_settings
from tests.pipeline import Pipeline, eventually, running
from tests.stack import serving


async def read(
    p: Pipeline, pool: db.Pool, projections: Any = SYSTEM.projections
) -> list[ShardStatus]:
    return await status.read(p.redis, pool, p.keys, projections)


async def after(redis: Redis, keys: Keys, s: ShardStatus) -> list[Any]:
    """The entries of the status's shard after its checkpoint, counted independently."""
    stream = keys.event_stream(Shard(s.context, s.shard))
    return list(await redis.xrange(stream, f"({format_entry_id(s.checkpoint)}", "+"))


async def create_sessions(p: Pipeline, n: int) -> None:
    ids = [
        (await p.submit("CreateChatSession", {"agent_id": f"a{i}", "participants": []})).command_id
        for i in range(n)
    ]
    for command_id in ids:
        assert (await p.outcome(command_id)).status == "processed"


async def test_lag_while_the_projector_is_stopped_and_none_once_it_caught_up(
    settings, redis, pool
) -> None:
    async with running(settings, projector=False) as p:
        await create_sessions(p, 10)
        statuses = await read(p, pool)
    assert [(s.projection, s.context, s.shard) for s in statuses] == [
        (projection.name, context, n)
        for projection in SYSTEM.projections
        for context in projection.contexts
        for n in range(settings.shards)
    ]
    sessions = [s for s in statuses if s.context == "chat_sessions"]
    assert {s.projection for s in sessions} == {"chat_sessions", "archive"}
    for s in sessions:  # no consumer group yet: every entry is behind
        behind = await after(redis, p.keys, s)
        assert s.checkpoint == (0, 0) and s.lag_events == len(behind)
        assert (s.lag_seconds > 0) == bool(behind)
    assert sum(s.lag_events for s in sessions if s.projection == "chat_sessions") == 10
    assert all(s.lag_events == 0 and s.lag_seconds == 0 for s in statuses if s not in sessions)

    # The projector catches up: no lag, each checkpoint at its stream's last entry.
    async with running(settings, worker=False) as p:

        async def caught_up() -> list[ShardStatus] | None:
            statuses = await read(p, pool)
            return statuses if all(s.lag_events == 0 for s in statuses) else None

        statuses = await eventually(caught_up)
    for s in statuses:
        assert s.lag_seconds == 0 and s.last_error is None
        last = await redis.xrevrange(p.keys.event_stream(Shard(s.context, s.shard)), count=1)
        assert s.checkpoint == (entry_id_of(last[0][0]) if last else (0, 0))
        assert (s.checkpoint_at is not None) == bool(last)

    # Stopped again, with consumer groups now: the lag counts only what is new ...
    async with running(settings, projector=False) as p:
        await create_sessions(p, 5)
        statuses = await read(p, pool)
        sessions = [s for s in statuses if s.projection == "chat_sessions"]
        assert sum(s.lag_events for s in sessions) == 5
        for s in sessions:
            assert s.lag_events == len(await after(redis, p.keys, s))

        # ... and entries delivered to the group but not committed are still behind.
        group = projection_group("chat_sessions")
        for shard in p.keys.shards_of("chat_sessions"):
            await redis.xreadgroup(group, "doomed", {p.keys.event_stream(shard): ">"}, count=2)
        assert [s.lag_events for s in await read(p, pool) if s.projection == "chat_sessions"] == [
            s.lag_events for s in sessions
        ]


async def test_a_failed_batch_is_recorded_until_the_shard_commits_again(
    settings, redis, pool
) -> None:
    await pool.execute("CREATE TABLE probe (event_id text PRIMARY KEY)")
    poisoned = True

    async def apply_probe(conn: db.Connection, batch: Batch) -> None:
        await conn.executemany(
            "INSERT INTO probe (event_id) VALUES ($1)", [(e.id,) for e, _ in batch]
        )
        if poisoned:
            raise ZeroDivisionError("a poison batch")

    probe = Projection(name="probe", reads=(chat_sessions.CONTEXT,), events=None, apply=apply_probe)
    async with running(settings, projector=False) as p:
        await create_sessions(p, 6)
        lengths = {
            s: await redis.xlen(p.keys.event_stream(s)) for s in p.keys.shards_of("chat_sessions")
        }
    shard = max(lengths, key=lambda s: lengths[s])
    entries = await redis.xrange(p.keys.event_stream(shard))
    projector = ShardProjector(pool, probe, shard, SYSTEM.catalog)

    with pytest.raises(ZeroDivisionError):
        await projector.handle(entries)
    statuses = await read(p, pool, [probe])
    [failed] = [s for s in statuses if s.shard == shard.number]
    assert failed.failing and failed.last_error == "ZeroDivisionError: a poison batch"
    assert failed.last_error_at is not None
    assert failed.checkpoint == (0, 0) and failed.lag_events == len(entries)
    assert not any(s.failing for s in statuses if s.shard != shard.number)
    assert await pool.fetchval("SELECT count(*) FROM probe") == 0  # the batch rolled back

    poisoned = False
    assert await projector.handle(entries) == [entry_id for entry_id, _ in entries]
    [cleared] = [s for s in await read(p, pool, [probe]) if s.shard == shard.number]
    assert not cleared.failing and cleared.last_error is None and cleared.last_error_at is None
    assert cleared.checkpoint == entry_id_of(entries[-1][0]) and cleared.lag_events == 0
    assert await pool.fetchval("SELECT count(*) FROM probe") == len(entries)


async def test_eddy_status_prints_a_table_and_json(settings, redis, pool, capsys) -> None:
    async with running(settings, projector=False) as p:
        await create_sessions(p, 3)
    env = {
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "EDDY_KEY_PREFIX": settings.key_prefix,
        "EDDY_DB_SCHEMA": settings.db_schema,
        "EDDY_SHARDS": str(settings.shards),
    }
    assert await anyio.to_thread.run_sync(main, ["status", "--json"], env) == 0
    rows = json.loads(capsys.readouterr().out)
    lagging = {(r["projection"], r["context"], r["shard"]): r["lag_events"] for r in rows}
    assert sum(v for (name, _, _), v in lagging.items() if name == "chat_sessions") == 3
    assert sum(v for (name, ctx, _), v in lagging.items() if ctx == "chat_sessions") == 6
    assert rows[0].keys() >= {"checkpoint", "lag_seconds", "last_error", "failing"}

    assert await anyio.to_thread.run_sync(main, ["status"], env) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        " ".join(lines[0].split()) == "projection context shard checkpoint lag lag (s) last error"
    )
    assert len(lines) == 1 + len(rows)
    assert any(line.split()[:2] == ["chat_sessions", "chat_sessions"] for line in lines)

    wrong = {**env, "EDDY_SHARDS": str(settings.shards + 1)}
    assert await anyio.to_thread.run_sync(main, ["status"], wrong) == 2
    assert "EDDY_SHARDS" in capsys.readouterr().err


def gauges(text: str) -> dict[str, dict[tuple[str, str, str], float]]:
    found: dict[str, dict[tuple[str, str, str], float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("eddy_projection_"):
            for sample in family.samples:
                labels = sample.labels
                key = (labels["projection"], labels["context"], labels["shard"])
                found.setdefault(sample.name, {})[key] = sample.value
    return found


async def test_metrics_exposes_the_lag_gauges(settings, schema) -> None:
    async with serving(settings, projector=False) as stack:
        r = await stack.client.post(
            "/v1/commands/CreateChatSession?wait=5",
            json={"agent_id": "a", "participants": []},
            headers=stack.auth(),
        )
        assert r.status_code == 200, r.text
        context, shard, entry = r.json()["position"].split(".", 2)
        key = ("chat_sessions", context, shard)
        ms = float(entry.split("-")[0])

        async def scrape() -> dict[str, dict[tuple[str, str, str], float]]:
            response = await stack.client.get("/metrics")
            assert response.status_code == 200
            return gauges(response.text)

        behind = await scrape()
        every = {
            (p.name, c, str(n))
            for p in SYSTEM.projections
            for c in p.contexts
            for n in range(settings.shards)
        }
        for name in (
            "eddy_projection_lag_events",
            "eddy_projection_lag_seconds",
            "eddy_projection_checkpoint_ms",
            "eddy_projection_failing",
        ):
            assert set(behind[name]) == every, name
        assert behind["eddy_projection_lag_events"][key] == 1
        assert behind["eddy_projection_checkpoint_ms"][key] == 0
        assert behind["eddy_projection_failing"][key] == 0

        async with running(settings, worker=False):

            async def caught_up() -> dict[str, Any] | None:
                now = await scrape()
                return now if now["eddy_projection_lag_events"][key] == 0 else None

            now = await eventually(caught_up)
        assert now["eddy_projection_lag_seconds"][key] == 0
        assert now["eddy_projection_checkpoint_ms"][key] == ms


@pytest.mark.cluster
async def test_lag_on_a_redis_cluster(redis_cluster_url: str, database_url: str) -> None:
    """The same reads on a Redis Cluster: the pipelines span several slots and nodes."""
    settings = fresh_settings(redis_cluster_url, database_url)
    await migrate(settings, SYSTEM)
    redis = connect(settings.redis_url)
    pool = await db.create_pool(settings.database_url, settings.db_schema)
    try:
        await test_lag_while_the_projector_is_stopped_and_none_once_it_caught_up(
            settings, redis, pool
        )
    finally:
        await pool.close()
        await redis.aclose()
        await services.drop_schema(settings.database_url, settings.db_schema)
