"""Admin routes: API tokens, join tokens, and cutting clients off."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from deploy_core.server.http.web import ApiError, json_body, parse_model, services
from deploy_core.server.http.webhooks import webhook_routes
from deploy_core.server.rows import iso_time
from deploy_core.server.tokens import SCOPES, TokenError


class NewApiToken(BaseModel):
    """``POST /api/tokens``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    scope: str = Field(pattern="^(" + "|".join(SCOPES) + ")$")


class NewJoinToken(BaseModel):
    """``POST /api/join-tokens``."""

    # Strict: JSON true is not "1 use" nor "1 second".
    model_config = ConfigDict(extra="forbid", strict=True)

    ttl: float | None = Field(None, gt=0, le=365 * 86400, description="seconds it stays valid")
    uses: int | None = Field(None, ge=1, le=100000, description="enrolments it allows")
    note: str = Field("", max_length=200)


async def create_api_token(request: Request) -> Response:
    """``POST /api/tokens`` → ``201 {"name", "scope", "token"}`` (the token is shown once)."""
    server = services(request)
    new = parse_model(NewApiToken, await json_body(request))
    try:
        token = await server.db(server.tokens.create_api_token, new.name, new.scope)
    except TokenError as exc:
        raise ApiError(409, str(exc)) from None
    return JSONResponse({"name": new.name, "scope": new.scope, "token": token}, 201)


async def list_api_tokens(request: Request) -> Response:
    """``GET /api/tokens`` — names and scopes, never values."""
    server = services(request)
    tokens = await server.db(server.tokens.list_api_tokens)
    return JSONResponse({"tokens": [t.to_api() for t in tokens]})


async def revoke_api_token(request: Request) -> Response:
    """``DELETE /api/tokens/{name}``."""
    server = services(request)
    name = request.path_params["name"]
    if not await server.db(server.tokens.revoke_api_token, name):
        raise ApiError(404, f"no token named {name!r}")
    return JSONResponse({"revoked": name})


async def create_join_token(request: Request) -> Response:
    """``POST /api/join-tokens`` → ``201 {"token_id", "token", "expires_at", "uses"}``."""
    server = services(request)
    new = parse_model(NewJoinToken, await json_body(request))
    token_id, token, expires_at = await server.db(
        server.tokens.create_join_token, ttl=new.ttl, uses=new.uses, note=new.note
    )
    return JSONResponse(
        {
            "token_id": token_id,
            "token": token,
            "expires_at": iso_time(expires_at),
            "uses": new.uses,
        },
        201,
    )


async def list_join_tokens(request: Request) -> Response:
    """``GET /api/join-tokens``."""
    server = services(request)
    tokens = await server.db(server.tokens.list_join_tokens)
    return JSONResponse({"join_tokens": [t.to_api() for t in tokens]})


async def revoke_join_token(request: Request) -> Response:
    """``DELETE /api/join-tokens/{token_id}``."""
    server = services(request)
    token_id = request.path_params["token_id"]
    if not await server.db(server.tokens.revoke_join_token, token_id):
        raise ApiError(404, f"no join token {token_id!r}")
    return JSONResponse({"revoked": token_id})


async def revoke_client(request: Request) -> Response:
    """``POST /api/clients/{client_id}/revoke`` — refused from now on, connection cut."""
    server = services(request)
    client_id = request.path_params["client_id"]
    if not await server.revoke_client(client_id):
        raise ApiError(404, f"unknown client {client_id!r}")
    return JSONResponse({"revoked": client_id})


async def forget_client(request: Request) -> Response:
    """``DELETE /api/clients/{client_id}`` — drop the enrolment so the id can enroll again
    with a join token (the deployments stay).  Refused while the agent is connected."""
    server = services(request)
    client_id = request.path_params["client_id"]
    client = await server.db(server.records.get_client, client_id)
    if client is None:
        raise ApiError(404, f"unknown client {client_id!r}")
    if client.connected and client.revoked_at is None:
        raise ApiError(409, f"client {client_id} is connected; revoke it first")
    await server.db(server.records.forget_client, client_id)
    return JSONResponse({"forgotten": client_id})


def admin_routes() -> list[BaseRoute]:
    """Routes that need the ``admin`` scope (see :mod:`deploy_core.server.http.auth`)."""
    return [
        Route("/tokens", create_api_token, methods=["POST"]),
        Route("/tokens", list_api_tokens, methods=["GET"]),
        Route("/tokens/{name:str}", revoke_api_token, methods=["DELETE"]),
        Route("/join-tokens", create_join_token, methods=["POST"]),
        Route("/join-tokens", list_join_tokens, methods=["GET"]),
        Route("/join-tokens/{token_id:str}", revoke_join_token, methods=["DELETE"]),
        Route("/clients/{client_id:str}/revoke", revoke_client, methods=["POST"]),
        Route("/clients/{client_id:str}", forget_client, methods=["DELETE"]),
        *webhook_routes(),
    ]
