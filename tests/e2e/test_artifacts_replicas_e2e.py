"""Artifacts across replicas end to end (issue 15 item 4): two real ``deployctl server``
processes on one PostgreSQL database sharing one identity, a real agent connected to B only,
real QUIC and HTTP on loopback.  A package uploaded on A deploys through B: B fetches it from
A, verified, and serves it to its agent.  A damaged copy on A fails the deployment with the
reason and leaves nothing in B's store; an unknown package is refused at submission; two
replicas sharing one ``--artifact-dir`` serve it without a fetch.

Needs the ``deploy-tar`` plugin installed.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import missing_part

from deploy_core.client import ApiError
from deploy_core.testing import DeployCenter

AGENT = "replica-agent"
# What a replica keeps for itself: its id, what it announces, its own artifact store.
OWN_FILES = {"server.id", "server.json", "artifacts"}


def replicas(root: Path, db_url: str, *args: str) -> tuple[DeployCenter, DeployCenter]:
    """Replicas A and B (B's state directory a copy of A's without its own files), both
    started with ``args``, an agent connected to B."""
    a = DeployCenter(root / "a", db_url=db_url)
    b = DeployCenter(root / "b", db_url=db_url)
    a.server_args = b.server_args = list(args)
    a.start_server()
    a.stop_server()
    shutil.copytree(a.server_dir, b.server_dir, ignore=lambda _d, names: OWN_FILES & set(names))
    a.start_server()
    b.start_server()
    b.start_agent(AGENT, timeout=60)
    types = next(c for c in b.api.clients() if c["client_id"] == AGENT)["capabilities"]
    if "deploy.tar" not in types["deploy_types"]:
        missing_part("deploy-tar must be installed")
    return a, b


@pytest.fixture
def pair(tmp_path: Path, pg_url: str) -> Iterator[tuple[DeployCenter, DeployCenter]]:
    centers: list[DeployCenter] = []
    try:
        a, b = replicas(tmp_path, pg_url)
        centers += [a, b]
        yield a, b
    finally:
        for center in centers:
            center.close()


def package(path: Path, version: str, blob: bytes) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, content in {"version": version.encode(), "blob.bin": blob}.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return path


def deploy_tar(center: DeployCenter, sha: str, target: Path) -> dict[str, Any]:
    deploy_id = center.deploy("tar", AGENT, artifact=sha, target_dir=str(target), timeout=120)
    return center.wait(deploy_id, timeout=180)


def stored(center: DeployCenter, sha: str) -> Path:
    return center.server_dir / "artifacts" / "sha256" / sha[:2] / sha


def test_upload_on_a_deploys_through_b_to_its_agent(
    pair: tuple[DeployCenter, DeployCenter], tmp_path: Path
) -> None:
    a, b = pair
    blob = os.urandom(4 << 20)
    pkg = package(tmp_path / "app-1.tar.gz", "1", blob)
    sha = a.api.upload_artifact(pkg)["sha256"]
    assert sha == hashlib.sha256(pkg.read_bytes()).hexdigest()
    assert b.api.artifact(sha)["size"] == pkg.stat().st_size  # known through B
    assert not stored(b, sha).exists()

    target = tmp_path / "srv" / "app"
    record = deploy_tar(b, sha, target)
    assert record["status"] == "success", record
    assert (target / "current" / "version").read_text() == "1"
    assert (target / "current" / "blob.bin").read_bytes() == blob
    # B holds its own verified copy now, and said where it came from.
    assert stored(b, sha).read_bytes() == pkg.read_bytes()
    a_id = (a.server_dir / "server.id").read_text().strip()
    assert f"fetched from replica {a_id}" in b.log("server")

    # A package no replica holds is refused at submission through B.
    with pytest.raises(ApiError) as refused:
        b.deploy("tar", AGENT, artifact="0" * 64, target_dir=str(target))
    assert refused.value.status == 404
    assert "upload the package first" in str(refused.value)


def test_a_damaged_copy_on_a_fails_the_deployment_with_the_reason(
    pair: tuple[DeployCenter, DeployCenter], tmp_path: Path
) -> None:
    a, b = pair
    pkg = package(tmp_path / "app-2.tar.gz", "2", os.urandom(1 << 20))
    sha = a.api.upload_artifact(pkg)["sha256"]
    copy = stored(a, sha)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))  # damaged on A's disk after the upload

    target = tmp_path / "srv" / "app"
    record = deploy_tar(b, sha, target)
    # Failed (the tar type's default rollback then finds no release before to go back to).
    assert record["status"] in ("failed", "rolled_back"), record
    assert f"do not hash to {sha}" in record["error"], record["error"]
    assert "nothing was stored" in record["error"]
    assert not stored(b, sha).exists()
    assert not [p for p in (b.server_dir / "artifacts" / "tmp").rglob("*") if p.is_file()]
    assert not (target / "current").exists()


def test_replicas_sharing_one_artifact_directory(tmp_path: Path, pg_url: str) -> None:
    shared = tmp_path / "shared-artifacts"
    a, b = replicas(tmp_path, pg_url, "--artifact-dir", str(shared))
    try:
        blob = os.urandom(1 << 20)
        pkg = package(tmp_path / "app-3.tar.gz", "3", blob)
        sha = a.api.upload_artifact(pkg)["sha256"]
        assert (shared / "sha256" / sha[:2] / sha).read_bytes() == pkg.read_bytes()

        target = tmp_path / "srv" / "app"
        record = deploy_tar(b, sha, target)
        assert record["status"] == "success", record
        assert (target / "current" / "blob.bin").read_bytes() == blob
        assert "fetched from replica" not in b.log("server")  # read from the shared directory
        assert not (b.server_dir / "artifacts").exists()
    finally:
        for center in (a, b):
            center.close()
