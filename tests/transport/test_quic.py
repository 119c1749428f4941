"""Server and agent over real QUIC on 127.0.0.1: handshake, messages, failures, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
import ssl
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    PingAcknowledged,
    QuicEvent,
    StreamDataReceived,
)
from aioquic.quic.logger import QuicLogger
from aioquic.quic.packet import pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy_core.testing import MemoryCredentials
from deploy_core.transport import (
    ALPN_PROTOCOL,
    AgentConnector,
    AgentCredential,
    AgentSession,
    AuthError,
    Envelope,
    FileCredentials,
    FrameDecoder,
    Kind,
    QuicServer,
    ServerCerts,
    encode,
    ensure_server_certs,
)
from deploy_core.transport import client as transport_client
from deploy_core.transport import quic_settings as transport_settings
from deploy_core.transport import server as transport_server
from deploy_core.transport.envelope import HEARTBEAT_QUIC
from deploy_core.transport.quic_settings import acknowledge_with_answer, pace_acknowledgement
from deploy_core.transport.stateless_reset import StatelessResets, is_stateless_reset

# --------------------------------------------------------------------------- helpers


class MemoryAuthority:
    """AgentAuthority keeping credentials in dicts; one valid join token. ``keys`` holds
    shared keys (agents enrolled before key pairs), ``public_keys`` agents' public keys."""

    def __init__(self, join_token: str = "join-secret") -> None:
        self.join_token = join_token
        self.keys: dict[str, bytes] = {}
        self.public_keys: dict[str, bytes] = {}
        self.enrolled: list[str] = []

    async def credential(self, client_id: str) -> AgentCredential | None:
        if client_id in self.public_keys:
            return AgentCredential(public_key=self.public_keys[client_id])
        if client_id in self.keys:
            return AgentCredential(shared_key=self.keys[client_id])
        return None

    async def enroll(self, client_id: str, join_token: str, public_key: bytes) -> None:
        if self.public_keys.get(client_id) == public_key:
            return
        if client_id in self.public_keys or client_id in self.keys:
            raise AuthError(f"client id {client_id} is already enrolled with another key")
        if join_token != self.join_token:
            raise AuthError("join token rejected; ask the operator for a fresh one")
        self.public_keys[client_id] = public_key
        self.enrolled.append(client_id)

    async def upgrade(self, client_id: str, public_key: bytes) -> None:
        del self.keys[client_id]
        self.public_keys[client_id] = public_key


class Recorder:
    """Server callbacks that record (what, session, envelope) in call order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, AgentSession, Envelope | None]] = []
        self.fail_next_message = False
        #: Answer each message with an ACK envelope this many seconds later (as the server
        #: answers an event once it is stored).
        self.answer_after: float | None = None

    async def on_connect(self, session: AgentSession) -> None:
        self.log.append(("connect", session, None))

    async def on_message(self, session: AgentSession, env: Envelope) -> None:
        self.log.append(("message", session, env))
        if self.answer_after is not None:
            answer = Envelope(kind=Kind.ACK, ref=env.id)
            asyncio.get_running_loop().call_later(self.answer_after, session.send, answer)
        if self.fail_next_message:
            self.fail_next_message = False
            raise RuntimeError("callback bug")

    async def on_disconnect(self, session: AgentSession) -> None:
        self.log.append(("disconnect", session, None))

    def sessions(self, what: str) -> list[AgentSession]:
        return [session for kind, session, _ in self.log if kind == what]

    def messages(self) -> list[Envelope]:
        return [env for kind, _, env in self.log if kind == "message" and env is not None]


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


class RawClient(QuicConnectionProtocol):
    """A bare aioquic client that speaks the framing but follows no rules."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decoder = FrameDecoder()
        self.received: asyncio.Queue[Envelope] = asyncio.Queue()
        self.stream_id: int | None = None
        self.terminated: ConnectionTerminated | None = None
        self.pings_acknowledged: list[int] = []

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            for env in self.decoder.feed(event.data):
                self.received.put_nowait(env)
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
        elif isinstance(event, PingAcknowledged):
            self.pings_acknowledged.append(event.uid)

    def send_raw(self, data: bytes) -> None:
        if self.stream_id is None:
            self.stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(self.stream_id, data)
        self.transmit()

    def send_env(self, env: Envelope) -> None:
        self.send_raw(encode(env))

    async def recv(self, timeout: float = 3.0) -> Envelope:
        return await asyncio.wait_for(self.received.get(), timeout)

    async def authenticate(self, client_id: str, key: bytes) -> Envelope:
        self.send_env(Envelope(kind=Kind.HELLO, payload={"client_id": client_id, "protocol": 1}))
        challenge = await self.recv()
        assert challenge.kind is Kind.CHALLENGE
        nonce = bytes.fromhex(challenge.payload["nonce"])
        mac = hmac.new(key, nonce + client_id.encode(), hashlib.sha256).hexdigest()
        self.send_env(Envelope(kind=Kind.AUTH, payload={"method": "key", "mac": mac}))
        return await self.recv()


@pytest.fixture
def certs(tmp_path: Path) -> ServerCerts:
    return ensure_server_certs(tmp_path / "server")


@pytest.fixture
def authority() -> MemoryAuthority:
    return MemoryAuthority()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


StartServer = Callable[..., Awaitable[QuicServer]]
StartConnector = Callable[..., AgentConnector]


@pytest_asyncio.fixture
async def start_server(
    certs: ServerCerts, authority: MemoryAuthority, recorder: Recorder
) -> AsyncIterator[StartServer]:
    servers: list[QuicServer] = []

    async def start(**overrides: Any) -> QuicServer:
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "certs": certs,
            "authority": authority,
            "on_connect": recorder.on_connect,
            "on_message": recorder.on_message,
            "on_disconnect": recorder.on_disconnect,
            "idle_timeout": 5.0,
            "handshake_timeout": 2.0,
        }
        server = QuicServer(**(options | overrides))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await asyncio.wait_for(server.close(), 10)


@pytest_asyncio.fixture
async def start_connector(certs: ServerCerts) -> AsyncIterator[StartConnector]:
    running: list[tuple[AgentConnector, asyncio.Task[None]]] = []

    def start(server: QuicServer, credentials: Any, **overrides: Any) -> AgentConnector:
        received: list[Envelope] = []

        async def on_message(env: Envelope) -> None:
            received.append(env)

        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": server.port,
            "ca_file": certs.ca_cert,
            "client_id": "web-1",
            "credentials": credentials,
            "capabilities": lambda: {"os": "linux", "plugins": ["shell"]},
            "on_message": on_message,
            "heartbeat_interval": 0.2,
            "backoff_initial": 0.05,
            "backoff_max": 0.3,
            "connect_timeout": 1.5,
        }
        connector = AgentConnector(**(options | overrides))
        connector.received = received  # type: ignore[attr-defined]
        running.append((connector, asyncio.create_task(connector.run())))
        return connector

    yield start
    for connector, task in running:
        await asyncio.wait_for(connector.stop(), 10)
        assert task.done()


def client_configuration(certs: ServerCerts, **extra: Any) -> QuicConfiguration:
    """A QUIC client's configuration trusting only the server's CA."""
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN_PROTOCOL],
        cafile=str(certs.ca_cert),
        verify_mode=ssl.CERT_REQUIRED,
        server_name="localhost",
        **extra,
    )


@contextlib.asynccontextmanager
async def raw_client(
    server: QuicServer,
    certs: ServerCerts,
    quic_logger: QuicLogger | None = None,
    *,
    timeout: float = 5.0,
) -> AsyncIterator[RawClient]:
    """A :class:`RawClient` connected to ``server`` (its packets traced in ``quic_logger``)."""
    configuration = client_configuration(certs, quic_logger=quic_logger)
    async with asyncio.timeout(timeout):
        async with connect(
            "127.0.0.1", server.port, configuration=configuration, create_protocol=RawClient
        ) as client:
            assert isinstance(client, RawClient)
            yield client


def received(connector: AgentConnector) -> list[Envelope]:
    return connector.received  # type: ignore[attr-defined,no-any-return]


async def connected_agent(
    server: QuicServer, start_connector: StartConnector
) -> tuple[AgentConnector, AgentSession]:
    """An agent ("web-1", join token) connected to ``server``, and its session there."""
    agent = start_connector(server, MemoryCredentials(token="join-secret"))
    assert await agent.wait_connected(5)
    await eventually(lambda: server.session("web-1") is not None)
    session = server.session("web-1")
    assert session is not None
    return agent, session


# --------------------------------------------------------------------------- authentication


@pytest.mark.asyncio
async def test_join_token_enrolls_the_agents_own_key_which_authenticates_next_time(
    tmp_path: Path,
    start_server: StartServer,
    start_connector: StartConnector,
    authority: MemoryAuthority,
    recorder: Recorder,
) -> None:
    server = await start_server()
    token_file = tmp_path / "join-token"
    token_file.write_text("  join-secret\n")
    state = tmp_path / "agent"

    first = start_connector(server, FileCredentials(state, token_file))
    assert await first.wait_connected(5)
    identity_file = state / "agent-identity.pem"
    identity = serialization.load_pem_private_key(identity_file.read_bytes(), password=None)
    assert isinstance(identity, Ed25519PrivateKey)
    assert authority.public_keys["web-1"] == identity.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert stat.S_IMODE(identity_file.stat().st_mode) == 0o600
    assert not (state / "agent.key").exists()
    await eventually(lambda: len(recorder.sessions("connect")) == 1)
    session = recorder.sessions("connect")[0]
    assert session.client_id == "web-1"
    # The transport adds what it understands itself (files.CAPABILITY_FILE_QUEUE).
    assert session.capabilities == {"os": "linux", "plugins": ["shell"], "file_queue": 1}
    assert session.remote[0] == "127.0.0.1"
    assert server.session("web-1") is session

    await asyncio.wait_for(first.stop(), 5)
    await eventually(lambda: recorder.sessions("disconnect") == [session])
    assert server.session("web-1") is None

    token_file.unlink()  # the key alone must do now
    second = start_connector(server, FileCredentials(state))
    assert await second.wait_connected(5)
    assert authority.enrolled == ["web-1"]
    await eventually(lambda: len(recorder.sessions("connect")) == 2)


@pytest.mark.asyncio
async def test_wrong_join_token_is_refused_with_the_servers_reason(
    start_server: StartServer, start_connector: StartConnector, recorder: Recorder
) -> None:
    server = await start_server()
    connector = start_connector(server, MemoryCredentials(token="guessed"))
    await eventually(lambda: connector.last_error is not None)
    assert "join token rejected" in (connector.last_error or "")
    assert not connector.connected
    await asyncio.sleep(0.3)  # it retries with back-off; none of it may get through
    assert recorder.log == []
    assert dict(server.sessions) == {}


@pytest.mark.asyncio
async def test_wrong_key_is_refused(
    start_server: StartServer,
    start_connector: StartConnector,
    authority: MemoryAuthority,
    recorder: Recorder,
) -> None:
    server = await start_server()
    authority.keys["web-1"] = secrets.token_bytes(32)
    connector = start_connector(server, MemoryCredentials(key=secrets.token_bytes(32)))
    await eventually(lambda: connector.last_error is not None)
    assert "wrong agent key for client web-1" in (connector.last_error or "")
    assert not connector.connected
    assert recorder.log == []
    assert server.stats.refusals["auth"] >= 1 and server.stats.connects == 0


@pytest.mark.asyncio
async def test_unknown_agent_with_a_key_is_told_to_enroll(
    start_server: StartServer, start_connector: StartConnector
) -> None:
    server = await start_server()
    connector = start_connector(server, MemoryCredentials(key=b"k" * 32))
    await eventually(lambda: connector.last_error is not None)
    assert "not enrolled" in (connector.last_error or "")


@pytest.mark.asyncio
async def test_agent_trusts_only_the_pinned_ca(
    tmp_path: Path, start_server: StartServer, start_connector: StartConnector, recorder: Recorder
) -> None:
    server = await start_server()
    other_ca = ensure_server_certs(tmp_path / "other").ca_cert
    connector = start_connector(server, MemoryCredentials(token="join-secret"), ca_file=other_ca)
    await eventually(lambda: connector.last_error is not None)
    assert not connector.connected
    assert recorder.log == []


@pytest.mark.asyncio
async def test_message_before_auth_gets_error_and_close_while_agents_keep_working(
    start_server: StartServer,
    start_connector: StartConnector,
    certs: ServerCerts,
    recorder: Recorder,
) -> None:
    server = await start_server()
    agent = start_connector(server, MemoryCredentials(token="join-secret"))
    assert await agent.wait_connected(5)

    async with raw_client(server, certs) as raw:
        raw.send_env(Envelope(kind=Kind.EVENT, name="deploy.done"))
        error = await raw.recv()
        assert error.kind is Kind.ERROR
        assert "expected hello as the first message, got event" in error.payload["reason"]
        await eventually(lambda: raw.terminated is not None)

    assert agent.send(Envelope(kind=Kind.EVENT, name="still.here"))
    await eventually(lambda: [env.name for env in recorder.messages()] == ["still.here"])
    assert len(recorder.sessions("connect")) == 1


@pytest.mark.asyncio
async def test_extra_message_during_the_handshake_is_refused(
    start_server: StartServer, certs: ServerCerts, authority: MemoryAuthority, recorder: Recorder
) -> None:
    server = await start_server()
    authority.keys["raw-1"] = b"k" * 32
    async with raw_client(server, certs) as raw:
        raw.send_env(Envelope(kind=Kind.HELLO, payload={"client_id": "raw-1", "protocol": 1}))
        challenge = await raw.recv()
        nonce = bytes.fromhex(challenge.payload["nonce"])
        mac = hmac.new(b"k" * 32, nonce + b"raw-1", hashlib.sha256).hexdigest()
        auth = Envelope(kind=Kind.AUTH, payload={"method": "key", "mac": mac})
        # In one write, so the event is on the wire before the server could answer.
        raw.send_raw(encode(auth) + encode(Envelope(kind=Kind.EVENT, name="too.early")))
        error = await raw.recv()
        assert error.kind is Kind.ERROR
        assert "before WELCOME" in error.payload["reason"]
        await eventually(lambda: raw.terminated is not None)
    assert recorder.log == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"client_id": "../etc", "protocol": 1}, "client_id must match"),
        ({"client_id": "web-1", "protocol": 2}, "unsupported protocol 2"),
        ({"protocol": 1}, "client_id must match"),
    ],
)
async def test_bad_hello_is_refused(
    start_server: StartServer,
    certs: ServerCerts,
    recorder: Recorder,
    payload: dict[str, Any],
    reason: str,
) -> None:
    server = await start_server()
    async with raw_client(server, certs) as raw:
        raw.send_env(Envelope(kind=Kind.HELLO, payload=payload))
        error = await raw.recv()
        assert error.kind is Kind.ERROR
        assert reason in error.payload["reason"]
        await eventually(lambda: raw.terminated is not None)
    assert recorder.log == []
    assert sum(server.stats.refusals.values()) == 1 and server.stats.disconnects == {}


@pytest.mark.asyncio
async def test_slow_handshake_is_cut_off(start_server: StartServer, certs: ServerCerts) -> None:
    server = await start_server(handshake_timeout=0.3)
    async with raw_client(server, certs) as raw:
        raw.send_env(Envelope(kind=Kind.HELLO, payload={"client_id": "slow", "protocol": 1}))
        assert (await raw.recv()).kind is Kind.CHALLENGE
        error = await raw.recv()  # and then never answer
        assert error.payload["reason"] == "handshake did not complete within 0.3 s"
        await eventually(lambda: raw.terminated is not None)
    assert dict(server.stats.refusals) == {"handshake_timeout": 1}
    assert server.stats.messages_received["hello"] == 1
    assert server.stats.messages_sent["challenge"] == 1 == server.stats.messages_sent["error"]


# --------------------------------------------------------------------------- messages


@pytest.mark.asyncio
async def test_commands_reach_the_agent_and_events_reach_the_server(
    start_server: StartServer, start_connector: StartConnector, recorder: Recorder
) -> None:
    server = await start_server()
    agent, session = await connected_agent(server, start_connector)

    command = Envelope(
        kind=Kind.COMMAND, name="deploy.start", wait_ack=True, payload={"deploy_id": "d1"}
    )
    session.send(command)
    await eventually(lambda: received(agent) == [command])

    events = [
        Envelope(kind=Kind.EVENT, name="deploy.progress", payload={"i": i}) for i in range(20)
    ]
    for event in events:
        assert agent.send(event)
    await eventually(lambda: recorder.messages() == events)
    assert all(s is session for kind, s, _ in recorder.log if kind == "message")

    # Heartbeats flow both ways but neither side's callback sees them.
    seen = session.last_seen
    await asyncio.sleep(0.5)
    assert session.last_seen > seen
    assert recorder.messages() == events
    assert received(agent) == [command]


@pytest.mark.asyncio
async def test_a_ping_is_answered_by_one_packet_with_the_pong_and_the_ack(
    start_server: StartServer, certs: ServerCerts, authority: MemoryAuthority
) -> None:
    """The server acknowledges a PING in the packet carrying its PONG (not in a packet of
    its own a millisecond later): one datagram per agent heartbeat (issue 13, idle CPU)."""
    server = await start_server()
    authority.keys["raw-1"] = key = secrets.token_bytes(32)
    quic_logger = QuicLogger()
    async with raw_client(server, certs, quic_logger, timeout=10) as raw:
        assert (await raw.authenticate("raw-1", key)).kind is Kind.WELCOME
        for _ in range(3):
            before = _trace_length(quic_logger)
            ping = Envelope(kind=Kind.PING)
            raw.send_env(ping)
            pong = await raw.recv()
            assert (pong.kind, pong.ref) == (Kind.PONG, ping.id)
            received = _packets_received(quic_logger, before)
            with_pong = [frames for frames in received if "stream" in frames]
            assert len(with_pong) == 1, received
            assert "ack" in with_pong[0], received


@pytest.mark.asyncio
async def test_a_message_answered_later_is_acknowledged_in_the_answers_packet(
    start_server: StartServer, certs: ServerCerts, authority: MemoryAuthority, recorder: Recorder
) -> None:
    """The server answers an event once it is stored, milliseconds after it arrived; the QUIC
    ACK of the event waits for that answer and rides in its packet instead of leaving 1 ms
    after the event in a packet of its own (issue 13: 14 datagrams per `true` became 8)."""
    server = await start_server()
    authority.keys["raw-1"] = key = secrets.token_bytes(32)
    quic_logger = QuicLogger()
    recorder.answer_after = transport_settings.MESSAGE_ACK_DELAY / 4
    async with raw_client(server, certs, quic_logger, timeout=10) as raw:
        assert (await raw.authenticate("raw-1", key)).kind is Kind.WELCOME
        for i in range(3):
            before = _trace_length(quic_logger)
            event = Envelope(kind=Kind.EVENT, name="deploy.progress", payload={"i": i})
            raw.send_env(event)
            answer = await raw.recv()
            assert (answer.kind, answer.ref) == (Kind.ACK, event.id)
            received = _packets_received(quic_logger, before)
            assert len(received) == 1, received
            assert "ack" in received[0] and "stream" in received[0], received


@pytest.mark.asyncio
async def test_an_unanswered_message_is_still_acknowledged(
    start_server: StartServer, certs: ServerCerts, authority: MemoryAuthority, recorder: Recorder
) -> None:
    """With no answer to ride with, the ACK leaves on its own once the delay is over: the
    sender's packet is acknowledged, nothing stays in flight."""
    server = await start_server()
    authority.keys["raw-1"] = key = secrets.token_bytes(32)
    quic_logger = QuicLogger()
    async with raw_client(server, certs, quic_logger, timeout=10) as raw:
        assert (await raw.authenticate("raw-1", key)).kind is Kind.WELCOME
        before = _trace_length(quic_logger)
        raw.send_env(Envelope(kind=Kind.EVENT, name="deploy.progress", payload={}))
        await eventually(lambda: len(recorder.messages()) == 1)
        await eventually(lambda: _packets_received(quic_logger, before) == [["ack"]])
        await eventually(lambda: raw._quic._loss.bytes_in_flight == 0)


@pytest.mark.asyncio
async def test_the_agent_acknowledges_the_servers_acks_with_its_next_packet(
    start_server: StartServer, start_connector: StartConnector
) -> None:
    """A datagram holding only the server's ACKs of the agent's events gets no answer from
    the agent: its QUIC acknowledgement waits (ANSWERLESS_ACK_DELAY, under the probe floor)
    for the agent's next packet instead of leaving on its own 20 ms later, one datagram less
    for the server per report (issue 13, paced ingest).  Anything else is acknowledged as
    before, and a deferred acknowledgement still leaves."""
    server = await start_server()
    agent, session = await connected_agent(server, start_connector)
    (server_side,) = [c for c in server._connections if not c.shut]
    connection = agent._connection
    assert connection is not None
    space = connection._quic._spaces[tls.Epoch.ONE_RTT]
    loop = asyncio.get_running_loop()
    # When the acknowledgement is due, right after the agent read each datagram.
    due: list[float] = []
    receive = connection.datagram_received

    def recording(data: bytes | str, addr: Any) -> None:
        receive(data, addr)
        if space.ack_at is not None:
            due.append(space.ack_at - loop.time())

    connection.datagram_received = recording  # type: ignore[method-assign]
    assert transport_settings.ANSWERLESS_ACK_DELAY < transport_settings.PROBE_FLOOR

    async def sent_and_read(env: Envelope) -> float:
        await eventually(lambda: space.ack_at is None)  # nothing owed from before
        due.clear()
        session.send(env)
        await eventually(lambda: bool(due))
        return due[0]

    # The server's ACK of an event: deferred.
    wait = await sent_and_read(Envelope(kind=Kind.ACK, ref="ev-1"))
    assert wait > transport_settings.MESSAGE_ACK_DELAY * 2
    # The agent's next packet (an event) carries it: nothing owed once that is out.
    assert agent.send(Envelope(kind=Kind.EVENT, name="deploy.progress", payload={}))
    await asyncio.sleep(0)
    assert space.ack_at is None
    # A command (which the agent answers) is acknowledged within the message delay.
    command = Envelope(kind=Kind.COMMAND, name="deploy.start", payload={"deploy_id": "d1"})
    assert await sent_and_read(command) <= transport_settings.MESSAGE_ACK_DELAY
    # A message spanning many datagrams is acknowledged as it arrives (the server's window
    # must move), though none of its datagrams holds a whole envelope.
    big = Envelope(kind=Kind.COMMAND, name="deploy.start", payload={"script": "x" * 60_000})
    await eventually(lambda: space.ack_at is None)
    due.clear()
    session.send(big)
    await eventually(lambda: big in received(agent))
    assert len(due) > 10 and max(due) <= transport_settings.MESSAGE_ACK_DELAY, due
    # Deferred with nothing to carry it, the acknowledgement leaves on its own.
    await sent_and_read(Envelope(kind=Kind.ACK, ref="ev-2"))
    await eventually(lambda: server_side._quic._loss.bytes_in_flight == 0)
    assert space.ack_at is None


@pytest.mark.asyncio
async def test_both_ends_wait_at_least_the_probe_floor_before_resending(
    start_server: StartServer, start_connector: StartConnector
) -> None:
    """A server answering late is not a lost packet: neither end probes (resends what is
    unacknowledged) sooner than PROBE_FLOOR after the handshake, though both are on
    loopback, where aioquic alone would probe after ~30 ms (issue 13: 2,000 agents resending
    to a busy server)."""
    server = await start_server()
    agent, _session = await connected_agent(server, start_connector)
    (connection,) = [c for c in server._connections if not c.shut]
    agent_connection = agent._connection
    assert agent_connection is not None
    for quic in (connection._quic, agent_connection._quic):
        assert quic._loss.get_probe_timeout() >= transport_settings.PROBE_FLOOR
    # Before the floor, the same connection probed within tens of milliseconds.
    connection._quic._loss.max_ack_delay = 0.025
    assert connection._quic._loss.get_probe_timeout() < transport_settings.PROBE_FLOOR / 4


def _handshaken_pair(certs: ServerCerts) -> tuple[QuicConnection, QuicConnection, list[float]]:
    """An aioquic client and server connection, handshaken in memory (no sockets, a clock
    of our own: ``clock[0]``)."""
    clock = [1000.0]
    client = QuicConnection(
        configuration=client_configuration(
            certs, max_datagram_size=transport_settings.MAX_DATAGRAM_SIZE
        )
    )
    server_configuration = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN_PROTOCOL],
        max_datagram_size=transport_settings.MAX_DATAGRAM_SIZE,
    )
    server_configuration.load_cert_chain(str(certs.cert), str(certs.key))
    server: QuicConnection | None = None
    address = ("127.0.0.1", 4433)
    client.connect(address, now=clock[0])
    for _ in range(20):
        clock[0] += 0.001
        for data, _ in client.datagrams_to_send(now=clock[0]):
            if server is None:
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                server = QuicConnection(
                    configuration=server_configuration,
                    original_destination_connection_id=header.destination_cid,
                )
            server.receive_datagram(data, address, now=clock[0])
        assert server is not None
        for data, _ in server.datagrams_to_send(now=clock[0]):
            client.receive_datagram(data, address, now=clock[0])
    assert server is not None
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    assert any(isinstance(e, HandshakeCompleted) for e in events)
    _settle(client, server, clock)
    return client, server, clock


def _settle(client: QuicConnection, server: QuicConnection, clock: list[float]) -> None:
    """Exchange what either end has to send, ACKs due later included, until both are quiet."""
    address = ("127.0.0.1", 4433)
    quiet = 0
    for _ in range(50):
        clock[0] += 0.05
        sent = 0
        for sender, receiver in ((client, server), (server, client)):
            for data, _ in sender.datagrams_to_send(now=clock[0]):
                receiver.receive_datagram(data, address, now=clock[0])
                sent += 1
        quiet = 0 if sent else quiet + 1
        if quiet == 3:
            return
    raise AssertionError("the connections did not fall quiet")


def _ack_due_in(quic: QuicConnection, now: float) -> float | None:
    ack_at = quic._spaces[tls.Epoch.ONE_RTT].ack_at
    return None if ack_at is None else round(ack_at - now, 4)


def test_acknowledgements_wait_for_an_answer_only_for_messages(certs: ServerCerts) -> None:
    """pace_acknowledgement: a message's ACK is due in MESSAGE_ACK_DELAY; a tiny datagram's
    (a heartbeat's PING) and a full one's (bytes in bulk) ``at_once``, and a full one also
    brings forward the ACK already waiting; an answer takes every waiting ACK along."""
    client, server, clock = _handshaken_pair(certs)
    address = ("127.0.0.1", 4433)

    def deliver(sender: QuicConnection, receiver: QuicConnection, *, at_once: float) -> int:
        sizes = []
        for data, _ in sender.datagrams_to_send(now=clock[0]):
            pace_acknowledgement(receiver, len(data), clock[0], at_once=at_once)
            receiver.receive_datagram(data, address, now=clock[0])
            sizes.append(len(data))
        assert len(sizes) == 1, sizes
        return sizes[0]

    stream = client.get_next_available_stream_id()
    # A message: 300 bytes on a stream.
    client.send_stream_data(stream, b"m" * 300)
    assert 64 <= deliver(client, server, at_once=0.0) < 1300
    assert _ack_due_in(server, clock[0]) == transport_settings.MESSAGE_ACK_DELAY
    # A heartbeat alone: due at once.
    _settle(client, server, clock)
    client.send_ping(1)
    assert deliver(client, server, at_once=0.0) < 64
    assert _ack_due_in(server, clock[0]) == 0.0
    # Bytes in bulk: due in at_once, and so is the message's ACK waiting before them.
    _settle(client, server, clock)
    client.send_stream_data(stream, b"m" * 200)
    deliver(client, server, at_once=0.0)
    assert _ack_due_in(server, clock[0]) == transport_settings.MESSAGE_ACK_DELAY
    client.send_stream_data(stream, b"b" * 5000)
    sizes = []
    for data, _ in client.datagrams_to_send(now=clock[0]):
        pace_acknowledgement(server, len(data), clock[0], at_once=0.001)
        server.receive_datagram(data, address, now=clock[0])
        sizes.append(len(data))
    assert max(sizes) >= 1300
    assert _ack_due_in(server, clock[0]) == 0.001
    # An answer carries the waiting ACK.
    _settle(client, server, clock)
    client.send_stream_data(stream, b"m" * 300)
    deliver(client, server, at_once=0.0)
    assert _ack_due_in(server, clock[0]) == transport_settings.MESSAGE_ACK_DELAY
    server.send_stream_data(stream, b"answer")
    acknowledge_with_answer(server, clock[0])
    answers = server.datagrams_to_send(now=clock[0])
    assert len(answers) == 1
    assert _ack_due_in(server, clock[0]) is None


def _trace_length(quic_logger: QuicLogger) -> int:
    (trace,) = quic_logger.to_dict()["traces"]
    return len(trace["events"])


def _packets_received(quic_logger: QuicLogger, since: int) -> list[list[str]]:
    """The frame types of each packet the client received after trace event ``since``."""
    (trace,) = quic_logger.to_dict()["traces"]
    return [
        [frame["frame_type"] for frame in event["data"]["frames"]]
        for event in trace["events"][since:]
        if event["name"] == "transport:packet_received"
    ]


@pytest.mark.asyncio
async def test_a_quic_ping_heartbeat_is_answered_by_one_ack_and_counts_as_heard_from(
    start_server: StartServer, certs: ServerCerts, authority: MemoryAuthority
) -> None:
    """WELCOME offers QUIC PING frames as heartbeats; the server answers each with one
    packet holding only its ACK (no envelope to decode or build, no ACK of a PONG to take
    back), and the agent counts as heard from (issue 13, idle CPU)."""
    server = await start_server()
    authority.keys["raw-1"] = key = secrets.token_bytes(32)
    quic_logger = QuicLogger()
    async with raw_client(server, certs, quic_logger, timeout=10) as raw:
        welcome = await raw.authenticate("raw-1", key)
        assert welcome.kind is Kind.WELCOME
        assert welcome.payload["heartbeat"] == HEARTBEAT_QUIC
        await eventually(lambda: server.session("raw-1") is not None)
        session = server.session("raw-1")
        assert session is not None
        received_before = dict(server.stats.messages_received)
        sent_before = dict(server.stats.messages_sent)
        for uid in (11, 12, 13):
            before = _trace_length(quic_logger)
            seen = session.last_seen
            await asyncio.sleep(0.02)
            raw._quic.send_ping(uid)
            raw.transmit()
            await eventually(lambda uid=uid: uid in raw.pings_acknowledged)  # type: ignore[misc]
            assert _packets_received(quic_logger, before) == [["ack"]]
            assert session.last_seen > seen
        assert dict(server.stats.messages_received) == received_before
        assert dict(server.stats.messages_sent) == sent_before


@pytest.mark.asyncio
async def test_the_agent_heartbeats_with_quic_pings_and_a_silent_link_is_still_lost(
    start_server: StartServer, start_connector: StartConnector
) -> None:
    server = await start_server()
    agent, session = await connected_agent(server, start_connector)
    seen = session.last_seen
    # Heartbeats every 0.2 s, the connection lost after 3 unanswered: a second holds
    # five, each answered in time, and none of them an envelope.
    await asyncio.sleep(1.0)
    assert agent.connected and server.session("web-1") is session
    assert session.last_seen > seen
    assert server.stats.messages_received["ping"] == 0
    assert server.stats.messages_sent["pong"] == 0


@pytest.mark.asyncio
async def test_an_agent_sends_ping_envelopes_to_a_server_without_quic_heartbeats(
    start_server: StartServer,
    start_connector: StartConnector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server older than QUIC heartbeats says nothing of them in WELCOME: the agent then
    sends PING envelopes, which every server answers."""
    monkeypatch.setattr(transport_server, "HEARTBEAT_QUIC", "something-else")
    server = await start_server()
    agent = start_connector(server, MemoryCredentials(token="join-secret"))
    assert await agent.wait_connected(5)
    await eventually(lambda: server.stats.messages_received["ping"] >= 3)
    assert server.stats.messages_sent["pong"] >= 3
    assert agent.connected


@pytest.mark.asyncio
async def test_a_failing_callback_does_not_break_the_connection(
    start_server: StartServer,
    start_connector: StartConnector,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await start_server()
    agent = start_connector(server, MemoryCredentials(token="join-secret"))
    assert await agent.wait_connected(5)
    recorder.fail_next_message = True
    with caplog.at_level(logging.ERROR, logger="deploy_core.transport.server"):
        agent.send(Envelope(kind=Kind.EVENT, name="first"))
        agent.send(Envelope(kind=Kind.EVENT, name="second"))
        await eventually(lambda: len(recorder.messages()) == 2)
    assert "on_message callback failed for client web-1" in caplog.text
    assert agent.connected
    assert recorder.sessions("disconnect") == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (struct.pack(">I", 10_000) + b"{", "10000 bytes, over the 4096-byte message limit"),
        (struct.pack(">I", 5) + b"{oops", "frame is not valid JSON"),
        (struct.pack(">I", 18) + b'{"kind":"explode"}', "kind: Input should be"),
    ],
)
async def test_bad_frame_after_auth_closes_only_that_connection(
    start_server: StartServer,
    start_connector: StartConnector,
    certs: ServerCerts,
    authority: MemoryAuthority,
    recorder: Recorder,
    frame: bytes,
    reason: str,
) -> None:
    server = await start_server(max_message_bytes=4096)
    agent = start_connector(server, MemoryCredentials(token="join-secret"))
    assert await agent.wait_connected(5)
    authority.keys["raw-1"] = key = secrets.token_bytes(32)

    async with raw_client(server, certs) as raw:
        welcome = await raw.authenticate("raw-1", key)
        assert welcome.kind is Kind.WELCOME and "agent_key" not in welcome.payload
        await eventually(lambda: server.session("raw-1") is not None)
        raw.send_raw(frame)
        error = await raw.recv()
        assert error.kind is Kind.ERROR
        assert reason in error.payload["reason"]
        await eventually(lambda: raw.terminated is not None)

    await eventually(lambda: [s.client_id for s in recorder.sessions("disconnect")] == ["raw-1"])
    assert server.session("raw-1") is None
    assert server.stats.disconnects == {"server": 1}
    assert sum(server.stats.refusals.values()) == 1
    assert agent.send(Envelope(kind=Kind.EVENT, name="unaffected"))
    await eventually(lambda: [env.name for env in recorder.messages()] == ["unaffected"])


# --------------------------------------------------------------------------- connection life


@pytest.mark.asyncio
async def test_agent_reconnects_after_server_restart(
    start_server: StartServer, start_connector: StartConnector, recorder: Recorder
) -> None:
    first = await start_server()
    port = first.port
    agent = start_connector(first, MemoryCredentials(token="join-secret"))
    assert await agent.wait_connected(5)
    await eventually(lambda: len(recorder.sessions("connect")) == 1)

    await asyncio.wait_for(first.close(), 5)
    assert len(recorder.sessions("disconnect")) == 1
    await eventually(lambda: not agent.connected and agent.last_error is not None)
    assert "server shutting down" in (agent.last_error or "")

    second = await start_server(port=port)
    assert await agent.wait_connected(8)
    await eventually(lambda: second.session("web-1") is not None)
    assert len(recorder.sessions("connect")) == 2
    assert len(recorder.sessions("disconnect")) == 1


class _Void:
    """A datagram transport that sends nothing."""

    def sendto(self, data: bytes, addr: Any = None) -> None:
        pass

    def close(self) -> None:
        pass


async def crash(server: QuicServer) -> None:
    """Stop ``server`` as ``kill -9`` does for its agents: nothing more reaches them (no
    CONNECTION_CLOSE), then its socket closes and its connections' state is gone."""
    for connection in server._connections:
        connection._transport = _Void()  # type: ignore[assignment]
    await asyncio.wait_for(server.close(), 10)


async def _crash_and_restart(
    start_server: StartServer,
    start_connector: StartConnector,
    recorder: Recorder,
    heartbeat_interval: float,
    **second_options: Any,
) -> tuple[QuicServer, Any]:
    """An agent connected to a server that then crashes; a new server on the same port
    (``second_options`` for it) once the agent is back: (the new server, the agent's old
    connection)."""
    first = await start_server(idle_timeout=30.0)
    port = first.port
    agent = start_connector(
        first, MemoryCredentials(token="join-secret"), heartbeat_interval=heartbeat_interval
    )
    assert await agent.wait_connected(5)
    await eventually(lambda: len(recorder.sessions("connect")) == 1)
    old_connection = agent._connection
    assert old_connection is not None
    await crash(first)
    second = await start_server(port=port, idle_timeout=30.0, **second_options)
    await eventually(lambda: second.session("web-1") is not None, timeout=15)
    assert old_connection.lost_reason is not None
    return second, old_connection


@pytest.mark.asyncio
async def test_a_restarted_server_resets_the_agents_old_connection_at_once(
    start_server: StartServer,
    start_connector: StartConnector,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a crash and restart (same certificate, so the same reset key), the agent's
    next heartbeat to the new process is answered with a stateless reset and the agent
    reconnects at once, instead of after three missed heartbeats (issue 13: 15-20 s of a
    fleet's return after ``kill -9``)."""
    caplog.set_level(logging.INFO, logger="deploy_core.transport.client")
    # Three missed heartbeats would take over 6 s; a reset comes with the next one (2 s).
    second, old_connection = await _crash_and_restart(
        start_server, start_connector, recorder, heartbeat_interval=2.0
    )
    assert "stateless reset" in old_connection.lost_reason, old_connection.lost_reason
    assert second.resets.sent >= 1
    assert any("lost: connection closed: stateless reset" in r.getMessage() for r in caplog.records)
    # Draining after a reset sends nothing: the old connection never closed towards the
    # server (no second reset answered a CONNECTION_CLOSE of it).
    assert old_connection._quic._close_pending is False


@pytest.mark.asyncio
async def test_a_reset_under_another_key_does_not_end_the_connection(
    start_server: StartServer,
    start_connector: StartConnector,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reset whose token was not made with the key the agent's connection ids came with
    (a forger's, or a server that lost its key) is ignored: the agent finds the server gone
    only when its heartbeats go unanswered."""
    second, old_connection = await _crash_and_restart(
        start_server,
        start_connector,
        recorder,
        heartbeat_interval=0.5,
        stateless_reset_key=bytes(32),
    )
    assert second.resets.sent >= 1  # it answered the old heartbeats, with the wrong tokens
    assert "no frame from the server" in old_connection.lost_reason, old_connection.lost_reason


@pytest.mark.asyncio
async def test_the_agent_holds_the_servers_reset_tokens_and_knows_a_reset(
    start_server: StartServer, start_connector: StartConnector
) -> None:
    """Every connection id the server gave the agent (in the handshake and in
    NEW_CONNECTION_ID frames) carries the token of the server's key; a datagram ending with
    one is a reset, one ending with anything else, or a long-header packet, is not."""
    server = await start_server()
    agent = start_connector(server, MemoryCredentials(token="join-secret"))
    assert await agent.wait_connected(5)
    connection = agent._connection
    assert connection is not None
    quic = connection._quic
    await eventually(lambda: len(quic._peer_cid_available) >= 1)
    held = [quic._peer_cid, *quic._peer_cid_available]
    for connection_id in held:
        assert connection_id.stateless_reset_token == server.resets.token(connection_id.cid)
    reset = server.resets.reset_for(b"\x41" + quic._peer_cid.cid + bytes(30), 8)
    assert reset is not None and is_stateless_reset(quic, reset)
    other = server.resets.reset_for(b"\x41" + quic._peer_cid_available[0].cid + bytes(30), 8)
    assert other is not None and is_stateless_reset(quic, other)
    forged = reset[:-1] + bytes([reset[-1] ^ 1])
    assert not is_stateless_reset(quic, forged)
    assert not is_stateless_reset(quic, bytes([0xC0]) + reset[1:])  # long header
    assert not is_stateless_reset(quic, reset[-20:])  # shorter than any reset
    assert connection.lost_reason is None


def test_stateless_resets_are_smaller_than_what_they_answer_and_rate_limited() -> None:
    clock = [100.0]
    resets = StatelessResets(bytes(range(32)), rate=10, clock=lambda: clock[0])
    cid = bytes(range(8))
    assert resets.token(cid) == StatelessResets(bytes(range(32))).token(cid)  # survives
    assert resets.token(cid) != StatelessResets(bytes(32)).token(cid)
    assert resets.token(cid) != resets.token(bytes(8))
    short = b"\x40" + cid + bytes(20)  # 29 bytes, like a heartbeat's packet
    reset = resets.reset_for(short, 8)
    assert reset is not None
    assert len(reset) == len(short) - 1 and reset[0] & 0xC0 == 0x40
    assert reset.endswith(resets.token(cid))
    big = resets.reset_for(b"\x40" + cid + bytes(1400), 8)
    assert big is not None and len(big) == 43
    assert resets.reset_for(b"\x40" + cid + bytes(12), 8) is None  # 21 bytes: no room
    assert resets.reset_for(b"\xc0" + cid + bytes(40), 8) is None  # a long header
    sent = [resets.reset_for(short, 8) for _ in range(20)]
    assert sum(r is not None for r in sent) == 10 - 2  # 2 went out above
    assert resets.limited == 12 and resets.sent == 10
    clock[0] += 0.5
    assert sum(resets.reset_for(short, 8) is not None for _ in range(20)) == 5
    with pytest.raises(ValueError, match="32 bytes"):
        StatelessResets(b"short")
    with pytest.raises(ValueError, match="rate"):
        StatelessResets(rate=0)


@pytest.mark.asyncio
async def test_the_welcome_asks_a_large_fleet_for_longer_heartbeats(
    start_server: StartServer, start_connector: StartConnector
) -> None:
    """A server expecting more agents than its heartbeat budget covers asks each for a
    longer interval in its WELCOME, and the agent keeps to it (issue 13: idle CPU with
    2,000 agents is their heartbeats)."""
    expected = [4]
    server = await start_server(
        idle_timeout=30.0, heartbeats_per_second=1.0, fleet_size=lambda: expected[0]
    )
    assert server.heartbeat_interval() == 4.0
    agent = start_connector(server, MemoryCredentials(token="join-secret"), heartbeat_interval=0.2)
    assert await agent.wait_connected(5)
    connection = agent._connection
    assert connection is not None
    assert connection.heartbeat_interval == 4.0
    await asyncio.sleep(1.0)  # its own 0.2 s would have sent about five by now
    assert connection._ping_uid == 0
    assert connection.lost_reason is None
    # Never longer than a quarter of the idle timeout; a broken estimate is not fatal.
    expected[0] = 100_000
    assert server.heartbeat_interval() == 7.5

    def broken() -> int:
        raise RuntimeError("database gone")

    server._fleet_size = broken
    assert server.heartbeat_interval() == 1.0  # the one agent connected, at 1 a second


@pytest.mark.parametrize(
    ("asked", "kept"),
    [
        (None, 5.0),
        (0.0, 5.0),
        (3.0, 5.0),  # never shorter than the agent's own
        (6.5, 6.5),
        (100.0, 7.5),  # at most a quarter of the idle timeout
        (float("nan"), 5.0),
        (float("inf"), 5.0),
        (-7.0, 5.0),
        (True, 5.0),
        ("60", 5.0),
        ([9], 5.0),
    ],
)
def test_the_agent_takes_a_servers_heartbeat_interval_only_within_bounds(
    asked: object, kept: float
) -> None:
    assert transport_client.heartbeat_interval(asked, 5.0, 30.0) == kept


class SilenceRelay:
    """A UDP relay on loopback between agents and a server that can go silent, as a dropped
    network does: while ``silent``, datagrams in both directions are dropped and counted."""

    def __init__(self) -> None:
        self.silent = False
        self.dropped = 0
        self.port = 0
        self._agent: tuple[str, int] | None = None
        self._front: asyncio.DatagramTransport | None = None  # agents talk to this
        self._back: asyncio.DatagramTransport | None = None  # connected to the server

    async def start(self, server_port: int) -> None:
        relay = self
        loop = asyncio.get_running_loop()

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                relay._agent = addr  # a reconnecting agent comes from a new port
                relay._pass(data, relay._back, None)

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                relay._pass(data, relay._front, relay._agent)

        self._front, _ = await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", 0))
        self._back, _ = await loop.create_datagram_endpoint(
            Back, remote_addr=("127.0.0.1", server_port)
        )
        self.port = int(self._front.get_extra_info("sockname")[1])

    def _pass(
        self, data: bytes, out: asyncio.DatagramTransport | None, addr: tuple[str, int] | None
    ) -> None:
        if self.silent:
            self.dropped += 1
        elif out is not None:
            out.sendto(data, addr)

    def close(self) -> None:
        for transport in (self._front, self._back):
            if transport is not None:
                transport.close()


@pytest.mark.asyncio
async def test_silent_server_is_detected_by_heartbeat_and_the_agent_reconnects(
    start_server: StartServer, start_connector: StartConnector, recorder: Recorder
) -> None:
    server = await start_server()
    relay = SilenceRelay()
    await relay.start(server.port)
    try:
        agent = start_connector(server, MemoryCredentials(token="join-secret"), port=relay.port)
        assert await agent.wait_connected(5)
        # The network drops everything both ways, so no PONGs come back.
        relay.silent = True
        await eventually(lambda: not agent.connected, timeout=3)
        await eventually(lambda: "no frame from the server" in (agent.last_error or ""))
        assert relay.dropped > 0
        relay.silent = False
        assert await agent.wait_connected(8)
        await eventually(lambda: len(recorder.sessions("connect")) == 2)
        await eventually(lambda: len(recorder.sessions("disconnect")) == 1)
        assert server.session("web-1") is recorder.sessions("connect")[1]
    finally:
        relay.close()


@pytest.mark.asyncio
async def test_second_connection_for_a_client_replaces_the_first(
    start_server: StartServer, certs: ServerCerts, authority: MemoryAuthority, recorder: Recorder
) -> None:
    server = await start_server()
    authority.keys["web-1"] = key = secrets.token_bytes(32)
    async with raw_client(server, certs) as old, raw_client(server, certs) as new:
        assert (await old.authenticate("web-1", key)).kind is Kind.WELCOME
        await eventually(lambda: len(recorder.sessions("connect")) == 1)
        assert (await new.authenticate("web-1", key)).kind is Kind.WELCOME
        await eventually(lambda: old.terminated is not None)
        await eventually(lambda: len(recorder.sessions("connect")) == 2)
        first, second = recorder.sessions("connect")
        assert first.closed and not second.closed
        assert server.session("web-1") is second
        assert [(what, s) for what, s, _ in recorder.log] == [
            ("connect", first),
            ("disconnect", first),
            ("connect", second),
        ]
        assert old.terminated is not None
        assert "replaced by a newer connection" in old.terminated.reason_phrase
        assert server.stats.disconnects == {"replaced": 1} and server.stats.connects == 2
    await eventually(lambda: recorder.sessions("disconnect") == [first, second])


@pytest.mark.asyncio
async def test_idle_agent_is_disconnected_exactly_once(
    start_server: StartServer, certs: ServerCerts, authority: MemoryAuthority, recorder: Recorder
) -> None:
    server = await start_server(idle_timeout=0.5)
    authority.keys["quiet"] = key = secrets.token_bytes(32)
    async with raw_client(server, certs) as raw:
        assert (await raw.authenticate("quiet", key)).kind is Kind.WELCOME
        await eventually(lambda: len(recorder.sessions("disconnect")) == 1, timeout=4)
        assert server.session("quiet") is None
        assert server.stats.disconnects == {"idle_timeout": 1}
        await asyncio.sleep(0.3)
    assert len(recorder.sessions("disconnect")) == 1
    assert len(recorder.sessions("connect")) == 1


@pytest.mark.asyncio
async def test_an_ended_connection_leaves_no_entry_in_the_endpoint_table(
    start_server: StartServer, certs: ServerCerts, authority: MemoryAuthority, recorder: Recorder
) -> None:
    """The endpoint forgets an ended connection by its own connection ids (aioquic scans
    every connection's), and forgets all of them: nothing of a gone agent is left."""
    server = await start_server()
    endpoint = server._endpoint
    assert endpoint is not None
    table = endpoint._protocols
    assert isinstance(table, transport_server._ConnectionTable)
    keys = {f"agent-{i}": secrets.token_bytes(32) for i in range(4)}
    authority.keys.update(keys)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(raw_client(server, certs)) for _ in keys]
        for raw, (name, key) in zip(clients, keys.items(), strict=True):
            assert (await raw.authenticate(name, key)).kind is Kind.WELCOME
        await eventually(lambda: len(recorder.sessions("connect")) == 4)
        protocols = set(table.values())
        assert len(protocols) == 4
        # Each connection is known by several ids (the client's first and those issued).
        assert len(table) > 4
        assert all(set(table._ids[p]) == {c for c, q in table.items() if q is p} for p in protocols)
        first = clients[0]
        first.close()
        await eventually(lambda: len(set(table.values())) == 3, timeout=5)
        assert len(table._ids) == 3
    await eventually(lambda: len(table) == 0, timeout=5)
    assert table._ids == {}


@pytest.mark.asyncio
async def test_server_close_disconnects_every_session_once(
    start_server: StartServer, certs: ServerCerts, authority: MemoryAuthority, recorder: Recorder
) -> None:
    server = await start_server()
    keys = {name: secrets.token_bytes(32) for name in ("a", "b")}
    authority.keys.update(keys)
    async with raw_client(server, certs) as a, raw_client(server, certs) as b:
        for client, name in ((a, "a"), (b, "b")):
            assert (await client.authenticate(name, keys[name])).kind is Kind.WELCOME
        await eventually(lambda: len(recorder.sessions("connect")) == 2)
        await asyncio.wait_for(server.close(), 5)
        assert sorted(s.client_id for s in recorder.sessions("disconnect")) == ["a", "b"]
        assert server.stats.disconnects == {"server": 2}
        await eventually(lambda: a.terminated is not None and b.terminated is not None)
        await asyncio.wait_for(server.close(), 5)  # a second close is harmless
    assert len(recorder.sessions("disconnect")) == 2
    assert dict(server.sessions) == {}


# --------------------------------------------------------------------------- files on disk


def test_server_certs_are_created_private_and_reused(tmp_path: Path) -> None:
    certs = ensure_server_certs(tmp_path / "state")
    for path in (certs.ca_key, certs.cert, certs.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.ca_cert.stat().st_mode) in (0o600, 0o644)
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == ca.subject

    before = {path: path.read_bytes() for path in (certs.ca_cert, certs.ca_key, certs.cert)}
    again = ensure_server_certs(tmp_path / "state")
    assert again == certs
    assert {path: path.read_bytes() for path in before} == before


def test_new_hostname_reissues_the_server_cert_under_the_same_ca(tmp_path: Path) -> None:
    certs = ensure_server_certs(tmp_path)
    ca_before = certs.ca_cert.read_bytes()
    cert_before = certs.cert.read_bytes()
    ensure_server_certs(tmp_path, hostnames=["deploy.example.org", "10.0.0.5"])
    assert certs.ca_cert.read_bytes() == ca_before
    assert certs.cert.read_bytes() != cert_before
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["deploy.example.org"]


def test_missing_ca_key_is_explained(tmp_path: Path) -> None:
    certs = ensure_server_certs(tmp_path)
    certs.ca_key.unlink()
    certs.cert.unlink()
    with pytest.raises(ValueError, match=r"ca\.key is missing"):
        ensure_server_certs(tmp_path)


def test_file_credentials(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    credentials = FileCredentials(tmp_path / "agent", token_file)
    assert credentials.load_key() is None
    assert credentials.join_token() is None
    token_file.write_text("\n")
    assert credentials.join_token() is None
    token_file.write_text(" abc \n")
    assert credentials.join_token() == "abc"
    credentials.save_key(b"\x01\x02")
    assert credentials.load_key() == b"\x01\x02"
    assert stat.S_IMODE(credentials.key_file.stat().st_mode) == 0o600
    assert list((tmp_path / "agent").iterdir()) == [credentials.key_file]  # no temp files left
    credentials.key_file.write_text("not hex")
    with pytest.raises(ValueError, match="does not hold a hex agent key"):
        credentials.load_key()


def test_connector_rejects_a_bad_client_id(certs: ServerCerts) -> None:
    async def ignore(env: Envelope) -> None:
        return None

    with pytest.raises(ValueError, match="client_id must match"):
        AgentConnector(
            host="127.0.0.1",
            port=1,
            ca_file=certs.ca_cert,
            client_id="bad id",
            credentials=MemoryCredentials(),
            capabilities=dict,
            on_message=ignore,
        )
