"""Server side: ``GET /api/docker/monitor/{client_id}`` (SPEC deploy-28).

Without query parameters: the client's last report and the current state of each of its
containers.  With ``since`` and/or ``until`` (seconds since the epoch, or ISO 8601): also the
samples in that window, oldest first, at most ``limit`` (default 1000, at most 10000),
optionally of one ``container`` (name, deployment name or id prefix).
"""

from __future__ import annotations

import datetime as dt

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deploy_core.plugin import ApiError, server_services
from monitor_docker.store import DEFAULT_LIMIT, MAX_LIMIT, store_for


def parse_time(name: str, raw: str) -> float:
    """Seconds since the epoch from ``1767225600``, ``1767225600.5`` or ISO 8601
    (``2026-01-01T00:00:00Z``; without a zone, UTC).

    :raises ApiError: 422 naming the parameter.
    """
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(
            422,
            f"query parameter {name} must be seconds since the epoch or an ISO 8601 time, "
            f"got {raw!r}",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


async def get_monitor(request: Request) -> Response:
    """The client's Docker monitor data."""
    services = server_services(request)
    client_id = request.path_params["client_id"]
    query = request.query_params
    since = parse_time("since", query["since"]) if "since" in query else None
    until = parse_time("until", query["until"]) if "until" in query else None
    if since is not None and until is not None and until < since:
        raise ApiError(422, "query parameter until is before since")
    raw_limit = query.get("limit", str(DEFAULT_LIMIT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise ApiError(422, f"query parameter limit must be an integer from 1 to {MAX_LIMIT}")
    if not await services.client_exists(client_id):
        raise ApiError(404, f"unknown client {client_id!r}: no agent enrolled with that id")
    store = store_for(services)
    view = await services.db(
        store.view,
        client_id,
        since=since,
        until=until,
        container=query.get("container") or None,
        limit=int(raw_limit),
    )
    return JSONResponse(view)


ROUTES = [Route("/docker/monitor/{client_id:str}", get_monitor, methods=["GET"])]
