"""Read-only routes about the server itself: clients, plugins, schemas, version."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from deploy_core import __version__
from deploy_core.models import wire_schemas
from deploy_core.server.http.requests import request_model
from deploy_core.server.http.web import ApiError, services
from deploy_core.server.rollback_plan import describe_defaults
from deploy_core.server.views import iso_time

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer


def render_client(server: DeployServer, row: dict[str, Any]) -> dict[str, Any]:
    """A client as the API shows it."""
    caps = row.get("capabilities") or {}
    return {
        "client_id": row["client_id"],
        "connected": bool(row["connected"]),
        "connected_here": server.is_connected(row["client_id"]),
        "connected_since": iso_time(row["connected_since"]) if row["connected"] else None,
        "disconnected_since": None if row["connected"] else iso_time(row["disconnected_since"]),
        "last_seen": iso_time(row["last_seen"]),
        "remote": row["remote"],
        "enrolled_at": iso_time(row["enrolled_at"]),
        "revoked_at": iso_time(row.get("revoked_at")),
        "credential": row["credential"],
        "plugins": caps.get("plugins", {}),
        "capabilities": caps,
        "labels": row.get("labels") or {},
    }


async def list_clients(request: Request) -> Response:
    """``GET /api/clients`` — every enrolled client with its state and capabilities."""
    server = services(request)
    rows = await server.db(server.records.list_clients)
    return JSONResponse({"clients": [render_client(server, r) for r in rows]})


async def get_client(request: Request) -> Response:
    """``GET /api/clients/{client_id}`` — the client, the deployment it is busy with, and the
    deployment live on each of its targets."""
    server = services(request)
    row = await server.db(server.records.get_client, request.path_params["client_id"])
    if row is None:
        raise ApiError(404, f"unknown client {request.path_params['client_id']!r}")
    lock = await server.db(server.records.lock_holder, row["client_id"])
    live = await server.db(server.records.live_deployments, row["client_id"])
    return JSONResponse(
        {
            **render_client(server, row),
            "busy_with": lock and lock["deploy_id"],
            "live": [
                {
                    "target": r["target"],
                    "deploy_id": r["deploy_id"],
                    "command_type": r["command_type"],
                    "finished_at": iso_time(r["finished_at"]),
                }
                for r in live
            ],
        }
    )


async def list_plugins(request: Request) -> Response:
    """``GET /api/plugins`` — loaded plugins, their versions, hooks and registrations."""
    return JSONResponse({"plugins": services(request).plugins.describe()})


async def get_schemas(request: Request) -> Response:
    """``GET /api/schemas`` — JSON Schema of the wire models (with each deploy type's
    registered result model) and of each deploy request."""

    types = services(request).plugins.deploy_types.entries.values()
    return JSONResponse(
        {
            "wire": wire_schemas(t.result for t in types if t.result is not None),
            "deploy_requests": {t.name: request_model(t).model_json_schema() for t in types},
        }
    )


async def get_info(request: Request) -> Response:
    """``GET /api/info`` — server version, id and endpoints, and the rollback each deploy
    type gets when a request names none."""
    server = services(request)
    return JSONResponse(
        {
            "version": __version__,
            "server_id": server.config.server_id,
            "quic_port": server.transport.port,
            "started_at": iso_time(server.started_at),
            "rollback_defaults": describe_defaults(server.plugins, server.rollback_defaults),
        }
    )
