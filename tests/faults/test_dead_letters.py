"""Dead letters (guarantee 6) under faults: the Lua steps driven directly; a failing
apply step, transient outages that must not count, undecodable commands and events
(for every projection and process manager that reads them); the admin routes
(401/403, tenant scoping) and `eddy deadletters`.

The guarantee's own test is `tests/guarantees/test_g06_dead_letters.py`.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import msgspec
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app import cli
from app.registry import SYSTEM
from core.settings import Settings
from projections import db
from streams.connection import Redis, Scripts
from streams.deadletters import DeadLetters, ReplayRefused
from streams.keys import COMMAND_GROUP, Keys, Shard, projection_group
from streams.lease import LeaseLost, ShardLease
from streams.worker import run_worker
from tests.pipeline import ADMIN, Pipeline, eventually, running
from tests.stack import Stack

MAX_ATTEMPTS = 3
SHARD = Shard("chat_sessions", 0)


@pytest.fixture
def poisoning(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, max_attempts=MAX_ATTEMPTS)


def dead_letters(redis: Redis, settings: Settings) -> DeadLetters:
    keys = Keys.of(settings)
    return DeadLetters(redis, Scripts(redis), keys, settings.command_ttl_s, SYSTEM.catalog)


def on_shard(
    keys: Keys, shard: Shard, prefix: str, n: int, tenant: str = ADMIN.tenant
) -> list[str]:
    ids = (f"{prefix}-{i}" for i in range(10_000))
    return [i for i in ids if keys.shard_of(shard.context, tenant, i) == shard][:n]


async def corrupt(redis: Redis, keys: Keys, tenant: str, session_id: str) -> None:
    """Put a session's state aside and a string in its place: every load of it
    raises WRONGTYPE (inside the worker's Lua step) until `repair`."""
    shard = keys.shard_of("chat_sessions", tenant, session_id)
    state = keys.aggregate(shard, tenant, session_id)
    await redis.rename(state, f"{state}:saved")
    await redis.set(state, "not a hash")


async def repair(redis: Redis, keys: Keys, tenant: str, session_id: str) -> None:
    shard = keys.shard_of("chat_sessions", tenant, session_id)
    state = keys.aggregate(shard, tenant, session_id)
    await redis.delete(state)
    await redis.rename(f"{state}:saved", state)


def readers(p: Pipeline, shard: Shard) -> set[str]:
    """The consumer groups of every projection and process manager reading `shard`."""
    projections = {
        projection_group(x.name) for x in SYSTEM.projections if shard.context in x.contexts
    }
    managers = {m.group for m in SYSTEM.process_managers if shard.context in m.contexts}
    return projections | managers


async def test_the_dead_letter_steps_directly(settings, redis) -> None:
    letters = dead_letters(redis, settings)
    keys, scripts = letters.keys, letters.scripts
    stream, lease_key = keys.command_stream(SHARD), keys.lease(SHARD, "worker")
    await redis.xgroup_create(stream, COMMAND_GROUP, id="0", mkstream=True)
    record = {"id": "c1", "type": "CloseChatSession", "tenant_id": "t", "aggregate_id": "s1"}
    raw = msgspec.json.encode(record)
    status = keys.command_status(SHARD, "t", "c1")
    await redis.hset(status, mapping={"status": "consumed", "type": "CloseChatSession"})
    entry_id = await redis.xadd(stream, {"c": raw})
    await redis.xreadgroup(COMMAND_GROUP, "w", {stream: ">"})
    entry = (entry_id, {b"c": raw})
    await redis.set(lease_key, "someone-else")
    mine = ShardLease(redis, scripts, lease_key, "me", 5000)

    with pytest.raises(LeaseLost):  # fenced: nothing written, still pending
        await letters.bury(mine, SHARD, COMMAND_GROUP, entry, ValueError("x"), 3)
    assert not await redis.exists(keys.dead_letters(SHARD))
    assert (await redis.xpending(stream, COMMAND_GROUP))["pending"] == 1

    await redis.set(lease_key, "me")
    dead = await letters.bury(mine, SHARD, COMMAND_GROUP, entry, ValueError("boom"), 3)
    assert dead is not None and dead.startswith("chat_sessions.0.")
    assert (await redis.xpending(stream, COMMAND_GROUP))["pending"] == 0
    hashed = {k.decode(): v.decode() for k, v in (await redis.hgetall(status)).items()}
    assert hashed["status"] == "failed" and hashed["dead_letter"] == dead
    assert json.loads(hashed["error"]) == {
        "code": "dead_lettered",
        "message": "dead-lettered after 3 attempts: ValueError: boom",
        "dead_letter_id": dead,
    }
    letter = await letters.get(dead)
    assert (letter.command_id, letter.tenant_id, letter.attempts) == ("c1", "t", 3)
    assert (letter.entry_id, letter.raw) == (entry_id.decode(), raw)
    # Buried twice (a second owner, a retry): the entry is no longer pending, no copy.
    assert await letters.bury(mine, SHARD, COMMAND_GROUP, entry, ValueError("boom"), 3) is None
    assert await redis.xlen(keys.dead_letters(SHARD)) == 1

    # An entry whose command is already final is acknowledged, not dead-lettered.
    applied = await redis.xadd(stream, {"c": raw})
    await redis.xreadgroup(COMMAND_GROUP, "w", {stream: ">"})
    await redis.hset(status, "status", "processed")
    assert (
        await letters.bury(mine, SHARD, COMMAND_GROUP, (applied, {b"c": raw}), ValueError(), 3)
        is None
    )
    assert await redis.xlen(keys.dead_letters(SHARD)) == 1
    assert (await redis.xpending(stream, COMMAND_GROUP))["pending"] == 0

    # Replay: refused while the status says processed; else the same record goes back.
    with pytest.raises(ReplayRefused, match="processed already"):
        await letters.replay_command(letter)
    await redis.hset(status, "status", "failed")
    new_entry = await letters.replay_command(letter)
    ((last_id, fields),) = await redis.xrevrange(stream, count=1)
    assert (last_id.decode(), fields) == (new_entry, {b"c": raw})
    hashed = {k.decode(): v.decode() for k, v in (await redis.hgetall(status)).items()}
    assert hashed["status"] == "pending" and "error" not in hashed and "dead_letter" not in hashed
    assert hashed["entry"] == new_entry
    assert await redis.xlen(keys.dead_letters(SHARD)) == 0
    with pytest.raises(Exception, match="no dead letter"):
        await letters.replay_command(letter)


class FlakyScripts(Scripts):
    """The worker's scripts, with an apply step that fails: `outages` times as if Redis
    were away (for every command), then always for the commands named `poisoned`."""

    def __init__(self, client: Redis, *, outages: int, poisoned: str) -> None:
        super().__init__(client)
        real = self.apply
        self.outages = outages

        async def apply(keys: list[str], args: list[Any], client: Any = None) -> Any:
            if self.outages > 0:
                self.outages -= 1
                raise RedisConnectionError("simulated outage")
            if any(key.endswith(f":{poisoned}") for key in keys):
                raise ResponseError("simulated: this command breaks the apply step")
            return await real(keys=keys, args=args)

        self.apply = apply  # type: ignore[assignment]


async def test_a_failing_apply_step_is_dead_lettered_and_outages_never_count(
    poisoning, redis
) -> None:
    p = Pipeline(poisoning, redis)
    shard = p.keys.shard_of("chat_sessions", ADMIN.tenant, "s-0")
    sessions = on_shard(p.keys, shard, "s", 4)
    for n, session_id in enumerate(sessions):
        payload = {"session_id": session_id, "agent_id": "a", "participants": []}
        await p.submit("CreateChatSession", payload, command_id=f"c{n}")
    scripts = FlakyScripts(redis, outages=MAX_ATTEMPTS + 2, poisoned="c1")
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_worker, redis, scripts, p.keys, poisoning, SYSTEM.catalog)
        outcomes = [await p.outcome(f"c{n}") for n in range(len(sessions))]
        tg.cancel_scope.cancel()
    assert scripts.outages == 0  # the outage happened, and dead-lettered nothing
    assert [o.status for o in outcomes] == ["processed", "failed", "processed", "processed"]
    assert outcomes[1].error is not None and outcomes[1].error["code"] == "dead_lettered"
    (letter,) = await dead_letters(redis, poisoning).read()
    assert (letter.command_id, letter.attempts) == ("c1", MAX_ATTEMPTS)
    assert letter.error == "ResponseError: simulated: this command breaks the apply step"


async def test_undecodable_commands_are_dead_lettered_at_once(poisoning, redis) -> None:
    async with running(poisoning, projector=False) as p:
        stream = p.keys.command_stream(SHARD)
        await p.redis.xadd(stream, {"c": b"{not json"})
        named = msgspec.json.encode({"id": "x1", "tenant_id": ADMIN.tenant, "type": "Nope"})
        await p.redis.xadd(stream, {"c": named})
        (session_id,) = on_shard(p.keys, SHARD, "s", 1)
        payload = {"session_id": session_id, "agent_id": "a", "participants": []}
        await p.submit("CreateChatSession", payload, command_id="after")
        assert (await p.outcome("after")).status == "processed"
        letters = await dead_letters(p.redis, poisoning).read()
    assert [(d.command_id, d.tenant_id, d.attempts) for d in letters] == [
        (None, "", 1),
        ("x1", ADMIN.tenant, 1),
    ]
    assert letters[0].error.startswith("DecodeError: JSON is malformed")
    assert "missing required field" in letters[1].error


async def test_an_undecodable_event_is_dead_lettered_by_each_of_its_readers(
    poisoning, redis, pool
) -> None:
    async with running(poisoning) as p:
        await p.redis.xadd(p.keys.event_stream(SHARD), {"e": b"\xff not an envelope"})
        (session_id,) = on_shard(p.keys, SHARD, "s", 1)
        payload = {"session_id": session_id, "agent_id": "a", "participants": []}
        await p.submit("CreateChatSession", payload, command_id="after")
        after = await p.outcome("after")
        assert after.entry is not None
        ms, _, seq = after.entry.partition("-")
        projections = [x for x in SYSTEM.projections if SHARD.context in x.contexts]

        async def projected() -> bool:  # every projection went past the poison
            for projection in projections:
                if not await db.reached(pool, projection.name, SHARD, (int(ms), int(seq))):
                    return False
            return True

        await eventually(projected)
        expected = readers(p, SHARD)

        async def all_dead() -> list[Any]:
            found = await dead_letters(p.redis, poisoning).read()
            return found if {d.consumer for d in found} == expected else []

        letters = await eventually(all_dead)
    assert len(letters) == len(expected) >= 3  # chat_sessions, archive, the process manager
    assert {(d.kind, d.attempts, d.tenant_id) for d in letters} == {("event", MAX_ATTEMPTS, "")}
    row = await pool.fetchval(
        "SELECT count(*) FROM chat_sessions WHERE session_id = $1", session_id
    )
    assert row == 1


@pytest.fixture
def stack_settings(poisoning: Settings) -> Settings:
    return poisoning


async def dead_command(
    stack: Stack, redis: Redis, session_id: str, command_id: str, tenant: str
) -> Any:
    """A session of `tenant` whose state is then corrupted, and a command on it that
    is dead-lettered; return its final status."""
    c, auth = stack.client, stack.auth(tenant)
    r = await c.post(
        "/v1/commands/CreateChatSession?wait=5",
        json={"session_id": session_id, "agent_id": "a", "participants": []},
        headers=auth,
    )
    assert r.status_code == 200, r.text
    await corrupt(redis, Keys(stack.settings.key_prefix, stack.settings.shards), tenant, session_id)
    r = await c.post(
        "/v1/commands/CloseChatSession?wait=10",
        json={"session_id": session_id},
        headers={**auth, "Idempotency-Key": command_id},
    )
    assert r.status_code == 409, r.text
    return r.json()


async def test_the_admin_routes(stack, redis) -> None:
    c = stack.client
    admin_a, admin_b = stack.auth("tenant-a"), stack.auth("tenant-b")
    first = await dead_command(stack, redis, "s1", "close-s1", "tenant-a")
    second = await dead_command(stack, redis, "s2", "close-s2", "tenant-a")
    assert first["status"] == "failed" and first["error"]["code"] == "dead_lettered"
    first_id, second_id = first["error"]["dead_letter_id"], second["error"]["dead_letter_id"]

    # Who may see them: admins of their tenant only.
    assert (await c.get("/v1/admin/dead-letters")).status_code == 401
    user = stack.auth("tenant-a", roles=("user", "agent"))
    for method, path in (
        ("GET", "/v1/admin/dead-letters"),
        ("GET", f"/v1/admin/dead-letters/{first_id}"),
        ("POST", f"/v1/admin/dead-letters/{first_id}/replay"),
        ("DELETE", f"/v1/admin/dead-letters/{first_id}"),
    ):
        r = await c.request(method, path, headers=user)
        assert r.status_code == 403, (method, path, r.text)
        r = await c.request(method, path, headers=admin_b)
        expected = 200 if path == "/v1/admin/dead-letters" else 404
        assert r.status_code == expected, (method, path, r.text)
    assert (await c.get("/v1/admin/dead-letters", headers=admin_b)).json()["items"] == []
    for bad in ("nope", "chat_sessions.9.1-0", "tools.0.x-1", f"traces{first_id[13:]}"):
        r = await c.get(f"/v1/admin/dead-letters/{bad}", headers=admin_a)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", bad

    # List (paged), filter, show.
    page = (await c.get("/v1/admin/dead-letters?limit=1", headers=admin_a)).json()
    assert [d["dead_letter_id"] for d in page["items"]] == [first_id]
    cursor = page["next_cursor"]
    rest = (await c.get(f"/v1/admin/dead-letters?cursor={cursor}", headers=admin_a)).json()
    assert [d["dead_letter_id"] for d in rest["items"]] == [second_id]
    assert rest["next_cursor"] is None
    events = await c.get("/v1/admin/dead-letters?kind=event", headers=admin_a)
    assert events.json()["items"] == []
    for query in ("kind=other", "limit=0", "limit=x", "cursor=x"):
        assert (await c.get(f"/v1/admin/dead-letters?{query}", headers=admin_a)).status_code == 400
    shown = (await c.get(f"/v1/admin/dead-letters/{first_id}", headers=admin_a)).json()
    assert shown["command_id"] == "close-s1" and shown["kind"] == "command"
    assert shown["attempts"] == MAX_ATTEMPTS and "WRONGTYPE" in shown["error"]
    assert shown["payload"]["payload"]["session_id"] == "s1"  # the record, and its payload

    # Purge one: gone, its command stays failed.
    r = await c.delete(f"/v1/admin/dead-letters/{second_id}", headers=admin_a)
    assert r.json() == {"dead_letter_id": second_id, "status": "purged"}
    assert (await c.get(f"/v1/admin/dead-letters/{second_id}", headers=admin_a)).status_code == 404
    status = (await c.get("/v1/commands/close-s2", headers=admin_a)).json()
    assert status["status"] == "failed"

    # Fix the cause, replay the other: processed, once.
    await repair(redis, Keys(stack.settings.key_prefix, stack.settings.shards), "tenant-a", "s1")
    r = await c.post(f"/v1/admin/dead-letters/{first_id}/replay", headers=admin_a)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "replayed" and r.json()["command_id"] == "close-s1"
    again = await c.post(f"/v1/admin/dead-letters/{first_id}/replay", headers=admin_a)
    assert again.status_code == 404

    async def final() -> dict[str, Any] | None:
        body = (await c.get("/v1/commands/close-s1", headers=admin_a)).json()
        return body if body["status"] in ("processed", "failed") else None

    outcome = await eventually(final)
    assert outcome["status"] == "processed" and len(outcome["events"]) == 1
    session = await c.get(f"/v1/chat-sessions/s1?after={outcome['position']}", headers=admin_a)
    assert session.json()["status"] == "closed" and session.json()["version"] == 2
    assert (await c.get("/v1/admin/dead-letters", headers=admin_a)).json()["items"] == []


async def test_the_command_line(poisoning, redis, pool, capsys) -> None:
    env = {
        "REDIS_URL": poisoning.redis_url,
        "DATABASE_URL": poisoning.database_url,
        "EDDY_KEY_PREFIX": poisoning.key_prefix,
        "EDDY_DB_SCHEMA": poisoning.db_schema,
        "EDDY_SHARDS": str(poisoning.shards),
        "EDDY_LOG_LEVEL": "warning",
    }

    async def eddy(*argv: str) -> tuple[int, str, str]:
        code = await anyio.to_thread.run_sync(cli.main, list(argv), env)
        out, err = capsys.readouterr()
        return code, out, err

    async with running(poisoning) as p:
        await p.submit(
            "CreateChatSession",
            {"session_id": "s1", "agent_id": "a", "participants": []},
            command_id="c1",
        )
        assert (await p.outcome("c1")).status == "processed"
        await corrupt(p.redis, p.keys, ADMIN.tenant, "s1")
        await p.submit("CloseChatSession", {"session_id": "s1"}, command_id="close")
        failed = await p.outcome("close")
        await p.redis.xadd(p.keys.event_stream(SHARD), {"e": b"garbage"})
        expected = {"workers", *readers(p, SHARD)}

        async def all_dead() -> list[Any]:
            found = await dead_letters(p.redis, poisoning).read()
            return found if {d.consumer for d in found} == expected else []

        letters = await eventually(all_dead)

    assert failed.error is not None
    command_id = failed.error["dead_letter_id"]
    code, out, _ = await eddy("deadletters", "list")
    assert code == 0 and command_id in out and "WRONGTYPE" in out
    code, out, _ = await eddy("deadletters", "list", "--json")
    listed = json.loads(out)
    assert code == 0 and {d["dead_letter_id"] for d in listed} == {
        d.dead_letter_id for d in letters
    }
    code, out, _ = await eddy("deadletters", "show", command_id)
    assert code == 0 and json.loads(out)["payload"]["id"] == "close"
    event_id = next(d.dead_letter_id for d in letters if d.kind == "event")
    code, out, err = await eddy("deadletters", "replay", event_id)
    assert code == 1 and "replay_failed" in err  # garbage stays garbage
    code, _, err = await eddy("deadletters", "show", "chat_sessions.0.1-0")
    assert code == 1 and "not_found" in err
    code, _, err = await eddy("deadletters", "purge")
    assert code == 2 and "id or --all" in err
    code, out, _ = await eddy("deadletters", "purge", event_id)
    assert code == 0 and out.strip() == f"purged {event_id}"

    await repair(redis, p.keys, ADMIN.tenant, "s1")
    code, out, _ = await eddy("deadletters", "replay", command_id)
    assert code == 0 and json.loads(out)["command_id"] == "close"
    shard = p.keys.shard_of("chat_sessions", ADMIN.tenant, "s1")
    status = await redis.hget(p.keys.command_status(shard, ADMIN.tenant, "close"), "status")
    assert status == b"pending"  # back in its stream, for the next worker
    code, out, _ = await eddy("deadletters", "purge", "--all")
    assert code == 0 and out.strip() == f"purged {len(letters) - 2} dead letters"
    code, out, _ = await eddy("deadletters", "list")
    assert (code, out.strip()) == (0, "no dead letters")
