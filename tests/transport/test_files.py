"""Artifact transfer over real QUIC on 127.0.0.1: the file streams and the agent's fetcher."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived

from deploy_core.agent.artifacts import ArtifactError, ArtifactFetcher, ArtifactTimeout
from deploy_core.server.artifacts import ArtifactStore
from deploy_core.testing import connector_for
from deploy_core.transport import (
    ALPN_PROTOCOL,
    AgentConnector,
    AgentCredential,
    AgentSession,
    AuthError,
    Envelope,
    FrameDecoder,
    Kind,
    QuicServer,
    ServerCerts,
    encode,
    ensure_server_certs,
)
from deploy_core.transport.files import DEFAULT_WINDOW, FileRefused, FileRequest, FileStreamClient

CHUNK = 64 << 10
CLIENT = "agent-1"

# --------------------------------------------------------------------------- helpers


class MemoryAuthority:
    """One join token; keys kept in a dict."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.public_keys: dict[str, bytes] = {}

    async def credential(self, client_id: str) -> AgentCredential | None:
        if client_id in self.public_keys:
            return AgentCredential(public_key=self.public_keys[client_id])
        key = self.keys.get(client_id)
        return None if key is None else AgentCredential(shared_key=key)

    async def enroll(self, client_id: str, join_token: str, public_key: bytes) -> None:
        if join_token != "join-secret":
            raise AuthError("join token rejected")
        self.public_keys[client_id] = public_key

    async def upgrade(self, client_id: str, public_key: bytes) -> None:
        self.keys.pop(client_id, None)
        self.public_keys[client_id] = public_key


class CountingStore:
    """The real store, counting the file requests that reached it."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.requests: list[str] = []

    def locate(self, sha256: str) -> Path | None:
        self.requests.append(sha256)
        return self.store.locate(sha256)


@dataclass
class Rig:
    """A QUIC server with an artifact store, one connected agent connector and a fetcher."""

    server: QuicServer
    store: ArtifactStore
    source: CountingStore
    connector: AgentConnector
    fetcher: ArtifactFetcher
    cache: Path

    async def put(self, data: bytes) -> str:
        async def body() -> AsyncIterator[bytes]:
            for start in range(0, len(data), 1 << 20):
                yield data[start : start + (1 << 20)]

        info, _ = await self.store.receive(body())
        return info.sha256

    def session(self) -> AgentSession:
        session = self.server.session(CLIENT)
        assert session is not None
        return session

    def files(self) -> FileStreamClient:
        files = self.connector.files
        assert files is not None
        return files


async def eventually(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


@pytest.fixture
def certs(tmp_path: Path) -> ServerCerts:
    return ensure_server_certs(tmp_path / "server")


@pytest_asyncio.fixture
async def rig(tmp_path: Path, certs: ServerCerts) -> AsyncIterator[Rig]:
    async def nothing(*args: Any) -> None:
        return None

    store = ArtifactStore(tmp_path / "artifacts")
    source = CountingStore(store)
    server = QuicServer(
        host="127.0.0.1",
        port=0,
        certs=certs,
        authority=MemoryAuthority(),
        on_connect=nothing,
        on_message=nothing,
        on_disconnect=nothing,
        idle_timeout=10.0,
        files=source,
    )
    await server.start()
    connector = connector_for(server.port, certs.ca_cert, CLIENT)
    task = asyncio.create_task(connector.run())
    try:
        assert await connector.wait_connected(10)
        cache = tmp_path / "cache"
        fetcher = ArtifactFetcher(connector, cache, chunk_size=CHUNK, stall_timeout=10.0)
        yield Rig(server, store, source, connector, fetcher, cache)
    finally:
        await asyncio.wait_for(connector.stop(), 10)
        await asyncio.wait_for(task, 10)
        await asyncio.wait_for(server.close(), 10)


@pytest.fixture
def transfer_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="deploy_core.transport.files"):
        yield caplog


def sent_ranges(caplog: pytest.LogCaptureFixture) -> list[tuple[int, int]]:
    """(from, to) of every transfer the server started, from its log."""
    return [
        (int(record.args[2]), int(record.args[3]))  # type: ignore[index,call-overload]
        for record in caplog.records
        if record.msg.startswith("sending artifact")
    ]


# --------------------------------------------------------------------------- transfer


async def test_fetch_delivers_verified_bytes_and_a_redeploy_transfers_nothing(rig: Rig) -> None:
    data = os.urandom(3 * (1 << 20) + 12345)
    sha = await rig.put(data)
    seen: list[tuple[int, int]] = []

    fetched = await rig.fetcher.fetch(sha, progress=lambda done, total: seen.append((done, total)))

    assert fetched.path == rig.cache / sha
    assert fetched.path.read_bytes() == data
    assert (fetched.size, fetched.bytes_transferred, fetched.bytes_resumed) == (
        len(data),
        len(data),
        0,
    )
    assert not fetched.from_cache and fetched.interruptions == 0
    assert not (rig.cache / f"{sha}.partial").exists()
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert len(seen) <= 101  # at most one call per percent

    again = await rig.fetcher.fetch(sha)
    assert again.from_cache and again.bytes_transferred == 0 and again.path == fetched.path
    assert rig.source.requests == [sha]  # the server was not asked again


async def test_fetch_resumes_from_the_partial_file_an_earlier_fetch_left(rig: Rig) -> None:
    data = os.urandom(2 * (1 << 20))
    sha = await rig.put(data)
    rig.cache.mkdir()
    kept = 700_001
    (rig.cache / f"{sha}.partial").write_bytes(data[:kept])

    fetched = await rig.fetcher.fetch(sha)

    assert fetched.bytes_resumed == kept
    assert fetched.bytes_transferred == len(data) - kept
    assert fetched.path.read_bytes() == data


async def test_connection_cut_half_way_resumes_with_at_most_one_chunk_sent_again(
    rig: Rig, transfer_log: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(8 * (1 << 20))
    sha = await rig.put(data)
    cut_at: list[int] = []

    def progress(done: int, total: int) -> None:
        if not cut_at and done >= total // 2:
            cut_at.append(done)
            rig.session().close("cut by the test")

    first = rig.session()
    fetched = await asyncio.wait_for(rig.fetcher.fetch(sha, progress=progress), 60)

    assert rig.session() is not first  # it really went over a new connection
    assert fetched.path.read_bytes() == data
    assert fetched.interruptions == 1
    assert fetched.bytes_resumed == 0
    sent_again = fetched.bytes_transferred - len(data)
    assert 0 <= sent_again <= CHUNK
    # The second connection asked for the rest only, from where the first one stopped.
    [(start, _), (resumed_from, end)] = sent_ranges(transfer_log)
    assert start == 0 and end == len(data)
    assert len(data) // 2 <= cut_at[0] <= resumed_from <= cut_at[0] + DEFAULT_WINDOW


async def test_a_cancelled_fetch_leaves_a_partial_file_that_the_next_one_resumes(
    rig: Rig,
) -> None:
    data = os.urandom(6 * (1 << 20))
    sha = await rig.put(data)
    # Cancelled from the progress callback itself: cancelled from the test's task after
    # an event, the fetch could finish its last bytes first on a fast machine (CI saw it).
    task: asyncio.Task[Any] | None = None

    def progress(done: int, total: int) -> None:
        if done >= total // 3 and task is not None:
            task.cancel()

    task = asyncio.create_task(rig.fetcher.fetch(sha, progress=progress))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    kept = (rig.cache / f"{sha}.partial").stat().st_size
    assert kept >= len(data) // 3

    # A new fetcher, as after an agent restart.
    fresh = ArtifactFetcher(rig.connector, rig.cache, chunk_size=CHUNK)
    fetched = await asyncio.wait_for(fresh.fetch(sha), 30)
    assert fetched.bytes_resumed == kept
    assert fetched.bytes_transferred == len(data) - kept
    assert fetched.path.read_bytes() == data


# --------------------------------------------------------------------------- corruption


async def test_damaged_partial_file_is_caught_by_the_hash_and_fetched_again_from_zero(
    rig: Rig,
) -> None:
    data = os.urandom(1 << 20)
    sha = await rig.put(data)
    rig.cache.mkdir()
    damaged = bytearray(data[:300_000])
    damaged[1234] ^= 0xFF
    (rig.cache / f"{sha}.partial").write_bytes(bytes(damaged))

    fetched = await rig.fetcher.fetch(sha)

    assert fetched.path.read_bytes() == data
    assert fetched.bytes_resumed == 300_000
    assert fetched.bytes_transferred == (len(data) - 300_000) + len(data)
    assert rig.source.requests == [sha, sha]


async def test_damaged_server_copy_fails_clearly_after_one_fresh_attempt(rig: Rig) -> None:
    data = os.urandom(1 << 20)
    sha = await rig.put(data)
    stored = rig.store.locate(sha)
    assert stored is not None
    damaged = bytearray(stored.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    stored.write_bytes(bytes(damaged))

    with pytest.raises(ArtifactError, match="failed SHA-256 verification twice") as caught:
        await rig.fetcher.fetch(sha)

    assert hashlib.sha256(damaged).hexdigest() in str(caught.value)
    assert "upload the package again" in str(caught.value)
    assert rig.source.requests == [sha, sha]
    assert not (rig.cache / f"{sha}.partial").exists()
    assert not (rig.cache / sha).exists()


async def test_damaged_cached_copy_is_fetched_again(rig: Rig) -> None:
    data = os.urandom(200_000)
    sha = await rig.put(data)
    first = await rig.fetcher.fetch(sha)
    first.path.write_bytes(b"not the artifact")

    again = await rig.fetcher.fetch(sha)

    assert not again.from_cache and again.bytes_transferred == len(data)
    assert again.path.read_bytes() == data


# --------------------------------------------------------------------------- refusals


async def test_bad_requests_get_error_frames_and_the_connection_keeps_working(
    rig: Rig,
) -> None:
    data = os.urandom(100_000)
    sha = await rig.put(data)
    session = rig.session()

    async def refusal(request: FileRequest) -> FileRefused:
        incoming = rig.files().request(request)
        try:
            with pytest.raises(FileRefused) as caught:
                await incoming.header(timeout=5)
        finally:
            incoming.close()
        return caught.value

    unknown = await refusal(FileRequest(sha256="0" * 64))
    assert unknown.code == "not_found" and "not in the server's store" in str(unknown)
    past_end = await refusal(FileRequest(sha256=sha, offset=len(data) + 1))
    assert past_end.code == "bad_offset" and "past the end" in str(past_end)
    # Requests the agent's own model would refuse, sent anyway.
    traversal = await refusal(FileRequest.model_construct(sha256="../../etc/passwd", offset=0))
    assert traversal.code == "bad_request" and "sha256" in str(traversal)
    negative = await refusal(FileRequest.model_construct(sha256=sha, offset=-5, chunk_size=1))
    assert negative.code == "bad_request"
    assert "offset" in str(negative) and "chunk_size" in str(negative)
    huge = await refusal(FileRequest.model_construct(sha256="a" * 10_000))
    assert huge.code == "bad_request" and "limit" in str(huge)

    with pytest.raises(ArtifactError, match="not in the server's store"):
        await rig.fetcher.fetch("f" * 64)
    assert not (rig.cache / f"{'f' * 64}.partial").exists()
    with pytest.raises(ArtifactError, match="not a SHA-256"):
        await rig.fetcher.fetch("abc")

    # The same connection still serves a good request.
    fetched = await rig.fetcher.fetch(sha)
    assert fetched.path.read_bytes() == data
    assert rig.session() is session and not session.closed


async def test_an_offset_at_the_end_gets_an_empty_answer(rig: Rig) -> None:
    data = os.urandom(70_000)
    sha = await rig.put(data)
    incoming = rig.files().request(FileRequest(sha256=sha, offset=len(data)))
    try:
        header = await incoming.header(timeout=5)
        assert (header.size, header.offset) == (len(data), len(data))
        assert await incoming.read(timeout=5) == b""
    finally:
        incoming.close()


class RawClient(QuicConnectionProtocol):
    """A bare aioquic client that skips authentication."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decoder = FrameDecoder()
        self.envelopes: list[Envelope] = []
        self.file_bytes = 0
        self.terminated: ConnectionTerminated | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            if event.stream_id == 0:
                self.envelopes += self.decoder.feed(event.data)
            else:
                self.file_bytes += len(event.data)
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event


async def test_a_file_request_before_authentication_closes_the_connection(
    rig: Rig, certs: ServerCerts
) -> None:
    sha = await rig.put(os.urandom(100_000))
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN_PROTOCOL],
        cafile=str(certs.ca_cert),
        verify_mode=ssl.CERT_REQUIRED,
        server_name="localhost",
    )
    async with asyncio.timeout(10):
        async with connect(
            "127.0.0.1", rig.server.port, configuration=configuration, create_protocol=RawClient
        ) as raw:
            assert isinstance(raw, RawClient)
            quic = raw._quic
            hello = Envelope(kind=Kind.HELLO, payload={"client_id": "intruder", "protocol": 1})
            quic.send_stream_data(quic.get_next_available_stream_id(), encode(hello))
            body = FileRequest(sha256=sha).model_dump_json().encode()
            request = len(body).to_bytes(4, "big") + body
            quic.send_stream_data(quic.get_next_available_stream_id(), request)
            raw.transmit()
            await eventually(lambda: raw.terminated is not None)
    assert raw.file_bytes == 0
    assert any("before authentication" in e.payload.get("reason", "") for e in raw.envelopes)
    assert rig.source.requests == []


async def test_without_a_connection_the_fetch_gives_up_at_the_deadline(tmp_path: Path) -> None:
    class Offline:
        files = None

        async def wait_connected(self, timeout: float) -> bool:
            await asyncio.sleep(min(timeout, 0.05))
            return False

    fetcher = ArtifactFetcher(Offline(), tmp_path / "cache")
    started = time.monotonic()
    with pytest.raises(ArtifactTimeout, match="no connection to the server"):
        await fetcher.fetch("a" * 64, deadline=time.time() + 0.3)
    assert time.monotonic() - started < 3


def test_fetcher_rejects_a_chunk_size_out_of_range(tmp_path: Path) -> None:
    for size in (1024, 2 << 20):
        with pytest.raises(ValueError, match="chunk_size must be between"):
            ArtifactFetcher(None, tmp_path, chunk_size=size)  # type: ignore[arg-type]
