"""What every HTTP handler shares: the error type and reading untrusted input."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from deploy_core.plugin.errors import ApiError as ApiError  # defined by the contract

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer
    from deploy_core.server.rows import DeploymentRow

MAX_BODY_BYTES = 1 << 20

M = TypeVar("M", bound=BaseModel)


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


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


async def _read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it grows past the limit: never buffered whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    return bytes(body)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, refusing oversize, non-JSON and non-objects."""
    body = await _read_body(request)
    try:
        data = json.loads(body or b"null", parse_constant=_not_json)
    except RecursionError:
        raise ApiError(400, "request body is not JSON we accept: nested too deeply") from None
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


FLAG_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def flag_param(request: Request, name: str) -> bool:
    """A yes/no query parameter (``1``/``true``/``yes`` or ``0``/``false``/``no``; absent is
    no); anything else is refused rather than read as no."""
    raw = request.query_params.get(name)
    if raw is None:
        return False
    if raw not in FLAG_VALUES:
        raise ApiError(
            422, f"query parameter {name} must be one of {', '.join(FLAG_VALUES)}, got {raw!r}"
        )
    return FLAG_VALUES[raw]


def parse_model(model: type[M], body: dict[str, Any]) -> M:
    """Validate a request body with ``model``, or answer 422 with the field errors."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(422, "invalid request", validation_detail(exc)) from None


async def record_or_404(server: DeployServer, deploy_id: str) -> DeploymentRow:
    """The deployment record ``deploy_id``, or a 404 answer."""
    record = await server.db(server.records.get, deploy_id)
    if record is None:
        raise ApiError(404, f"no deployment {deploy_id!r}")
    return record
