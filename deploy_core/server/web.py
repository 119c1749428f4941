"""What every HTTP handler shares: the error type and reading untrusted input."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer

MAX_BODY_BYTES = 1 << 20

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An error answer: HTTP status, message and optional detail."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


def validation_detail(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic's field errors as the API shows them, located under ``prefix``."""
    return [
        {"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


def services(request: Request) -> DeployServer:
    """The server a request is handled by."""
    server: DeployServer = request.app.state.services
    return server


async def json_body(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, refusing oversize, non-JSON and non-objects."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "request body must be a JSON object")
    return data


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"query parameter {name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(422, f"query parameter {name} must be between {low} and {high}")
    return value


def float_param(request: Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(422, f"query parameter {name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(422, f"query parameter {name} must be between {low:g} and {high:g}")
    return value


def parse_model(model: type[M], body: dict[str, Any]) -> M:
    """Validate a request body with ``model``, or answer 422 with the field errors."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(422, "invalid request", validation_detail(exc)) from None
