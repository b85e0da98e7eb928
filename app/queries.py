"""Query routes, built from the projections' declared queries.

Every query accepts `?after=<position>` (or `X-After-Position`): the answer waits
until every projection whose tables the query reads (its own, and those it names
in `also_from`) has committed that position, up to `EDDY_AFTER_TIMEOUT_S`, then
answers 504 `stale`. A query of a materialized view (`Query.view`) waits until
the view reflects the position (`projections/views.py`).

A query that declares a `Cache` is answered through `projections/cache.py`
(unless `EDDY_QUERY_CACHE=off`): after the wait, so the generation it reads
covers the position waited for. Every outcome is counted in
`eddy_query_cache_total{query, outcome}`.

Every query counts against its connection's and its tenant's rate of queries
(`app/limits.py`, 429 over it), before anything else is done.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.http import json_response
from app.limits import authenticate_within_limits
from app.webprocess import WebProcess
from core.errors import BadRequest, NotFound, Stale
from core.outages import poll
from projections import db, views
from projections.pagination import QueryArgs
from projections.projection import Projection, Query
from projections.views import View
from streams.positions import parse_event_position


async def wait_for(
    web: WebProcess,
    projections: Sequence[Projection],
    position: str,
    view: View | None = None,
) -> None:
    """Return once `projections` (and `view`) reflect every event up to `position`;
    else raise `Stale`."""
    shard, entry = parse_event_position(position, web.system.catalog.by_name, web.settings.shards)
    # A projection that never reads that stream has nothing to wait for.
    waiting = [p.name for p in projections if shard.context in p.contexts]
    watched = view if view is not None and view.feeding(shard) else None

    async def reached() -> bool:
        for name in waiting:
            if not await db.reached(web.pool, name, shard, entry):
                return False
        return watched is None or await views.reflects(web.pool, watched, shard, entry)

    if (waiting or watched) and not await poll(
        reached, bool, within_s=web.settings.after_timeout_s, first_s=0.005, cap_s=0.1
    ):
        behind = [*waiting, *([f"view {watched.name}"] if watched else [])]
        raise Stale(f"{', '.join(behind)} has not reached {position} yet")


def check_params(request: Request) -> None:
    """Refuse (400) a path or query parameter holding a NUL character: any of them
    may reach Postgres, whose text refuses it (a 500 otherwise)."""
    for name, value in [*request.path_params.items(), *request.query_params.multi_items()]:
        if "\x00" in value:
            raise BadRequest(f"{name[:100]!r} holds a NUL character (\\u0000)")


def query_route(projections: Sequence[Projection], query: Query, view: View | None = None) -> Route:
    """The route of `query`; `projections`: every projection whose tables it reads;
    `view`: the materialized view it reads, if any."""

    async def endpoint(request: Request) -> Response:
        web: WebProcess = request.app.state.web
        principal = await authenticate_within_limits(request, "queries")
        check_params(request)
        after = request.query_params.get("after") or request.headers.get("x-after-position")
        if after:
            await wait_for(web, projections, after, view)
        args = QueryArgs(
            tenant_id=principal.tenant,
            path=request.path_params,
            params=request.query_params,
        )
        if query.cache is not None and web.settings.query_cache == "on":
            body, outcome = await web.query_cache.answer(web.pool, web.redis, web.keys, query, args)
            web.metrics.query_cache.labels(query.name, outcome).inc()
            if body is None:
                raise NotFound(f"{query.name}: not found")
            return Response(body, media_type="application/json")
        async with web.pool.acquire() as conn:
            answer = await query.run(conn, args)
        if answer is None:
            raise NotFound(f"{query.name}: not found")
        return json_response(answer)

    endpoint.__name__ = query.name
    return Route(query.path, endpoint, methods=["GET"], name=query.name)


def query_routes(projections: Sequence[Projection], views: Sequence[View]) -> list[Route]:
    by_name = {p.name: p for p in projections}
    by_view = {v.name: v for v in views}
    return [
        query_route(
            [p, *(by_name[name] for name in q.also_from)],
            q,
            None if q.view is None else by_view[q.view],
        )
        for p in projections
        for q in p.queries
    ]
