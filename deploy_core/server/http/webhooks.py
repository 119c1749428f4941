"""Webhook routes (admin scope): subscribe a URL to events, list and remove webhooks, and read
a webhook's delivery log.  A webhook's secret goes in once and is never shown again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from deploy_core.server.http.web import ApiError, int_param, json_body, parse_model, services
from deploy_core.server.webhooks import (
    DELIVERY_STATUSES,
    MAX_DESCRIPTION_LENGTH,
    MAX_SECRET_LENGTH,
    MAX_URL_LENGTH,
    MIN_SECRET_LENGTH,
    WebhookError,
    check_description,
    check_events,
    check_secret,
    check_url,
)
from deploy_core.webhook_events import EVENTS

WEBHOOK_ID_PATTERN = r"^[0-9a-f]{16}$"

T = TypeVar("T")


class NewWebhook(BaseModel):
    """``POST /api/webhooks``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(
        max_length=MAX_URL_LENGTH,
        description="https:// (or http:// to a host in the server's [webhooks] "
        "allow_http_hosts); no user name or password, no #fragment",
    )
    events: list[str] = Field(
        min_length=1,
        max_length=len(EVENTS),
        description="what to be told of (each once)",
        json_schema_extra={"items": {"type": "string", "enum": list(EVENTS)}},
    )
    secret: str = Field(
        min_length=MIN_SECRET_LENGTH,
        max_length=MAX_SECRET_LENGTH,
        description="signs each delivery (HMAC-SHA256); stored sealed, never shown again",
    )
    description: str = Field("", max_length=MAX_DESCRIPTION_LENGTH)


class DeliveryCounts(BaseModel):
    """A webhook's deliveries by status."""

    model_config = ConfigDict(extra="forbid")

    pending: int
    delivered: int
    failed: int


class WebhookView(BaseModel):
    """A webhook (never its secret)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    url: str
    events: list[str]
    description: str
    created_at: str
    deliveries: DeliveryCounts


class WebhookList(BaseModel):
    """``GET /api/webhooks``: oldest first."""

    model_config = ConfigDict(extra="forbid")

    webhooks: list[WebhookView]


class WebhookRemoved(BaseModel):
    """``DELETE /api/webhooks/{webhook_id}``: the webhook and its delivery log are gone."""

    model_config = ConfigDict(extra="forbid")

    removed: str


class PingAccepted(BaseModel):
    """``POST /api/webhooks/{webhook_id}/ping``: a ``ping`` delivery was queued."""

    model_config = ConfigDict(extra="forbid")

    delivery_id: str = Field(description="find it in the delivery log")


class DeliveryView(BaseModel):
    """One delivery: an event for a webhook, and how sending it went."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="the X-Deploy-Center-Delivery header and the payload's id")
    event: str
    status: str = Field(description="pending (retried later), delivered or failed (given up)")
    attempts: int
    last_status_code: int | None = Field(description="the HTTP status of the last attempt")
    last_error: str | None
    created_at: str | None
    last_attempt_at: str | None
    next_attempt_at: str | None = Field(description="when a pending delivery is tried next")
    finished_at: str | None


class DeliveryLog(BaseModel):
    """``GET /api/webhooks/{webhook_id}/deliveries``: newest first."""

    model_config = ConfigDict(extra="forbid")

    webhook_id: str
    deliveries: list[DeliveryView]


def _checked(field: str, check: Callable[..., T], *args: Any) -> T:
    """``check(*args)``, or a 422 naming ``field`` with what was wrong."""
    try:
        return check(*args)
    except WebhookError as exc:
        raise ApiError(
            422, str(exc), [{"loc": [field], "msg": str(exc), "type": "value_error"}]
        ) from None


async def create_webhook(request: Request) -> Response:
    """``POST /api/webhooks`` → ``201`` with the webhook (without its secret)."""
    server = services(request)
    new = parse_model(NewWebhook, await json_body(request))
    url = _checked("url", check_url, new.url, server.webhooks.settings.allow_http_hosts)
    events = _checked("events", check_events, new.events)
    secret = _checked("secret", check_secret, new.secret)
    description = _checked("description", check_description, new.description)
    try:
        made = await server.db(server.webhooks.store.create, url, events, secret, description)
    except WebhookError as exc:
        raise ApiError(409, str(exc)) from None
    server.webhooks.invalidate()
    return JSONResponse(made, 201)


async def list_webhooks(request: Request) -> Response:
    """``GET /api/webhooks`` — every webhook with its deliveries counted by status."""
    server = services(request)
    return JSONResponse({"webhooks": await server.db(server.webhooks.store.all)})


async def _webhook_or_404(request: Request) -> dict[str, Any]:
    server = services(request)
    webhook_id = request.path_params["webhook_id"]
    webhook = await server.db(server.webhooks.store.get, webhook_id)
    if webhook is None:
        raise ApiError(404, f"no webhook {webhook_id[:64]!r}")
    return webhook


async def get_webhook(request: Request) -> Response:
    """``GET /api/webhooks/{webhook_id}``."""
    return JSONResponse(await _webhook_or_404(request))


async def remove_webhook(request: Request) -> Response:
    """``DELETE /api/webhooks/{webhook_id}`` — no more deliveries; its log is deleted too."""
    server = services(request)
    webhook_id = request.path_params["webhook_id"]
    if not await server.db(server.webhooks.store.remove, webhook_id):
        raise ApiError(404, f"no webhook {webhook_id[:64]!r}")
    server.webhooks.invalidate()
    return JSONResponse({"removed": webhook_id})


async def ping_webhook(request: Request) -> Response:
    """``POST /api/webhooks/{webhook_id}/ping`` → ``202``: send the webhook a signed ``ping``
    (no body needed), to check the receiver and its secret; it shows in the delivery log."""
    server = services(request)
    webhook = await _webhook_or_404(request)
    delivery_id = await server.db(server.webhooks.store.ping, webhook["id"])
    if delivery_id is None:  # removed meanwhile
        raise ApiError(404, f"no webhook {webhook['id']!r}")
    server.webhooks.wake()
    return JSONResponse({"delivery_id": delivery_id}, 202)


async def list_deliveries(request: Request) -> Response:
    """``GET /api/webhooks/{webhook_id}/deliveries?status=&limit=`` — the delivery log, newest
    first: status, attempts, the last HTTP status and error, and times."""
    server = services(request)
    webhook = await _webhook_or_404(request)
    status = request.query_params.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise ApiError(
            422, f"unknown delivery status {status[:32]!r} (one of: {', '.join(DELIVERY_STATUSES)})"
        )
    limit = int_param(request, "limit", 50, 1, 500)
    rows = await server.db(
        server.webhooks.store.deliveries, webhook["id"], limit=limit, status=status
    )
    return JSONResponse({"webhook_id": webhook["id"], "deliveries": rows})


def webhook_routes() -> list[BaseRoute]:
    """The webhook routes (under ``/api``; ``admin`` scope, see http/auth.py)."""
    return [
        Route("/webhooks", create_webhook, methods=["POST"]),
        Route("/webhooks", list_webhooks, methods=["GET"]),
        Route("/webhooks/{webhook_id:str}", get_webhook, methods=["GET"]),
        Route("/webhooks/{webhook_id:str}", remove_webhook, methods=["DELETE"]),
        Route("/webhooks/{webhook_id:str}/deliveries", list_deliveries, methods=["GET"]),
        Route("/webhooks/{webhook_id:str}/ping", ping_webhook, methods=["POST"]),
    ]
