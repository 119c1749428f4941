"""Server side: ``GET /api/docker/monitor/{client_id}`` (SPEC deploy-28).

Without query parameters: the client's last report and the current state of each of its
containers.  With ``since`` and/or ``until`` (seconds since the epoch, or ISO 8601): also the
samples in that window, oldest first, at most ``limit`` (default 1000, at most 10000),
optionally of one ``container`` (name, deployment name or id prefix).

``GET /api/docker/monitor/{client_id}/series``: each current managed container (``all=1``:
every one) with its CPU % and memory over the retained window (``since``: a later start) as
at most ``points`` points (default 120, at most 500) — what the web page draws.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deploy_core.plugin import ApiError, ServerServices, server_services
from monitor_docker.store import (
    DEFAULT_LIMIT,
    DEFAULT_POINTS,
    MAX_LIMIT,
    MAX_POINTS,
    MonitorStore,
    store_for,
)

_DIGITS = re.compile(r"[0-9]{1,6}")  # not str.isdigit(): "²" is a digit to it, not to int()


def parse_time(name: str, raw: str) -> float:
    """Seconds since the epoch from ``1767225600``, ``1767225600.5`` or ISO 8601
    (``2026-01-01T00:00:00Z``; without a zone, UTC).

    :raises ApiError: 422 naming the parameter.
    """
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ApiError(422, f"query parameter {name} must be a finite time, got {raw!r}")
        return seconds
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


async def _store_of(services: ServerServices, client_id: str) -> MonitorStore:
    """The store, once ``client_id`` is known to be an enrolled client (else a 404)."""
    if not await services.client_exists(client_id):
        raise ApiError(404, f"unknown client {client_id!r}: no agent enrolled with that id")
    return store_for(services)


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
    if not _DIGITS.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise ApiError(422, f"query parameter limit must be an integer from 1 to {MAX_LIMIT}")
    store = await _store_of(services, client_id)
    view = await services.db(
        store.view,
        client_id,
        since=since,
        until=until,
        container=query.get("container") or None,
        limit=int(raw_limit),
    )
    return JSONResponse(view)


async def get_series(request: Request) -> Response:
    """The client's containers with their CPU and memory series, a few points each."""
    services = server_services(request)
    client_id = request.path_params["client_id"]
    query = request.query_params
    unknown = sorted(set(query) - {"points", "since", "all"})
    if unknown:
        raise ApiError(422, f"unknown query parameter {unknown[0]!r}: use points, since, all")
    raw_points = query.get("points", str(DEFAULT_POINTS))
    if not _DIGITS.fullmatch(raw_points) or not 2 <= int(raw_points) <= MAX_POINTS:
        raise ApiError(422, f"query parameter points must be an integer from 2 to {MAX_POINTS}")
    since = parse_time("since", query["since"]) if "since" in query else None
    raw_all = query.get("all", "0")
    if raw_all not in ("0", "1"):
        raise ApiError(422, "query parameter all must be 0 or 1")
    store = await _store_of(services, client_id)
    view = await services.db(
        store.series,
        client_id,
        now=time.time(),
        points=int(raw_points),
        since=since,
        include_all=raw_all == "1",
    )
    return JSONResponse(view)


ROUTES = [
    Route("/docker/monitor/{client_id:str}", get_monitor, methods=["GET"]),
    Route("/docker/monitor/{client_id:str}/series", get_series, methods=["GET"]),
]
