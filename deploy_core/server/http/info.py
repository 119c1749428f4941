"""Read-only routes about the server itself: clients, plugins, schemas, version."""

from __future__ import annotations

import base64
import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from deploy_core import __version__
from deploy_core.labels import (
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    LabelError,
    parse_selector,
)
from deploy_core.models import ID_PATTERN, wire_schemas
from deploy_core.server.clients import CLIENT_STATES, ClientFilter
from deploy_core.server.http.requests import request_model
from deploy_core.server.http.web import ApiError, flag_param, int_param, services
from deploy_core.server.rollback_plan import describe_defaults
from deploy_core.server.rows import ClientRow, iso_time

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer


def render_client(server: DeployServer, row: ClientRow) -> dict[str, Any]:
    """A client as this replica's API shows it."""
    return row.to_api(connected_here=server.is_connected(row.client_id))


#: ``GET /api/clients``: page sizes, the longest search, the most label filters.
CLIENTS_LIMIT = 100
CLIENTS_MAX_LIMIT = 1000
MAX_SEARCH = 128
MAX_LABEL_FILTERS = 16
CLIENT_QUERY = ("state", "q", "label", "limit", "cursor", "summary")
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,100}$"
_CURSOR = re.compile(CURSOR_PATTERN)
#: ``q``: no control character (PostgreSQL refuses a NUL in text; no id or address has one).
SEARCH_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
_SEARCH = re.compile(SEARCH_PATTERN)
#: One ``label`` filter: a label key and value by the label rules (deploy_core/labels.py).
LABEL_FILTER_PATTERN = LABEL_KEY_PATTERN.removesuffix("$") + "=" + LABEL_VALUE_PATTERN[1:]


def encode_cursor(client_id: str) -> str:
    """The opaque ``next_cursor`` of a page that ends with ``client_id``."""
    return base64.urlsafe_b64encode(client_id.encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> str:
    """The client id a ``cursor`` names; ``422`` for anything this server did not make."""
    try:
        if not _CURSOR.fullmatch(raw):
            raise ValueError
        client_id = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        if not re.fullmatch(ID_PATTERN, client_id):
            raise ValueError
    except ValueError:
        raise ApiError(
            422, f"invalid cursor {raw[:80]!r}: pass a next_cursor this API returned"
        ) from None
    return client_id


def _one(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise ApiError(422, f"query parameter {name} given {len(values)} times; give it once")
    return values[0] if values else None


def client_filter(request: Request) -> ClientFilter:
    """The filters of a ``GET /api/clients`` request, validated."""
    unknown = sorted(set(request.query_params) - set(CLIENT_QUERY))
    if unknown:
        raise ApiError(
            422,
            f"unknown query parameter {unknown[0][:40]!r} (this route takes: "
            f"{', '.join(CLIENT_QUERY)})",
        )
    state = _one(request, "state")
    if state is not None and state not in CLIENT_STATES:
        raise ApiError(422, f"unknown state {state[:40]!r} (one of: {', '.join(CLIENT_STATES)})")
    q = _one(request, "q")
    if q is not None and len(q) > MAX_SEARCH:
        raise ApiError(422, f"query parameter q is over {MAX_SEARCH} characters")
    if q is not None and not _SEARCH.fullmatch(q):
        raise ApiError(422, "query parameter q must not contain control characters")
    raw_labels = request.query_params.getlist("label")
    if len(raw_labels) > MAX_LABEL_FILTERS:
        raise ApiError(422, f"at most {MAX_LABEL_FILTERS} label filters")
    try:
        labels = parse_selector(raw_labels)
    except LabelError as exc:
        raise ApiError(422, f"invalid label filter: {exc} (write label=key=value)") from None
    return ClientFilter(state=state, q=q or None, labels=tuple(sorted(labels.items())))


async def list_clients(request: Request) -> Response:
    """``GET /api/clients`` — enrolled clients with their state and capabilities, a page at
    a time by id: ``?state=&q=&label=k=v&limit=&cursor=&summary=1`` (docs/api.md)."""
    server = services(request)
    where = client_filter(request)
    _one(request, "limit")
    limit = int_param(request, "limit", CLIENTS_LIMIT, 1, CLIENTS_MAX_LIMIT)
    cursor = _one(request, "cursor")
    after = decode_cursor(cursor) if cursor is not None else None
    _one(request, "summary")
    summary = flag_param(request, "summary")
    page = await server.db(server.records.page_clients, where, after=after, limit=limit)
    answer: dict[str, Any] = {
        "clients": [render_client(server, r) for r in page.rows],
        "total": page.total,
        "limit": limit,
        "next_cursor": encode_cursor(page.last_id) if page.last_id is not None else None,
    }
    if summary:
        answer["summary"] = await server.db(server.records.summarize_clients, where)
    return JSONResponse(answer)


async def get_client(request: Request) -> Response:
    """``GET /api/clients/{client_id}`` — the client, the deployment it is busy with, and the
    deployment live on each of its targets."""
    server = services(request)
    row = await server.db(server.records.get_client, request.path_params["client_id"])
    if row is None:
        raise ApiError(404, f"unknown client {request.path_params['client_id']!r}")
    lock = await server.db(server.records.lock_holder, row.client_id)
    live = await server.db(server.records.live_deployments, row.client_id)
    return JSONResponse(
        {
            **render_client(server, row),
            "busy_with": lock and lock.deploy_id,
            "live": [
                {
                    "target": r.target,
                    "deploy_id": r.deploy_id,
                    "command_type": r.command_type,
                    "finished_at": iso_time(r.finished_at),
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
