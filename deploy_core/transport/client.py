"""Agent end of the control channel: connect, authenticate, stay connected.

:class:`AgentConnector` keeps one QUIC connection to the server, pinned to the server's
own CA. It authenticates by signing the server's challenge with its own Ed25519 key, which
it makes (and stores) before it first enrolls with a join token; an agent still holding a
shared key from before key pairs proves that key and offers its new key pair, which the
server takes instead. It sends heartbeats, and reconnects with full-jitter exponential
back-off whenever the connection is lost or refused. A server at its handshake limit
refuses a new connection with a retry-after hint (:mod:`.admission`); the agent then waits
at least that long, plus a jittered share of its back-off, so a restart storm spreads out.
A server that cannot check credentials for now (its database is unreachable) refuses the
handshake with a ``retry_after`` in its ERROR, honoured the same way.

An agent may know several servers (replicas on one database), and a server's name may resolve
to several addresses: each failed attempt moves on to the next address, then the next server,
starting at a place the client id picks so that agents spread over the replicas; only a full
round of failures grows the back-off, and a busy server is not tried again before its hint.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import math
import random
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    PingAcknowledged,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicErrorCode
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .admission import MAX_RETRY_AFTER, parse_busy_reason
from .certs import write_private_file
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
)
from .files import CAPABILITY_FILE_QUEUE, FileStreamClient
from .identity import auth_transcript, certificate_digest, new_private_key, public_bytes
from .quic_settings import (
    ANSWERLESS_ACK_DELAY,
    CONGESTION_CONTROL,
    MAX_DATA,
    MAX_STREAM_DATA,
    SOCKET_BUFFER_BYTES,
    ack_due,
    acknowledge_with_answer,
    datagram_size_for,
    defer_acknowledgement,
    enlarge_socket_buffers,
    pace_acknowledgement,
    patient_probes,
    peer_closed,
)
from .stateless_reset import drain_after_reset, is_stateless_reset

__all__ = [
    "AgentConnector",
    "CredentialStore",
    "FileCredentials",
    "FileWorkerLink",
    "HandshakeRefused",
    "ServerBusy",
    "ServerUnavailable",
]

logger = logging.getLogger(__name__)

# A connection that lasted this long resets the back-off even if it never authenticated.
_STABLE_AFTER = 10.0
# How long a closing connection waits for the peer before the socket is released.
_CLOSE_LINGER = 0.5
# Heartbeats missed in a row before the connection counts as lost.
_MISSED_HEARTBEATS = 3
# The longest heartbeat interval a server may ask for, as a share of the QUIC idle timeout
# (the connection must not go idle between two heartbeats).
_HEARTBEATS_PER_IDLE_TIMEOUT = 4


def heartbeat_interval(asked: object, own: float, idle_timeout: float) -> float:
    """The heartbeat interval to keep on a connection whose server's WELCOME asked for
    ``asked`` seconds at least: the longer of that and ``own``, but never longer than a
    quarter of ``idle_timeout`` for the server's sake; ``own`` when ``asked`` is not a finite
    positive number (a server before this, or a malformed WELCOME)."""
    if not isinstance(asked, int | float) or isinstance(asked, bool):
        return own
    if not math.isfinite(asked) or asked <= own:
        return own
    return max(own, min(float(asked), idle_timeout / _HEARTBEATS_PER_IDLE_TIMEOUT))


#: aioquic's own acknowledgement delay (its timer granularity), kept for bytes in bulk.
_AIOQUIC_ACK_DELAY = 0.001  # its K_GRANULARITY
# QUIC puts the close reason in one packet; keep it well inside.
_MAX_REASON_CHARS = 300


class CredentialStore(Protocol):
    """Where an agent keeps its keys and finds its join token."""

    def load_identity(self) -> Ed25519PrivateKey | None:
        """Return the agent's own key pair, or ``None`` before it made one."""
        ...

    def create_identity(self) -> Ed25519PrivateKey:
        """Make the agent's key pair and store it durably before returning it (it is sent
        to the server right after, and the same key must be sent on every retry)."""
        ...

    def load_key(self) -> bytes | None:
        """Return the older scheme's shared key, or ``None`` when the agent holds none."""
        ...

    def save_key(self, key: bytes) -> None:
        """Store a shared key that an older server issued at enrollment."""
        ...

    def drop_key(self) -> None:
        """Forget the shared key: the server now knows the agent by its key pair."""
        ...

    def join_token(self) -> str | None:
        """Return the join token to enroll with, or ``None`` when there is none."""
        ...


class FileCredentials:
    """Credentials on disk, all in ``state_dir`` with mode 0600: ``agent-identity.pem`` (the
    agent's Ed25519 private key, PKCS#8 PEM), ``agent.key`` (hex; only on an agent enrolled
    before agents made their own keys, removed once the server has its public key), and a
    join token file.

    The files are read on every call, so an operator can add a token without a restart.
    """

    def __init__(self, state_dir: Path, join_token_file: Path | None = None) -> None:
        self.identity_file = state_dir / "agent-identity.pem"
        self.key_file = state_dir / "agent.key"
        self.join_token_file = join_token_file

    def load_identity(self) -> Ed25519PrivateKey | None:
        """Return the stored key pair, ``None`` when there is no identity file.

        :raises ValueError: when the file does not hold an Ed25519 private key.
        """
        try:
            data = self.identity_file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            key = None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(
                f"{self.identity_file} does not hold an Ed25519 private key (PKCS#8 PEM); "
                "restore it from a backup, or delete it and have an operator run 'deployctl "
                "clients forget' so that the agent enrolls again with a join token"
            )
        return key

    def create_identity(self) -> Ed25519PrivateKey:
        """Make a key pair and write it atomically with mode 0600."""
        key = new_private_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.identity_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_file(self.identity_file, pem)
        return key

    def load_key(self) -> bytes | None:
        """Return the stored shared key, ``None`` when there is no key file.

        :raises ValueError: when the key file does not hold a hex key.
        """
        try:
            text = self.key_file.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return None
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if not key:
            raise ValueError(
                f"{self.key_file} does not hold a hex agent key; delete it and give the "
                "agent a join token to enroll again"
            )
        return key

    def save_key(self, key: bytes) -> None:
        """Write the key atomically with mode 0600."""
        self.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_file(self.key_file, key.hex().encode("ascii") + b"\n")

    def drop_key(self) -> None:
        """Delete the shared key file."""
        self.key_file.unlink(missing_ok=True)

    def join_token(self) -> str | None:
        """Return the stripped contents of the join token file, ``None`` if absent or empty."""
        if self.join_token_file is None:
            return None
        try:
            token = self.join_token_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return token or None


class HandshakeRefused(Exception):
    """The server answered the handshake with ERROR; ``str(e)`` is its reason."""


class ServerBusy(Exception):
    """The server refused the connection at its handshake limit; ``retry_after`` is the
    seconds it asked the agent to wait, ``str(e)`` its reason."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class ServerUnavailable(ServerBusy):
    """The server refused the handshake for now (it cannot check credentials: its database
    is unreachable) and asked the agent to wait ``retry_after`` seconds."""


class _MissingCredentials(Exception):
    """Neither a key nor a join token: no point in connecting."""


class _ServerConnection(QuicConnectionProtocol):
    """The agent's side of one QUIC connection: frames in, frames out, loss detection."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        max_bytes: int,
    ) -> None:
        super().__init__(quic, stream_handler)
        self._decoder = FrameDecoder(max_bytes=max_bytes)
        self._max_bytes = max_bytes
        self._flush_scheduled = False
        # What the datagram being read held needs an answer or a prompt acknowledgement
        # (anything but whole ACKs of this agent's events); the ACKs it held.
        self._answered = True
        self._acks_read = 0
        self.control_stream: int | None = None
        self.inbox: asyncio.Queue[Envelope | None] = asyncio.Queue()
        self.last_frame_at = asyncio.get_running_loop().time()
        #: The server's WELCOME said it takes QUIC PING frames as heartbeats (no PING
        #: envelope, no PONG): the acknowledgement of each is the proof of life.
        self.quic_heartbeats = False
        #: Seconds between heartbeats on this connection (the server may ask for longer).
        self.heartbeat_interval: float | None = None
        self._ping_uid = 0
        #: Why the connection is gone; ``None`` while it is usable.
        self.lost_reason: str | None = None
        #: Seconds a busy server asked to wait before trying again (its refusal's hint).
        self.retry_after: float | None = None
        self._handshake_over = asyncio.Event()
        #: Artifact requests on their own streams (deploy-11); used once authenticated.
        self.files = FileStreamClient(quic, self.transmit)
        #: The server's file workers' UDP ports, from its WELCOME.
        self.file_worker_ports: list[int] = []

    async def wait_handshake(self) -> None:
        """Wait for the QUIC/TLS handshake; raise ConnectionError with the reason if it fails."""
        # Not the base class's wait_connected(): its future is left with an unretrieved
        # exception when the wait is cancelled by a timeout.
        await self._handshake_over.wait()
        if self.lost_reason is not None and self.retry_after is not None:
            raise ServerBusy(self.lost_reason, self.retry_after)
        if self.lost_reason is not None:
            raise ConnectionError(self.lost_reason)

    def open_control_stream(self) -> None:
        self.control_stream = self._quic.get_next_available_stream_id()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        # The base class transmits after every datagram. Once connected, an agent mostly
        # receives (artifact bytes) and owes the server ACKs, which aioquic delays by 1 ms
        # anyway: transmitting only when the timer must move spares it about a third of its
        # CPU per received byte. What it sends itself is transmitted as it is queued. A
        # message's ACK waits for the answer (pace_acknowledgement).
        if not self._handshake_over.is_set():
            super().datagram_received(data, addr)
            return
        now = self._loop.time()
        if is_stateless_reset(self._quic, cast(bytes, data)):
            # The server restarted and lost this connection: reconnect now rather than
            # after three missed heartbeats.
            drain_after_reset(self._quic, now)
        else:
            owed = ack_due(self._quic)
            pace_acknowledgement(self._quic, len(data), now, at_once=_AIOQUIC_ACK_DELAY)
            self._answered, self._acks_read = False, 0
            self._quic.receive_datagram(cast(bytes, data), addr, now=now)
            self._process_events()
            if owed is None and self._acks_read and not self._answered:
                # Only whole ACKs of this agent's events: no answer will carry the
                # acknowledgement; the agent's next event or heartbeat will.
                defer_acknowledgement(self._quic, now + ANSWERLESS_ACK_DELAY)
        closed = peer_closed(self._quic)
        if closed is not None and self.lost_reason is None:
            self.quic_event_received(closed)
        if self._quic.get_timer() != self._timer_at:
            self.transmit()

    def send(self, env: Envelope) -> None:
        if self.lost_reason is not None or self.control_stream is None:
            return
        self._quic.send_stream_data(self.control_stream, encode(env, max_bytes=self._max_bytes))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        acknowledge_with_answer(self._quic, self._loop.time())
        self.transmit()

    def heartbeat(self) -> None:
        """Send one heartbeat: a QUIC PING frame when the server takes those (its ACK, a
        packet of a few bytes that the server answers without decoding any message, is
        the answer), else a PING envelope that the server answers with a PONG."""
        if self.lost_reason is not None:
            return
        if not self.quic_heartbeats:
            self.send(Envelope(kind=Kind.PING))
            return
        self._ping_uid += 1
        self._quic.send_ping(self._ping_uid)
        acknowledge_with_answer(self._quic, self._loop.time())
        self.transmit()

    def lose(self, reason: str) -> None:
        """Give up on the connection: wake the reader and close."""
        self._mark_lost(reason)
        self.close(reason_phrase=reason[:_MAX_REASON_CHARS])

    def _mark_lost(self, reason: str) -> None:
        if self.lost_reason is None:
            self.lost_reason = reason
            self.inbox.put_nowait(None)
            self.files.connection_lost(reason)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived) and event.stream_id == self.control_stream:
            self._control_data(event)
            return
        if not isinstance(event, PingAcknowledged):
            self._answered = True  # file data, a reset, a handshake event: acknowledged soon
        if isinstance(event, StreamDataReceived):
            self.files.data_received(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, StreamReset) and event.stream_id == self.control_stream:
            self.lose("server reset the control stream")
        elif isinstance(event, StreamReset):
            self.files.stream_reset(event.stream_id, event.error_code)
        elif isinstance(event, PingAcknowledged):
            self.last_frame_at = asyncio.get_running_loop().time()
        elif isinstance(event, HandshakeCompleted):
            patient_probes(self._quic)
            self._handshake_over.set()
        elif isinstance(event, ConnectionTerminated):
            reason = event.reason_phrase or f"QUIC error code {event.error_code:#x}"
            if event.error_code == QuicErrorCode.CONNECTION_REFUSED:
                self.retry_after = parse_busy_reason(event.reason_phrase)
            self._mark_lost(f"connection closed: {reason}")
            self._handshake_over.set()

    def _control_data(self, event: StreamDataReceived) -> None:
        if self.lost_reason is not None:
            return
        try:
            envelopes = self._decoder.feed(event.data)
        except ProtocolError as exc:
            self.lose(f"server sent a bad frame: {exc}")
            return
        self.last_frame_at = asyncio.get_running_loop().time()
        if self._decoder.pending:
            self._answered = True  # part of a message: its sender's window must move
        for env in envelopes:
            if env.kind is Kind.ACK:
                self._acks_read += 1
            else:
                self._answered = True  # answered, or worth acknowledging soon
            if env.kind is Kind.PING:
                self.send(Envelope(kind=Kind.PONG, ref=env.id))
            elif env.kind is not Kind.PONG:
                self.inbox.put_nowait(env)
        if event.end_stream:
            self.lose("server closed the control stream")


class _WorkerConnection(_ServerConnection):
    """A connection to a file worker: file streams only, on a connected UDP socket so that
    a worker that is gone (ICMP port unreachable) fails it at once."""

    def error_received(self, exc: Exception) -> None:
        self._mark_lost(f"file worker unreachable: {exc}")
        self._handshake_over.set()

    def _mark_lost(self, reason: str) -> None:
        super()._mark_lost(reason)
        self._handshake_over.set()


class FileWorkerLink:
    """An open connection to one of the server's file workers (:mod:`.file_workers`)."""

    def __init__(
        self, address: tuple[str, int], transport: asyncio.DatagramTransport, connection: Any
    ) -> None:
        self.address = address
        self._transport = transport
        self._connection: _WorkerConnection = connection

    @property
    def files(self) -> FileStreamClient:
        """File streams on this connection (each request with its ticket)."""
        return self._connection.files

    @property
    def lost_reason(self) -> str | None:
        """Why the connection is gone; ``None`` while it is usable."""
        return self._connection.lost_reason

    async def close(self) -> None:
        """Close the connection and release its socket."""
        self._connection._mark_lost("closed by the agent")
        await _close_quietly(self._transport, self._connection)


def _server_certificate(connection: _ServerConnection) -> bytes:
    """The digest of the certificate the server presented on ``connection``."""
    # aioquic keeps the verified peer certificate on its TLS context but offers no public
    # accessor for it (checked with aioquic 1.2 to 1.7).
    certificate = getattr(connection._quic.tls, "_peer_certificate", None)
    if not isinstance(certificate, x509.Certificate):
        raise ProtocolError(
            "cannot read the server's certificate from aioquic to bind the signature to it; "
            "this aioquic release is not supported"
        )
    return certificate_digest(certificate)


async def _close_quietly(transport: asyncio.BaseTransport, connection: _ServerConnection) -> None:
    """Send CONNECTION_CLOSE, linger briefly for the peer, then release the socket."""
    try:
        connection.close()
        await asyncio.wait_for(connection.wait_closed(), _CLOSE_LINGER)
    except TimeoutError:
        pass
    finally:
        transport.close()


async def _guarded(what: str, call: Awaitable[None]) -> None:
    """Await a user callback; its exceptions are logged, never passed on."""
    try:
        await call
    except Exception:
        logger.exception("%s callback failed", what)


class AgentConnector:
    """Keeps an agent connected to the server until :meth:`stop`.

    ``on_message`` receives every envelope after the handshake except PONG, in order;
    PINGs from the server are answered here. Use :meth:`send` to transmit; it returns
    ``False`` while disconnected, so the caller keeps the message for later.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ca_file: Path,
        client_id: str,
        credentials: CredentialStore,
        capabilities: Callable[[], dict[str, Any]],
        on_message: Callable[[Envelope], Awaitable[None]],
        on_connected: Callable[[], Awaitable[None]] | None = None,
        on_disconnected: Callable[[], Awaitable[None]] | None = None,
        heartbeat_interval: float = 5.0,
        idle_timeout: float = 30.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        server_name: str = "localhost",
        servers: Sequence[tuple[str, int]] = (),
    ) -> None:
        if not re.fullmatch(CLIENT_ID_PATTERN, client_id):
            raise ValueError(f"client_id must match {CLIENT_ID_PATTERN}, got {client_id!r}")
        for name, value in [
            ("heartbeat_interval", heartbeat_interval),
            ("idle_timeout", idle_timeout),
            ("backoff_initial", backoff_initial),
            ("connect_timeout", connect_timeout),
        ]:
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if backoff_max < backoff_initial:
            raise ValueError(
                f"backoff_max ({backoff_max}) must not be below backoff_initial ({backoff_initial})"
            )
        # Every server to try, host:port first, each once; the agent starts at an index
        # its id picks (stable, so a restarted fleet spreads the same way over replicas).
        listed = list(dict.fromkeys([(host, port), *servers]))
        start = int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:4], "big")
        start %= len(listed)
        self._servers = listed[start:] + listed[:start]
        self._host, self._port = self._servers[0]
        # Which of the current server's addresses the next attempt uses, and how many its
        # name resolved to on the last attempt.
        self._address_turn = 0
        self._address_count = 1
        #: The address (IP, port) of the current connection; ``None`` while disconnected.
        self.address: tuple[str, int] | None = None
        self._ca_file = ca_file
        self._client_id = client_id
        self._credentials = credentials
        self._capabilities = capabilities
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._heartbeat_interval = heartbeat_interval
        self._idle_timeout = idle_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._max_message_bytes = max_message_bytes
        self._server_name = server_name
        #: Why the last attempt or connection ended (the server's reason when refused).
        self.last_error: str | None = None
        #: Busy refusals' hints, in seconds, one per refusal (the last 100).
        self.busy_hints: collections.deque[float] = collections.deque(maxlen=100)
        #: Seconds waited before each of the last 100 reconnection attempts.
        self.backoff_waits: collections.deque[float] = collections.deque(maxlen=100)
        self._connection: _ServerConnection | None = None
        self._authenticated = False
        self._connected = asyncio.Event()
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._attempt: asyncio.Task[None] | None = None
        self._running = False
        self._finished = asyncio.Event()

    # -- public API

    @property
    def servers(self) -> list[tuple[str, int]]:
        """The servers this connector tries, in the order it tries them."""
        return list(self._servers)

    @property
    def server(self) -> str | None:
        """``HOST:PORT`` of the server connected to (with the address it resolved to when
        the name has several); ``None`` while disconnected."""
        if not self.connected or self.address is None:
            return None
        return self._describe()

    def _describe(self) -> str:
        where = f"{self._host}:{self._port}"
        if self._address_count > 1 and self.address is not None:
            where += f" ({self.address[0]})"
        return where

    @property
    def connected(self) -> bool:
        """True between a successful handshake and the loss of that connection."""
        connection = self._connection
        return connection is not None and connection.lost_reason is None

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; return whether there is one."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self.connected

    @property
    def files(self) -> FileStreamClient | None:
        """File streams of the current authenticated connection; ``None`` while there is
        none (see :class:`~deploy_core.agent.artifacts.ArtifactFetcher`)."""
        connection = self._connection
        if connection is None or connection.lost_reason is not None:
            return None
        return connection.files

    @property
    def file_workers(self) -> list[tuple[str, int]]:
        """The current server's file workers (its WELCOME listed them): the address this
        connection reached and each worker's port; empty while disconnected or without."""
        connection = self._connection
        if connection is None or connection.lost_reason is not None or self.address is None:
            return []
        return [(self.address[0], port) for port in connection.file_worker_ports]

    async def open_file_worker(
        self, address: tuple[str, int], *, timeout: float | None = None
    ) -> FileWorkerLink:
        """Open a connection to a file worker (the server's certificate and CA, as the
        control connection).

        :raises ConnectionError: it did not answer within ``timeout`` (default: the
            connect timeout) or refused.
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
        _, _, _, _, remote = infos[0]
        quic = QuicConnection(configuration=self._configuration())
        transport, connection = await loop.create_datagram_endpoint(
            lambda: _WorkerConnection(quic, max_bytes=self._max_message_bytes),
            remote_addr=cast(tuple[str, int], remote),
        )
        enlarge_socket_buffers(transport, SOCKET_BUFFER_BYTES)
        link = FileWorkerLink(address, transport, connection)
        try:
            connection.connect(remote)
            async with asyncio.timeout(timeout or self._connect_timeout):
                await connection.wait_handshake()
        except BaseException as exc:
            await link.close()
            if isinstance(exc, TimeoutError):
                raise ConnectionError(
                    f"file worker {address[0]}:{address[1]} did not answer"
                ) from None
            if isinstance(exc, ServerBusy):
                raise ConnectionError(f"file worker {address[0]}:{address[1]}: {exc}") from None
            raise
        return link

    def send(self, env: Envelope) -> bool:
        """Send ``env`` now; ``False`` when not connected (nothing was sent).

        :raises ProtocolError: when ``env`` is over the message size limit.
        """
        connection = self._connection
        if connection is None or connection.lost_reason is not None:
            return False
        connection.send(env)
        return True

    async def stop(self) -> None:
        """Close the connection, stop reconnecting, and wait for :meth:`run` to return."""
        self._stopping = True
        self._stop_requested.set()
        attempt = self._attempt
        if attempt is not None:
            attempt.cancel()
            if attempt is asyncio.current_task():
                return  # called from one of our own callbacks; run() ends after it
        if self._running:
            await self._finished.wait()

    async def run(self) -> None:
        """Stay connected until :meth:`stop`, reconnecting with back-off.

        A stopped connector stays stopped; make a new one to connect again.
        """
        if self._running:
            raise RuntimeError("AgentConnector.run() is already running")
        self._running = True
        self._finished.clear()
        loop = asyncio.get_running_loop()
        failures = 0
        # Where the next attempt goes: (index in self._servers, address turn).
        position = cycle_start = (0, 0)
        not_before: dict[int, float] = {}  # busy servers' hints, by index
        try:
            while not self._stopping:
                self._host, self._port = self._servers[position[0]]
                self._address_turn = position[1]
                started = loop.time()
                busy_for = 0.0
                self._authenticated = False
                self._attempt = asyncio.create_task(self._connect_once())
                try:
                    await self._attempt
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if not self._stopping or (current is not None and current.cancelling()):
                        raise
                except ServerBusy as exc:
                    self.last_error = str(exc)
                    busy_for = exc.retry_after
                    not_before[position[0]] = loop.time() + busy_for
                    self.busy_hints.append(busy_for)
                    logger.log(
                        logging.WARNING if isinstance(exc, ServerUnavailable) else logging.INFO,
                        "server %s:%d refused %s for now; it waits at least the %.1f s asked: %s"
                        if isinstance(exc, ServerUnavailable)
                        else "server %s:%d is busy; %s waits at least the %.1f s asked: %s",
                        self._host,
                        self._port,
                        self._client_id,
                        busy_for,
                        self.last_error,
                    )
                except HandshakeRefused as exc:
                    self.last_error = str(exc)
                    logger.warning(
                        "server %s:%d refused %s: %s", self._host, self._port, self._client_id, exc
                    )
                except _MissingCredentials as exc:
                    self.last_error = str(exc)
                    logger.warning("%s cannot authenticate: %s", self._client_id, exc)
                except Exception as exc:
                    self.last_error = str(exc) or type(exc).__name__
                    what = "lost" if self._authenticated else "failed"
                    logger.info(
                        "connection to %s:%d %s: %s", self._host, self._port, what, self.last_error
                    )
                if self._stopping:
                    break
                position = self._next_position(position)
                if self._authenticated or loop.time() - started > _STABLE_AFTER:
                    failures = 0
                    cycle_start = position
                if position == cycle_start:
                    # A full round of the servers failed (with one server: every failure).
                    ceiling = min(self._backoff_max, self._backoff_initial * 2 ** min(failures, 32))
                    failures += 1
                else:  # the next server in the round: only a little jitter
                    ceiling = self._backoff_initial
                # A busy server's hint is a floor; the jitter on top spreads the refused.
                if len(self._servers) == 1:
                    floor = busy_for
                else:
                    floor = max(0.0, not_before.pop(position[0], 0.0) - loop.time())
                if busy_for:
                    # The hint is a turn the server booked for this agent in its queue:
                    # jitter of a quarter of it at most spreads the refused without
                    # leaving that turn unused for seconds (the doubling back-off is for
                    # a server that does not answer).
                    ceiling = min(ceiling, max(self._backoff_initial, busy_for / 4))
                delay = floor + random.uniform(0, ceiling)
                self.backoff_waits.append(delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), delay)
        finally:
            if self._attempt is not None and not self._attempt.done():
                self._attempt.cancel()
                await asyncio.gather(self._attempt, return_exceptions=True)
            self._attempt = None
            self._running = False
            self._finished.set()

    def _next_position(self, position: tuple[int, int]) -> tuple[int, int]:
        """Where the attempt after one at ``position`` goes: the current server's next
        address, else the next server's first."""
        index, turn = position
        if turn + 1 < self._address_count:
            return index, turn + 1
        self._address_count = 1
        return (index + 1) % len(self._servers), 0

    # -- one connection

    def _configuration(self) -> QuicConfiguration:
        # Only the given CA is trusted: with cafile set, aioquic loads no other roots.
        return QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN_PROTOCOL],
            cafile=str(self._ca_file),
            verify_mode=ssl.CERT_REQUIRED,
            server_name=self._server_name,
            idle_timeout=self._idle_timeout,
            max_data=MAX_DATA,
            max_stream_data=MAX_STREAM_DATA,
            max_datagram_size=datagram_size_for(self._host),
            congestion_control_algorithm=CONGESTION_CONTROL,
        )

    async def _open(self, stack: contextlib.AsyncExitStack) -> _ServerConnection:
        """Open a UDP socket and complete the QUIC/TLS handshake; ``stack`` closes both."""
        loop = asyncio.get_running_loop()
        self._address_count = 1
        self.address = None
        infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_DGRAM)
        # A name with several addresses: each attempt takes the next (in the resolver's order).
        infos = list({info[4][:2]: info for info in infos}.values())
        self._address_count = len(infos)
        family, _, _, _, address = infos[self._address_turn % len(infos)]
        quic = QuicConnection(configuration=self._configuration())
        transport, connection = await loop.create_datagram_endpoint(
            lambda: _ServerConnection(quic, max_bytes=self._max_message_bytes),
            family=family,
            local_addr=("::" if family == socket.AF_INET6 else "0.0.0.0", 0),
        )
        stack.push_async_callback(_close_quietly, transport, connection)
        enlarge_socket_buffers(transport, SOCKET_BUFFER_BYTES)
        connection.connect(address)
        await connection.wait_handshake()
        self.address = (str(address[0]), int(address[1]))
        return connection

    async def _connect_once(self) -> None:
        """Connect, authenticate, and serve until the connection is lost (raises why)."""
        if not self._ca_file.is_file():
            raise ConnectionError(
                f"CA file {self._ca_file} not found; copy the server's ca.pem there"
            )
        credentials = self._credentials
        if (
            credentials.load_identity() is None
            and credentials.load_key() is None
            and not credentials.join_token()
        ):
            raise _MissingCredentials(
                "no agent key stored and no join token configured; give the agent a join token"
            )
        where = f"{self._host}:{self._port}"
        logger.debug("connecting to %s as %s", where, self._client_id)
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    connection = await self._open(stack)
                    await self._handshake(connection)
            except TimeoutError:
                raise ConnectionError(
                    f"no answer from {where} within {self._connect_timeout:g} s"
                ) from None
            except ConnectionError as exc:
                raise ConnectionError(f"cannot connect to {where}: {exc}") from None
            await self._serve(connection)

    async def _serve(self, connection: _ServerConnection) -> None:
        self._authenticated = True
        self._connection = connection
        self._connected.set()
        self.last_error = None
        logger.info("connected to %s as %s", self._describe(), self._client_id)
        heartbeat = asyncio.create_task(self._heartbeat(connection))
        try:
            if self._on_connected is not None:
                await _guarded("on_connected", self._on_connected())
            while (env := await connection.inbox.get()) is not None:
                await _guarded("on_message", self._on_message(env))
            self.last_error = connection.lost_reason or "connection lost"
            raise ConnectionError(self.last_error)
        finally:
            heartbeat.cancel()
            self._connection = None
            self.address = None
            self._connected.clear()
            if self._on_disconnected is not None:
                await _guarded("on_disconnected", self._on_disconnected())

    async def _heartbeat(self, connection: _ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        interval = connection.heartbeat_interval or self._heartbeat_interval
        limit = _MISSED_HEARTBEATS * interval
        while True:
            await asyncio.sleep(interval)
            silent = loop.time() - connection.last_frame_at
            if silent > limit:
                connection.lose(f"no frame from the server for {silent:.1f} s")
                return
            connection.heartbeat()

    async def _handshake(self, connection: _ServerConnection) -> None:
        connection.open_control_stream()
        connection.send(
            Envelope(
                kind=Kind.HELLO,
                payload={"client_id": self._client_id, "protocol": PROTOCOL_VERSION},
            )
        )
        challenge = await self._expect(connection, Kind.CHALLENGE)
        nonce_hex = challenge.payload.get("nonce")
        try:
            nonce = bytes.fromhex(nonce_hex) if isinstance(nonce_hex, str) else b""
        except ValueError:
            nonce = b""
        if len(nonce) != 32:
            raise ProtocolError("server's challenge has no 64-hex-digit nonce")

        transcript = auth_transcript(self._client_id, nonce, _server_certificate(connection))
        # This end's FileStreamClient understands QUEUED frames on file streams.
        auth: dict[str, Any] = {"capabilities": {**self._capabilities(), CAPABILITY_FILE_QUEUE: 1}}
        credentials = self._credentials
        shared = credentials.load_key()
        token = credentials.join_token() if shared is None else None
        identity = credentials.load_identity()
        if identity is None and (shared is not None or token):
            # Stored before it is first sent: every retry offers the same key.
            identity = credentials.create_identity()
        if identity is None:
            raise _MissingCredentials("no agent key stored and no join token configured")
        public_key = public_bytes(identity)
        proof = {"public_key": public_key.hex(), "signature": identity.sign(transcript).hex()}
        if shared is not None:
            # Enrolled before agents made their own keys: prove the shared key, and offer
            # the key pair so that the server can replace the shared key with it.
            mac = hmac.new(shared, nonce + self._client_id.encode(), hashlib.sha256).hexdigest()
            auth.update(method="key", mac=mac, **proof)
        elif token:
            # Idempotent: the same key for an id enrolled with it just signs in.
            auth.update(method="join", join_token=token, **proof)
        else:
            auth.update(method="signature", signature=proof["signature"])
        connection.send(Envelope(kind=Kind.AUTH, payload=auth))

        welcome = await self._expect(connection, Kind.WELCOME)
        connection.quic_heartbeats = welcome.payload.get("heartbeat") == HEARTBEAT_QUIC
        connection.heartbeat_interval = heartbeat_interval(
            welcome.payload.get("heartbeat_interval"), self._heartbeat_interval, self._idle_timeout
        )
        if connection.heartbeat_interval != self._heartbeat_interval:
            logger.debug(
                "server asked %s for a heartbeat every %.1f s",
                self._client_id,
                connection.heartbeat_interval,
            )
        workers = welcome.payload.get("file_workers")
        if isinstance(workers, list):
            connection.file_worker_ports = [
                port
                for port in workers
                if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
            ][:64]
        if welcome.payload.get("public_key") == public_key.hex():
            if shared is not None:
                credentials.drop_key()
                logger.info("%s now authenticates with its own key pair", self._client_id)
            return
        issued = welcome.payload.get("agent_key")
        if issued is not None and shared is None:
            # A server older than key pairs issued a shared key at enrollment.
            try:
                key_bytes = bytes.fromhex(issued) if isinstance(issued, str) else b""
            except ValueError:
                key_bytes = b""
            if not key_bytes:
                raise ProtocolError("server's welcome has an agent_key that is not hex")
            credentials.save_key(key_bytes)
            logger.info("enrolled %s with an older server; its agent key saved", self._client_id)

    async def _expect(self, connection: _ServerConnection, kind: Kind) -> Envelope:
        env = await connection.inbox.get()
        if env is None:
            raise ConnectionError(connection.lost_reason or "connection lost during the handshake")
        if env.kind is Kind.ERROR:
            reason = str(env.payload.get("reason") or "no reason given")
            hint = env.payload.get("retry_after")
            if isinstance(hint, int | float) and not isinstance(hint, bool) and hint > 0:
                raise ServerUnavailable(reason, min(float(hint), MAX_RETRY_AFTER))
            raise HandshakeRefused(reason)
        if env.kind is not kind:
            raise ProtocolError(f"expected {kind.value} from the server, got {env.kind.value}")
        return env
