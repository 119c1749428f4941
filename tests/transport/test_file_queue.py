"""Artifacts to many agents at once: the server's bound on transfers, its queue and the
bytes it holds, over real QUIC on 127.0.0.1 (issue 13 item 4)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from deploy_core.agent.artifacts import ArtifactFetcher
from deploy_core.server.artifacts import ArtifactStore
from deploy_core.testing import connector_for
from deploy_core.transport import AgentConnector, QuicServer, ServerCerts, ensure_server_certs
from deploy_core.transport.files import (
    DEFAULT_WINDOW,
    FileRequest,
    IncomingFile,
    TransferGate,
    TransferInterrupted,
)
from tests.transport.test_files import MemoryAuthority, eventually

CHUNK = 64 << 10
BOUND = 3


async def nothing(*args: Any) -> None:
    return None


async def put(store: ArtifactStore, data: bytes) -> str:
    async def body() -> AsyncIterator[bytes]:
        yield data

    info, _ = await store.receive(body())
    return info.sha256


@pytest.fixture
def certs(tmp_path: Path) -> ServerCerts:
    return ensure_server_certs(tmp_path / "server")


@pytest_asyncio.fixture
async def server(tmp_path: Path, certs: ServerCerts) -> AsyncIterator[QuicServer]:
    server = QuicServer(
        host="127.0.0.1",
        port=0,
        certs=certs,
        authority=MemoryAuthority(),
        on_connect=nothing,
        on_message=nothing,
        on_disconnect=nothing,
        idle_timeout=20.0,
        files=ArtifactStore(tmp_path / "artifacts"),
        max_file_transfers=BOUND,
    )
    # Waiting agents hear of it often, so a short no-data watchdog can prove it stays quiet.
    server.transfers.notice_interval = 0.3
    await server.start()
    try:
        yield server
    finally:
        await asyncio.wait_for(server.close(), 20)


async def connect(
    stack: AsyncExitStack, server: QuicServer, certs: ServerCerts, client_id: str
) -> AgentConnector:
    connector: AgentConnector = connector_for(
        server.port,
        certs.ca_cert,
        client_id,
        heartbeat_interval=2.0,
        backoff_max=0.5,
        connect_timeout=10.0,
    )
    task = asyncio.create_task(connector.run())

    async def stop() -> None:
        await asyncio.wait_for(connector.stop(), 20)
        await asyncio.wait_for(task, 20)

    stack.push_async_callback(stop)
    assert await connector.wait_connected(60), f"{client_id} did not connect"
    return connector


def store_of(server: QuicServer) -> ArtifactStore:
    store = server._files
    assert isinstance(store, ArtifactStore)
    return store


async def test_thirty_agents_all_get_the_artifact_with_at_most_the_bound_sending(
    server: QuicServer, certs: ServerCerts, tmp_path: Path
) -> None:
    data = os.urandom(2 * (1 << 20) + 777)
    sha = await put(store_of(server), data)
    agents = 30
    positions: dict[int, list[int]] = {i: [] for i in range(agents)}
    async with AsyncExitStack() as stack:
        connectors = await asyncio.gather(
            *(connect(stack, server, certs, f"fleet-{i:02d}") for i in range(agents))
        )
        fetchers = [
            # A 2 s no-data watchdog: far shorter than the wait of the last in line.
            ArtifactFetcher(c, tmp_path / f"cache-{i}", chunk_size=CHUNK, stall_timeout=2.0)
            for i, c in enumerate(connectors)
        ]
        async with asyncio.timeout(300):
            fetched = await asyncio.gather(
                *(f.fetch(sha, waiting=positions[i].append) for i, f in enumerate(fetchers))
            )
    for result in fetched:
        assert result.path.read_bytes() == data
        assert result.bytes_transferred == len(data)
        assert result.interruptions == 0  # no watchdog fired, nothing was asked twice
    gate = server.transfers
    assert gate.peak == BOUND  # the bound was reached, never passed
    assert gate.admitted == agents
    assert gate.queued >= agents - BOUND - 1  # nearly everyone waited in line
    assert gate.peak_buffered <= BOUND * DEFAULT_WINDOW
    assert (gate.active, gate.waiting, gate.buffered) == (0, 0, 0)
    waited = [p for p in positions.values() if p]
    assert len(waited) >= agents // 2
    # The place in line is a small positive number that only moves forward.
    for seen in waited:
        assert all(1 <= p <= agents for p in seen)
        assert seen == sorted(seen, reverse=True)
    assert max(p[0] for p in waited) > BOUND


async def test_a_queued_fetch_outlives_its_watchdog_and_starts_when_a_slot_frees(
    server: QuicServer, certs: ServerCerts, tmp_path: Path
) -> None:
    server.transfers.limit = 1
    data = os.urandom(2 * DEFAULT_WINDOW)
    sha = await put(store_of(server), data)
    async with AsyncExitStack() as stack:
        hog = await connect(stack, server, certs, "hog")
        agent = await connect(stack, server, certs, "patient")
        hog_files = hog.files
        assert hog_files is not None
        # Takes the only slot and never credits: the server sends a window and waits.
        held = hog_files.request(FileRequest(sha256=sha, chunk_size=CHUNK))
        await held.header(timeout=10)
        await eventually(lambda: server.transfers.buffered == DEFAULT_WINDOW, 20)
        positions: list[int] = []
        fetcher = ArtifactFetcher(agent, tmp_path / "cache", chunk_size=CHUNK, stall_timeout=1.0)
        fetch = asyncio.create_task(fetcher.fetch(sha, waiting=positions.append))
        await eventually(lambda: positions == [1], 30)
        # Queued for several periods of its 1 s watchdog: it keeps waiting, not retrying.
        await asyncio.sleep(4)
        assert not fetch.done()
        assert positions == [1]  # told once; the place did not change
        assert (server.transfers.active, server.transfers.waiting) == (1, 1)
        held.close()  # the hog gives up: its slot passes to the one in line
        async with asyncio.timeout(60):
            result = await fetch
    assert result.path.read_bytes() == data
    assert result.interruptions == 0
    assert server.transfers.peak == 1
    assert server.transfers.peak_buffered <= DEFAULT_WINDOW


async def test_an_agent_opening_many_file_streams_is_capped_and_leaves_nothing_behind(
    server: QuicServer, certs: ServerCerts
) -> None:
    server.transfers.limit = 1
    data = os.urandom(3 * DEFAULT_WINDOW)
    sha = await put(store_of(server), data)
    async with AsyncExitStack() as stack:
        hostile = await connect(stack, server, certs, "hostile")
        files = hostile.files
        assert files is not None
        streams = [files.request(FileRequest(sha256=sha, chunk_size=CHUNK)) for _ in range(40)]

        def answers() -> Counter[str]:
            return Counter(
                "sending"
                if incoming._header is not None
                else incoming._refusal.code
                if incoming._refusal is not None
                else "queued"
                if incoming.queue_position is not None
                else "no answer"
                for incoming in streams
            )

        # 8 transfers per connection, sending or waiting; the rest are refused at once.
        await eventually(lambda: answers() == {"sending": 1, "queued": 7, "busy": 32}, 30)
        gate = server.transfers
        assert (gate.active, gate.waiting) == (1, 7)
        assert gate.buffered <= DEFAULT_WINDOW
        for incoming in streams:
            incoming.close()
        await eventually(lambda: (gate.active, gate.waiting, gate.buffered) == (0, 0, 0), 20)
        assert gate.peak == 1


async def test_the_gate_gives_up_places_and_slots_on_cancel() -> None:
    gate = TransferGate(1, notice_interval=0.05)
    await gate.acquire()
    heard: list[int] = []
    second = asyncio.create_task(gate.acquire(heard.append))
    third = asyncio.create_task(gate.acquire())
    await eventually(lambda: gate.waiting == 2 and heard, 5)
    assert heard[0] == 1
    second.cancel()  # leaves the line before its turn
    await asyncio.gather(second, return_exceptions=True)
    assert gate.waiting == 1
    gate.release()
    async with asyncio.timeout(5):
        await third
    assert (gate.active, gate.waiting) == (1, 0)
    # A slot granted to a waiter cancelled at the same moment passes on, not leaks.
    fourth = asyncio.create_task(gate.acquire())
    fifth = asyncio.create_task(gate.acquire())
    await eventually(lambda: gate.waiting == 2, 5)
    gate.release()
    fourth.cancel()
    await asyncio.gather(fourth, return_exceptions=True)
    async with asyncio.timeout(5):
        await fifth
    assert (gate.active, gate.waiting, gate.peak) == (1, 0, 1)
    gate.release()
    assert gate.active == 0
    with pytest.raises(ValueError, match="at least 1"):
        TransferGate(0)


async def test_an_agent_without_file_queue_starts_at_once_and_hears_no_queued_frames(
    server: QuicServer, certs: ServerCerts, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.transfers.limit = 1
    data = os.urandom(3 * DEFAULT_WINDOW)
    sha = await put(store_of(server), data)
    async with AsyncExitStack() as stack:
        new = await connect(stack, server, certs, "new-agent")
        with monkeypatch.context() as patch:
            # An agent of the previous version: its AUTH lacks "file_queue".
            patch.setattr("deploy_core.transport.client.CAPABILITY_FILE_QUEUE", "unknown")
            old = [await connect(stack, server, certs, f"old-{i}") for i in range(2)]
        assert server.session("old-0").capabilities.get("file_queue") is None  # type: ignore[union-attr]
        assert server.session("new-agent").capabilities["file_queue"] == 1  # type: ignore[union-attr]
        held = []
        for connector in old:
            files = connector.files
            assert files is not None
            held.append(files.request(FileRequest(sha256=sha, chunk_size=CHUNK)))
        # Both old agents are sent their header at once, past the bound of 1 (the old way).
        for incoming in held:
            header = await incoming.header(timeout=20)
            assert header.size == len(data) and incoming.queue_position is None
        assert server.transfers.active == 2
        # A new agent now waits in line and is told so.
        new_files = new.files
        assert new_files is not None
        waiting = new_files.request(FileRequest(sha256=sha, chunk_size=CHUNK))
        await eventually(lambda: waiting.queue_position == 1, 20)
        assert server.transfers.waiting == 1
        for incoming in [*held, waiting]:
            incoming.close()
        gate = server.transfers
        await eventually(lambda: (gate.active, gate.waiting, gate.buffered) == (0, 0, 0), 20)


async def test_one_agent_holds_at_most_half_the_slots_and_others_still_get_in(
    server: QuicServer, certs: ServerCerts
) -> None:
    server.transfers.limit = 4
    data = os.urandom(3 * DEFAULT_WINDOW)
    sha = await put(store_of(server), data)
    async with AsyncExitStack() as stack:
        greedy = await connect(stack, server, certs, "greedy")
        other = await connect(stack, server, certs, "other")
        greedy_files, other_files = greedy.files, other.files
        assert greedy_files is not None and other_files is not None
        # Never credited: each started one holds its slot.
        streams = [
            greedy_files.request(FileRequest(sha256=sha, chunk_size=CHUNK)) for _ in range(8)
        ]
        gate = server.transfers
        await eventually(lambda: (gate.active, gate.waiting) == (2, 6), 20)
        await eventually(lambda: sum(s.queue_position is not None for s in streams) == 6, 20)
        # Another agent's request starts at once, ahead of the greedy one's six in line.
        mine = other_files.request(FileRequest(sha256=sha, chunk_size=CHUNK))
        header = await mine.header(timeout=20)
        assert header.size == len(data) and mine.queue_position is None
        assert (gate.active, gate.waiting) == (3, 6)
        assert gate.buffered <= 4 * DEFAULT_WINDOW
        for incoming in [*streams, mine]:
            incoming.close()
        await eventually(lambda: (gate.active, gate.waiting, gate.buffered) == (0, 0, 0), 20)
        assert gate.peak == 3


def _framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


async def test_the_agent_reads_queued_frames_and_refuses_bad_ones() -> None:
    client: Any = object()  # the stream never credits or closes here
    incoming = IncomingFile(client, 0, CHUNK)
    heard: list[int | None] = []
    incoming.on_queued = heard.append
    # Two notices and the header in one delivery, then the bytes.
    incoming._data(
        _framed(b'{"queued": 3}')
        + _framed(b'{"queued": 2}')
        + _framed(b'{"size": 5, "offset": 0}'),
        False,
    )
    header = await incoming.header(timeout=1)
    assert (header.size, incoming.queue_position) == (5, None)
    incoming._data(b"hello", True)
    assert await incoming.read(timeout=1) == b"hello"

    for bad in (b'{"queued": 0}', b'{"queued": "x"}', b'{"queued": 1, "more": 2}'):
        broken = IncomingFile(client, 4, CHUNK)
        broken._data(_framed(bad), False)
        with pytest.raises(TransferInterrupted, match="bad header"):
            await broken.header(timeout=1)

    # Notices keep a waiting request alive past its watchdog; silence then ends it.
    waiting = IncomingFile(client, 8, CHUNK)
    waiting.on_queued = heard.append
    task = asyncio.create_task(waiting.header(timeout=0.5))
    for position in (4, 3, 2, 1, 1, 1):
        await asyncio.sleep(0.2)
        waiting._data(_framed(b'{"queued": %d}' % position), False)
    assert not task.done()
    with pytest.raises(TransferInterrupted, match="no data from the server"):
        await asyncio.wait_for(task, 10)
    assert heard[-4:] == [4, 3, 2, 1]
