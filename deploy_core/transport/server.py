"""QUIC server end of the control channel.

aioquic servers cannot verify client certificates, so an agent proves who it is inside
the connection, on the first bidirectional stream it opens (the control stream)::

    agent -> HELLO     {"client_id", "protocol": 1}
    server -> CHALLENGE {"nonce": 64 hex chars}
    agent -> AUTH      one of
                       {"method": "signature", "signature"}
                       {"method": "join", "join_token", "public_key", "signature"}
                       {"method": "key", "mac": hex HMAC-SHA256(key, nonce + client_id)}
                         (+ "public_key", "signature": upgrade to a key pair)
                       plus "capabilities" (an object, at most 16 KiB of JSON)
    server -> WELCOME  {"client_id", "server_time", "heartbeat": "quic"} (+ "public_key"
                       when the server holds the agent's public key)
              or ERROR {"reason", "code"?} and the connection closes

``signature`` is the agent's Ed25519 signature of :func:`~.identity.auth_transcript` (the
nonce, the client id and the server certificate's digest), hex; ``public_key`` its raw
public key, hex. The agent makes its key pair itself; the server keeps public keys only.
``join`` enrolls that key with a join token, and is idempotent: the same key for an id
already enrolled with it is a plain sign-in (no join-token use is spent, whatever the
token's state now), so an agent whose WELCOME was lost gets in on its next try. ``key`` is
the older scheme (a shared key the server issued at enrollment), accepted for the agents
that still hold one; with an upgrade offer the server replaces the shared key by the
public key, and from then on also accepts the ``key`` message whose offer is that same
public key, in case the WELCOME of the upgrade was lost.

Anything else before WELCOME, a malformed or oversize frame at any time, or a handshake
slower than ``handshake_timeout`` gets an ERROR and a closed connection; other
connections are not affected.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import platform
import re
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, cast

from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.asyncio.server import QuicServer as _QuicEndpoint
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    PingAcknowledged,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509

from deploy_core.logs import bind

from .admission import (
    DEFAULT_BUSY_RETRY_AFTER,
    DEFAULT_MAX_HANDSHAKES,
    HandshakeGate,
    busy_close_packet,
    busy_reason,
)
from .certs import ServerCerts
from .envelope import (
    ALPN_PROTOCOL,
    CLIENT_ID_PATTERN,
    DEFAULT_MAX_MESSAGE_BYTES,
    HEARTBEAT_QUIC,
    PROTOCOL_VERSION,
    Envelope,
    FrameDecoder,
    Kind,
    ProtocolError,
    encode,
    error_for,
    pong_for,
)
from .file_workers import FileWorkerPool
from .files import (
    CAPABILITY_FILE_QUEUE,
    DEFAULT_MAX_TRANSFERS,
    ArtifactSource,
    FetchCheck,
    FileStreamServer,
    TransferGate,
)
from .identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    auth_transcript,
    certificate_digest,
    new_private_key,
    public_bytes,
    verify_signature,
)
from .quic_settings import (
    CONGESTION_CONTROL,
    LOOPBACK_DATAGRAM_SIZE,
    MAX_DATA,
    MAX_DATAGRAM_SIZE,
    MAX_STREAM_DATA,
    SOCKET_BUFFER_BYTES,
    acknowledge_with_answer,
    datagram_size_for,
    enlarge_socket_buffers,
    pace_acknowledgement,
    patient_probes,
    peer_closed,
)
from .stateless_reset import StatelessResets, reset_key_from
from .stats import TransportStats

__all__ = [
    "AUTH_FAILED",
    "CONGESTION_CONTROL",
    "LOOPBACK_DATAGRAM_SIZE",
    "MAX_CAPABILITIES_BYTES",
    "MAX_DATA",
    "MAX_DATAGRAM_SIZE",
    "MAX_STREAM_DATA",
    "SERVER_RECEIVE_BUFFER_BYTES",
    "SOCKET_BUFFER_BYTES",
    "AgentAuthority",
    "AgentCredential",
    "AgentSession",
    "AuthError",
    "QuicServer",
    "auth_refusal",
    "datagram_size_for",
    "enlarge_socket_buffers",
    "size_receive_buffer",
]

logger = logging.getLogger(__name__)

#: The server's receive buffer: every agent's datagrams land in it, and a restart storm of
#: thousands of agents overflows 4 MiB while the loop is busy with handshakes.
SERVER_RECEIVE_BUFFER_BYTES = 32 << 20

_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)
# How long to wait for the peer to acknowledge an ERROR before closing anyway.
_ERROR_FLUSH_WAIT = 1.0
_FLUSH_PING = 1
# How long a replacing connection waits for on_disconnect of the one it replaces.
_REPLACE_WAIT = 10.0
# How long close() lets callbacks finish before cancelling them.
_SHUTDOWN_WAIT = 5.0
#: Heartbeats a second the server asks its agents to keep to, together: each one costs the
#: server a datagram in and one out (~0.25 ms of CPU). Beyond this many agents per heartbeat
#: interval, the WELCOME asks each for a longer interval (:meth:`QuicServer.heartbeat_interval`).
DEFAULT_HEARTBEATS_PER_SECOND = 250.0
#: The longest heartbeat interval the server asks for, as a share of its QUIC idle timeout:
#: four heartbeats fit in the time after which it counts a silent agent gone.
_HEARTBEATS_PER_IDLE_TIMEOUT = 4
# Envelopes waiting for on_message; an agent that outruns the server this far is cut off.
_MAX_PENDING = 10_000
# QUIC puts the close reason in one packet; keep it well inside.
_MAX_REASON_CHARS = 300
# What an agent announces is stored with the client and shown by the API; a real agent's
# capabilities are well under 1 KiB.
MAX_CAPABILITIES_BYTES = 16 * 1024


def size_receive_buffer(transport: asyncio.BaseTransport, size: int) -> int:
    """Ask for a ``size``-byte receive buffer on a UDP transport's socket and return what the
    kernel granted (Linux reports twice the usable size; 0 when there is no socket).

    ``SO_RCVBUFFORCE`` goes past ``net.core.rmem_max`` for a process with CAP_NET_ADMIN;
    otherwise ``SO_RCVBUF`` is capped there (raise it with ``sysctl -w
    net.core.rmem_max=...`` for a larger buffer).
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    force = _so_rcvbufforce()
    try:
        if force is None:
            raise PermissionError("no SO_RCVBUFFORCE here")
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


#: Linux's SO_RCVBUFFORCE in its generic socket options, which these machines use.
_LINUX_SO_RCVBUFFORCE = 33
_GENERIC_SOCKET_OPTIONS = frozenset(
    {"x86_64", "amd64", "i386", "i686", "aarch64", "arm64", "armv7l", "armv6l", "riscv64", "s390x"}
)


def _so_rcvbufforce() -> int | None:
    """SO_RCVBUFFORCE, also where Python does not name it: 3.11 (Debian 12's) has no
    ``socket.SO_RCVBUFFORCE``, and its server got the 8 MiB ``rmem_max`` allows instead of
    the buffer it asked for, even as root; 2,000 agents then overflowed it in one rollout."""
    value = getattr(socket, "SO_RCVBUFFORCE", None)
    if value is None and sys.platform == "linux" and platform.machine() in _GENERIC_SOCKET_OPTIONS:
        return _LINUX_SO_RCVBUFFORCE
    return value


class AuthError(Exception):
    """An agent may not connect; ``str(e)`` is the reason sent to it in the ERROR, and
    ``code`` (when given) its ``payload.code``.  With ``retry_after`` the refusal is for now
    (the authority cannot check credentials: its database is unreachable): the ERROR's
    ``payload.retry_after`` asks the agent to wait that many seconds, as a busy server does."""

    def __init__(
        self, reason: str, code: str | None = None, *, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.retry_after = retry_after


@dataclass(frozen=True)
class AgentCredential:
    """What the server holds to check an enrolled agent's proof.

    :param public_key: the agent's raw Ed25519 public key; ``None`` for an agent enrolled
        before agents made their own keys (until it upgrades).
    :param shared_key: the older scheme's shared key, only for such an agent.
    :param revoked: why the agent may not connect, when an operator revoked it: told only to
        a peer that proves the key; anyone else gets the refusal an unknown client id gets.
    """

    public_key: bytes | None = None
    shared_key: bytes | None = None
    revoked: str | None = None


#: ``payload.code`` of the ERROR that refuses a key handshake, whatever the cause.
AUTH_FAILED = "auth_failed"


def auth_refusal(client_id: str) -> str:
    """The one refusal for an unknown client id, a wrong key or signature and (to anyone but
    the agent itself) a revoked client: the handshake tells a stranger nothing about which
    ids exist."""
    return (
        f"unknown client or wrong agent key for client {client_id}: either it is not enrolled "
        "on this server or the agent's key is not the enrolled one; have an operator run "
        f"'deployctl clients forget {client_id}', delete the agent's agent-identity.pem and "
        "agent.key, and enroll it again with a join token"
    )


class AgentAuthority(Protocol):
    """Where the server looks up agents' credentials and records enrollments."""

    async def credential(self, client_id: str) -> AgentCredential | None:
        """Return what the server holds for an enrolled agent.

        :param client_id: the agent's id, already checked against the client id pattern.
        :returns: its credential, or ``None`` when the agent is not enrolled.
        """
        ...

    async def enroll(self, client_id: str, join_token: str, public_key: bytes) -> None:
        """Enroll an agent's public key with a join token (the agent has proven it holds
        the private key).

        Idempotent: when ``client_id`` is enrolled with this same ``public_key`` it returns
        without spending a use of the token, whatever the token's state now.

        :raises AuthError: when the token is refused, the id is enrolled with another key,
            or the agent is revoked; the text is sent to the agent.
        """
        ...

    async def upgrade(self, client_id: str, public_key: bytes) -> None:
        """Replace the shared key of an agent that has just proven it by ``public_key``,
        which the agent has proven to hold; the shared key is forgotten."""
        ...


class AgentSession:
    """One authenticated agent connection, as seen by the server's callbacks."""

    def __init__(
        self,
        connection: _AgentConnection,
        client_id: str,
        capabilities: dict[str, Any],
        remote: tuple[str, int],
    ) -> None:
        self.client_id = client_id
        self.capabilities = capabilities
        self.remote = remote
        self.connected_at = time.time()
        #: time.time() of the last frame received from the agent.
        self.last_seen = self.connected_at
        self._connection = connection

    def send(self, env: Envelope) -> None:
        """Queue ``env`` on the control stream and transmit it; no-op once closed.

        :raises ProtocolError: when ``env`` is over the message size limit.
        """
        self._connection.send(env)

    def close(self, reason: str = "") -> None:
        """Close the connection; ``reason`` travels in the QUIC close frame."""
        self._connection.shutdown(reason or "closed by server")

    @property
    def closed(self) -> bool:
        """True once the connection is closing or gone."""
        return self._connection.shut

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<AgentSession {self.client_id} {self.remote[0]}:{self.remote[1]} {state}>"


async def _guarded(what: str, client_id: str, call: Awaitable[None]) -> None:
    """Await a user callback; its exceptions are logged, never passed on."""
    try:
        await call
    except Exception:
        logger.exception("%s callback failed for client %s", what, client_id)


class _AgentConnection(QuicConnectionProtocol):
    """One QUIC connection: the handshake, then envelopes to and from the callbacks."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        server: QuicServer,
    ) -> None:
        super().__init__(quic, stream_handler)
        self._server = server
        server.resets.issue(quic)
        self._decoder = FrameDecoder(max_bytes=server._max_message_bytes)
        self._inbox: asyncio.Queue[Envelope | None] = asyncio.Queue()
        self._control_stream: int | None = None
        self._pre_auth_frames = 0
        self._last_handshake_env: Envelope | None = None
        self._session: AgentSession | None = None
        # Serves the agent's file requests once it is authenticated (deploy-11).
        self._files: FileStreamServer | None = None
        self._flush_scheduled = False
        # Something was queued to send since the last flush: its packet carries the ACKs.
        self._answering = False
        self._linger: asyncio.Task[None] | None = None
        self._disconnected = asyncio.Event()
        self._flushed = asyncio.Event()
        self.shut = False
        #: Who ended the connection, once known (stats.DISCONNECT_REASONS).
        self.close_cause: str | None = None
        # The endpoint took a handshake slot for this connection; given back once.
        self._in_handshake = True
        self._handshake_began = time.monotonic()
        self.task = asyncio.create_task(self._serve())
        self.task.add_done_callback(self._served)
        server._connections.add(self)

    # -- receiving (synchronous, in aioquic's datagram callback)

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        # aioquic's transmits after each datagram; here once per loop turn (_flush), after
        # every datagram of this connection the endpoint read in this turn and the answers
        # they got at once, so that one packet carries the ACKs and the answers. A heartbeat
        # (a QUIC PING) is acknowledged in that packet (one datagram each way, no timer); a
        # message's ACK waits for the answer the server sends once it is stored.
        now = self._loop.time()
        pace_acknowledgement(self._quic, len(data), now, at_once=0.0)
        self._quic.receive_datagram(cast(bytes, data), addr, now=now)
        if self._session is not None:
            # Heard from: a heartbeat is a QUIC PING frame, which raises no event.
            self._session.last_seen = time.time()
        self._process_events()
        closed = peer_closed(self._quic)
        if closed is not None and not self.shut:
            self.quic_event_received(closed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def quic_event_received(self, event: QuicEvent) -> None:
        # The base class would copy stream data into StreamReaders; the frames are
        # decoded here instead so that size limits apply before anything is buffered.
        if isinstance(event, StreamDataReceived):
            self._stream_data(event)
        elif isinstance(event, StreamReset) and event.stream_id == self._control_stream:
            self.close_cause = self.close_cause or "agent"
            self.shutdown("agent reset the control stream")
        elif isinstance(event, StreamReset | StopSendingReceived) and self._files is not None:
            self._files.stream_reset(event.stream_id)
        elif isinstance(event, PingAcknowledged) and event.uid == _FLUSH_PING:
            self._flushed.set()
        elif isinstance(event, HandshakeCompleted):
            patient_probes(self._quic)
        elif isinstance(event, ConnectionTerminated):
            idle = event.reason_phrase == "Idle timeout"  # aioquic's words for its own timer
            self.close_cause = self.close_cause or ("idle_timeout" if idle else "agent")
            self._flushed.set()
            self._mark_shut()

    def _stream_data(self, event: StreamDataReceived) -> None:
        if self.shut:
            return
        client_bidi = event.stream_id % 4 == 0
        if self._control_stream is None and self._session is None and client_bidi:
            self._control_stream = event.stream_id
        if event.stream_id != self._control_stream:
            if self._session is None:
                self.refuse(
                    None,
                    f"data on stream {event.stream_id} before authentication; "
                    "use only the control stream until WELCOME",
                )
            elif self._files is not None:
                self._files.data_received(event.stream_id, event.data, event.end_stream)
            return
        try:
            envelopes = self._decoder.feed(event.data)
        except ProtocolError as exc:
            self.refuse(None, str(exc))
            return
        for env, size in zip(envelopes, self._decoder.sizes, strict=True):
            self._server.stats.received(env.kind.value, size)
            if self._session is None:
                self._pre_auth_frames += 1
                if self._pre_auth_frames > 2:
                    self.refuse(env, f"{env.kind.value} sent before WELCOME; wait for it")
                    return
            elif env.kind is Kind.PING:
                self.send(pong_for(env))
                continue
            elif self._inbox.qsize() >= _MAX_PENDING:
                self.refuse(
                    env, f"more than {_MAX_PENDING} messages waiting; slow down", why="flood"
                )
                return
            self._inbox.put_nowait(env)
        if event.end_stream:
            self.close_cause = self.close_cause or "agent"
            self.shutdown("agent closed the control stream")

    # -- sending

    def send(self, env: Envelope) -> None:
        """Queue ``env`` on the control stream; transmitted at the next loop turn."""
        if self.shut or self._control_stream is None:
            return
        frame = encode(env, max_bytes=self._server._max_message_bytes)
        self._quic.send_stream_data(self._control_stream, frame)
        self._server.stats.sent(env.kind.value, len(frame))
        self._answering = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._answering:
            self._answering = False
            acknowledge_with_answer(self._quic, self._loop.time())
        self.transmit()

    # -- closing

    def refuse(
        self,
        env: Envelope | None,
        reason: str,
        code: str | None = None,
        *,
        why: str = "protocol",
        retry_after: float | None = None,
    ) -> None:
        """Send ERROR(reason[, code][, retry_after]), stop reading, and close once the peer
        has had it.

        :param why: the refusal's kind in the server's counts (stats.REFUSAL_REASONS).
        :param retry_after: seconds the agent should wait (a refusal for now; the authority
            logs those, a few lines however many agents retry)."""
        if self.shut:
            return
        self._server.stats.refusals[why] += 1
        self.close_cause = self.close_cause or "server"
        who = self._session.client_id if self._session else self._peer()
        level = logging.DEBUG if retry_after is not None else logging.WARNING
        logger.log(level, "closing connection from %s: %s", who, reason)
        error = error_for(env, reason)
        if code is not None:
            error.payload["code"] = code
        if retry_after is not None:
            error.payload["retry_after"] = retry_after
        self.send(error)
        # Closing at once would discard the ERROR still in flight. A PING sent in the
        # same packet is acknowledged once the peer has the ERROR.
        self._quic.send_ping(_FLUSH_PING)
        self.transmit()
        self._mark_shut()
        self._linger = asyncio.create_task(self._close_after_flush(reason))

    async def _close_after_flush(self, reason: str) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flushed.wait(), _ERROR_FLUSH_WAIT)
        self.close(reason_phrase=reason[:_MAX_REASON_CHARS])

    def shutdown(self, reason: str) -> None:
        """Close the connection now (idempotent)."""
        self.close_cause = self.close_cause or "server"
        if self._linger is not None:
            self._linger.cancel()
        self._mark_shut()
        self.close(reason_phrase=reason[:_MAX_REASON_CHARS])

    def _end_handshake(self) -> None:
        """Give the handshake slot back (authenticated, refused or gone; idempotent)."""
        if self._in_handshake:
            self._in_handshake = False
            self._server._gate.leave(time.monotonic() - self._handshake_began)

    def _mark_shut(self) -> None:
        if self.shut:
            return
        self.shut = True
        self._end_handshake()
        if self._files is not None:
            self._files.close()
            self._server.stats.artifact_bytes_closed += self._files.bytes_sent
        self._inbox.put_nowait(None)  # wakes the serving task
        if self._session is not None:
            self._server._forget(self._session)

    async def wait_disconnected(self, timeout: float) -> bool:
        """Wait until this connection's on_disconnect (if any) has returned."""
        try:
            await asyncio.wait_for(self._disconnected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- the connection's life, one task per connection

    async def _serve(self) -> None:
        try:
            session = await self._authenticate()
            self._end_handshake()
            if session is None:
                return
            old = self._server._register(session)
            if old is not None:
                logger.info("client %s reconnected; closing its previous connection", old.client_id)
                old._connection.close_cause = old._connection.close_cause or "replaced"
                old.close("replaced by a newer connection from the same client")
                if not await old._connection.wait_disconnected(_REPLACE_WAIT):
                    logger.warning("on_disconnect for %s still running; connecting anyway", old)
            self._server.stats.connects += 1
            bind(client_id=session.client_id)  # on the log lines of this connection's task
            await _guarded("on_connect", session.client_id, self._server._on_connect(session))
            try:
                while (env := await self._inbox.get()) is not None and not self.shut:
                    bind(deploy_id=env.callback_id)
                    await _guarded(
                        "on_message", session.client_id, self._server._on_message(session, env)
                    )
            finally:
                self._server.stats.disconnects[self.close_cause or "agent"] += 1
                bind(deploy_id=None)
                await _guarded(
                    "on_disconnect", session.client_id, self._server._on_disconnect(session)
                )
        finally:
            self._disconnected.set()

    def _served(self, task: asyncio.Task[None]) -> None:
        self._end_handshake()
        self._server._connections.discard(self)
        if not task.cancelled() and task.exception() is not None:
            logger.error("connection task for %s failed", self._peer(), exc_info=task.exception())

    async def _authenticate(self) -> AgentSession | None:
        deadline = asyncio.timeout(self._server._handshake_timeout)
        try:
            async with deadline:
                return await self._handshake()
        except AuthError as exc:
            self.refuse(
                self._last_handshake_env,
                str(exc),
                exc.code,
                why="auth" if exc.retry_after is None else "unavailable",
                retry_after=exc.retry_after,
            )
        except TimeoutError:
            if not deadline.expired():
                raise
            self.refuse(
                None,
                f"handshake did not complete within {self._server._handshake_timeout:g} s",
                why="handshake_timeout",
            )
        except Exception:
            logger.exception("authenticating %s failed", self._peer())
            self.refuse(
                self._last_handshake_env,
                "internal error while authenticating; see the server log",
                why="internal",
            )
        return None

    async def _next_handshake_message(self) -> Envelope | None:
        env = await self._inbox.get()
        if env is None or self.shut:
            return None
        self._last_handshake_env = env
        return env

    async def _handshake(self) -> AgentSession | None:
        hello = await self._next_handshake_message()
        if hello is None:
            return None
        if hello.kind is not Kind.HELLO:
            raise AuthError(f"expected hello as the first message, got {hello.kind.value}")
        client_id = hello.payload.get("client_id")
        # fullmatch: with match, "$" would also accept a trailing newline ("web-1\n").
        if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
            raise AuthError(
                f"hello.payload.client_id must match {CLIENT_ID_PATTERN}, got {client_id!r:.80}"
            )
        protocol = hello.payload.get("protocol")
        if protocol != PROTOCOL_VERSION or isinstance(protocol, bool):
            raise AuthError(
                f"unsupported protocol {protocol!r:.20}; this server speaks {PROTOCOL_VERSION}"
            )
        nonce = secrets.token_bytes(32)
        self.send(Envelope(kind=Kind.CHALLENGE, ref=hello.id, payload={"nonce": nonce.hex()}))

        auth = await self._next_handshake_message()
        if auth is None:
            return None
        if auth.kind is not Kind.AUTH:
            raise AuthError(f"expected auth after challenge, got {auth.kind.value}")
        capabilities = auth.payload.get("capabilities", {})
        if not isinstance(capabilities, dict):
            raise AuthError("auth.payload.capabilities must be an object")
        size = len(json.dumps(capabilities))
        if size > MAX_CAPABILITIES_BYTES:
            raise AuthError(
                f"auth.payload.capabilities is {size} bytes of JSON; at most "
                f"{MAX_CAPABILITIES_BYTES} are accepted"
            )
        method = auth.payload.get("method")
        transcript = auth_transcript(client_id, nonce, self._server._certificate_digest)
        public_key: bytes | None
        if method == "signature":
            public_key = await self._check_signature(client_id, transcript, auth.payload)
        elif method == "key":
            public_key = await self._check_mac(client_id, nonce, transcript, auth.payload)
        elif method == "join":
            public_key = await self._enroll(client_id, transcript, auth.payload)
        else:
            raise AuthError(
                f"auth.payload.method must be 'signature', 'join' or 'key', got {method!r:.20}"
            )
        if self.shut:
            return None

        session = AgentSession(self, client_id, capabilities, self._peer_address())
        self._session = session
        self._files = FileStreamServer(
            self._quic,
            self.transmit,
            source=self._server._files,
            client_id=client_id,
            may_fetch=self._server._may_fetch,
            gate=self._server.transfers,
            queue_notices=capabilities.get(CAPABILITY_FILE_QUEUE) == 1,
            issue_ticket=self._server.file_workers.issue if self._server.file_workers else None,
        )
        welcome: dict[str, Any] = {
            "client_id": client_id,
            "server_time": time.time(),
            "heartbeat": HEARTBEAT_QUIC,
            # The least interval between heartbeats: a large fleet's keep the server's CPU
            # bounded (agents before this ignore it, and keep their own).
            "heartbeat_interval": self._server.heartbeat_interval(),
        }
        if self._server.file_workers is not None and self._server.file_workers.ports:
            # Where an agent may fetch artifacts with a ticket (older agents ignore it).
            welcome["file_workers"] = self._server.file_workers.ports
        if public_key is not None:
            welcome["public_key"] = public_key.hex()
        self.send(Envelope(kind=Kind.WELCOME, ref=auth.id, payload=welcome))
        return session

    # The shape of a proof is checked before anything is looked up, so that answer cannot
    # depend on the client id; an unknown id then costs the same work as a known one (a
    # throw-away key) and gets the same refusal as a wrong proof.

    async def _credential(self, client_id: str) -> AgentCredential | None:
        return await self._server._authority.credential(client_id)

    def _refused(self, client_id: str, why: str) -> AuthError:
        logger.info("handshake of client %s refused: %s", client_id, why)
        return AuthError(auth_refusal(client_id), AUTH_FAILED)

    async def _check_signature(
        self, client_id: str, transcript: bytes, payload: dict[str, Any]
    ) -> bytes:
        signature = _hex_field(payload, "signature", SIGNATURE_BYTES, required=True)
        assert signature is not None
        credential = await self._credential(client_id)
        known = credential.public_key if credential is not None else None
        valid = verify_signature(known or self._server._decoy_key, signature, transcript)
        if credential is None or known is None or not valid:
            raise self._refused(
                client_id,
                "not enrolled"
                if credential is None
                else "enrolled with a shared key, not a key pair"
                if known is None
                else "revoked, wrong signature"
                if credential.revoked
                else "wrong signature",
            )
        if credential.revoked is not None:
            raise AuthError(credential.revoked, "revoked")  # the agent itself may know why
        return known

    async def _check_mac(
        self, client_id: str, nonce: bytes, transcript: bytes, payload: dict[str, Any]
    ) -> bytes | None:
        try:
            given = bytes.fromhex(mac) if isinstance(mac := payload.get("mac"), str) else None
        except ValueError:
            given = None
        if given is None:
            raise AuthError("auth.payload.mac must be a hex string")
        offer = _key_offer(payload)
        credential = await self._credential(client_id)
        shared = credential.shared_key if credential is not None else None
        expected = hmac.new(
            shared if shared is not None else secrets.token_bytes(32),
            nonce + client_id.encode(),
            hashlib.sha256,
        ).digest()
        by_mac = hmac.compare_digest(expected, given) and shared is not None
        offered_valid = offer is not None and verify_signature(*offer, transcript)
        # The agent offered its key pair and the server took it, but the WELCOME that said
        # so was lost: the agent still holds its shared key and offers the same key again.
        by_upgraded_key = (
            not by_mac
            and offered_valid
            and offer is not None
            and credential is not None
            and credential.public_key is not None
            and hmac.compare_digest(offer[0], credential.public_key)
        )
        if credential is None or not (by_mac or by_upgraded_key):
            raise self._refused(
                client_id,
                "not enrolled"
                if credential is None
                else "revoked, wrong key"
                if credential.revoked
                else "wrong key",
            )
        if credential.revoked is not None:
            raise AuthError(credential.revoked, "revoked")
        if by_upgraded_key:
            return credential.public_key
        if offer is not None and offered_valid:
            await self._server._authority.upgrade(client_id, offer[0])
            logger.info("client %s upgraded from a shared key to its own key pair", client_id)
            return offer[0]
        if offer is not None:
            logger.warning(
                "client %s offered a key pair whose signature does not verify; it keeps "
                "its shared key",
                client_id,
            )
        return None

    async def _enroll(self, client_id: str, transcript: bytes, payload: dict[str, Any]) -> bytes:
        token = payload.get("join_token")
        if not isinstance(token, str) or not token:
            raise AuthError("auth.payload.join_token must be a non-empty string")
        offer = _key_offer(payload)
        if offer is None:
            raise AuthError(
                "auth.payload.public_key and auth.payload.signature are missing: this server "
                "enrolls an agent only with a key pair the agent makes itself (it never "
                "issues shared keys); upgrade the agent to a release that does"
            )
        public_key, signature = offer
        if not verify_signature(public_key, signature, transcript):
            raise AuthError(
                "auth.payload.signature is not public_key's signature of this connection's "
                "challenge; the agent must sign the nonce, its client id and the server "
                "certificate it sees (is something between the agent and the server?)"
            )
        await self._server._authority.enroll(client_id, token, public_key)
        logger.info("client %s signed in with a join token and its key pair", client_id)
        return public_key

    def _peer_address(self) -> tuple[str, int]:
        addr = self._quic.get_peer_address()
        return (str(addr[0]), int(addr[1])) if addr else ("", 0)

    def _peer(self) -> str:
        host, port = self._peer_address()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _hex_field(payload: dict[str, Any], name: str, size: int, *, required: bool) -> bytes | None:
    """``payload[name]`` as ``size`` bytes given in hex; ``None`` when absent and optional."""
    value = payload.get(name)
    if value is None and not required:
        return None
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise AuthError(f"auth.payload.{name} must be {2 * size} hex digits")
    return raw


def _key_offer(payload: dict[str, Any]) -> tuple[bytes, bytes] | None:
    """The ``(public_key, signature)`` an AUTH carries, or ``None`` when it carries none."""
    public_key = _hex_field(payload, "public_key", PUBLIC_KEY_BYTES, required=False)
    signature = _hex_field(payload, "signature", SIGNATURE_BYTES, required=public_key is not None)
    if public_key is None or signature is None:
        if signature is not None:
            raise AuthError("auth.payload.signature needs auth.payload.public_key")
        return None
    return public_key, signature


#: Datagrams handled per event-loop turn: the one asyncio read, then more read here until
#: the socket is empty, this many in all, or _READ_BUDGET seconds have gone. asyncio runs
#: every callback that is ready in each turn; when a rollout has thousands of them queued a
#: turn takes hundreds of milliseconds, and 64 datagrams a turn (as before) read fewer than
#: 2,000 agents' heartbeats alone: the socket then held seconds of datagrams, heartbeats went
#: unanswered and agents gave the server up.
_READ_BATCH = 4096
_READ_BUDGET = 0.05
# Larger than any QUIC datagram (they fit one path MTU).
_MAX_UDP_READ = 65535
# How long, and how many, connection ids refused as busy are remembered.
_REFUSED_CID_MEMORY = 5.0
_REFUSED_CID_LIMIT = 65536


class _ConnectionTable(dict[bytes, QuicConnectionProtocol]):
    """aioquic's endpoint's connection ids → connection, which also knows each connection's
    ids, so that forgetting a connection touches only its own entries.

    aioquic forgets a terminated connection by scanning every entry of every connection
    (about nine per connection): with 2,000 agents connected, ~2 ms per connection that
    ends, which took more than half of the server's CPU while agents came and went."""

    def __init__(self) -> None:
        super().__init__()
        self._ids: dict[QuicConnectionProtocol, set[bytes]] = {}

    def __setitem__(self, cid: bytes, protocol: QuicConnectionProtocol) -> None:
        old = self.get(cid)
        if old is not None and old is not protocol:
            self._ids.get(old, set()).discard(cid)
        super().__setitem__(cid, protocol)
        self._ids.setdefault(protocol, set()).add(cid)

    def __delitem__(self, cid: bytes) -> None:
        protocol = self[cid]
        super().__delitem__(cid)
        ids = self._ids.get(protocol)
        if ids is not None:
            ids.discard(cid)
            if not ids:
                del self._ids[protocol]

    def clear(self) -> None:
        super().clear()
        self._ids.clear()

    def forget(self, protocol: QuicConnectionProtocol) -> None:
        """Remove every entry of ``protocol``."""
        for cid in self._ids.pop(protocol, ()):
            if self.get(cid) is protocol:
                super().__delitem__(cid)


class _AdmittingEndpoint(_QuicEndpoint):
    """aioquic's server endpoint, refusing new connections while the handshake gate is full.

    The check runs on the Initial packet that would create a connection, before aioquic
    makes any connection state or does any TLS work; the refusal is one stateless packet
    (see :mod:`.admission`).

    asyncio's datagram transport reads one datagram each time the socket is readable, so a
    full receive buffer costs a select() and a loop turn per datagram while thousands of
    agents send Initials at once; with ``sock`` (the endpoint's own non-blocking socket)
    each datagram asyncio hands over is followed by what else the socket holds, read here
    (at most ``_READ_BATCH`` in all, for at most ``_READ_BUDGET`` seconds).
    """

    def __init__(
        self,
        *,
        gate: HandshakeGate,
        resets: StatelessResets | None = None,
        sock: socket.socket | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._protocols = _ConnectionTable()
        self._gate = gate
        self._resets = resets
        self._sock = sock
        self._last_busy_log = -1.0
        # Connection ids refused as busy lately (monotonic time of the refusal): a late or
        # retransmitted Initial of a refused attempt is refused again instead of opening a
        # connection the agent, already draining, never answers (it would hold a slot until
        # the handshake timeout).
        self._refused_cids: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        self._datagram(data, addr)
        sock = self._sock
        if sock is None:
            return
        until = time.monotonic() + _READ_BUDGET
        for n in range(1, _READ_BATCH):
            if self._transport is None or self._transport.is_closing():
                return
            if n % 64 == 0 and time.monotonic() > until:
                return
            try:
                data, addr = sock.recvfrom(_MAX_UDP_READ)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error_received(exc)
                return
            self._datagram(data, addr)

    def _datagram(self, data: bytes | str, addr: NetworkAddress) -> None:
        if not isinstance(data, bytes) or not data:
            return
        if not data[0] & 0x80:
            # A short-header packet: for a connection this process does not know (it
            # restarted, or forgot a closed one), a stateless reset tells the agent at once.
            cid_length = self._configuration.connection_id_length
            if data[1 : 1 + cid_length] not in self._protocols:
                reset = self._resets.reset_for(data, cid_length) if self._resets else None
                if reset is not None and self._transport is not None:
                    self._transport.sendto(reset, addr)
                return
        # Only a long-header packet (the first bit set) can be an Initial.
        elif len(data) >= SMALLEST_MAX_DATAGRAM_SIZE:
            try:
                header = pull_quic_header(
                    Buffer(data=data), host_cid_length=self._configuration.connection_id_length
                )
            except ValueError:
                return
            # The same test aioquic makes before it creates a connection.
            if (
                header.packet_type == QuicPacketType.INITIAL
                and header.version in self._configuration.supported_versions
                and header.destination_cid not in self._protocols
                and (self._refused_lately(header.destination_cid) or not self._gate.try_enter())
            ):
                self._refuse_busy(header.version, header.destination_cid, header.source_cid, addr)
                return
        super().datagram_received(data, addr)

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        table = self._protocols
        if isinstance(table, _ConnectionTable):
            table.forget(protocol)
        else:
            super()._connection_terminated(protocol)

    def _refused_lately(self, dcid: bytes) -> bool:
        now = time.monotonic()
        refused = self._refused_cids
        while refused and now - next(iter(refused.values())) > _REFUSED_CID_MEMORY:
            refused.popitem(last=False)
        return dcid in refused

    def _refuse_busy(
        self, version: int | None, dcid: bytes, scid: bytes, addr: NetworkAddress
    ) -> None:
        gate = self._gate
        retry_after = gate.retry_after()
        now = time.monotonic()
        if dcid not in self._refused_cids:
            self._refused_cids[dcid] = now
            if len(self._refused_cids) > _REFUSED_CID_LIMIT:
                self._refused_cids.popitem(last=False)
        if self._transport is not None and version is not None:
            self._transport.sendto(
                busy_close_packet(version, dcid, scid, busy_reason(gate.in_progress, retry_after)),
                addr,
            )
        if now - self._last_busy_log >= 10.0:
            self._last_busy_log = now
            logger.warning(
                "%d handshakes in progress (the limit); refusing new connections with a "
                "retry-after hint (now %.1f s; %d refused since the start; admitting about "
                "%.0f a second, %d told to come back)",
                gate.in_progress,
                retry_after,
                gate.refused,
                gate.pace(),
                gate.queued(),
            )


class QuicServer:
    """Accepts agent connections, authenticates them, and hands envelopes to callbacks.

    Callbacks receive only authenticated sessions. For one connection, ``on_connect``,
    every ``on_message`` and ``on_disconnect`` run one after another in arrival order;
    ``on_disconnect`` runs exactly once for each session whose ``on_connect`` ran,
    whether the agent left, went silent past ``idle_timeout``, was replaced by a newer
    connection with the same client id (its ``on_disconnect`` runs before the newer
    ``on_connect``), or the server closed.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        certs: ServerCerts,
        authority: AgentAuthority,
        on_connect: Callable[[AgentSession], Awaitable[None]],
        on_message: Callable[[AgentSession, Envelope], Awaitable[None]],
        on_disconnect: Callable[[AgentSession], Awaitable[None]],
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        idle_timeout: float = 30.0,
        handshake_timeout: float = 10.0,
        files: ArtifactSource | None = None,
        may_fetch: FetchCheck | None = None,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        busy_retry_after: float = DEFAULT_BUSY_RETRY_AFTER,
        max_file_transfers: int = DEFAULT_MAX_TRANSFERS,
        file_workers: int = 0,
        artifact_root: Path | None = None,
        stateless_reset_key: bytes | None = None,
        heartbeats_per_second: float = DEFAULT_HEARTBEATS_PER_SECOND,
        fleet_size: Callable[[], int] | None = None,
    ) -> None:
        """:param max_handshakes: connections in their handshake (QUIC/TLS up to WELCOME or
        refusal) at once; a new connection beyond them is refused before any TLS work with
        a retry-after hint (:mod:`.admission`).
        :param busy_retry_after: the base of that hint, in seconds.
        :param files: the artifacts authenticated agents may fetch on file streams; with
        ``None`` every file request is refused.
        :param may_fetch: ``async (client_id, sha256) -> bool``, asked before each transfer:
        whether that agent may fetch that artifact; ``None`` lets every agent fetch every
        artifact in ``files``.
        :param max_file_transfers: file transfers sent at once over all connections; more
        wait in line (:class:`~.files.TransferGate`); each file worker has a line of its own.
        :param file_workers: processes serving artifact file streams besides this one
        (:mod:`.file_workers`), each on a UDP port of its own; 0: none.
        :param artifact_root: the store directory the file workers read (needed with them).
        :param stateless_reset_key: 32 bytes or more that survive a restart, from which the
        connections' stateless reset tokens derive (:mod:`.stateless_reset`); ``None``
        derives it from the TLS private key in ``certs``, read at :meth:`start`.
        :param heartbeats_per_second: the heartbeats all agents together should send at
        most; agents connecting to a larger fleet are asked for a longer interval.
        :param fleet_size: how many agents to expect (e.g. those recorded as connected here
        before a restart); the larger of it and those connected sizes that interval."""
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
        if idle_timeout <= 0 or handshake_timeout <= 0:
            raise ValueError(
                f"idle_timeout and handshake_timeout must be positive, got "
                f"{idle_timeout} and {handshake_timeout}"
            )
        self._host = host
        self._certs = certs
        self._authority = authority
        self._on_connect = on_connect
        self._on_message = on_message
        self._on_disconnect = on_disconnect
        self._max_message_bytes = max_message_bytes
        self._idle_timeout = idle_timeout
        self._handshake_timeout = handshake_timeout
        self._files = files
        self._may_fetch = may_fetch
        if file_workers < 0:
            raise ValueError(f"file_workers must not be negative, got {file_workers}")
        if file_workers and artifact_root is None:
            raise ValueError("file workers need the artifact store's directory (artifact_root)")
        self._file_worker_count = file_workers
        self._artifact_root = artifact_root
        self._max_file_transfers = max_file_transfers
        #: The file workers once started (``None`` without them).
        self.file_workers: FileWorkerPool | None = None
        #: File transfers sending (``active``), waiting, and the bytes they hold.
        self.transfers = TransferGate(max_file_transfers)
        self._requested_port = port
        if heartbeats_per_second <= 0:
            raise ValueError(f"heartbeats_per_second must be positive, got {heartbeats_per_second}")
        self._heartbeats_per_second = heartbeats_per_second
        self._fleet_size = fleet_size
        self._stateless_reset_key = stateless_reset_key
        #: Stateless resets: the tokens of the connection ids issued, the resets sent.
        self.resets = StatelessResets(stateless_reset_key)
        self._sessions: dict[str, AgentSession] = {}
        #: Authenticated sessions by client id (a live, read-only view).
        self.sessions: Mapping[str, AgentSession] = MappingProxyType(self._sessions)
        #: Every live connection, authenticated or not.
        self._connections: set[_AgentConnection] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._endpoint: _QuicEndpoint | None = None
        #: What agents' signatures are bound to (see identity.auth_transcript).
        self._certificate_digest = b""
        # Checked against for unknown ids, so that they cost the same work as known ones.
        self._decoy_key = public_bytes(new_private_key())
        #: Handshakes in progress (``in_progress``), their ``peak`` and the ``refused``.
        self.handshakes = HandshakeGate(max_handshakes, busy_retry_after)
        self._gate = self.handshakes
        #: Connections, refusals, messages and bytes since the start, for metrics.
        self.stats = TransportStats()

    def _configuration(self) -> QuicConfiguration:
        configuration = QuicConfiguration(
            is_client=False,
            alpn_protocols=[ALPN_PROTOCOL],
            idle_timeout=self._idle_timeout,
            max_data=MAX_DATA,
            max_stream_data=MAX_STREAM_DATA,
            max_datagram_size=datagram_size_for(self._host),
            congestion_control_algorithm=CONGESTION_CONTROL,
        )
        configuration.load_cert_chain(self._certs.cert, self._certs.key)
        return configuration

    async def start(self) -> None:
        """Bind the UDP port and start accepting connections."""
        if self._endpoint is not None:
            raise RuntimeError("QuicServer.start() called twice")
        configuration = self._configuration()
        if self._stateless_reset_key is None:
            # The same key after a restart: agents recognise its resets of their old ids.
            self.resets = StatelessResets(reset_key_from(self._certs.key.read_bytes()))
        self._certificate_digest = certificate_digest(
            x509.load_pem_x509_certificates(self._certs.cert.read_bytes())[0]
        )
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self._host, self._requested_port, type=socket.SOCK_DGRAM)
        family, _, proto, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        try:
            sock.setblocking(False)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        # No session ticket handler: no resumption, so no 0-RTT data is ever accepted.
        transport, endpoint = await loop.create_datagram_endpoint(
            lambda: _AdmittingEndpoint(
                configuration=configuration,
                create_protocol=functools.partial(_AgentConnection, server=self),
                gate=self._gate,
                resets=self.resets,
                sock=sock,
            ),
            sock=sock,
        )
        enlarge_socket_buffers(transport, SOCKET_BUFFER_BYTES)
        granted = size_receive_buffer(transport, SERVER_RECEIVE_BUFFER_BYTES)
        self._transport = transport
        self._endpoint = endpoint
        if self._file_worker_count and self._artifact_root is not None:
            pool = FileWorkerPool(
                self._file_worker_count,
                host=self._host,
                cert=self._certs.cert,
                key=self._certs.key,
                store=self._artifact_root,
                max_transfers=self._max_file_transfers,
                idle_timeout=self._idle_timeout,
                # Next to the QUIC port, for firewalls; any free ones with port 0 (tests).
                ports=[self.port + 1 + i for i in range(self._file_worker_count)]
                if self._requested_port and self.port + self._file_worker_count < 65536
                else (),
            )
            try:
                await pool.start()
            except BaseException:
                endpoint.close()
                self._endpoint = self._transport = None
                raise
            self.file_workers = pool
        logger.info(
            "QUIC server listening on %s:%d (receive buffer %d KiB of %d asked; at most %d "
            "handshakes at once)",
            self._host,
            self.port,
            granted // 1024,
            SERVER_RECEIVE_BUFFER_BYTES // 1024,
            self._gate.limit,
        )

    @property
    def port(self) -> int:
        """The bound UDP port (useful when constructed with ``port=0``)."""
        if self._transport is None:
            raise RuntimeError("QuicServer is not started")
        return int(self._transport.get_extra_info("sockname")[1])

    def artifact_bytes_sent(self) -> int:
        """Artifact bytes sent on file streams since the start, live connections included."""
        live = sum(c._files.bytes_sent for c in self._connections if c._files and not c.shut)
        return self.stats.artifact_bytes_closed + live

    def heartbeat_interval(self) -> float:
        """The heartbeat interval (seconds) the WELCOME asks a connecting agent for at
        least: the fleet (the larger of those connected, in their handshake or told to
        come back by the handshake gate, and ``fleet_size()``) divided by
        ``heartbeats_per_second``, at most a quarter of the idle timeout; 0.0 while the
        fleet is small enough for any interval."""
        fleet = len(self._sessions) + self._gate.in_progress + self._gate.queued()
        if self._fleet_size is not None:
            with contextlib.suppress(Exception):  # a broken estimate must not stop a WELCOME
                fleet = max(fleet, int(self._fleet_size()))
        interval = fleet / self._heartbeats_per_second
        return round(min(interval, self._idle_timeout / _HEARTBEATS_PER_IDLE_TIMEOUT), 1)

    def session(self, client_id: str) -> AgentSession | None:
        """The connected session of ``client_id``, or ``None``."""
        return self._sessions.get(client_id)

    def _register(self, session: AgentSession) -> AgentSession | None:
        """Make ``session`` the current one for its client id; return the one it replaces."""
        old = self._sessions.get(session.client_id)
        self._sessions[session.client_id] = session
        return old

    def _forget(self, session: AgentSession) -> None:
        """Drop ``session`` from :attr:`sessions` unless a newer one took its place."""
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    async def close(self) -> None:
        """Close every connection and the endpoint; wait for on_disconnect callbacks."""
        if self._endpoint is None:
            return
        connections = list(self._connections)
        for connection in connections:
            connection.shutdown("server shutting down")
        self._endpoint.close()
        self._endpoint = None
        self._transport = None
        if self.file_workers is not None:
            await self.file_workers.close()
        tasks = [connection.task for connection in connections]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=_SHUTDOWN_WAIT)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
