"""``deployctl server --file-workers 2`` end to end: a real server and agent process, a tar
package served by a file worker, and the workers gone with a server killed by SIGKILL."""

from __future__ import annotations

import io
import os
import signal
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import missing_part

from deploy_core.testing import DeployCenter

AGENT = "fw-e2e"


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def center(tmp_path: Path) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path)
    c.server_args = ["--file-workers", "2"]
    try:
        c.start_server()
        c.start_agent(AGENT)
        types = next(x for x in c.api.clients() if x["client_id"] == AGENT)["capabilities"]
        if "deploy.tar" not in types["deploy_types"]:
            missing_part("deploy-tar must be installed")
        yield c
    finally:
        c.close()


def test_a_package_comes_from_a_file_worker_and_the_workers_die_with_the_server(
    center: DeployCenter, tmp_path: Path
) -> None:
    package = tmp_path / "app.tar.gz"
    blob = os.urandom(5 << 20)
    with tarfile.open(package, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("blob.bin")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    sha = center.api.upload_artifact(package)["sha256"]
    target = tmp_path / "target"

    body = {"client_id": AGENT, "artifact": sha, "target_dir": str(target), "timeout": 120}
    record = center.wait(center.api.deploy("tar", body)["deploy_id"], 120)

    assert record["status"] == "success", record
    assert any(path.read_bytes() == blob for path in target.rglob("blob.bin"))
    log = center.log("server")
    assert "2 file workers serving artifacts on UDP ports" in log
    assert f"INFO deploy_core.transport.files: sending artifact {sha[:12]} to {AGENT}" in log
    served_by = [
        line for line in log.splitlines() if f"sending artifact {sha[:12]} to {AGENT}" in line
    ]
    assert served_by and all(" file-worker-" in line for line in served_by), served_by

    workers = children(center.server_proc.pid)
    assert len(workers) == 2
    center.stop_server(signal.SIGKILL)
    deadline = time.monotonic() + 15
    while [pid for pid in workers if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)], "file workers outlived a killed server"
