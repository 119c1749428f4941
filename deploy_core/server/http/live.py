"""The web page and its live feed: ``GET /`` (the page), ``/static/*`` and ``WS /api/live``.

The page and its files hold no data and are public.  The socket carries data, so it needs an
API token like every ``/api`` route — but a browser cannot set ``Authorization`` on a
WebSocket, so this socket checks its token itself (:class:`~deploy_core.server.http.auth.TokenAuth`
lets it through): either the ``Authorization: Bearer`` header, as programs send it, or, from
the page, a first message ``{"type": "auth", "token": "…"}``.  The token travels inside the
connection, never in the URL, so it stays out of access logs and browser history.  The socket
is accepted first and then closed with ``4401`` (no token, unknown token, or no first message
within :data:`AUTH_TIMEOUT` seconds) or ``4403`` (a scope below ``read``), so the page can
tell a refused token from a lost connection.

Once in, the server sends (every message a JSON object with a ``type``):

- ``hello`` — ``{"protocol": 1, "caller": …, "scope": …, "server_id": …, "version": …}``
- ``clients`` — ``{"clients": [...]}`` as ``GET /api/clients`` shows them: at once, then
  whenever a client connects, disconnects, is revoked or changes its capabilities; or, for a
  socket that asked for ``"clients": "summary"`` (in its auth message, or ``?clients=summary``),
  ``clients_summary`` — ``{"summary": {...}}`` as ``GET /api/clients?summary=1`` counts them;
- ``deployment`` — ``{"record": {...}}`` as ``GET /api/deploy/{id}`` shows it, each time any
  deployment changes (status report, callback, timeout, new deployment, rollback);
- ``rollout`` — ``{"rollout": {...}}`` as ``GET /api/rollouts`` lists it, each time a rollout
  changes (status, batch, counts) on the server that drives it (docs/rollouts.md);
- ``pong`` — the answer to ``{"type": "ping"}``; ``error`` — ``{"error": "…"}`` for a message
  it did not understand.

No history is replayed: a page reads the current state with the REST API after ``hello``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from deploy_core import __version__
from deploy_core.server.clients import ClientFilter
from deploy_core.server.http.auth import SELF_AUTHENTICATED_SOCKET
from deploy_core.server.http.info import render_client
from deploy_core.server.tokens import Caller, allows

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer

log = logging.getLogger(__name__)

LIVE_PATH = SELF_AUTHENTICATED_SOCKET
STATIC_DIR = Path(__file__).parent.parent / "static"
PROTOCOL = 1
# Seconds a socket may stay open before it has shown a token.
AUTH_TIMEOUT = 10.0
# How often the client list is compared with what the socket last sent (agents connecting
# and leaving are not published as record changes), and how often the token is checked again
# so that a revoked token loses its feed.
CLIENTS_INTERVAL = 1.0
REVERIFY_INTERVAL = 30.0
CLOSE_UNAUTHORIZED = 4401
CLOSE_BAD_REQUEST = 4400
#: How a socket gets the clients: ``list``, every client (``clients`` messages, as before
#: fleets); ``summary``, their counts (``clients_summary``), for pages that read the clients
#: a page at a time with ``GET /api/clients``.
CLIENTS_MODES = ("list", "summary")
CLOSE_FORBIDDEN = 4403
# The page's policy: nothing but this server's own files and API.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# --------------------------------------------------------------------------- the page


async def page(request: Request) -> Response:
    """``GET /`` — the web page (no data in it: it asks for a token and reads the API)."""
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


def page_routes() -> list[BaseRoute]:
    """The public routes: the page and its static files."""
    return [
        Route("/", page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]


def live_routes() -> list[BaseRoute]:
    """The live socket, mounted under ``/api`` beside the API routes."""
    return [WebSocketRoute(LIVE_PATH.removeprefix("/api"), live)]


# --------------------------------------------------------------------------- the socket


class Refused(Exception):
    """The socket's caller showed no usable token; ``code`` is the close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def authenticate(server: DeployServer, websocket: WebSocket) -> tuple[Caller, str, str]:
    """The caller of an accepted socket, its token, from the ``Authorization`` header or
    the first message, and how it wants the clients (:data:`CLIENTS_MODES`: the message's
    ``clients`` field, or the URL's ``?clients=``).

    :raises Refused: no token, a wrong one, a scope below ``read``, or an unknown mode.
    """
    mode = websocket.query_params.get("clients", "list")
    header = websocket.headers.get("authorization")
    if header is not None:
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer":
            raise Refused(CLOSE_UNAUTHORIZED, "Authorization must be 'Bearer <token>'")
    else:
        try:
            first = await asyncio.wait_for(receive_text(websocket), AUTH_TIMEOUT)
        except TimeoutError:
            raise Refused(
                CLOSE_UNAUTHORIZED,
                f'no token: send {{"type":"auth","token":"…"}} within {AUTH_TIMEOUT:g}s',
            ) from None
        token, mode = _auth_message_token(first), _auth_message_mode(first, mode)
    if mode not in CLIENTS_MODES:
        raise Refused(CLOSE_BAD_REQUEST, f"clients must be one of {', '.join(CLIENTS_MODES)}")
    token = token.strip()
    caller = await server.caller(token) if token else None
    if caller is None:
        raise Refused(CLOSE_UNAUTHORIZED, "unknown API token")
    if not allows(caller.scope, "read"):
        raise Refused(CLOSE_FORBIDDEN, f"token {caller.name!r} has scope {caller.scope!r}")
    return caller, token, mode


async def receive_text(websocket: WebSocket) -> str:
    """The next message's text (``""`` for a binary one).

    :raises WebSocketDisconnect: the other side closed.
    """
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    return text if isinstance(text, str) else ""


def _auth_message_token(text: str) -> str:
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    if (
        not isinstance(message, dict)
        or message.get("type") != "auth"
        or not isinstance(message.get("token"), str)
        or len(message["token"]) > 1024
    ):
        raise Refused(CLOSE_UNAUTHORIZED, 'first message must be {"type":"auth","token":"…"}')
    token: str = message["token"]
    return token


def _auth_message_mode(text: str, default: str) -> str:
    mode = json.loads(text).get("clients", default)  # a valid auth message (checked first)
    return mode if isinstance(mode, str) else repr(mode)


async def live(websocket: WebSocket) -> None:
    """``WS /api/live`` — deployment and client changes as they happen (SPEC deploy-21)."""
    server: DeployServer = websocket.app.state.services
    await websocket.accept()
    peer = websocket.client.host if websocket.client else "?"
    try:
        caller, token, mode = await authenticate(server, websocket)
    except Refused as exc:
        log.warning("refused live socket from %s: %s", peer, exc.reason)
        await _close(websocket, exc)
        return
    except WebSocketDisconnect:
        return
    feed = LiveFeed(server, websocket, caller, token, clients_summary=mode == "summary")
    try:
        await feed.run()
    except WebSocketDisconnect:
        pass
    except Refused as exc:
        log.warning("closed live socket of %s from %s: %s", caller.name, peer, exc.reason)
        await _close(websocket, exc)
    finally:
        if websocket.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close()


async def _close(websocket: WebSocket, refused: Refused) -> None:
    # A close frame's reason is at most 123 bytes.
    reason = refused.reason.encode()[:123].decode(errors="ignore")
    await websocket.close(refused.code, reason)


class LiveFeed:
    """One authenticated socket: forwards record changes and client-list changes."""

    def __init__(
        self,
        server: DeployServer,
        websocket: WebSocket,
        caller: Caller,
        token: str,
        *,
        clients_summary: bool = False,
    ) -> None:
        self.server = server
        self.websocket = websocket
        self.caller = caller
        self._token = token
        self._send_lock = asyncio.Lock()
        self._clients: list[dict[str, Any]] | None = None
        self._clients_summary = clients_summary
        self._fingerprint: tuple[Any, ...] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message; sends from the feed and the reader never interleave."""
        async with self._send_lock:
            await self.websocket.send_text(json.dumps(message))

    async def run(self) -> None:
        """Send ``hello`` and the clients, then changes until either side closes."""
        async with (
            self.server.listeners.subscribe("*") as changes,
            self.server.rollouts.feed.subscribe() as rollouts,
        ):
            await self.send(
                {
                    "type": "hello",
                    "protocol": PROTOCOL,
                    "caller": self.caller.name,
                    "scope": self.caller.scope,
                    "server_id": self.server.config.server_id,
                    "version": __version__,
                }
            )
            await self.send_clients_if_changed()
            tasks = [
                asyncio.create_task(self._forward(changes)),
                asyncio.create_task(self._read()),
                asyncio.create_task(self._forward_rollouts(rollouts)),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a disconnect or a refusal ends the feed
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _forward(self, changes: asyncio.Queue[dict[str, Any]]) -> None:
        next_clients = time.monotonic() + CLIENTS_INTERVAL
        next_verify = time.monotonic() + REVERIFY_INTERVAL
        while True:
            now = time.monotonic()
            if now >= next_clients:  # checked first, so a flood of changes cannot starve it
                next_clients = now + CLIENTS_INTERVAL
                await self.send_clients_if_changed()
                if now >= next_verify:
                    next_verify = now + REVERIFY_INTERVAL
                    await self._reverify()
            try:
                record = await asyncio.wait_for(
                    changes.get(), max(0.01, next_clients - time.monotonic())
                )
            except TimeoutError:
                continue
            await self.send({"type": "deployment", "record": record})

    async def _forward_rollouts(self, rollouts: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            await self.send({"type": "rollout", "rollout": await rollouts.get()})

    async def _reverify(self) -> None:
        # The token was given once; a revoked one must not keep its feed.
        if await self.server.caller(self._token) is None:
            raise Refused(CLOSE_UNAUTHORIZED, "API token revoked")

    async def send_clients_if_changed(self) -> None:
        """Send the client list when it differs from the last one sent (heartbeat times
        aside, which change every few seconds and are not news); in summary mode, the counts
        (``clients_summary``) whenever some client enrolled, connected, disconnected, was
        revoked or forgotten: one aggregate query a second, not every client's row."""
        if self._clients_summary:
            fingerprint = await self.server.db(self.server.records.clients_fingerprint)
            if fingerprint != self._fingerprint:
                self._fingerprint = fingerprint
                summary = await self.server.db(
                    self.server.records.summarize_clients, ClientFilter()
                )
                await self.send({"type": "clients_summary", "summary": summary})
            return
        rows = await self.server.db(self.server.records.list_clients)
        clients = [render_client(self.server, row) for row in rows]
        compare = [{k: v for k, v in c.items() if k != "last_seen"} for c in clients]
        if self._clients != compare:
            self._clients = compare
            await self.send({"type": "clients", "clients": clients})

    async def _read(self) -> None:
        while True:
            text = await receive_text(self.websocket)
            try:
                message = json.loads(text)
            except ValueError:
                message = None
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "ping":
                await self.send({"type": "pong"})
            elif kind == "auth":
                pass  # a page that sends its token again: already in
            else:
                await self.send(
                    {"type": "error", "error": f"unknown message {text[:80]!r}: send ping"}
                )
