"""Artifacts across replicas (issue 15 item 4): two real DeployServers on one PostgreSQL schema
sharing one identity (the second's state directory is a copy of the first's), real HTTP
between them.  A package uploaded on A is known on B and fetched by B from A, verified, and
recorded as B's copy; a damaged copy on A, an unknown package and an oversize one are refused
with nothing stored on B; the content route needs ``admin``; start-up reconciles the copy
rows with the store; two replicas sharing one directory never delete each other's uploads in
progress."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import ssl
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa

from deploy_core.agent.artifacts import ArtifactError, ArtifactFetcher
from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.artifacts import STALE_TMP_SECONDS
from deploy_core.server.db import artifact_copies, replicas
from deploy_core.server.services import PluginServices
from deploy_core.testing import MemoryCredentials
from deploy_core.transport import AgentConnector, AgentCredential, QuicServer
from deploy_core.transport.files import FileRefused

OWN_FILES = {"server.id", "server.json", "artifacts"}


class Pair:
    """Replicas A and B on one database with one CA and admin token."""

    def __init__(self, root: Path, db_url: str) -> None:
        self.root = root
        self.db_url = db_url
        self.servers: dict[str, DeployServer] = {}

    async def start(self, name: str, *, own_ca: bool = False, **config: Any) -> DeployServer:
        state = self.root / name
        if name != "a" and not own_ca and not state.exists():
            shutil.copytree(self.root / "a", state, ignore=lambda _d, names: OWN_FILES & set(names))
        server = DeployServer(
            ServerConfig(
                state_dir=state,
                api_port=0,
                quic_port=0,
                db_url=self.db_url,
                server_id=name,
                heartbeat_flush_interval=0.5,
                **config,
            )
        )
        await server.start()
        self.servers[name] = server
        return server

    async def stop(self, name: str) -> None:
        await self.servers.pop(name).stop()

    def http(self, name: str, token: str | None = None) -> httpx.AsyncClient:
        server = self.servers[name]
        ca = server.api_tls.ca if server.api_tls else None
        return httpx.AsyncClient(
            base_url=server.api_url,
            verify=ssl.create_default_context(cafile=str(ca)) if ca else True,
            headers={"Authorization": f"Bearer {token or server.state.admin_token}"},
            timeout=60,
        )

    async def upload(self, name: str, data: bytes) -> str:
        async with self.http(name) as http:
            answer = await http.post("/api/artifacts", content=data)
        assert answer.status_code == 201, answer.text
        sha: str = answer.json()["sha256"]
        assert sha == hashlib.sha256(data).hexdigest()
        return sha


@pytest_asyncio.fixture
async def pair(tmp_path: Path, pg_url: str) -> AsyncIterator[Pair]:
    p = Pair(tmp_path, pg_url)
    try:
        await p.start("a")
        yield p
    finally:
        for name in list(p.servers):
            await p.stop(name)


def copy_rows(server: DeployServer) -> dict[tuple[str, str], int]:
    with server.engine.connect() as conn:
        rows = conn.execute(sa.select(artifact_copies)).fetchall()
    return {(r.sha256, r.server_id): r.size for r in rows}


def tmp_files(server: DeployServer) -> list[Path]:
    return [p for p in (server.artifacts.root / "tmp").rglob("*") if p.is_file()]


async def test_a_package_uploaded_on_a_is_fetched_by_b_verified_and_recorded(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    a = pair.servers["a"]
    b = await pair.start("b")
    data = os.urandom(3 << 20)
    sha = await pair.upload("a", data)
    assert copy_rows(a) == {(sha, "a"): len(data)}

    # B knows it (the deploy check and the API answer for the cluster) before it has it.
    assert b.artifacts.locate(sha) is None
    assert await PluginServices(b).artifact_exists(sha)
    async with pair.http("b") as http:
        shown = await http.get(f"/api/artifacts/{sha}")
        assert shown.status_code == 200, shown.text
        assert shown.json()["size"] == len(data)
        # B's content route serves only its own copy: it has none yet.
        assert (await http.get(f"/api/artifacts/{sha}/content")).status_code == 404

    # Five agents asking at once: one fetch from A, every one gets the verified file.
    caplog.set_level(logging.INFO, logger="deploy_core.server.artifact_peers")
    paths = await asyncio.gather(*(b.artifact_source.locate(sha) for _ in range(5)))
    assert len(set(paths)) == 1
    path = paths[0]
    assert path is not None and path.read_bytes() == data
    assert path.parent.parent.parent == b.artifacts.root  # B's own store
    fetched = [r for r in caplog.records if "fetched from replica" in r.getMessage()]
    assert len(fetched) == 1, [r.getMessage() for r in caplog.records]
    assert copy_rows(a) == {(sha, "a"): len(data), (sha, "b"): len(data)}
    assert tmp_files(b) == []
    async with pair.http("b") as http:
        content = await http.get(f"/api/artifacts/{sha}/content")
    assert content.status_code == 200 and content.content == data


async def test_a_damaged_copy_on_the_peer_is_refused_and_nothing_is_stored(pair: Pair) -> None:
    a = pair.servers["a"]
    b = await pair.start("b")
    data = os.urandom(1 << 20)
    sha = await pair.upload("a", data)
    stored = a.artifacts.locate(sha)
    assert stored is not None
    stored.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, one byte changed

    with pytest.raises(FileRefused) as refused:
        await b.artifact_source.locate(sha)
    assert refused.value.code == "not_found"
    assert f"do not hash to {sha}" in str(refused.value)
    assert "replica a" in str(refused.value) and "nothing was stored" in str(refused.value)
    assert b.artifacts.locate(sha) is None
    assert tmp_files(b) == []
    assert (sha, "b") not in copy_rows(b)


async def test_an_unknown_package_and_a_stopped_holder_are_refused_clearly(pair: Pair) -> None:
    b = await pair.start("b")
    unknown = hashlib.sha256(b"nobody uploaded this").hexdigest()
    with pytest.raises(FileRefused, match="no live replica holds a copy"):
        await b.artifact_source.locate(unknown)
    assert not await PluginServices(b).artifact_exists(unknown)
    async with pair.http("b") as http:
        assert (await http.get(f"/api/artifacts/{unknown}")).status_code == 404

    sha = await pair.upload("a", b"only on a\n")
    await pair.stop("a")  # a clean stop removes A's heartbeat row: not live
    # The cluster still knows the package (A's copy is complete), but nobody live serves it.
    assert await PluginServices(b).artifact_exists(sha)
    with pytest.raises(FileRefused, match="no live replica holds a copy"):
        await b.artifact_source.locate(sha)
    assert b.artifacts.locate(sha) is None


async def test_a_copy_over_this_replicas_size_limit_is_not_fetched(pair: Pair) -> None:
    b = await pair.start("b", max_artifact_bytes=1 << 20)
    data = os.urandom(2 << 20)
    sha = await pair.upload("a", data)
    with pytest.raises(FileRefused, match="over this server's artifact size limit of 1 MiB"):
        await b.artifact_source.locate(sha)
    assert b.artifacts.locate(sha) is None
    assert tmp_files(b) == []

    # A lying row (a copy recorded smaller than it is) does not get past the limit either:
    # the bytes are counted as they arrive.
    with b.engine.begin() as conn:
        conn.execute(
            artifact_copies.update().where(artifact_copies.c.sha256 == sha).values(size=10)
        )
    with pytest.raises(FileRefused, match="size limit"):
        await b.artifact_source.locate(sha)
    assert b.artifacts.locate(sha) is None
    assert tmp_files(b) == []


async def test_the_content_route_needs_admin_and_checks_its_argument(pair: Pair) -> None:
    a = pair.servers["a"]
    sha = await pair.upload("a", b"secret-bearing package\n")
    read_token = await a.db(a.tokens.create_api_token, "reader", "read")
    async with pair.http("a", read_token) as http:
        assert (await http.get(f"/api/artifacts/{sha}")).status_code == 200
        refused = await http.get(f"/api/artifacts/{sha}/content")
        assert refused.status_code == 403
        assert "needs 'admin'" in refused.text
    async with pair.http("a") as http:
        ok = await http.get(f"/api/artifacts/{sha}/content")
        assert ok.content == b"secret-bearing package\n"
        assert ok.headers["content-type"] == "application/octet-stream"
        bad = await http.get("/api/artifacts/not-a-sha/content")
        assert bad.status_code == 422 and "64 lowercase hex digits" in bad.text
        missing = await http.get(f"/api/artifacts/{'0' * 64}/content")
        assert missing.status_code == 404
        doc = (await http.get("/openapi.json")).json()
    op = doc["paths"]["/api/artifacts/{sha256}/content"]["get"]
    assert op["x-required-scope"] == "admin"
    assert "application/octet-stream" in op["responses"]["200"]["content"]


async def test_start_up_reconciles_the_copy_rows_with_the_store(pair: Pair) -> None:
    a = pair.servers["a"]
    kept = await pair.upload("a", b"kept\n")
    lost = await pair.upload("a", b"lost\n")
    assert set(copy_rows(a)) == {(kept, "a"), (lost, "a")}
    root = a.artifacts.root
    await pair.stop("a")
    lost_path = root / "sha256" / lost[:2] / lost
    lost_path.unlink()
    # A file put into the store by hand (e.g. restored from a backup), with no row.
    extra = b"restored\n"
    extra_sha = hashlib.sha256(extra).hexdigest()
    (root / "sha256" / extra_sha[:2]).mkdir(exist_ok=True)
    (root / "sha256" / extra_sha[:2] / extra_sha).write_bytes(extra)

    a = await pair.start("a")
    assert copy_rows(a) == {(kept, "a"): 5, (extra_sha, "a"): len(extra)}
    assert not await PluginServices(a).artifact_exists(lost)


async def test_two_replicas_share_one_directory_without_cutting_uploads_short(
    pair: Pair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "shared-artifacts"
    await pair.stop("a")
    a = await pair.start("a", artifact_dir=shared)
    b = await pair.start("b", artifact_dir=shared)
    assert a.artifacts.root == b.artifacts.root == shared

    data = os.urandom(1 << 20)
    sha = await pair.upload("a", data)
    caplog.set_level(logging.INFO, logger="deploy_core.server.artifact_peers")
    path = await b.artifact_source.locate(sha)
    assert path == shared / "sha256" / sha[:2] / sha
    assert not [r for r in caplog.records if "fetched from replica" in r.getMessage()]

    # B's upload in progress (a file in its tmp/, written to just now) and a long-dead
    # replica's leftover: A restarting keeps the first and removes the second.
    in_progress = shared / "tmp" / "b" / "upload-in-progress"
    in_progress.write_bytes(b"half of a package")
    dead = shared / "tmp" / "gone-replica"
    dead.mkdir()
    leftover = dead / "upload-leftover"
    leftover.write_bytes(b"never finished")
    old = time.time() - STALE_TMP_SECONDS - 60
    os.utime(leftover, (old, old))
    mine = shared / "tmp" / "a" / "upload-from-my-last-run"
    mine.write_bytes(b"mine")
    await pair.stop("a")
    os.utime(dead, (old, old))  # the directory too: no file changed in it for a day
    a = await pair.start("a", artifact_dir=shared)
    assert in_progress.read_bytes() == b"half of a package"
    assert not leftover.exists() and not dead.exists()
    assert not mine.exists()

    # B's next upload still finds its tmp/ and lands in the shared store, known to both.
    other = os.urandom(4096)
    other_sha = await pair.upload("b", other)
    assert (await a.artifact_source.locate(other_sha)) == shared / "sha256" / other_sha[:2] / (
        other_sha
    )
    assert (other_sha, "b") in copy_rows(a)
    # A restarted: its reconcile recorded the shared files as its own copies.
    assert (sha, "a") in copy_rows(a)


# --------------------------------------------------------------------------- over QUIC, odd peers


class Peer:
    """A real HTTP server registered as a live replica holding ``sha``: it answers the
    content route after ``delay`` seconds with ``body`` (right or wrong), and records the
    Authorization headers it was sent."""

    def __init__(self, body: bytes, delay: float = 0.0, status: int = 200) -> None:
        self.body = body
        self.delay = delay
        self.status = status
        self.auth: list[str | None] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                peer.auth.append(self.headers.get("Authorization"))
                time.sleep(peer.delay)
                self.send_response(peer.status)
                self.send_header("Content-Length", str(len(peer.body)))
                self.end_headers()
                self.wfile.write(peer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def register(self, server: DeployServer, name: str, sha: str, *, last_seen: float) -> None:
        with server.engine.begin() as conn:
            conn.execute(
                replicas.insert().values(
                    server_id=name,
                    api_url=self.url,
                    quic_address="127.0.0.1:1",
                    started_at=time.time(),
                    last_seen=last_seen,
                    heartbeat_interval=3600.0,
                    agents_connected=0,
                )
            )
            conn.execute(
                artifact_copies.insert().values(
                    sha256=sha, server_id=name, size=len(self.body), stored_at=time.time()
                )
            )

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


class OneAgent:
    """Accepts the one agent of these tests (no enrollment: the part under test is the file
    streams and the peers behind them)."""

    def __init__(self) -> None:
        self.public_key: bytes | None = None

    async def credential(self, client_id: str) -> AgentCredential | None:
        return None if self.public_key is None else AgentCredential(public_key=self.public_key)

    async def enroll(self, client_id: str, join_token: str, public_key: bytes) -> None:
        self.public_key = public_key

    async def upgrade(self, client_id: str, public_key: bytes) -> None:
        self.public_key = public_key


@contextlib.asynccontextmanager
async def agent_on(server: DeployServer, tmp_path: Path) -> AsyncIterator[ArtifactFetcher]:
    """A real QUIC endpoint serving ``server``'s artifacts (store, then peers) and a real
    agent connection to it; the agent's fetcher gives up on 4 s without news (the server's
    notices come every second)."""

    async def nothing(*args: Any) -> None:
        return None

    quic = QuicServer(
        host="127.0.0.1",
        port=0,
        certs=server.state.certs,
        authority=OneAgent(),
        on_connect=nothing,
        on_message=nothing,
        on_disconnect=nothing,
        files=server.artifact_source,
    )
    await quic.start()
    connector = AgentConnector(
        host="127.0.0.1",
        port=quic.port,
        ca_file=server.state.certs.ca_cert,
        client_id="agent-1",
        credentials=MemoryCredentials(token="join"),
        capabilities=dict,
        on_message=nothing,
        heartbeat_interval=1.0,
        backoff_initial=0.05,
        backoff_max=0.2,
        connect_timeout=3.0,
    )
    task = asyncio.create_task(connector.run())
    try:
        assert await connector.wait_connected(10)
        yield ArtifactFetcher(connector, tmp_path / "agent-cache", stall_timeout=4.0)
    finally:
        await asyncio.wait_for(connector.stop(), 10)
        await asyncio.wait_for(task, 10)
        await asyncio.wait_for(quic.close(), 10)


async def test_an_agent_waits_through_a_slow_peer_without_giving_up(
    pair: Pair, tmp_path: Path
) -> None:
    b = await pair.start("b")
    data = os.urandom(1 << 20)
    sha = hashlib.sha256(data).hexdigest()
    slow = Peer(data, delay=7.0)  # longer than the agent's 4 s without news
    try:
        slow.register(b, "slow", sha, last_seen=time.time())
        async with agent_on(b, tmp_path) as fetcher:
            fetched = await fetcher.fetch(sha, deadline=time.time() + 60)
        assert fetched.path.read_bytes() == data
        # QUEUED frames kept it waiting on one request: no interruption, one fetch.
        assert fetched.interruptions == 0
        assert slow.auth == [f"Bearer {b.state.admin_token}"]
        assert b.artifacts.locate(sha) is not None
        assert (sha, "b") in copy_rows(b)
    finally:
        slow.close()


async def test_a_lying_peer_is_skipped_for_one_with_the_right_bytes(
    pair: Pair, tmp_path: Path
) -> None:
    b = await pair.start("b")
    data = os.urandom(1 << 20)
    sha = await pair.upload("a", data)
    liar = Peer(os.urandom(len(data)))  # answers at once, with other bytes
    try:
        # Heard from most recently: asked first.
        liar.register(b, "liar", sha, last_seen=time.time() + 3600)
        async with agent_on(b, tmp_path) as fetcher:
            fetched = await fetcher.fetch(sha, deadline=time.time() + 60)
        assert fetched.path.read_bytes() == data
        assert len(liar.auth) == 1
        assert b.artifacts.locate(sha) is not None and tmp_files(b) == []

        # Only liars left: the agent is refused with the reason, nothing is stored.
        other = os.urandom(4096)
        other_sha = hashlib.sha256(other).hexdigest()
        liar.body = os.urandom(4096)
        with b.engine.begin() as conn:
            conn.execute(
                artifact_copies.insert().values(
                    sha256=other_sha, server_id="liar", size=4096, stored_at=time.time()
                )
            )
        async with agent_on(b, tmp_path / "again") as fetcher:
            with pytest.raises(ArtifactError) as refused:
                await fetcher.fetch(other_sha, deadline=time.time() + 60)
        assert f"replica liar: the bytes it sent do not hash to {other_sha}" in str(refused.value)
        assert b.artifacts.locate(other_sha) is None and tmp_files(b) == []
        assert (other_sha, "b") not in copy_rows(b)
    finally:
        liar.close()


async def test_peers_over_https_are_verified_with_the_clusters_own_ca(
    tmp_path: Path, pg_url: str
) -> None:
    tls = Pair(tmp_path / "tls", pg_url)
    try:
        a = await tls.start("a", api_tls=True)
        b = await tls.start("b", api_tls=True)
        assert a.api_url.startswith("https://") and b.api_url.startswith("https://")
        data = os.urandom(1 << 20)
        sha = await tls.upload("a", data)
        path = await b.artifact_source.locate(sha)
        assert path is not None and path.read_bytes() == data

        # A replica of another identity (its own CA) on the database: its certificate does
        # not verify, so B refuses it and stores nothing.
        await tls.start("c", own_ca=True, api_tls=True)
        other_sha = await tls.upload("c", os.urandom(4096))
        with pytest.raises(FileRefused, match="CERTIFICATE_VERIFY_FAILED"):
            await b.artifact_source.locate(other_sha)
        assert b.artifacts.locate(other_sha) is None and tmp_files(b) == []
    finally:
        for name in list(tls.servers):
            await tls.stop(name)


async def test_a_peer_announcing_this_replicas_own_address_is_named(pair: Pair) -> None:
    b = await pair.start("b")
    sha = hashlib.sha256(b"announced wrong").hexdigest()
    with b.engine.begin() as conn:
        conn.execute(
            replicas.insert().values(
                server_id="elsewhere",
                api_url=b.api_url,
                quic_address="127.0.0.1:1",
                started_at=time.time(),
                last_seen=time.time(),
                heartbeat_interval=3600.0,
                agents_connected=0,
            )
        )
        conn.execute(
            artifact_copies.insert().values(
                sha256=sha, server_id="elsewhere", size=15, stored_at=time.time()
            )
        )
    with pytest.raises(FileRefused, match="which is this replica's own: give each replica"):
        await b.artifact_source.locate(sha)


def test_the_artifact_directory_from_the_flag_or_the_server_config(tmp_path: Path) -> None:
    from deploy_core.cli.server_command import artifact_dir_setting, server_config_file

    config = tmp_path / "etc" / "server.toml"
    config.parent.mkdir()
    config.write_text('[artifacts]\ndir = "../shared/artifacts"\n')
    assert artifact_dir_setting(config, None) == tmp_path / "shared" / "artifacts"
    assert artifact_dir_setting(config, tmp_path / "flag") == tmp_path / "flag"  # flag wins
    assert artifact_dir_setting(None, None) is None
    with click.Context(click.Command("server")):
        assert server_config_file(config)["artifact_dir"] == tmp_path / "shared" / "artifacts"
    for bad, message in (
        ('[artifacts]\ndirectory = "x"\n', "[artifacts] takes only dir"),
        ("[artifacts]\ndir = 3\n", "[artifacts] dir must be a path"),
        ('artifacts = "x"\n', "[artifacts] takes only dir"),
    ):
        config.write_text(bad)
        with pytest.raises(click.BadParameter, match=re.escape(message)):
            artifact_dir_setting(config, None)


async def test_peers_that_fail_or_cannot_be_reached_are_each_named(
    pair: Pair, tmp_path: Path
) -> None:
    b = await pair.start("b")
    data = os.urandom(4096)
    sha = hashlib.sha256(data).hexdigest()
    erring = Peer(b"x" * (8 << 20), status=503)  # a long error body: only its start is read
    gone = Peer(data)
    try:
        erring.register(b, "erring", sha, last_seen=time.time() + 10)
        gone.register(b, "gone", sha, last_seen=time.time())
        gone.close()  # listed as live, but nothing answers there any more
        with pytest.raises(FileRefused) as refused:
            await b.artifact_source.locate(sha)
        reason = str(refused.value)
        assert "replica erring: " in reason and "answered 503: xxx" in reason
        assert len(reason) < 2000
        assert "replica gone: " in reason
        assert b.artifacts.locate(sha) is None and tmp_files(b) == []
    finally:
        erring.close()
