"""Enrollment with the agent's own key pair (issue 13 §1), over real QUIC on 127.0.0.1 with
a real :class:`~deploy_core.server.app.DeployServer` (SQLite) and real agents' connectors.

A lost WELCOME is made by a UDP relay between agent and server that starts dropping the
server's datagrams the moment the enrollment (or upgrade) has committed in the database.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from udp_relay import UdpRelay

from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.enrollment import AgentRegistry
from deploy_core.transport import AgentConnector, AuthError, Envelope, FileCredentials
from deploy_core.transport.identity import public_bytes

CLIENT = "web-1"


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DeployServer]:
    server = DeployServer(ServerConfig(state_dir=tmp_path / "server", api_port=0, quic_port=0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def relay(server: DeployServer) -> Iterator[UdpRelay]:
    relay = UdpRelay(server.transport.port).start()
    try:
        yield relay
    finally:
        relay.close()


class Agents:
    """Starts agents' connectors against the server (directly or through a port) and
    stops them all at the end."""

    def __init__(self, server: DeployServer) -> None:
        self.server = server
        self.running: list[tuple[AgentConnector, asyncio.Task[None]]] = []

    def start(self, credentials: FileCredentials, *, port: int | None = None) -> AgentConnector:
        async def ignore(env: Envelope) -> None:
            return None

        connector = AgentConnector(
            host="127.0.0.1",
            port=port or self.server.transport.port,
            ca_file=self.server.state.certs.ca_cert,
            client_id=CLIENT,
            credentials=credentials,
            capabilities=dict,
            on_message=ignore,
            heartbeat_interval=0.5,
            backoff_initial=0.05,
            backoff_max=0.3,
            connect_timeout=1.0,
        )
        self.running.append((connector, asyncio.create_task(connector.run())))
        return connector

    async def stop(self) -> None:
        for connector, task in self.running:
            await asyncio.wait_for(connector.stop(), 10)
            assert task.done()
        self.running.clear()


@pytest_asyncio.fixture
async def agents(server: DeployServer) -> AsyncIterator[Agents]:
    agents = Agents(server)
    try:
        yield agents
    finally:
        await agents.stop()


def join_token(server: DeployServer, path: Path, uses: int = 1) -> tuple[str, Path]:
    """A join token of ``uses`` uses, written to ``path``; its id and the file."""
    token_id, token, _ = server.tokens.create_join_token(uses=uses)
    path.write_text(token + "\n")
    return token_id, path


def uses_left(server: DeployServer, token_id: str) -> int | None:
    (row,) = [t for t in server.tokens.list_join_tokens() if t.token_id == token_id]
    return row.uses_left


def identity_public_hex(state: Path) -> str:
    key = serialization.load_pem_private_key(
        (state / "agent-identity.pem").read_bytes(), password=None
    )
    assert isinstance(key, Ed25519PrivateKey)
    return public_bytes(key).hex()


def row(server: DeployServer) -> dict[str, Any]:
    """The client's row as SQLite has it, read with sqlite3 from the database file."""
    with sqlite3.connect(server.state.database_file) as conn:
        conn.row_factory = sqlite3.Row
        (found,) = conn.execute("SELECT * FROM clients WHERE client_id = ?", (CLIENT,))
        return dict(found)


def lose_replies_after(
    relay: UdpRelay, target: Any, name: str, seconds: float = 2.5
) -> list[tuple[Any, ...]]:
    """Wrap ``target.name`` (a blocking records call): once it has committed, the relay drops
    every datagram to the agent for ``seconds``, so the WELCOME that follows is lost. The
    calls made are returned (a list, filled as they happen)."""
    real = getattr(target, name)
    calls: list[tuple[Any, ...]] = []

    def committed_then_cut(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls.append(args)
        if len(calls) == 1:
            relay.blackhole(seconds, direction="to_client")
        return result

    setattr(target, name, committed_then_cut)
    return calls


# --------------------------------------------------------------------------- a lost reply


@pytest.mark.asyncio
async def test_enrollment_whose_welcome_is_lost_gets_in_on_retry_with_one_token_use(
    tmp_path: Path,
    server: DeployServer,
    relay: UdpRelay,
    agents: Agents,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="deploy_core.server.enrollment")
    token_id, token_file = join_token(server, tmp_path / "join.token", uses=1)
    enrollments = lose_replies_after(relay, server.records, "enroll")
    state = tmp_path / "agent"

    agent = agents.start(FileCredentials(state, token_file), port=relay.port)
    await eventually(lambda: relay.dropped > 0)  # the WELCOME was dropped...
    assert not agent.connected
    assert await agent.wait_connected(30)  # ... and the agent got in all the same

    assert len(enrollments) == 1
    assert uses_left(server, token_id) == 0  # one use, though the token is now used up
    assert "enrolled again with its key; no join-token use spent" in caplog.text
    enrolled = row(server)
    assert enrolled["public_key"] == identity_public_hex(state)  # the same key every try
    assert enrolled["agent_key"] is None
    assert server.transport.session(CLIENT) is not None


@pytest.mark.asyncio
async def test_upgrade_whose_welcome_is_lost_still_gets_in(
    tmp_path: Path, server: DeployServer, relay: UdpRelay, agents: Agents
) -> None:
    shared = bytes(range(32))
    await server.db(server.records.enroll, CLIENT, shared.hex())
    state = tmp_path / "agent"
    FileCredentials(state).save_key(shared)
    upgrades = lose_replies_after(relay, server.records, "set_public_key")

    agent = agents.start(FileCredentials(state), port=relay.port)
    await eventually(lambda: relay.dropped > 0)
    assert await agent.wait_connected(30)

    assert len(upgrades) == 1
    # The server forgot the shared key when it took the public key; the agent proved the
    # key pair on its retry, and learned then that the shared key is no longer needed.
    assert row(server)["agent_key"] is None
    assert row(server)["public_key"] == identity_public_hex(state)
    await eventually(lambda: not (state / "agent.key").exists())


@pytest.mark.asyncio
async def test_concurrent_tries_with_one_key_enroll_once_and_spend_one_use(
    tmp_path: Path, db_url: str
) -> None:
    # An agent that gave up on a slow server and tried again while the first try was still
    # being served: both tries reach the database (SQLite and PostgreSQL).
    config = ServerConfig(state_dir=tmp_path / "server", api_port=0, quic_port=0, db_url=db_url)
    server = DeployServer(config)
    await server.start()
    try:
        token_id, token_file = join_token(server, tmp_path / "join.token", uses=1)
        token = token_file.read_text().strip()
        registry = AgentRegistry(server.records, server.tokens, server.db)
        key = public_bytes(Ed25519PrivateKey.generate())

        results = await asyncio.gather(
            *(registry.enroll(CLIENT, token, key) for _ in range(6)), return_exceptions=True
        )
        assert results == [None] * 6
        assert uses_left(server, token_id) == 0
        held = server.records.client_credentials(CLIENT)
        assert held is not None and held.public_key == key.hex()
        with pytest.raises(AuthError, match="already enrolled with another key"):
            await registry.enroll(CLIENT, token, public_bytes(Ed25519PrivateKey.generate()))
    finally:
        await server.stop()


# --------------------------------------------------------------------------- other keys


@pytest.mark.asyncio
async def test_another_key_for_an_enrolled_id_is_refused_and_spends_nothing(
    tmp_path: Path, server: DeployServer, agents: Agents
) -> None:
    _, first_file = join_token(server, tmp_path / "first.token")
    first = agents.start(FileCredentials(tmp_path / "first", first_file))
    assert await first.wait_connected(20)
    await agents.stop()

    second_id, second_file = join_token(server, tmp_path / "second.token")
    impostor = agents.start(FileCredentials(tmp_path / "impostor", second_file))
    await eventually(lambda: impostor.last_error is not None)
    assert f"client id {CLIENT} is already enrolled with another key" in str(impostor.last_error)
    assert "deployctl clients forget" in str(impostor.last_error)
    assert not impostor.connected
    assert uses_left(server, second_id) == 1
    assert row(server)["public_key"] == identity_public_hex(tmp_path / "first")

    # After 'deployctl clients forget' the same id enrolls with the new key.
    assert await server.db(server.records.forget_client, CLIENT)
    assert await impostor.wait_connected(20)
    assert row(server)["public_key"] == identity_public_hex(tmp_path / "impostor")
    assert uses_left(server, second_id) == 0


@pytest.mark.asyncio
async def test_enrolled_agent_signs_in_with_its_key_alone(
    tmp_path: Path, server: DeployServer, agents: Agents
) -> None:
    token_id, token_file = join_token(server, tmp_path / "join.token")
    state = tmp_path / "agent"
    assert await agents.start(FileCredentials(state, token_file)).wait_connected(20)
    await agents.stop()
    token_file.unlink()
    await server.db(server.tokens.revoke_join_token, token_id)

    again = agents.start(FileCredentials(state))  # no token at all: a signature only
    assert await again.wait_connected(20)


# --------------------------------------------------------------------------- migration


@pytest.mark.asyncio
async def test_agent_with_a_shared_key_upgrades_and_the_server_forgets_the_secret(
    tmp_path: Path, server: DeployServer, agents: Agents
) -> None:
    shared = bytes(range(100, 132))
    await server.db(server.records.enroll, CLIENT, shared.hex())
    state = tmp_path / "agent"
    FileCredentials(state).save_key(shared)
    assert row(server)["agent_key"] == shared.hex()

    agent = agents.start(FileCredentials(state))  # no join token: no re-enrollment
    assert await agent.wait_connected(20)
    await eventually(lambda: not (state / "agent.key").exists())
    upgraded = row(server)
    assert upgraded["agent_key"] is None
    assert upgraded["public_key"] == identity_public_hex(state)
    assert upgraded["enrolled_at"] is not None
    await agents.stop()

    # The shared key is worthless now: it no longer authenticates anyone.
    FileCredentials(tmp_path / "thief").save_key(shared)
    thief = agents.start(FileCredentials(tmp_path / "thief"))
    await eventually(lambda: thief.last_error is not None)
    assert "unknown client or wrong agent key" in str(thief.last_error)
    await agents.stop()
    # ... while the agent's key pair does.
    assert await agents.start(FileCredentials(state)).wait_connected(20)


@pytest.mark.asyncio
async def test_database_holds_no_private_key_or_shared_secret_of_a_new_agent(
    tmp_path: Path, server: DeployServer, agents: Agents
) -> None:
    _, token_file = join_token(server, tmp_path / "join.token")
    state = tmp_path / "agent"
    assert await agents.start(FileCredentials(state, token_file)).wait_connected(20)
    await agents.stop()
    key = serialization.load_pem_private_key(
        (state / "agent-identity.pem").read_bytes(), password=None
    )
    assert isinstance(key, Ed25519PrivateKey)
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    database = server.state.database_file
    with sqlite3.connect(database) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = b"".join(
        path.read_bytes()
        for path in database.parent.iterdir()
        if path.name.startswith(database.name)
    )
    assert public_bytes(key).hex().encode() in raw  # what is there, is found
    for secret in (seed, seed.hex().encode(), seed.hex().upper().encode()):
        assert secret not in raw
    assert row(server)["agent_key"] is None


def test_identity_file_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    credentials = FileCredentials(tmp_path / "agent")
    assert credentials.load_identity() is None
    made = credentials.create_identity()
    loaded = credentials.load_identity()
    assert loaded is not None and public_bytes(loaded) == public_bytes(made)
    assert stat.S_IMODE(credentials.identity_file.stat().st_mode) == 0o600
    assert list((tmp_path / "agent").iterdir()) == [credentials.identity_file]
    credentials.identity_file.write_text("not a key")
    with pytest.raises(ValueError, match="does not hold an Ed25519 private key"):
        credentials.load_identity()
