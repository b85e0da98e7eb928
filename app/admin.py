"""Dead letters for operators (guarantee 6): the admin routes and `eddy deadletters`.

Over HTTP, admin tokens only (403 otherwise), scoped to the token's tenant: another
tenant's dead letter is a 404, as is one whose tenant could not be read.

- `GET /v1/admin/dead-letters?kind=&limit=&cursor=`: `{"items", "next_cursor"}`, oldest first;
- `GET /v1/admin/dead-letters/{id}`: one, with `payload` (its record or envelope);
- `POST /v1/admin/dead-letters/{id}/replay`: `{"dead_letter_id", "status": "replayed", ...}`,
  409 if it cannot be replayed now (`streams.deadletters.ReplayRefused`);
- `DELETE /v1/admin/dead-letters/{id}`: `{"dead_letter_id", "status": "purged"}`.

`eddy deadletters list | show <id> | replay <id> | purge <id> | purge --all` does the
same for every tenant. A dead command goes back into its command stream; a dead event
goes back to the one projection or process manager that gave up on it (in the
replaying process, `ShardProjector.replay` / `Reactor.react`), no other consumer.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.auth import authenticate
from app.http import json_response
from app.system import System
from app.webprocess import WebProcess
from core.errors import BadRequest, NotFound, Unavailable
from core.messages import Envelope
from core.outages import DOWN
from core.settings import Settings
from projections import db
from projections.pagination import parse_limit
from projections.projector import ShardProjector
from streams.bus import CommandBus
from streams.connection import Redis, Scripts, connect
from streams.deadletters import DeadLetter, DeadLetters, ReplayRefused
from streams.keys import Keys, projection_group

DEFAULT_LIMIT = 100


@dataclass
class Operator:
    """What replaying needs: Redis for every dead letter, Postgres for a projection's."""

    settings: Settings
    system: System
    redis: Redis
    scripts: Scripts
    keys: Keys
    pool: db.Pool | None

    @property
    def dead_letters(self) -> DeadLetters:
        return DeadLetters(
            self.redis, self.scripts, self.keys, self.settings.command_ttl_s, self.system.catalog
        )

    async def replay(self, letter: DeadLetter) -> dict[str, Any]:
        """Replay a dead letter; the answer says what became of it."""
        answer: dict[str, Any] = {"dead_letter_id": letter.dead_letter_id, "status": "replayed"}
        if letter.kind == "command":
            entry = await self.dead_letters.replay_command(letter)
            return {**answer, "kind": "command", "command_id": letter.command_id, "entry_id": entry}
        await self.dead_letters.replay_event(letter, self._consumer(letter))
        return {**answer, "kind": "event", "event_id": letter.event_id, "consumer": letter.consumer}

    def _consumer(self, letter: DeadLetter) -> Callable[[Envelope], Awaitable[None]]:
        """The one consumer that gave up on a dead event, as a function of the event
        (as it was written: a projection, like a process manager, reads its current
        shape)."""
        deliver = self._projection(letter) or self._process_manager(letter)
        if deliver is None:
            raise ReplayRefused("replay_failed", f"no consumer {letter.consumer!r} to replay to")
        known = deliver

        async def guarded(envelope: Envelope) -> None:
            try:
                await known(envelope)
            except DOWN as exc:
                raise Unavailable(f"cannot replay now: {type(exc).__name__}: {exc}") from exc
            except (ReplayRefused, Unavailable):
                raise
            except Exception as exc:  # the cause is not fixed: it stays a dead letter
                raise ReplayRefused("replay_failed", f"{type(exc).__name__}: {exc}") from exc

        return guarded

    def _projection(self, letter: DeadLetter) -> Callable[[Envelope], Awaitable[None]] | None:
        system = self.system
        for projection in system.projections:
            if projection_group(projection.name) == letter.consumer and self.pool is not None:
                hooks, _ = system.projector_hooks(self.pool, self.settings.view_debounce_s)
                projector = ShardProjector(
                    self.pool, projection, letter.where, system.catalog, hooks
                )
                return projector.replay
        return None

    def _process_manager(self, letter: DeadLetter) -> Callable[[Envelope], Awaitable[None]] | None:
        catalog = self.system.catalog
        managers = [m for m in self.system.process_managers if m.group == letter.consumer]
        if not managers:
            return None
        bus = CommandBus(self.redis, self.scripts, self.keys, self.settings.command_ttl_s, catalog)
        react = managers[0].start(self.redis, self.keys, bus)

        async def deliver(envelope: Envelope) -> None:
            await react(catalog.current(envelope))

        return deliver


def _operator(request: Request) -> tuple[Operator, str]:
    """The operator of a request, and the admin's tenant (401/403 otherwise)."""
    web: WebProcess = request.app.state.web
    principal = authenticate(request, web.settings.jwt_secret)
    principal.require({"admin"})
    operator = Operator(web.settings, web.system, web.redis, web.scripts, web.keys, web.pool)
    return operator, principal.tenant


async def list_dead_letters(request: Request) -> Response:
    operator, tenant = _operator(request)
    kind = request.query_params.get("kind")
    if kind not in (None, "command", "event"):
        raise BadRequest("kind must be command or event")
    limit = parse_limit(request.query_params.get("limit"), DEFAULT_LIMIT)
    cursor = request.query_params.get("cursor") or None
    try:
        letters = await operator.dead_letters.read(tenant_id=tenant, after=cursor)
    except NotFound:
        raise BadRequest(f"bad cursor {cursor!r}") from None
    if kind is not None:
        letters = [d for d in letters if d.kind == kind]
    page = letters[:limit]
    more = len(letters) > limit
    return json_response(
        {
            "items": [d.public() for d in page],
            "next_cursor": page[-1].dead_letter_id if more else None,
        }
    )


async def show_dead_letter(request: Request) -> Response:
    operator, tenant = _operator(request)
    letter = await operator.dead_letters.get(request.path_params["id"], tenant_id=tenant)
    return json_response(letter.public(payload=True))


async def replay_dead_letter(request: Request) -> Response:
    operator, tenant = _operator(request)
    letter = await operator.dead_letters.get(request.path_params["id"], tenant_id=tenant)
    return json_response(await operator.replay(letter))


async def purge_dead_letter(request: Request) -> Response:
    operator, tenant = _operator(request)
    letter = await operator.dead_letters.get(request.path_params["id"], tenant_id=tenant)
    await operator.dead_letters.purge(letter)
    return json_response({"dead_letter_id": letter.dead_letter_id, "status": "purged"})


def routes() -> list[Route]:
    return [
        Route("/v1/admin/dead-letters", list_dead_letters, methods=["GET"]),
        Route("/v1/admin/dead-letters/{id}", show_dead_letter, methods=["GET"]),
        Route("/v1/admin/dead-letters/{id}", purge_dead_letter, methods=["DELETE"]),
        Route("/v1/admin/dead-letters/{id}/replay", replay_dead_letter, methods=["POST"]),
    ]


@contextlib.asynccontextmanager
async def operating(
    settings: Settings, system: System, *, postgres: bool
) -> AsyncIterator[Operator]:
    """An operator for the command line: a Redis client, and a pool if `postgres`."""
    redis = connect(settings.redis_url)
    pool = None
    try:
        if postgres:
            pool = await db.create_pool(settings.database_url, settings.db_schema, min_size=0)
        yield Operator(settings, system, redis, Scripts(redis), Keys.of(settings), pool)
    finally:
        if pool is not None:
            await pool.close()
        await redis.aclose()


def table(letters: list[DeadLetter]) -> str:
    """Dead letters as `eddy deadletters list` prints them."""
    head = ("id", "kind", "consumer", "tenant", "type", "attempts", "at", "error")
    rows = [
        (
            d.dead_letter_id,
            d.kind,
            d.consumer,
            d.tenant_id or "-",
            d.type or "-",
            str(d.attempts),
            d.dead_lettered_at.strftime("%Y-%m-%d %H:%M:%S"),
            d.error[:80],
        )
        for d in letters
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in [head, *rows]
    )


async def command_line(
    settings: Settings,
    system: System,
    action: str,
    dead_letter_id: str | None,
    *,
    every: bool = False,
    as_json: bool = False,
    out: TextIO,
) -> int:
    """`eddy deadletters <action>`; returns the exit code (a server that does not
    answer raises, and `eddy` says which)."""
    encode = msgspec.json.encode
    async with operating(settings, system, postgres=action == "replay") as operator:
        dead_letters = operator.dead_letters
        if action == "list":
            letters = await dead_letters.read()
            if as_json:
                print(encode([d.public() for d in letters]).decode(), file=out)
            else:
                print(table(letters) if letters else "no dead letters", file=out)
            return 0
        if action == "purge" and every:
            print(f"purged {await dead_letters.purge_all()} dead letters", file=out)
            return 0
        if dead_letter_id is None:
            raise ValueError(f"deadletters {action} needs a dead letter id")
        letter = await dead_letters.get(dead_letter_id)
        if action == "show":
            print(encode(letter.public(payload=True)).decode(), file=out)
        elif action == "replay":
            print(encode(await operator.replay(letter)).decode(), file=out)
        else:
            await dead_letters.purge(letter)
            print(f"purged {letter.dead_letter_id}", file=out)
        return 0
