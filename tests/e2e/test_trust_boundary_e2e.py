"""The agent's trust boundary end to end (issue 10 §4): an agent running as root whose
constraints set ``run_as`` (a real unprivileged user) and ``workdir_roots``.  Every path a
plugin touches — a tar ``target_dir``, a snapshot ``path`` — is refused outside them before
anything is written, and a script (running as that user) that swaps a symlink to a root-only
directory into a path the agent later works on cannot make the agent touch that directory.

Real server and agent processes, real QUIC, real files; needs root (to switch users) and
the deploy-tar and rollback-basic plugins.
"""

from __future__ import annotations

import io
import os
import pwd
import shutil
import signal
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import missing_part

from deploy_core.testing import DeployCenter, tree_fingerprint

AGENT = "bounded"
USER = "nobody"
INSTALL = '#!/bin/sh\nid -un > "$TARGET_DIR/installed-by"\n'


def build(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def site() -> Iterator[Path]:
    """A directory every user may enter, holding ``apps`` (the only root, owned by the
    run-as user) and a root-only ``decoy`` standing for /etc, /root and the like."""
    if os.geteuid() != 0:
        missing_part("an agent with run_as must run as root")
    user = pwd.getpwnam(USER)
    base = Path(tempfile.mkdtemp(prefix="trust-boundary-"))
    base.chmod(0o755)
    apps = base / "apps"
    apps.mkdir()
    os.chown(apps, user.pw_uid, user.pw_gid)
    decoy = base / "decoy"
    (decoy / "releases" / "old" / "etc").mkdir(parents=True)
    (decoy / "releases" / "old" / "etc" / "shadow").write_text("root:secret\n")
    (decoy / "keys").write_text("private\n")
    decoy.chmod(0o700)
    try:
        yield base
    finally:
        shutil.rmtree(base)


@pytest.fixture(scope="module")
def center(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    config = f'[constraints]\nrun_as = "{USER}"\nworkdir_roots = ["{site / "apps"}"]\n'
    c = DeployCenter(tmp_path_factory.mktemp("trust"))
    try:
        c.start_server()
        c.start_agent(AGENT, config=config)
        kinds = next(x for x in c.api.clients() if x["client_id"] == AGENT)["capabilities"]
        if "deploy.tar" not in kinds["deploy_types"]:
            missing_part("deploy-tar must be installed")
        if "snapshot" not in kinds["rollback_strategies"]:
            missing_part("rollback-basic must be installed")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def package(center: DeployCenter, site: Path) -> str:
    built = build(site / "app.tar.gz", {"install.sh": INSTALL, "index.html": "v1\n"})
    sha: str = center.api.upload_artifact(built)["sha256"]
    return sha


def deploy_tar(center: DeployCenter, sha: str, target: Path, **fields: object) -> dict:
    body = {"client_id": AGENT, "artifact": sha, "target_dir": str(target), "timeout": 60}
    accepted = center.api.deploy("tar", {**body, **fields})
    return center.wait(accepted["deploy_id"], timeout=90)


def test_a_tar_target_outside_the_roots_is_refused_before_anything_is_written(
    center: DeployCenter, package: str, site: Path
) -> None:
    record = deploy_tar(center, package, site / "outside" / "app")
    assert record["status"] == "failed"
    # The release strategy's prepare (the default rollback) or the executor: either way,
    # before anything is written.
    assert record["error"].endswith(
        f"refused by constraint workdir_roots: tar target_dir {site}/outside/app is outside "
        f"the allowed roots {site}/apps"
    )
    assert not (site / "outside").exists()


def test_a_tar_target_the_run_as_user_could_not_write_is_refused(
    center: DeployCenter, package: str, site: Path
) -> None:
    closed = site / "apps" / "root-owned"
    closed.mkdir(exist_ok=True)  # root's, 0755: inside the roots, not the user's to write
    record = deploy_tar(center, package, closed / "app")
    assert record["status"] == "failed"
    assert (
        f"refused by constraint run_as: tar target_dir {closed}/app: {USER} " in (record["error"])
    )
    assert "cannot create entries in" in record["error"]
    assert list(closed.iterdir()) == []


def test_a_snapshot_path_outside_the_roots_is_refused_before_the_script_runs(
    center: DeployCenter, site: Path
) -> None:
    marker = site / "apps" / "ran"
    deploy_id = center.deploy(
        "shell",
        AGENT,
        script=f"touch {marker}",
        workdir=str(site / "apps"),
        rollback={"strategy": "snapshot", "path": str(site / "decoy")},
    )
    record = center.wait(deploy_id, timeout=60)
    assert record["status"] == "failed"
    assert "refused by constraint workdir_roots: snapshot path" in record["error"]
    assert not marker.exists()


def test_inside_the_roots_a_tar_deployment_runs_as_the_user(
    center: DeployCenter, package: str, site: Path
) -> None:
    target = site / "apps" / "web"
    target.mkdir(exist_ok=True)
    user = pwd.getpwnam(USER)
    os.chown(target, user.pw_uid, user.pw_gid)
    record = deploy_tar(center, package, target)
    assert record["status"] == "success", record["error"]
    assert (target / "installed-by").read_text().strip() == USER
    assert (target / "current" / "index.html").read_text() == "v1\n"


def test_a_script_swapping_links_to_a_root_only_dir_cannot_make_the_agent_touch_it(
    center: DeployCenter, package: str, site: Path
) -> None:
    target = site / "apps" / "web"
    if not (target / "current").exists():
        test_inside_the_roots_a_tar_deployment_runs_as_the_user(center, package, site)
    decoy = site / "decoy"
    before = tree_fingerprint(decoy)

    # The user's script replaces releases/ (in its own target directory) with a link to the
    # root-only directory; the next deployment would prune there (keep_releases=1).
    swap = center.deploy(
        "shell",
        AGENT,
        script=f"mv releases releases.mine && ln -s {decoy}/releases releases",
        workdir=str(target),
    )
    assert center.wait(swap, timeout=60)["status"] == "success"
    record = deploy_tar(center, package, target, keep_releases=1)
    # Refused, and so is the default rollback that would switch ``current`` back in there.
    assert record["status"] in ("failed", "rollback_failed"), record
    assert f"{target}/releases exists and is not a directory (a symlink" in record["error"]
    assert tree_fingerprint(decoy) == before

    # It then replaces the whole target directory with a link to the root-only directory.
    swap = center.deploy(
        "shell",
        AGENT,
        script=f"mv {target} {target}.mine && ln -s {decoy} {target}",
        workdir=str(site / "apps"),
    )
    assert center.wait(swap, timeout=60)["status"] == "success"
    record = deploy_tar(center, package, target, keep_releases=1)
    assert record["status"] in ("failed", "rollback_failed"), record
    assert (
        f"refused by constraint workdir_roots: tar target_dir {target} (resolves to {decoy})"
        in record["error"]
    )
    assert tree_fingerprint(decoy) == before


def test_a_snapshot_restore_runs_as_root_only_inside_what_the_user_owns(
    center: DeployCenter, site: Path
) -> None:
    user = pwd.getpwnam(USER)
    parent = site / "apps" / "p"
    app = parent / "site"
    app.mkdir(parents=True)
    (app / "index.html").write_text("v1\n")
    for path in (parent, app, app / "index.html"):
        os.chown(path, user.pw_uid, user.pw_gid)
    rollback = {"strategy": "snapshot", "path": str(app)}

    # An ordinary failure as the user: restored exactly.
    failed = center.deploy(
        "shell",
        AGENT,
        script="echo v2 > index.html; touch new; exit 1",
        workdir=str(app),
        rollback=rollback,
    )
    record = center.wait(failed, timeout=60)
    assert record["status"] == "rolled_back", record
    assert sorted(os.listdir(app)) == ["index.html"]
    assert (app / "index.html").read_text() == "v1\n"

    # The failing script swaps the snapshot path's parent for a link to a root-only
    # directory that has a "site" too: the restore must not replace it.
    decoy = site / "decoy"
    (decoy / "site").mkdir(exist_ok=True)
    before = tree_fingerprint(decoy)
    swap = f"cd {site}/apps && mv p p.mine && ln -s {decoy} p; exit 1"
    record = center.wait(
        center.deploy("shell", AGENT, script=swap, workdir=str(app), rollback=rollback), timeout=60
    )
    assert record["status"] == "rollback_failed", record
    assert (
        f"refused by constraint workdir_roots: snapshot path {app} (resolves to {decoy}/site)"
        in record["rollback"]["error"]
    )
    assert tree_fingerprint(decoy) == before


def link_maze(path: Path, links: int, parts: int = 1500) -> Path:
    """A package every member of which is allowed, but whose symlinks take the pre-scan
    millions of steps to resolve."""
    with tarfile.open(path, "w") as tar:
        for i in range(links):
            info = tarfile.TarInfo(f"l{i}")
            info.type, info.linkname = tarfile.SYMTYPE, "./" * parts + "x"
            tar.addfile(info)
        info = tarfile.TarInfo("x")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return path


def test_the_agent_stops_on_sigterm_in_the_middle_of_a_long_pre_scan(
    center: DeployCenter, site: Path, tmp_path: Path
) -> None:
    center.start_agent("busy")
    sha = center.api.upload_artifact(link_maze(tmp_path / "maze.tar", links=6000))["sha256"]
    target = site / "busy-app"
    accepted = center.api.deploy(
        "tar", {"client_id": "busy", "artifact": sha, "target_dir": str(target), "timeout": 600}
    )
    deploy_id = accepted["deploy_id"]
    for _ in range(600):  # until the agent is in the pre-scan
        if center.api.get(deploy_id)["status"] == "extracting":
            break
        time.sleep(0.05)
    assert center.api.get(deploy_id)["status"] == "extracting"

    proc = center.agents.pop("busy")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0  # on its own: the scan thread stopped when told

    center.start_agent("busy")  # the restarted agent settles the interrupted deployment
    record = center.wait(deploy_id, timeout=120)
    assert record["status"] in ("failed", "rolled_back", "rollback_failed"), record
    assert not (target / "releases").exists() or not os.listdir(target / "releases")
