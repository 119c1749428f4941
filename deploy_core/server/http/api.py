"""The HTTP API (Starlette).  Every route under ``/api`` needs ``Authorization: Bearer``.

Deploy requests are validated with the deploy type's own parameter model plus the common
fields (:class:`DeployRequestCommon`); health checks and rollback options are validated with
the models of the plugins that provide them.  Errors say what was wrong:
``{"error": "...", "detail": [...]}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Scope

from deploy_core.models import ID_PATTERN, DeployStatus
from deploy_core.server.db_health import (
    HEALTH_PATH,
    DatabaseUnavailable,
    OutageGuard,
    health_response,
    is_outage,
    outage_response,
    refuse_if_fenced,
)
from deploy_core.server.http.admin import admin_routes
from deploy_core.server.http.artifacts import artifact_routes
from deploy_core.server.http.auth import TokenAuth
from deploy_core.server.http.cluster import cluster_routes
from deploy_core.server.http.deploying import deploy_type_of, prepare_deploy
from deploy_core.server.http.info import (
    get_client,
    get_info,
    get_schemas,
    list_clients,
    list_plugins,
)
from deploy_core.server.http.live import live_routes, page_routes
from deploy_core.server.http.logs import get_logs
from deploy_core.server.http.metrics import instrument
from deploy_core.server.http.openapi import build_openapi
from deploy_core.server.http.requests import RollbackOptions
from deploy_core.server.http.rollouts import rollout_routes
from deploy_core.server.http.web import (
    ApiError,
    flag_param,
    float_param,
    int_param,
    json_body,
    parse_model,
    record_or_404,
    services,
)
from deploy_core.server.locks import ClientBusy
from deploy_core.server.rollbacks import (
    RollbackRefused,
    RollbackSuperseded,
    cascade_order,
    request_rollback,
)
from deploy_core.server.rows import ClientRow
from deploy_core.server.services import PluginServices

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer

log = logging.getLogger(__name__)

MAX_WAIT = 60.0


# --------------------------------------------------------------------------- deploy


async def create_deployment(request: Request) -> Response:
    """``POST /api/deploy/{kind}`` → ``202 {"deploy_id": …}`` (SPEC deploy-23)."""
    server = services(request)
    refuse_if_fenced(server.db_health)
    kind = request.path_params["kind"]
    # An unknown type is a 404 before the body is read: /api/deploy/<id> is the same URL
    # template, and a POST there must not be answered as a malformed deploy request.
    deploy_type_of(server, kind)
    prepared = await prepare_deploy(server, kind, await json_body(request))
    common = prepared.common
    clients: list[ClientRow] = []

    def check_client() -> None:
        # On the thread that then records the deployment (one hand-over per request).
        client = server.records.get_client(common.client_id)
        if client is None:
            raise ApiError(
                404, f"unknown client {common.client_id!r}: no agent enrolled with that id"
            )
        prepared.check_capabilities(client)
        clients.append(client)

    try:
        record = await server.deployments.submit(
            client_id=common.client_id,
            command_type=prepared.deploy_type.name,
            request=prepared.request,
            deadline=time.time() + prepared.seconds,
            secret_env=common.secret_env,
            before=check_client,
        )
    except ClientBusy as exc:
        raise ApiError(409, str(exc), {"busy_with": exc.deploy_id}) from None
    client = clients[0]
    return JSONResponse(
        {
            "deploy_id": record.deploy_id,
            "status": record.status,
            # Connected here, or to another replica (which is sent the deployment).
            "client_connected": server.is_connected(common.client_id) or client.connected,
            "url": f"/api/deploy/{record.deploy_id}",
        },
        status_code=202,
    )


async def rollback_deployment(request: Request) -> Response:
    """``POST /api/deploy/{deploy_id}/rollback`` → ``202`` with the rollback's own deployment
    id (SPEC deploy-25).  ``409`` when there is nothing to restore, when the client is busy,
    or when newer deployments of the same target are still in place (``detail.newer``,
    ``detail.target``) and the body does not ask for ``{"cascade": true}``."""
    server = services(request)
    refuse_if_fenced(server.db_health)
    has_body = (
        request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
    )
    options = (
        parse_model(RollbackOptions, await json_body(request)) if has_body else RollbackOptions()
    )
    record = await record_or_404(server, request.path_params["deploy_id"])
    try:
        rollback = await request_rollback(server.deployments, record, cascade=options.cascade)
    except RollbackSuperseded as exc:
        raise ApiError(409, str(exc), {"newer": exc.newer, "target": exc.target}) from None
    except RollbackRefused as exc:
        raise ApiError(409, str(exc)) from None
    except ClientBusy as exc:
        raise ApiError(409, str(exc), {"busy_with": exc.deploy_id}) from None
    return JSONResponse(
        {
            "deploy_id": rollback.deploy_id,
            "rollback_of": rollback.rollback_of,
            "cascade": cascade_order(rollback),
            "status": rollback.status,
            "client_connected": server.is_connected(record.client_id),
            "url": f"/api/deploy/{rollback.deploy_id}",
        },
        status_code=202,
    )


async def get_deployment(request: Request) -> Response:
    """``GET /api/deploy/{deploy_id}`` — the record.  ``?wait=S&since=T`` long-polls up to S
    seconds for a change after ``updated_ts`` T (or for the end, without ``since``).

    A waiting request reads the record once, after subscribing to its changes; then each
    change told to the listeners is the record as its transaction stored it (published
    only after the commit), so the answer needs no read of its own: no thread hop and no
    query between the recorded status and the response.  Woken, it answers the newest
    change published by then."""
    server = services(request)
    deploy_id = request.path_params["deploy_id"]
    wait = float_param(request, "wait", 0.0, 0.0, MAX_WAIT)
    since = float_param(request, "since", -1.0, -1.0, 1e12)
    if wait <= 0:
        return JSONResponse((await record_or_404(server, deploy_id)).to_api())
    async with server.listeners.subscribe(deploy_id) as queue:
        view = (await record_or_404(server, deploy_id)).to_api()  # read after subscribing
        end = time.monotonic() + wait

        def settled(view: dict[str, Any]) -> bool:
            if since >= 0:
                return bool(view["updated_ts"] > since)
            return bool(view["finished"])

        while not settled(view) and (left := end - time.monotonic()) > 0:
            try:
                # In this task (not wait_for's own): woken, it answers in the same loop turn,
                # before the ACK of the agent's callback goes out.
                async with asyncio.timeout(left):
                    view = await queue.get()
            except TimeoutError:
                break
            # The newest of what was published meanwhile (an agent's last report and its
            # callback are stored in one transaction: answer the end, not the report).
            while not queue.empty():
                view = queue.get_nowait()
    return JSONResponse(view)


async def get_status_history(request: Request) -> Response:
    """``GET /api/deploy/{deploy_id}/status`` — the status history, oldest first."""
    server = services(request)
    deploy_id = request.path_params["deploy_id"]
    record = await record_or_404(server, deploy_id)
    rows = await server.db(server.records.history, deploy_id)
    return JSONResponse(
        {
            "deploy_id": deploy_id,
            "status": record.status,
            "history": [r.to_api() for r in rows],
        }
    )


async def list_deployments(request: Request) -> Response:
    """``GET /api/deploy/{client_id}/list`` — newest first, ``?limit=&offset=``."""
    server = services(request)
    client_id = request.path_params["client_id"]
    limit = int_param(request, "limit", 50, 1, 500)
    offset = int_param(request, "offset", 0, 0, 10**9)
    if await server.db(server.records.get_client, client_id) is None:
        raise ApiError(404, f"unknown client {client_id!r}")
    items, total = await server.db(
        server.records.list_for_client, client_id, limit=limit, offset=offset
    )
    return JSONResponse(
        {
            "client_id": client_id,
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": [r.to_api() for r in items],
        }
    )


async def list_all_deployments(request: Request) -> Response:
    """``GET /api/deployments?status=&client_id=&unfinished=1&limit=&offset=`` — every
    client's deployments, newest first."""
    server = services(request)
    status = request.query_params.get("status")
    if status is not None:
        try:
            DeployStatus(status)
        except ValueError:
            known = ", ".join(s.value for s in DeployStatus)
            raise ApiError(422, f"unknown status {status!r} (one of: {known})") from None
    client_id = request.query_params.get("client_id")
    if client_id is not None and not re.fullmatch(ID_PATTERN, client_id):
        raise ApiError(422, f"invalid client_id {client_id!r}")
    limit = int_param(request, "limit", 50, 1, 500)
    offset = int_param(request, "offset", 0, 0, 10**9)
    unfinished = flag_param(request, "unfinished")
    items, total = await server.db(
        server.records.list_all,
        status=status,
        client_id=client_id,
        unfinished=unfinished,
        limit=limit,
        offset=offset,
    )
    return JSONResponse(
        {
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": [r.to_api() for r in items],
        }
    )


# --------------------------------------------------------------------------- app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    body: dict[str, Any] = {"error": exc.message}
    if exc.detail is not None:
        body["detail"] = exc.detail
    return JSONResponse(body, status_code=exc.status)


async def _database_error(request: Request, exc: Exception) -> Response:
    """``503`` with ``Retry-After`` for a database outage or a fenced replica
    (server/db_health.py); any other database error is a bug (500)."""
    if not (isinstance(exc, DatabaseUnavailable) or is_outage(exc)):
        raise exc
    return outage_response(services(request).db_health, exc)


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"no route {request.method} {request.url.path}"}, 404)


def _allowed_methods(routes: list[BaseRoute], scope: Scope) -> set[str]:
    """Every method some route serves at the request's path (several routes may share one
    path, e.g. ``GET`` and ``POST /api/tokens``; Starlette's own 405 names only the first)."""
    allowed: set[str] = set()
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount) and isinstance(route.app, StaticFiles):
            allowed |= {"GET", "HEAD"}
        elif isinstance(route, Mount):
            allowed |= _allowed_methods(route.routes, {**scope, **child})
        elif isinstance(route, Route) and route.methods:
            allowed |= route.methods
    return allowed


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    # Match from the top again: routing left the scope inside the mount it went through.
    scope = request.scope
    top = {**scope, "root_path": scope.get("app_root_path", scope.get("root_path", ""))}
    allowed = _allowed_methods(request.app.routes, top)
    return JSONResponse(
        {"error": f"method {request.method} not allowed on {request.url.path}"},
        405,
        headers={"Allow": ", ".join(sorted(allowed))},  # RFC 9110: a 405 lists them
    )


async def get_openapi(request: Request) -> Response:
    """``GET /openapi.json`` — the OpenAPI 3.1 document of this server's API (public: it
    describes the routes and holds no data)."""

    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = build_openapi(services(request).plugins, request.app.routes)
    return JSONResponse(state.openapi)


async def get_health(request: Request) -> Response:
    """Whether this replica should get traffic: its database answers and it is not fenced.

    Public (for load balancers); ``503`` with ``Retry-After`` and the reason when it should
    get none.  The database probe is shared and reused for a second, so a flood of probes is
    one query a second."""
    return await health_response(services(request).db_health)


def api_routes() -> list[BaseRoute]:
    """The core's routes (under ``/api``)."""
    return [
        Route("/deploy/{kind:str}", create_deployment, methods=["POST"]),
        Route("/deploy/{deploy_id:str}", get_deployment, methods=["GET"]),
        Route("/deploy/{deploy_id:str}/status", get_status_history, methods=["GET"]),
        Route("/deploy/{deploy_id:str}/logs", get_logs, methods=["GET"]),
        Route("/deploy/{deploy_id:str}/rollback", rollback_deployment, methods=["POST"]),
        Route("/deploy/{client_id:str}/list", list_deployments, methods=["GET"]),
        Route("/deployments", list_all_deployments, methods=["GET"]),
        Route("/clients", list_clients, methods=["GET"]),
        Route("/clients/{client_id:str}", get_client, methods=["GET"]),
        Route("/plugins", list_plugins, methods=["GET"]),
        Route("/schemas", get_schemas, methods=["GET"]),
        Route("/info", get_info, methods=["GET"]),
        *rollout_routes(),
        *cluster_routes(),
    ]


def create_app(server: DeployServer) -> ASGIApp:
    """The ASGI app: the web page (public), core routes, the live socket, plugin routes,
    token check."""

    routes = live_routes() + api_routes() + admin_routes() + artifact_routes()
    for route_set in server.plugins.route_sets.entries.values():
        routes.extend(route_set.routes)
    app = Starlette(
        routes=[
            *page_routes(),
            Route("/openapi.json", get_openapi, methods=["GET"]),
            Route(HEALTH_PATH, get_health, methods=["GET"]),
            Mount("/api", routes=routes),
        ],
        exception_handlers={
            ApiError: _api_error,
            DatabaseUnavailable: _database_error,
            sa.exc.DBAPIError: _database_error,
            sa.exc.TimeoutError: _database_error,
            404: _not_found,
            405: _method_not_allowed,
        },
    )
    app.state.services = server
    app.state.plugin_services = PluginServices(server)  # what plugins get (server_services)

    def guarded_auth(inner: ASGIApp, srv: DeployServer) -> ASGIApp:
        # The token check reads the database too: an outage there is a 503 as well.
        return OutageGuard(TokenAuth(inner, srv), lambda: srv.db_health)

    return instrument(app, server, guarded_auth)
