"""The artifact store and artifact transfer end to end: a real server process (uploads over
HTTP, transfers over QUIC), an agent process killed mid-transfer, and a deployment that
fetches a 50 MB artifact through the whole path (API → command → agent → QUIC → cache)."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pydantic import BaseModel

from deploy_core.agent.context import DeployContext
from deploy_core.client import ApiError
from deploy_core.hookspecs import hookimpl
from deploy_core.models import DeployStatus
from deploy_core.plugins import load_plugins
from deploy_core.registry import DeployParams, DeployType, Stage
from deploy_core.server import db
from deploy_core.server.app import DeployServer
from deploy_core.server.records import RecordStore
from deploy_core.testing import DeployCenter, in_process_center

MB = 1 << 20
LIMIT = 60 * MB


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as file:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MB))
            file.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def peak_rss(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(
        tmp_path_factory.mktemp("artifacts"),
        env={"DEPLOY_CENTER_MAX_ARTIFACT_SIZE": str(LIMIT)},
    )
    try:
        c.start_server()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("package") / "app.tar.gz"
    return path, write_random(path, 50 * MB)


# --------------------------------------------------------------------------- the store


def test_upload_is_streamed_stored_by_hash_and_deduplicated(
    center: DeployCenter, package: tuple[Path, str]
) -> None:
    path, sha = package
    before = peak_rss(center.server_proc.pid)
    seen: list[tuple[int, int]] = []

    first = center.api.upload_artifact(
        path, progress=lambda sent, total: seen.append((sent, total))
    )

    assert first["sha256"] == sha and first["size"] == 50 * MB
    assert first["existing"] is False
    assert seen[-1] == (50 * MB, 50 * MB) and len(seen) >= 10
    stored = center.server_dir / "artifacts" / "sha256" / sha[:2] / sha
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha
    # Streamed to disk: the server never held the package in memory.
    assert peak_rss(center.server_proc.pid) - before < 25 * MB

    again = center.api.upload_artifact(path)
    assert again["existing"] is True and again["sha256"] == sha
    assert len(list(stored.parent.iterdir())) == 2  # the bytes and their sidecar, once

    shown = center.api.artifact(sha)
    assert shown["size"] == 50 * MB and shown["created_at"] == first["created_at"]


def test_status_codes_of_the_artifact_routes(center: DeployCenter, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{center.api_port}/api/artifacts"
    token = (center.server_dir / "admin.token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=30) as http:
        created = http.post(url, content=b"small package", headers=auth)
        assert created.status_code == 201
        assert created.json()["sha256"] == hashlib.sha256(b"small package").hexdigest()
        assert http.post(url, content=b"small package", headers=auth).status_code == 200

        assert http.post(url, content=b"anything").status_code == 401
        assert http.get(f"{url}/{'a' * 64}").status_code == 401

        wrong = http.post(
            url, content=b"other bytes", headers={**auth, "X-Content-SHA256": "b" * 64}
        )
        assert wrong.status_code == 422 and "not " + "b" * 64 in wrong.json()["error"]
        sha = hashlib.sha256(b"other bytes").hexdigest()
        assert http.get(f"{url}/{sha}", headers=auth).status_code == 404
        right = http.post(f"{url}?sha256={sha}", content=b"other bytes", headers=auth)
        assert right.status_code == 201

        assert http.post(url, content=b"", headers=auth).status_code == 422
        bad = http.get(f"{url}/not-a-hash", headers=auth)
        assert bad.status_code == 422 and "64 lowercase hex digits" in bad.json()["error"]
        missing = http.get(f"{url}/{'c' * 64}", headers=auth)
        assert missing.status_code == 404 and "deployctl artifact push" in missing.json()["error"]

        def zeros(counter: list[int], total: int) -> Iterator[bytes]:
            block = b"\0" * MB
            while counter[0] < total:
                counter[0] += len(block)
                yield block

        # Declared too large: refused before the body is read.
        sent = [0]
        declared = http.post(
            url,
            content=zeros(sent, LIMIT + MB),
            headers={**auth, "Content-Length": str(LIMIT + MB)},
        )
        assert declared.status_code == 413 and "limit of 60 MiB" in declared.json()["error"]
        assert sent[0] < LIMIT // 2

        # Streamed without a length: refused as soon as the limit is passed.
        sent = [0]
        streamed = http.post(url, content=zeros(sent, LIMIT + 200 * MB), headers=auth)
        assert streamed.status_code == 413 and "over the server's" in streamed.json()["error"]
        assert sent[0] < LIMIT + 100 * MB
    assert [p for p in (center.server_dir / "artifacts" / "tmp").rglob("*") if p.is_file()] == []


def test_cli_pushes_with_a_progress_bar_and_shows(center: DeployCenter, tmp_path: Path) -> None:
    path = tmp_path / "pkg.bin"
    sha = write_random(path, 3 * MB)
    env = {**center.env, "DEPLOY_CENTER_URL": f"http://127.0.0.1:{center.api_port}"}
    env["DEPLOY_CENTER_TOKEN"] = (center.server_dir / "admin.token").read_text().strip()
    cli = [sys.executable, "-m", "deploy_core.cli"]
    pushed = subprocess.run(
        [*cli, "artifact", "push", str(path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith(sha) and "stored" in pushed.stdout
    assert "100%" in pushed.stderr and "3.0 MiB of 3.0 MiB" in pushed.stderr
    shown = subprocess.run(
        [*cli, "artifact", "show", sha], env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0 and f"size:       {3 * MB} bytes" in shown.stdout
    unknown = subprocess.run(
        [*cli, "artifact", "show", "d" * 64], env=env, capture_output=True, text=True, timeout=60
    )
    assert unknown.returncode == 1 and "HTTP 404: no artifact" in unknown.stderr


# --------------------------------------------------------------------------- agent restart

FETCH_SCRIPT = r"""
import asyncio, json, sys, time
from pathlib import Path
from deploy_core.agent.runtime import Agent, AgentConfig

async def main(port, state, ca, token, sha):
    agent = Agent(AgentConfig(
        server_host="127.0.0.1", server_port=int(port), client_id="fetcher",
        state_dir=Path(state), ca_file=Path(ca), join_token_file=Path(token),
        chunk_size=128 * 1024,
    ))
    task = asyncio.create_task(agent.run())
    def progress(done, total):
        print(json.dumps({"done": done, "total": total}), flush=True)
    got = await agent.artifacts.fetch(sha, deadline=time.time() + 60, progress=progress)
    print(json.dumps({"result": {
        "path": str(got.path), "size": got.size, "transferred": got.bytes_transferred,
        "resumed": got.bytes_resumed, "from_cache": got.from_cache,
    }}), flush=True)
    await agent.stop()
    await task

asyncio.run(main(*sys.argv[1:]))
"""


def allow_fetch(center: DeployCenter, client_id: str, sha: str) -> None:
    """Record a deployment of ``client_id`` that uses artifact ``sha`` as sent (and over):
    an agent may fetch only the artifacts of deployments sent to it."""
    engine = db.make_engine(db.sqlite_url(center.server_dir / "deploy-center.db"))
    try:
        store = RecordStore(engine)
        deploy_id = uuid.uuid4().hex
        store.create_deployment(
            deploy_id=deploy_id,
            client_id=client_id,
            command_type="deploy.fetchonly",
            request={"params": {"artifact": sha}},
            deadline=time.time() + 600,
            artifacts=[sha],
        )
        store.mark_dispatched(deploy_id)
        store.expire(deploy_id, "only a grant to fetch, for the test", rollback_wanted=False)
    finally:
        engine.dispose()


class FetchProcess:
    """A real agent process that fetches one artifact and prints its progress as JSON."""

    def __init__(self, center: DeployCenter, state: Path, sha: str) -> None:
        allow_fetch(center, "fetcher", sha)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                FETCH_SCRIPT,
                str(center.quic_port),
                str(state),
                str(center.server_dir / "ca.pem"),
                str(center.server_dir / "join.token"),
                sha,
            ],
            stdout=subprocess.PIPE,
            stderr=open(state.parent / "fetcher.log", "ab"),  # noqa: SIM115 - closed with it
            env=center.env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, timeout: float) -> dict[str, Any]:
        return self.lines.get(timeout=timeout)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def test_agent_killed_mid_transfer_resumes_after_restart(
    center: DeployCenter, tmp_path: Path
) -> None:
    path = tmp_path / "restart.bin"
    sha = write_random(path, 24 * MB)
    center.api.upload_artifact(path)
    state = tmp_path / "agent-fetcher"

    first = FetchProcess(center, state, sha)
    try:
        done = 0
        while done < 6 * MB:
            done = first.next(timeout=60)["done"]
    finally:
        first.kill()
    partial = state / "cache" / f"{sha}.partial"
    kept = partial.stat().st_size
    assert done <= kept < 24 * MB

    second = FetchProcess(center, state, sha)
    try:
        while "result" not in (line := second.next(timeout=60)):
            pass
        assert second.proc.wait(30) == 0
    finally:
        if second.proc.poll() is None:
            second.kill()
    result = line["result"]
    assert result["resumed"] == kept
    assert result["transferred"] == 24 * MB - kept
    assert not result["from_cache"]
    assert hashlib.sha256(Path(result["path"]).read_bytes()).hexdigest() == sha
    assert not partial.exists()


# --------------------------------------------------------------------------- a deployment


class FetchParams(DeployParams):
    artifact: str


class FetchResult(BaseModel):
    sha256: str
    size: int
    bytes_transferred: int
    bytes_resumed: int
    from_cache: bool


async def fetch_only(ctx: DeployContext, params: FetchParams) -> FetchResult:
    """A test-only deploy type: fetch the artifact, reporting 0-30 % as bytes arrive."""

    def progress(done: int, total: int) -> None:
        ctx.report(DeployStatus.UPLOADING, fraction=done / total, message=f"{done}/{total}")

    got = await ctx.fetch_artifact(params.artifact, progress=progress)
    return FetchResult(
        sha256=got.sha256,
        size=got.size,
        bytes_transferred=got.bytes_transferred,
        bytes_resumed=got.bytes_resumed,
        from_cache=got.from_cache,
    )


class FetchOnlyPlugin:
    @staticmethod
    @hookimpl
    def deploy_register_deploy_types(register: Callable[[DeployType], None]) -> None:
        register(
            DeployType(
                name="deploy.fetchonly",
                params=FetchParams,
                executor=fetch_only,
                stages=(Stage(DeployStatus.UPLOADING.value, 0, 30),),
                artifacts=lambda params: [params.artifact],
            )
        )


@pytest_asyncio.fixture
async def in_process(tmp_path: Path) -> AsyncIterator[tuple[DeployServer, httpx.AsyncClient]]:
    plugins = load_plugins(extra=[("fetch_only", FetchOnlyPlugin)], entry_points=False)
    async with in_process_center(tmp_path, plugins, client_id="in-proc") as center:
        yield center.server, center.http


async def deploy_and_wait(http: httpx.AsyncClient, sha: str) -> dict[str, Any]:
    answer = await http.post(
        "/api/deploy/fetchonly", json={"client_id": "in-proc", "artifact": sha}
    )
    assert answer.status_code == 202, answer.text
    deploy_id = answer.json()["deploy_id"]
    end = time.monotonic() + 90
    while time.monotonic() < end:
        record = (await http.get(f"/api/deploy/{deploy_id}", params={"wait": 10})).json()
        if record["finished"]:
            return record
    raise AssertionError(f"deployment {deploy_id} did not finish")


async def test_a_deployment_fetches_50_mb_and_a_redeploy_transfers_nothing(
    in_process: tuple[DeployServer, httpx.AsyncClient], package: tuple[Path, str]
) -> None:
    _, http = in_process
    path, sha = package

    async def body() -> AsyncIterator[bytes]:
        with path.open("rb") as file:
            while block := file.read(MB):
                yield block

    uploaded = await http.post("/api/artifacts", content=body())
    assert uploaded.status_code == 201

    record = await deploy_and_wait(http, sha)
    assert record["status"] == "success", record["error"]
    assert record["result"] == {
        "sha256": sha,
        "size": 50 * MB,
        "bytes_transferred": 50 * MB,
        "bytes_resumed": 0,
        "from_cache": False,
    }
    history = (await http.get(f"/api/deploy/{record['deploy_id']}/status")).json()["history"]
    uploading = [row["progress"] for row in history if row["status"] == "uploading"]
    assert len(uploading) >= 3 and max(uploading) == 30
    assert uploading == sorted(uploading)

    again = await deploy_and_wait(http, sha)
    assert again["status"] == "success"
    assert again["result"]["from_cache"] is True
    assert again["result"]["bytes_transferred"] == 0

    unknown = await deploy_and_wait(http, "e" * 64)
    assert unknown["status"] == "failed"
    assert "not in the server's store" in unknown["error"]


def test_api_error_of_the_client_names_the_status(center: DeployCenter) -> None:
    with pytest.raises(ApiError, match="HTTP 422"):
        center.api.artifact("xyz")
