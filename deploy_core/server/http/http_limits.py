"""Limits on HTTP clients the API has not authenticated yet (issue 10 §4).

Uvicorn closes idle keep-alive connections but has no timeout for reading a request's
headers or body, so a client sending one byte a second (slowloris) or stalling in the middle
of an upload holds its connection, and the request's task, for ever.  :class:`HttpLimits`
adds, at the protocol level (uvicorn's h11 protocol, subclassed):

* a **header timeout**: a request's line and headers must arrive within ``header_timeout``
  seconds of the connection opening (or of the previous response on a kept-alive one);
  otherwise ``408`` and the connection is closed;
* a **body timeout**: a body that stops arriving for ``body_timeout`` seconds (while the
  server is reading it) ends the same way.  It measures silence, not the whole upload, so a
  large package on a slow link is fine as long as bytes keep coming;
* a **cap on unauthenticated connections**: a connection counts until one of its requests
  passes the API token check; past ``max_unauthenticated`` such connections a new request
  gets ``503`` with ``Retry-After`` and the connection is closed.  Agents do not use HTTP,
  and a logged-in client's connections are not counted, so a flood of strangers does not
  lock out the operator's tools once they are connected.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_MAX_UNAUTHENTICATED = 200
DEFAULT_RETRY_AFTER = 5


@dataclass(frozen=True)
class HttpLimits:
    """How long the API waits for a request's headers and body, and how many connections
    not (yet) authenticated it keeps at once.  See the module docstring."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED
    retry_after: int = DEFAULT_RETRY_AFTER

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"HTTP {name} must be a positive number of seconds, got {value}")
        if self.max_unauthenticated < 1:
            raise ValueError(
                f"HTTP max_unauthenticated must be at least 1, got {self.max_unauthenticated}"
            )
        if self.retry_after < 1:
            raise ValueError(f"HTTP retry_after must be at least 1 s, got {self.retry_after}")

    def protocol(self) -> type[H11Protocol]:
        """Uvicorn's h11 protocol with these limits (pass as ``uvicorn.Config(http=...)``)."""
        return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": self})


def _raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


class LimitedH11Protocol(H11Protocol):
    """Uvicorn's h11 protocol with header and body timeouts and the unauthenticated
    connection cap of :attr:`limits` (a subclass made by :meth:`HttpLimits.protocol`)."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        #: One of this connection's requests passed the API token check.
        self.authenticated = False
        self._app = self.app
        self.app = self._gate

    # -- uvicorn's hooks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            # Closed, or handed to the WebSocket protocol (``/api/live``): no HTTP request
            # is being read here any more.
            self._cancel_timers()
            return
        if self.conn.their_state is not h11.IDLE and self._header_timer is not None:
            self._header_timer.cancel()  # the request line and headers are in
            self._header_timer = None
        if self.conn.their_state is h11.SEND_BODY:
            self._arm_body_timer()  # bytes arrived: the silence starts again
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request's headers, after keep-alive

    # -- the cap

    async def _gate(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every request of this connection passes here before the API."""
        if not self.authenticated:
            strangers = sum(
                1
                for c in self.connections
                if isinstance(c, LimitedH11Protocol) and not c.authenticated
            )
            if strangers > self.limits.max_unauthenticated:
                log.warning(
                    "HTTP: %d connections without an authenticated request (limit %d); refusing %s",
                    strangers,
                    self.limits.max_unauthenticated,
                    self._peer(),
                )
                await self._refuse(send)
                return

        async def send_marking(message: Message) -> None:
            # TokenAuth has run once the answer starts: a long answer (a followed log) must
            # not keep counting its connection as a stranger's.
            if (
                message["type"] == "http.response.start"
                and (scope.get("state") or {}).get("caller") is not None
            ):
                self.authenticated = True
            await send(message)

        await self._app(scope, receive, send_marking)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": f"the server already has {self.limits.max_unauthenticated} "
                "connections that have not authenticated; try again in "
                f"{self.limits.retry_after} s"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(self.limits.retry_after).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    # -- the timeouts

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_late)

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_stalled)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        log.warning(
            "HTTP: closing %s: no complete request headers within %g s",
            self._peer(),
            self.limits.header_timeout,
        )
        self._close_with(
            408,
            "Request Timeout",
            f"the request's headers did not arrive within {self.limits.header_timeout:g} s",
        )

    def _body_stalled(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:  # the server stopped reading, not the client sending
            self._arm_body_timer()
            return
        log.warning(
            "HTTP: closing %s: the request body stalled for %g s",
            self._peer(),
            self.limits.body_timeout,
        )
        started = self.cycle is not None and self.cycle.response_started
        self._close_with(
            408,
            "Request Timeout",
            f"no bytes of the request body arrived for {self.limits.body_timeout:g} s",
            send=not started,
        )

    def _close_with(
        self, status: int, reason: str, message: str, extra: str = "", *, send: bool = True
    ) -> None:
        """Answer (bypassing h11: the request may be half-read) and close the connection;
        a request task still reading its body sees the client gone."""
        self._cancel_timers()
        if self.cycle is not None:
            # The request's task sees the client gone: its reads end, its answer is dropped.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if send:
            self.transport.write(_raw_response(status, reason, message, extra))
        self.transport.close()

    def _peer(self) -> str:
        host, port = self.client or ("?", 0)
        return f"{host}:{port}"
