"""Admission under storms over real QUIC on 127.0.0.1: a bounded number of handshakes at
once, the excess refused before TLS with a retry-after hint that the agents honour."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy_core.transport import (
    AgentConnector,
    AgentCredential,
    AgentSession,
    AuthError,
    Envelope,
    QuicServer,
    ServerCerts,
    ensure_server_certs,
)
from deploy_core.transport.admission import (
    MAX_RETRY_AFTER,
    HandshakeGate,
    busy_reason,
    parse_busy_reason,
)
from deploy_core.transport.server import size_receive_buffer
from tests.conftest import missing_part

AGENTS = 10


class SlowAuthority:
    """Enrolls any key with the one join token; every lookup takes ``delay`` seconds, so
    that handshakes overlap as they do on a busy server."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.public_keys: dict[str, bytes] = {}

    async def credential(self, client_id: str) -> AgentCredential | None:
        await asyncio.sleep(self.delay)
        key = self.public_keys.get(client_id)
        return AgentCredential(public_key=key) if key is not None else None

    async def enroll(self, client_id: str, join_token: str, public_key: bytes) -> None:
        await asyncio.sleep(self.delay)
        if join_token != "join-secret":
            raise AuthError("join token rejected")
        self.public_keys.setdefault(client_id, public_key)

    async def upgrade(self, client_id: str, public_key: bytes) -> None:
        self.public_keys[client_id] = public_key


class TokenCredentials:
    """An agent with a join token and, once made, its key pair in memory."""

    def __init__(self) -> None:
        self.identity: Ed25519PrivateKey | None = None

    def load_identity(self) -> Ed25519PrivateKey | None:
        return self.identity

    def create_identity(self) -> Ed25519PrivateKey:
        self.identity = Ed25519PrivateKey.generate()
        return self.identity

    def load_key(self) -> bytes | None:
        return None

    def save_key(self, key: bytes) -> None:
        raise AssertionError("this server issues no shared keys")

    def drop_key(self) -> None:
        pass

    def join_token(self) -> str | None:
        return "join-secret"


class ClientLog(logging.Handler):
    """The connector's log records: (created, message)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.created, record.getMessage()))


@pytest.fixture
def certs(tmp_path: Path) -> ServerCerts:
    return ensure_server_certs(tmp_path / "server")


@pytest_asyncio.fixture
async def client_log() -> AsyncIterator[ClientLog]:
    handler = ClientLog()
    client_logger = logging.getLogger("deploy_core.transport.client")
    level = client_logger.level
    client_logger.setLevel(logging.DEBUG)
    client_logger.addHandler(handler)
    yield handler
    client_logger.removeHandler(handler)
    client_logger.setLevel(level)


async def _nothing(*_: object) -> None:
    return None


async def _until(predicate: object, timeout: float) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


@pytest.mark.asyncio
async def test_a_storm_is_admitted_two_at_a_time_and_the_refused_wait_the_hint(
    certs: ServerCerts, client_log: ClientLog
) -> None:
    sessions: list[AgentSession] = []

    async def on_connect(session: AgentSession) -> None:
        sessions.append(session)

    async def on_message(session: AgentSession, env: Envelope) -> None:
        return None

    server = QuicServer(
        host="127.0.0.1",
        port=0,
        certs=certs,
        authority=SlowAuthority(delay=0.1),
        on_connect=on_connect,
        on_message=on_message,
        on_disconnect=_nothing,
        max_handshakes=2,
        busy_retry_after=0.3,
    )
    await server.start()
    connectors = [
        AgentConnector(
            host="127.0.0.1",
            port=server.port,
            ca_file=certs.ca_cert,
            client_id=f"storm-{n}",
            credentials=TokenCredentials(),
            capabilities=dict,
            on_message=_nothing,
            backoff_initial=0.05,
            backoff_max=0.5,
        )
        for n in range(AGENTS)
    ]
    # What the server holds in its handshake, seen from outside the gate's own counter.
    observed: list[int] = []

    async def watch() -> None:
        while True:
            observed.append(
                sum(
                    1
                    for connection in list(server._connections)
                    if connection._session is None and not connection.shut
                )
            )
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    tasks = [asyncio.create_task(connector.run()) for connector in connectors]
    try:
        await _until(
            lambda: (
                len(server.sessions) == AGENTS
                and all(connector.connected for connector in connectors)
            ),
            timeout=120,
        )
    finally:
        watcher.cancel()
        for connector in connectors:
            await asyncio.wait_for(connector.stop(), 10)
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(server.close(), 10)

    gate = server.handshakes
    assert gate.peak == 2
    assert max(observed) <= 2
    assert gate.refused > 0
    assert sorted(session.client_id for session in sessions) == sorted(
        f"storm-{n}" for n in range(AGENTS)
    )
    # Each busy refusal an agent logged is followed by its next attempt no sooner than the
    # hint it was given.
    busy = re.compile(r"is busy; (storm-\d+) waits at least the (\d+\.\d) s asked")
    connecting = re.compile(r"connecting to \S+ as (storm-\d+)$")
    refusals = 0
    for index, (created, message) in enumerate(client_log.records):
        match = busy.search(message)
        if match is None:
            continue
        refusals += 1
        agent, hint = match.group(1), float(match.group(2))
        later = [
            at
            for at, text in client_log.records[index + 1 :]
            if (m := connecting.search(text)) is not None and m.group(1) == agent
        ]
        assert later, f"{agent} never tried again after a busy refusal"
        assert later[0] - created >= hint - 0.01  # log timestamps round to the microsecond
    assert refusals > 0
    assert sum(len(connector.busy_hints) for connector in connectors) == refusals


@pytest.mark.asyncio
async def test_a_handshake_that_times_out_gives_its_slot_back(
    certs: ServerCerts, client_log: ClientLog
) -> None:
    """A peer that opens QUIC and never says HELLO holds the only slot until the handshake
    timeout; the agent refused meanwhile gets in after it."""
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    from deploy_core.transport import ALPN_PROTOCOL

    server = QuicServer(
        host="127.0.0.1",
        port=0,
        certs=certs,
        authority=SlowAuthority(delay=0),
        on_connect=_nothing,
        on_message=_nothing,
        on_disconnect=_nothing,
        max_handshakes=1,
        busy_retry_after=0.2,
        handshake_timeout=1.0,
    )
    await server.start()
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN_PROTOCOL], cafile=str(certs.ca_cert)
    )
    connector = AgentConnector(
        host="127.0.0.1",
        port=server.port,
        ca_file=certs.ca_cert,
        client_id="late-1",
        credentials=TokenCredentials(),
        capabilities=dict,
        on_message=_nothing,
        backoff_initial=0.05,
        backoff_max=0.3,
    )
    task: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(30):
            async with connect("127.0.0.1", server.port, configuration=configuration):
                assert server.handshakes.in_progress == 1
                task = asyncio.create_task(connector.run())
                await _until(lambda: len(connector.busy_hints) > 0, timeout=10)
                assert not connector.connected
                assert await connector.wait_connected(20)
        assert server.handshakes.in_progress == 0
        assert server.session("late-1") is not None
    finally:
        await asyncio.wait_for(connector.stop(), 10)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.wait_for(server.close(), 10)


def test_the_hint_books_the_refused_one_after_another_at_the_measured_pace() -> None:
    now = [0.0]
    gate = HandshakeGate(limit=2, retry_after=0.5, clock=lambda: now[0])
    assert gate.try_enter() and gate.try_enter()
    # Nothing measured yet: 2 slots per 0.5 s, so each refusal books 0.25 s more.
    hints = []
    for _ in range(4):
        assert not gate.try_enter()
        hints.append(gate.retry_after())
    assert hints == [0.5, 0.5, 0.75, 1.0]
    # Handshakes end 10 a second: each refusal now books about 0.1 s more.
    for _ in range(10):
        now[0] += 0.1
        gate.leave()
        assert gate.try_enter()
    assert not gate.try_enter()
    assert gate.retry_after() == pytest.approx(0.5)  # the queue drained meanwhile
    for _ in range(20):
        assert not gate.try_enter()
    # 21 booked since, at the 10 ends measured over 0.9 s.
    assert gate.retry_after() == pytest.approx(21 * 0.9 / 10)
    assert gate.queued() == 21  # told to come back and not due yet
    now[0] += 21 * 0.9 / 10 / 3  # a third of the way: fewer are still to come
    assert 0 < gate.queued() < 21
    for _ in range(1000):
        gate.try_enter()
    assert gate.retry_after() == MAX_RETRY_AFTER
    assert (gate.in_progress, gate.peak) == (2, 2)
    assert gate.refused == 4 + 1 + 20 + 1000
    now[0] += 10_000
    assert gate.queued() == 0


def test_the_hint_counts_on_what_the_gate_can_take_not_on_how_few_came() -> None:
    """With handshakes holding their slot 0.1 s, 4 slots turn over 40 times a second, even
    while only 2 a second arrived (the refused waiting out long hints): the hints book turns
    at the gate's pace, so they shrink instead of staying as long as they made the arrivals
    slow (issue 13: a fleet's return after a restart)."""
    now = [0.0]
    gate = HandshakeGate(limit=4, retry_after=0.5, clock=lambda: now[0])
    for _ in range(8):  # slow arrivals: one every 0.5 s, each done in 0.1 s
        assert gate.try_enter()
        now[0] += 0.1
        gate.leave(0.1)
        now[0] += 0.4
    assert gate.pace() == pytest.approx(40.0)
    for _ in range(4):
        assert gate.try_enter()
    for _ in range(40):
        assert not gate.try_enter()
    assert gate.retry_after() == pytest.approx(40 / 40.0)  # at 40 a second, not at 2
    assert gate.queued() == 40
    gate.leave()  # a slot given back without a measure changes nothing
    assert gate.pace() == pytest.approx(40.0)


def test_busy_reasons_round_trip_and_are_capped() -> None:
    assert parse_busy_reason(busy_reason(64, 2.5)) == 2.5
    assert parse_busy_reason("server busy: 1 handshakes in progress; retry after 900 s") == (
        MAX_RETRY_AFTER
    )
    assert parse_busy_reason("server shutting down") is None
    with pytest.raises(ValueError, match="at least 1"):
        HandshakeGate(limit=0)


@pytest.mark.asyncio
async def test_a_late_copy_of_a_refused_initial_is_refused_too(certs: ServerCerts) -> None:
    """The same Initial sent again once a slot is free (a retransmission of an attempt the
    agent already gave up) gets the busy close again, not a connection nobody answers."""
    import socket
    import time

    from aioquic._buffer import Buffer
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet import QuicPacketType, pull_quic_header

    from deploy_core.transport import ALPN_PROTOCOL

    server = QuicServer(
        host="127.0.0.1",
        port=0,
        certs=certs,
        authority=SlowAuthority(delay=0),
        on_connect=_nothing,
        on_message=_nothing,
        on_disconnect=_nothing,
        max_handshakes=1,
    )
    await server.start()
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN_PROTOCOL], cafile=str(certs.ca_cert)
    )
    address = ("127.0.0.1", server.port)
    attempt = QuicConnection(configuration=configuration)
    attempt.connect(address, now=time.monotonic())
    initial = attempt.datagrams_to_send(now=time.monotonic())[0][0]
    sent = pull_quic_header(Buffer(data=initial), host_cid_length=8)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(30):
            async with connect("127.0.0.1", server.port, configuration=configuration):
                assert server.handshakes.in_progress == 1
                sock.sendto(initial, address)
                first = await loop.sock_recv(sock, 2048)
            await _until(lambda: server.handshakes.in_progress == 0, timeout=10)
            sock.sendto(initial, address)
            second = await loop.sock_recv(sock, 2048)
        assert server.handshakes.in_progress == 0
        assert server.handshakes.peak == 1
        assert server.handshakes.refused == 1
        # Both answers are the stateless close: an Initial from the id the attempt chose.
        for answer in (first, second):
            header = pull_quic_header(Buffer(data=answer), host_cid_length=8)
            assert header.packet_type == QuicPacketType.INITIAL
            assert header.source_cid == sent.destination_cid
        assert len(server._connections) == 0
    finally:
        sock.close()
        await asyncio.wait_for(server.close(), 10)


class _SocketOnly:
    """What size_receive_buffer reads of a transport: its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> socket.socket | None:
        return self.sock if name == "socket" else None


def _has_net_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 12 & 1)  # CAP_NET_ADMIN is bit 12
    return False


def test_the_servers_receive_buffer_goes_past_rmem_max_on_every_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python 3.11 has no ``socket.SO_RCVBUFFORCE``: the server still forces its receive
    buffer past ``net.core.rmem_max`` (it got 8 MiB of the 32 asked on Debian 12 before)."""
    if not sys.platform.startswith("linux") or not _has_net_admin():
        missing_part("forcing a socket buffer needs Linux and CAP_NET_ADMIN")
    monkeypatch.delattr(socket, "SO_RCVBUFFORCE", raising=False)
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        granted = size_receive_buffer(_SocketOnly(sock), rmem_max * 4)  # type: ignore[arg-type]
    # Linux reports twice what it grants; capped, it would be 2 * rmem_max.
    assert granted == 2 * rmem_max * 4


@pytest.mark.asyncio
async def test_one_loop_turn_reads_all_the_socket_holds(certs: ServerCerts) -> None:
    """Hundreds of datagrams waiting (a rollout's turn took long) are read in the one turn
    that is handed the first, not 64 a turn: 2,000 agents' heartbeats alone outran that."""
    server = QuicServer(
        host="127.0.0.1",
        port=0,
        certs=certs,
        authority=SlowAuthority(delay=0),
        on_connect=_nothing,
        on_message=_nothing,
        on_disconnect=_nothing,
    )
    await server.start()
    endpoint, server_sock = server._endpoint, server._endpoint._sock  # type: ignore[union-attr]
    assert endpoint is not None and server_sock is not None
    # Short-header datagrams for no connection: read, then dropped by aioquic.
    junk = b"\x40" + bytes(40)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        try:
            # No await from here on: asyncio's reader does not run meanwhile.
            for _ in range(500):
                sender.sendto(junk, ("127.0.0.1", server.port))
            data, addr = server_sock.recvfrom(2048)
            endpoint.datagram_received(data, addr)
            with pytest.raises(BlockingIOError):
                server_sock.recvfrom(2048)
        finally:
            await asyncio.wait_for(server.close(), 10)
