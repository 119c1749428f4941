"""``GET /metrics`` (Prometheus text format, needs a token of scope ``metrics`` or above: the
check is TokenAuth's) and the timing of every HTTP request by route template.

:func:`instrument` wraps the API app: timing outermost (so refusals are timed too), then the
token check, then ``/metrics``, then the routes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deploy_core.server.http.auth import METRICS_PATH

if TYPE_CHECKING:
    from collections.abc import Callable

    from deploy_core.server.app import DeployServer

#: The route label of a request no route matched (a 404): never the raw path.
UNMATCHED = "unmatched"


def _plain(template: str) -> str:
    return re.sub(r"\{([^}:]+)(:[^}]+)?\}", r"{\1}", template)


def templates(routes: Sequence[BaseRoute], prefix: str = "") -> dict[int, str]:
    """The template of every route by ``id(route)``, through mounts: what Starlette leaves
    in ``scope["route"]`` after routing is looked up here instead of matched again."""
    table: dict[int, str] = {}
    for route in routes:
        if isinstance(route, Mount) and route.routes:
            table.update(templates(route.routes, prefix + route.path))
        elif isinstance(route, Mount):
            table[id(route)] = _plain(prefix + route.path + "/{path}")
        elif isinstance(route, Route | WebSocketRoute):
            table[id(route)] = _plain(prefix + route.path)
    return table


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route ``scope`` goes to (``/api/deploy/{deploy_id}``), through
    mounts; :data:`UNMATCHED` when none does.  A route matching the path but not the method
    counts as that route (its 405)."""
    partial: str | None = None
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount):
            if not route.routes:
                template = route.path + "/{path}"  # static files
            else:
                inner = route_template(route.routes, {**scope, **child})
                template = route.path + inner if inner != UNMATCHED else UNMATCHED
        elif isinstance(route, Route | WebSocketRoute):
            template = route.path
        else:
            template = UNMATCHED
        template = _plain(template)
        if match is Match.FULL:
            return template
        partial = partial or template
    return partial or UNMATCHED


class _MetricsEndpoint:
    """Answers ``/metrics``; everything else goes on to ``app``."""

    def __init__(self, app: ASGIApp, server: DeployServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != METRICS_PATH:
            await self.app(scope, receive, send)
            return
        response: Response
        if scope["method"] not in ("GET", "HEAD"):
            response = JSONResponse(
                {"error": f"method {scope['method']} not allowed on {METRICS_PATH}"},
                405,
                headers={"Allow": "GET, HEAD"},
            )
        else:
            body = await self.server.metrics.exposition()
            response = Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        await response(scope, receive, send)


class _Timed:
    """Times each HTTP request to its last body byte and reports it by route template."""

    def __init__(self, app: ASGIApp, server: DeployServer, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.server = server
        self.routes = routes
        self.templates = templates(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # the live socket lasts as long as the page
            return
        # Matched on a copy taken now: routing changes the scope as it goes through mounts.
        original = dict(scope)
        started = time.perf_counter()
        status = 500

        async def send_timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            self.server.metrics.http_request(
                str(original.get("method", "GET")),
                self._template(scope, original),
                status,
                time.perf_counter() - started,
            )

    def _template(self, routed: Scope, original: Scope) -> str:
        """The route the request went to: the one routing chose, or (refused before routing)
        the one it would have."""
        if original.get("path") == METRICS_PATH:
            return METRICS_PATH
        chosen = self.templates.get(id(routed.get("route")))
        return chosen or route_template(self.routes, original)


def instrument(
    app: Any, server: DeployServer, auth: Callable[[ASGIApp, DeployServer], ASGIApp]
) -> ASGIApp:
    """``app`` (the Starlette app) with ``/metrics``, the token check ``auth`` and timing."""
    return _Timed(auth(_MetricsEndpoint(app, server), server), server, app.routes)
