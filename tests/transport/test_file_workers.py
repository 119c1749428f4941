"""File workers (issue 13 §4): artifact file streams served by child processes of the server,
over real QUIC on 127.0.0.1, with tickets from the control connection."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from deploy_core.agent.artifacts import ArtifactError, ArtifactFetcher
from deploy_core.server.artifacts import ArtifactStore
from deploy_core.testing import MemoryCredentials, connector_for
from deploy_core.transport import (
    AgentConnector,
    AgentCredential,
    AuthError,
    QuicServer,
    ServerCerts,
    ensure_server_certs,
)
from deploy_core.transport.client import FileWorkerLink
from deploy_core.transport.file_workers import FileWorkerPool, TicketSigner
from deploy_core.transport.files import FileRefused, FileRequest, TransferInterrupted

CHUNK = 64 << 10
CLIENT = "agent-1"
OTHER = "agent-2"


class MemoryAuthority:
    """Enrolls any key with the one join token."""

    def __init__(self) -> None:
        self.public_keys: dict[str, bytes] = {}

    async def credential(self, client_id: str) -> AgentCredential | None:
        key = self.public_keys.get(client_id)
        return None if key is None else AgentCredential(public_key=key)

    async def enroll(self, client_id: str, join_token: str, public_key: bytes) -> None:
        if join_token != "join-secret":
            raise AuthError("join token rejected")
        self.public_keys[client_id] = public_key

    async def upgrade(self, client_id: str, public_key: bytes) -> None:
        self.public_keys[client_id] = public_key


@dataclass
class Rig:
    server: QuicServer
    pool: FileWorkerPool
    store: ArtifactStore
    connector: AgentConnector
    fetcher: ArtifactFetcher
    cache: Path
    # Which client may fetch which artifacts (the server's may_fetch).
    allowed: dict[str, set[str]]

    async def put(self, data: bytes, client_id: str = CLIENT) -> str:
        async def body() -> AsyncIterator[bytes]:
            yield data

        info, _ = await self.store.receive(body())
        self.allowed.setdefault(client_id, set()).add(info.sha256)
        return info.sha256

    async def link(self, index: int = 0) -> FileWorkerLink:
        return await self.connector.open_file_worker(self.connector.file_workers[index])


async def eventually(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def certs(tmp_path: Path) -> ServerCerts:
    return ensure_server_certs(tmp_path / "server")


@pytest_asyncio.fixture
async def rig(tmp_path: Path, certs: ServerCerts) -> AsyncIterator[Rig]:
    async def nothing(*args: Any) -> None:
        return None

    allowed: dict[str, set[str]] = {}

    async def may_fetch(client_id: str, sha256: str) -> bool:
        return sha256 in allowed.get(client_id, set())

    store = ArtifactStore(tmp_path / "artifacts")
    server = QuicServer(
        host="127.0.0.1",
        port=0,
        certs=certs,
        authority=MemoryAuthority(),
        on_connect=nothing,
        on_message=nothing,
        on_disconnect=nothing,
        idle_timeout=10.0,
        files=store,
        may_fetch=may_fetch,
        file_workers=2,
        artifact_root=store.root,
    )
    await server.start()
    assert server.file_workers is not None
    connector = connector_for(server.port, certs.ca_cert, CLIENT)
    task = asyncio.create_task(connector.run())
    try:
        assert await connector.wait_connected(10)
        cache = tmp_path / "cache"
        fetcher = ArtifactFetcher(connector, cache, chunk_size=CHUNK, stall_timeout=10.0)
        yield Rig(server, server.file_workers, store, connector, fetcher, cache, allowed)
    finally:
        await asyncio.wait_for(connector.stop(), 10)
        await asyncio.wait_for(task, 10)
        await asyncio.wait_for(server.close(), 20)


async def ask(link: FileWorkerLink, request: FileRequest) -> FileRefused | int:
    """Send ``request`` to a worker: its refusal, or the size its header announced."""
    incoming = link.files.request(request)
    try:
        header = await incoming.header(timeout=10)
        return header.size
    except FileRefused as exc:
        return exc
    finally:
        incoming.close()


# --------------------------------------------------------------------------- transfers


async def test_the_welcome_lists_the_workers_and_a_fetch_goes_through_one(rig: Rig) -> None:
    assert [port for _, port in rig.connector.file_workers] == rig.pool.ports
    assert len(rig.pool.ports) == 2 and rig.server.port not in rig.pool.ports
    data = os.urandom(3 * (1 << 20) + 4321)
    sha = await rig.put(data)

    fetched = await asyncio.wait_for(rig.fetcher.fetch(sha), 60)

    assert fetched.path.read_bytes() == data
    assert fetched.bytes_transferred == len(data) and fetched.interruptions == 0
    # Not one artifact byte went over the control connection.
    assert rig.server.artifact_bytes_sent() == 0


async def test_a_missing_artifact_is_still_refused_with_the_control_connections_reason(
    rig: Rig,
) -> None:
    with pytest.raises(ArtifactError, match="not part of any deployment"):
        await asyncio.wait_for(rig.fetcher.fetch("ab" * 32), 30)


async def test_workers_killed_mid_transfer_the_fetch_resumes_elsewhere(rig: Rig) -> None:
    data = os.urandom(12 * (1 << 20))
    sha = await rig.put(data)
    killed: list[int] = []

    def progress(done: int, total: int) -> None:
        if not killed and done >= total // 3:
            for pid in rig.pool.pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    fetched = await asyncio.wait_for(rig.fetcher.fetch(sha, progress=progress), 120)

    assert len(killed) == 2
    assert fetched.path.read_bytes() == data
    assert fetched.interruptions >= 1
    # What arrived before the kill was kept: at most the worker's window sent twice.
    assert fetched.bytes_transferred - len(data) <= 4 << 20
    # The workers come back, on the same ports.
    ports = list(rig.pool.ports)
    await eventually(lambda: rig.pool.restarts >= 2 and len(rig.pool.pids) == 2)
    assert rig.pool.ports == ports and not set(killed) & set(rig.pool.pids)
    # And serve again.
    again = await rig.put(os.urandom(1 << 20))
    assert (await asyncio.wait_for(rig.fetcher.fetch(again), 60)).size == 1 << 20


async def test_one_worker_down_the_fetch_uses_the_other_or_the_control_connection(
    rig: Rig,
) -> None:
    data = os.urandom(2 * (1 << 20))
    sha = await rig.put(data)
    # Both down: the fetch falls back to the control connection.
    for pid in rig.pool.pids:
        os.kill(pid, signal.SIGKILL)
    await eventually(lambda: not rig.pool.pids, 10)

    fetched = await asyncio.wait_for(rig.fetcher.fetch(sha), 60)

    assert fetched.path.read_bytes() == data
    assert rig.server.artifact_bytes_sent() == len(data)


# --------------------------------------------------------------------------- hostile


async def test_a_ticket_is_given_only_for_the_clients_own_artifacts(rig: Rig) -> None:
    mine = await rig.put(os.urandom(100_000))
    theirs = await rig.put(os.urandom(100_000), client_id=OTHER)
    control = rig.connector.files
    assert control is not None

    grant = await control.ticket(mine, timeout=10)
    assert grant.expires_in > 0
    with pytest.raises(FileRefused) as refused:
        await control.ticket(theirs, timeout=10)
    assert refused.value.code == "not_found"


async def test_a_worker_refuses_requests_without_a_good_ticket(rig: Rig) -> None:
    mine = await rig.put(os.urandom(200_000))
    theirs = await rig.put(os.urandom(200_000), client_id=OTHER)
    control = rig.connector.files
    assert control is not None
    ticket = (await control.ticket(mine, timeout=10)).ticket
    link = await rig.link()
    try:
        # The real ticket works.
        assert await ask(link, FileRequest(sha256=mine, ticket=ticket)) == 200_000

        def refusal(answer: FileRefused | int) -> str:
            assert isinstance(answer, FileRefused), answer
            return f"{answer.code}: {answer}"

        assert "forbidden: a file worker serves only requests with a ticket" in refusal(
            await ask(link, FileRequest(sha256=mine))
        )
        # Another client's artifact with my ticket.
        assert "does not name artifact" in refusal(
            await ask(link, FileRequest(sha256=theirs, ticket=ticket))
        )
        # Signed with another secret.
        forged = TicketSigner(os.urandom(32)).issue(CLIENT, [theirs])
        assert "signature does not verify" in refusal(
            await ask(link, FileRequest(sha256=theirs, ticket=forged))
        )
        # My ticket with its body changed to name their artifact.
        mac = ticket.split(".")[1]
        other_body = TicketSigner(os.urandom(32)).issue(CLIENT, [theirs]).split(".")[0]
        assert "signature does not verify" in refusal(
            await ask(link, FileRequest(sha256=theirs, ticket=f"{other_body}.{mac}"))
        )
        assert "malformed" in refusal(
            await ask(link, FileRequest(sha256=mine, ticket="not a ticket"))
        )
        # Expired: the pool's own signer, an hour ago.
        old = rig.pool.signer.issue(CLIENT, [mine], now=time.time() - 3600)
        assert "expired" in refusal(await ask(link, FileRequest(sha256=mine, ticket=old)))
        # Path tricks never reach the store: the request's hash must be 64 hex digits.
        for trick in ("../../../../etc/passwd", "/etc/passwd", "..", mine[:2] + "/../" + mine):
            sneaky = FileRequest.model_construct(
                sha256=trick, offset=0, chunk_size=CHUNK, ticket=ticket
            )
            assert refusal(await ask(link, sneaky)).startswith("bad_request")
        # A good ticket for a hash the store lacks.
        missing = "cd" * 32
        good = rig.pool.signer.issue(CLIENT, [missing])
        assert refusal(await ask(link, FileRequest(sha256=missing, ticket=good))).startswith(
            "not_found"
        )
        # Another client's ticket on this connection, which carries my transfers.
        theirs_ticket = rig.pool.signer.issue(OTHER, [theirs])
        assert "another client's" in refusal(
            await ask(link, FileRequest(sha256=theirs, ticket=theirs_ticket))
        )
        # The connection still serves the good ticket after all that.
        assert await ask(link, FileRequest(sha256=mine, ticket=ticket)) == 200_000
    finally:
        await link.close()


async def test_a_worker_is_reached_only_with_the_servers_certificate(
    rig: Rig, tmp_path: Path
) -> None:
    other_ca = ensure_server_certs(tmp_path / "elsewhere").ca_cert

    async def nothing(*args: Any) -> None:
        return None

    stranger = AgentConnector(
        host="127.0.0.1",
        port=rig.server.port,
        ca_file=other_ca,
        client_id=CLIENT,
        credentials=MemoryCredentials(token="join-secret"),
        capabilities=dict,
        on_message=nothing,
        connect_timeout=3.0,
    )
    with pytest.raises((ConnectionError, OSError)):
        await stranger.open_file_worker(("127.0.0.1", rig.pool.ports[0]))


# --------------------------------------------------------------------------- life cycle


async def test_a_lost_worker_connection_fails_its_transfers_at_once(rig: Rig) -> None:
    data = os.urandom(8 * (1 << 20))
    sha = await rig.put(data)
    control = rig.connector.files
    assert control is not None
    ticket = (await control.ticket(sha, timeout=10)).ticket
    link = await rig.link()
    try:
        incoming = link.files.request(FileRequest(sha256=sha, chunk_size=CHUNK, ticket=ticket))
        await incoming.header(timeout=10)
        await incoming.read(timeout=10)
        for pid in rig.pool.pids:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(TransferInterrupted):
            while await incoming.read(timeout=30):
                pass  # no credit: the worker stops at its window, then dies
        incoming.close()
    finally:
        await link.close()


def test_workers_die_with_a_killed_server(tmp_path: Path) -> None:
    certs = ensure_server_certs(tmp_path / "server")
    store = tmp_path / "artifacts"
    (store / "sha256").mkdir(parents=True)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from deploy_core.transport.file_workers import FileWorkerPool

        async def main():
            pool = FileWorkerPool(
                2, host="127.0.0.1", cert=Path({str(certs.cert)!r}),
                key=Path({str(certs.key)!r}), store=Path({str(store)!r}),
            )
            await pool.start()
            print(" ".join(map(str, pool.pids)), flush=True)
            await asyncio.sleep(120)

        asyncio.run(main())
        """
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        pids = [int(pid) for pid in server.stdout.readline().split()]
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)  # alive
        server.kill()
        server.wait(10)
        deadline = time.monotonic() + 15
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [pid for pid in pids if _alive(pid)]
        assert not alive, f"file workers {alive} outlived their killed server"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by init) is dead too.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_close_stops_the_workers(tmp_path: Path, certs: ServerCerts) -> None:
    store = tmp_path / "artifacts"
    (store / "sha256").mkdir(parents=True)
    pool = FileWorkerPool(2, host="127.0.0.1", cert=certs.cert, key=certs.key, store=store)
    await pool.start()
    pids = pool.pids
    assert len(pids) == 2
    await asyncio.wait_for(pool.close(), 20)
    assert not pool.pids
    assert not [pid for pid in pids if _alive(pid)]


async def test_a_worker_whose_port_is_taken_takes_another(
    tmp_path: Path, certs: ServerCerts
) -> None:
    store = tmp_path / "artifacts"
    (store / "sha256").mkdir(parents=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        pool = FileWorkerPool(
            1, host="127.0.0.1", cert=certs.cert, key=certs.key, store=store, ports=[port]
        )
        await pool.start()
        try:
            assert len(pool.ports) == 1 and pool.ports[0] != port
        finally:
            await asyncio.wait_for(pool.close(), 20)
