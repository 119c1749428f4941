"""Who may call the API: a bearer token on every ``/api`` request, and the scope it needs.

``GET`` needs ``read``; changing things (deploy, roll back, upload) needs ``deploy``; tokens
and client revocation need ``admin``.  ``/metrics`` (outside ``/api``) needs ``metrics``, which
every other scope includes.  Refusals are logged with the reason, never the token.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from deploy_core.server.tokens import allows

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer

log = logging.getLogger(__name__)

SELF_AUTHENTICATED_SOCKET = "/api/live"
METRICS_PATH = "/metrics"
_ADMIN = re.compile(
    r"^/api/(tokens|join-tokens|webhooks)(/|$)|^/api/clients/[^/]+(/revoke)?$"
    r"|^/api/artifacts/[^/]+/content$"  # a package's bytes (may hold secrets): replicas' fetch
)


def needed_scope(method: str, path: str) -> str:
    """The scope a request needs."""
    if path == METRICS_PATH:
        return "metrics"
    if _ADMIN.match(path) and not (method in ("GET", "HEAD") and path.startswith("/api/clients")):
        return "admin"
    if method in ("GET", "HEAD"):
        return "read"
    return "deploy"


class TokenAuth:
    """ASGI middleware: 401 without a valid token, 403 when its scope is too small."""

    def __init__(self, app: ASGIApp, server: DeployServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not (
            path.startswith("/api") or path == METRICS_PATH
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket" and scope["path"] == SELF_AUTHENTICATED_SOCKET:
            # Browsers cannot set headers on a WebSocket: this one takes its token as its
            # first message and checks it with the same token store (server/live.py).
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"authorization", b"")
        kind, _, given = value.partition(b" ")
        caller = None
        if kind.lower() == b"bearer" and given.strip():
            try:
                token = given.strip().decode("ascii")
            except UnicodeDecodeError:
                token = ""
            if token:
                caller = await self.server.caller(token)
        peer = (scope.get("client") or ("?", 0))[0]
        if caller is None:
            reason = "no bearer token" if not value else "unknown token"
            log.warning("refused %s %s from %s: %s", method, scope["path"], peer, reason)
            await self._refuse(
                scope,
                receive,
                send,
                401,
                "missing or invalid API token: send 'Authorization: Bearer "
                "<token>' (the admin token is in the server's state directory)",
            )
            return
        need = needed_scope(method, scope["path"])
        if not allows(caller.scope, need):
            log.warning(
                "refused %s %s from %s: token %s has scope %s, needs %s",
                method,
                scope["path"],
                peer,
                caller.name,
                caller.scope,
                need,
            )
            await self._refuse(
                scope,
                receive,
                send,
                403,
                f"token {caller.name!r} has scope {caller.scope!r}; "
                f"{method} {scope['path']} needs {need!r}",
            )
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(
        scope: Scope, receive: Receive, send: Send, status: int, message: str
    ) -> None:
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 4401 if status == 401 else 4403})
            return
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        response = JSONResponse({"error": message}, status_code=status, headers=headers)
        await response(scope, receive, send)
