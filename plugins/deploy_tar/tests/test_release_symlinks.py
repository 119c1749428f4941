"""A script swapping symlinks in at each step of deploy.tar's root file operations —
creating the layout, staging and extracting, moving the release in, marking it bad, writing
the ledger, switching ``current``, pruning — cannot make the agent read, write or delete
anything outside the target directory.  A decoy directory stands for a root-only one; it
must be unchanged afterwards, and a refusal must name the path."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
from conftest import ContextFactory, LocalArtifacts

from deploy_core.agent.context import DeployContext, DeployFailed
from deploy_core.models import DeployCommand, DeployStatus
from deploy_core.plugin import WorkBudget, WorkStopped, run_bounded
from deploy_core.testing import RecordingReporter, tree_fingerprint
from deploy_tar.deploy import deploy_release
from deploy_tar.extract import scan_archive
from deploy_tar.params import TarParams
from deploy_tar.releases import LEDGER, ReleaseError, Releases
from deploy_tar.scripts import _read

Package = Callable[..., str]


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """Stands for a root-only directory, shaped like a target directory."""
    root = tmp_path / "decoy"
    for name in ("r1", "r2", "r3", "r4"):
        (root / "releases" / name / "etc").mkdir(parents=True)
        (root / "releases" / name / "etc" / "shadow").write_text("root:secret\n")
    (root / "current").symlink_to("releases/r1")
    (root / LEDGER).write_text('{"releases": []}\n')
    root.chmod(0o700)
    return root


def made(target: Path, *names: str) -> Releases:
    releases = Releases(target)
    releases.create()
    for name in names:
        releases.path(name).mkdir()
        (releases.path(name) / "app.txt").write_text(name)
        releases.record(name, sha256="0" * 64, install_script=None)
    return releases


def swap_for_link(path: Path, target: Path) -> None:
    os.rename(path, path.with_name(path.name + ".moved"))
    path.symlink_to(target)


def test_prune_refuses_releases_swapped_for_a_link(tmp_path: Path, decoy: Path) -> None:
    releases = made(tmp_path / "app", "r1", "r2", "r3", "r4")
    before = tree_fingerprint(decoy)
    swap_for_link(releases.root, decoy / "releases")

    with pytest.raises(ReleaseError, match=r"releases exists and is not a directory \(a symlink"):
        releases.prune(1, {"r4"})

    assert tree_fingerprint(decoy) == before
    assert sorted(os.listdir(tmp_path / "app" / "releases.moved")) == ["r1", "r2", "r3", "r4"]


def test_prune_never_follows_a_link_swapped_in_while_removing(tmp_path: Path, decoy: Path) -> None:
    target = tmp_path / "app"
    before = tree_fingerprint(decoy)
    for at in range(1, 7):  # removing r1 and r2 takes six steps: app.txt, etc, etc/conf
        shutil.rmtree(target, ignore_errors=True)
        releases = made(target, "r1", "r2", "r3")
        for name in ("r1", "r2"):
            (releases.path(name) / "etc").mkdir()
            (releases.path(name) / "etc" / "conf").write_text("x")

        def swap(releases: Releases = releases) -> None:
            for name in ("r1", "r2"):
                etc = releases.path(name) / "etc"
                if etc.is_dir() and not etc.is_symlink():
                    shutil.rmtree(etc)
                    etc.symlink_to(decoy / "releases" / "r1" / "etc")

        budget = SwapAt(at, swap)
        releases.prune(1, set(), budget=budget)
        assert budget.swapped
        assert tree_fingerprint(decoy) == before, f"decoy changed when swapped at step {at}"
        assert releases.names() == ["r3"]


class SwapAt(WorkBudget):
    """A budget that runs ``swap`` at its ``at``-th step: a script acting mid-operation."""

    def __init__(self, at: int, swap: Callable[[], None]) -> None:
        super().__init__("test", steps=10**9, seconds=3600)
        self.at, self.swap, self.count, self.swapped = at, swap, 0, False

    def step(self, n: int = 1) -> None:
        self.count += n
        if not self.swapped and self.count >= self.at:
            self.swapped = True
            self.swap()
        super().step(n)


def test_a_target_dir_replaced_after_create_is_refused_at_every_later_step(
    tmp_path: Path, decoy: Path
) -> None:
    releases = made(tmp_path / "app", "r1", "r2")
    releases.switch("r1")
    before = tree_fingerprint(decoy)
    swap_for_link(tmp_path / "app", decoy)  # current's parent is now the decoy

    for step in (
        lambda: releases.switch("r2"),
        lambda: releases.mark_bad("r1", "bad"),
        lambda: releases.record("r3", sha256="1" * 64, install_script=None),
        lambda: releases.remove_current(),
        lambda: releases.prune(0, set()),
    ):
        with pytest.raises(ReleaseError) as caught:
            step()
        assert f"refusing to work as root on {tmp_path / 'app'}: it is a symbolic link" in str(
            caught.value
        )
    assert tree_fingerprint(decoy) == before

    # A real directory put in its place is refused too: it is not the one recorded.
    (tmp_path / "app").unlink()
    (tmp_path / "app" / "releases" / "r2").mkdir(parents=True)
    with pytest.raises(ReleaseError, match="was replaced since it was recorded"):
        releases.switch("r2")


def test_links_planted_at_current_the_ledger_and_the_bad_marker_are_replaced_not_followed(
    tmp_path: Path, decoy: Path
) -> None:
    releases = made(tmp_path / "app", "r1")
    before = tree_fingerprint(decoy)
    releases.ledger_path.unlink()
    releases.ledger_path.symlink_to(decoy / LEDGER)
    (releases.path("r1") / ".deploy-tar-bad").symlink_to(
        decoy / "releases" / "r2" / "etc" / "shadow"
    )

    releases.record("r1", sha256="0" * 64, install_script=None)
    releases.mark_bad("r1", "failed")

    assert tree_fingerprint(decoy) == before
    assert not releases.ledger_path.is_symlink() and "r1" in releases.ledger_path.read_text()
    assert (releases.path("r1") / ".deploy-tar-bad").read_text().endswith(" failed\n")


def test_an_install_script_read_through_a_swapped_releases_link_is_refused(
    tmp_path: Path, decoy: Path
) -> None:
    releases = made(tmp_path / "app", "r1")
    (releases.path("r1") / "install.sh").write_text("echo hi\n")
    (decoy / "releases" / "r1" / "install.sh").write_text("root-only script\n")
    swap_for_link(releases.root, decoy / "releases")
    with pytest.raises(ReleaseError, match="cannot read the script: refusing to work as root"):
        _read(releases.path("r1"), "install.sh")


async def test_a_deployment_racing_a_releases_swapper_never_writes_outside(
    tar_context: ContextFactory, package: Package, tmp_path: Path, decoy: Path
) -> None:
    """A script (here a thread) swaps ``releases/`` for a link to the decoy and back, as
    fast as it can, while deployments run: each ends in success or a clear refusal, and the
    decoy never changes."""
    target = tmp_path / "app"
    files = {f"f{i}.txt": f"{i}\n" * 2000 for i in range(30)}
    files["etc/shadow"] = "planted\n"
    sha = package(files)
    before = tree_fingerprint(decoy)
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        link = target / "releases.link"
        while not stop.is_set():
            try:
                link.symlink_to(decoy / "releases")
                os.rename(target / "releases", target / "releases.real")
                os.rename(link, target / "releases")
                os.rename(target / "releases", link)
                os.rename(target / "releases.real", target / "releases")
                link.unlink()
                swaps += 1
            except OSError:
                pass

    outcomes = []
    # The swapper is a daemon stopped in ``finally``: a failure here must not leave it
    # spinning and keep the test process from exiting.
    thread = threading.Thread(target=swapper, daemon=True)
    try:
        for i in range(6):
            fields = {"artifact": sha, "target_dir": str(target), "keep_releases": 1}
            if i == 1:
                thread.start()
            ctx, _ = tar_context(fields, deploy_id=f"d{i}")
            try:
                await deploy_release(ctx, TarParams.model_validate(fields))
                outcomes.append("success")
            except DeployFailed as exc:
                outcomes.append(str(exc))
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=10)
    assert swaps > 0
    assert tree_fingerprint(decoy) == before, outcomes
    for outcome in outcomes:  # a failure names the target (the race, not a crash)
        assert outcome == "success" or str(target) in outcome, outcome


# --------------------------------------------------------------------------- bounded work


def link_maze(path: Path, links: int = 3000, parts: int = 1500) -> Path:
    """An archive every member of which is allowed, but whose symlink targets take the
    pre-scan millions of steps to resolve: many links, each a long walk of ``./``."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i in range(links):
            info = tarfile.TarInfo(f"l{i}")
            info.type = tarfile.SYMTYPE
            info.linkname = "./" * parts + "x"
            tar.addfile(info)
        data = b"x"
        info = tarfile.TarInfo("x")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_a_pre_scan_over_its_step_budget_stops_with_a_clear_error(tmp_path: Path) -> None:
    maze = link_maze(tmp_path / "maze.tar")
    budget = WorkBudget("extraction of maze", steps=200_000, seconds=3600)

    async def scan() -> object:
        return await run_bounded(lambda: scan_archive(maze), budget)

    with pytest.raises(WorkStopped) as caught:
        asyncio.run(scan())
    assert (
        str(caught.value) == "extraction of maze stopped: more than 200000 steps of work; refusing"
    )


async def test_a_cancelled_pre_scan_stops_its_thread_before_the_timeout_is_heard(
    tmp_path: Path,
) -> None:
    maze = link_maze(tmp_path / "maze.tar", links=20000)
    budget = WorkBudget("extraction of maze", steps=10**12, seconds=3600)
    finished = threading.Event()

    def scan() -> None:
        try:
            scan_archive(maze)
        finally:
            finished.set()

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_bounded(scan, budget), 0.5)
    assert finished.is_set()  # the thread is done, not still resolving links
    assert budget.cancelled and budget.used > 0


async def test_a_timed_out_deployment_leaves_no_thread_scanning(
    tar_context: ContextFactory, artifacts: LocalArtifacts, tmp_path: Path
) -> None:
    sha = artifacts.add(link_maze(tmp_path / "maze.tar", links=20000))
    fields = {"artifact": sha, "target_dir": str(tmp_path / "app"), "timeout": 1}
    ctx, _ = tar_context(fields)

    with pytest.raises(DeployFailed) as caught:
        await deploy_release(ctx, TarParams.model_validate(fields))

    assert caught.value.status == DeployStatus.TIMEOUT
    assert "extraction did not finish within the deployment's timeout of 1 s" in str(caught.value)
    # The deployment is over: no thread of it is still resolving the maze's links.
    working = {"scan_archive", "extract_archive", "_check_resolves"}
    for frame in sys._current_frames().values():
        names = {f.f_code.co_name for f in _stack(frame)}
        assert not names & working, names
    assert not list((tmp_path / "app" / "releases").iterdir())


def _stack(frame: FrameType | None) -> Iterator[FrameType]:
    while frame is not None:
        yield frame
        frame = frame.f_back


def missing_part(reason: str) -> None:
    """Skip, or fail under ``DEPLOY_CENTER_STRICT=1``, because a real part is missing."""
    if os.environ.get("DEPLOY_CENTER_STRICT") == "1":
        pytest.fail(f"required part missing (DEPLOY_CENTER_STRICT=1): {reason}")
    pytest.skip(reason)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A separate file system (tmpfs) mounted under ``tmp_path``."""
    import subprocess

    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        missing_part(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_on_another_file_system_the_package_is_staged_at_its_root_privately(
    tar_context: ContextFactory, package: Package, tmpfs: Path
) -> None:
    sha = package({"index.html": "v1\n"})
    target = tmpfs / "srv" / "app"
    fields = {"artifact": sha, "target_dir": str(target)}
    ctx, _ = tar_context(fields, deploy_id="d1")

    await deploy_release(ctx, TarParams.model_validate(fields))

    assert (target / "current" / "index.html").read_text() == "v1\n"
    staging = tmpfs / ".deploy-tar-staging"
    assert staging.stat().st_mode & 0o777 == 0o700 and list(staging.iterdir()) == []


async def test_a_staging_area_a_script_could_reach_is_refused(
    tar_context: ContextFactory, package: Package, tmpfs: Path
) -> None:
    sha = package({"index.html": "v1\n"})
    tmpfs.parent.chmod(0o777)  # anyone could rename the mount point's entry: not private
    try:
        fields = {"artifact": sha, "target_dir": str(tmpfs / "app")}
        ctx, _ = tar_context(fields)
        with pytest.raises(DeployFailed) as caught:
            await deploy_release(ctx, TarParams.model_validate(fields))
    finally:
        tmpfs.parent.chmod(0o700)
    assert "cannot extract the package where no script can reach it" in str(caught.value)
    assert f"{tmpfs.parent} is not a directory only the agent can change" in str(caught.value)


async def test_a_deployment_works_when_the_agents_data_dir_is_reached_through_a_link(
    artifacts: LocalArtifacts, package: Package, tmp_path: Path
) -> None:
    (tmp_path / "disk2" / "data").mkdir(parents=True)
    (tmp_path / "state").symlink_to(tmp_path / "disk2")  # a state directory moved elsewhere
    sha = package({"index.html": "v1\n"})
    fields = {"artifact": sha, "target_dir": str(tmp_path / "app")}
    command = DeployCommand(
        deploy_id="d1", command_type="deploy.tar", params=fields, expires_at=time.time() + 120
    )
    ctx = DeployContext(
        command=command,
        reporter=RecordingReporter(),
        data_dir=tmp_path / "state" / "data",
        artifacts=artifacts,
    )

    await deploy_release(ctx, TarParams.model_validate(fields))

    assert (tmp_path / "app" / "current" / "index.html").read_text() == "v1\n"
