"""The ``snapshot`` strategy: prepare, roll back, discard, on real directories."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from deploy_core.plugin import RollbackTarget, run_bounded, safefs
from pydantic import ValidationError
from rollback_bed import undo

from rollback_basic.errors import RollbackError
from rollback_basic.snapshot import SNAPSHOT, SnapshotParams

T0 = 1_600_000_000_000_000_000  # fixed mtimes (ns), so unchanged files really are unchanged


def build_app(root: Path, outside: Path) -> None:
    """An application directory with a bit of everything a restore must get right."""
    (root / "bin").mkdir(parents=True)
    (root / "conf").mkdir()
    (root / "empty").mkdir()
    (root / "static" / "css").mkdir(parents=True)
    (root / "readonly").mkdir()
    (root / "index.html").write_text("<h1>v1</h1>\n")
    (root / "bin" / "run.sh").write_text("#!/bin/sh\nexec app v1\n")
    (root / "bin" / "run.sh").chmod(0o755)
    (root / "conf" / "app.conf").write_text("port = 8080\n")
    (root / "conf" / "app.conf").chmod(0o640)
    (root / "conf" / "secret.key").write_bytes(os.urandom(256))
    (root / "conf" / "secret.key").chmod(0o600)
    (root / "static" / "css" / "site.css").write_text("body{}\n" * 500)
    (root / "readonly" / "fixed.txt").write_text("fixed\n")
    (root / "data.bin").write_bytes(bytes(range(256)) * 40)
    os.link(root / "data.bin", root / "data-hardlink.bin")
    (root / "current").symlink_to("bin/run.sh")
    (root / "dangling").symlink_to("no/such/file")
    outside.mkdir(exist_ok=True)
    (outside / "not-mine.txt").write_text("outside\n")
    (root / "shared").symlink_to(outside)  # must be kept as a link, never followed
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(path, ns=(T0 + i, T0 + i), follow_symlinks=False)
    (root / "readonly").chmod(0o555)
    os.utime(root, ns=(T0, T0))


def deploy_v2(root: Path) -> None:
    """What a (failed) deployment does to the directory: change, add, delete, re-mode, relink."""
    (root / "index.html").write_text("<h1>v2</h1>\n")  # changed in place
    (root / "new.txt").write_text("added\n")
    (root / "conf" / "app.conf").unlink()
    (root / "bin" / "run.sh").chmod(0o700)
    (root / "current").unlink()
    (root / "current").symlink_to("index.html")  # replaced symlink
    (root / "plugins" / "auth").mkdir(parents=True)  # added subdirectory
    (root / "plugins" / "auth" / "auth.py").write_text("x = 1\n")
    (root / "empty").rmdir()
    (root / "static" / "css" / "site.css").write_text("body{color:red}\n")
    (root / "data-hardlink.bin").write_bytes(b"unlinked")


def snapshot_params(path: Path, **extra: object) -> SnapshotParams:
    return SnapshotParams.model_validate({"strategy": "snapshot", "path": str(path), **extra})


def inode(path: Path) -> int:
    return os.lstat(path).st_ino


def snapshot_dirs(data_dir: Path) -> list[str]:
    (holder,) = (data_dir / "snapshots").iterdir()
    return sorted(p.name for p in holder.iterdir() if p.is_dir())


@pytest.fixture
def app(tmp_path: Path) -> Path:
    root = tmp_path / "srv" / "app"
    build_app(root, tmp_path / "outside")
    return root


async def test_rollback_restores_the_directory_byte_for_byte(
    app, data_dir, deployment, failed, tree_of
):
    before = tree_of(app)
    recorded = [app.lstat().st_dev, app.lstat().st_ino]
    params = snapshot_params(app)
    ctx, reporter = deployment("d-1")

    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    deploy_v2(app)
    assert tree_of(app) != before
    failed(ctx, "script exited with code 1", params.model_dump(), state)
    await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    assert tree_of(app) == before
    assert os.lstat(app / "data.bin").st_ino == os.lstat(app / "data-hardlink.bin").st_ino
    file_bytes = sum(len(entry[3]) for entry in before.values() if entry[0] == "file")
    assert state == {
        "snapshot": str(data_dir / "snapshots" / Path(state["snapshot"]).parent.name / "d-1"),
        "path": str(app),
        "absent": False,
        "files": 8,
        "bytes": file_bytes,
        "resolved": str(app),
        "parent_identity": [app.parent.stat().st_dev, app.parent.stat().st_ino],
        "identity": recorded,
        "processes": [],  # nothing runs from it (test_snapshot_processes.py has that)
        "units": {},
        "taken_ticks": state["taken_ticks"],
    }
    assert json.loads(json.dumps(state)) == state
    assert not list(app.parent.glob(".app.rollback-*"))  # nothing left beside it
    lines = reporter.lines()
    assert any(line.startswith("snapshot: ") and "8 files" in line for line in lines)
    assert any(line.startswith("restore: ") and "restored" in line for line in lines)


async def test_snapshot_hard_links_unchanged_files_to_the_previous_snapshot_only(app, deployment):
    params = snapshot_params(app)
    ctx1, _ = deployment("d-1")
    first = Path((await SNAPSHOT.prepare(ctx1, undo(ctx1, params)))["snapshot"]) / "tree"
    await SNAPSHOT.discard(ctx1, undo(ctx1, params, None))
    (app / "index.html").write_text("<h1>v2</h1>\n")
    (app / "bin" / "run.sh").chmod(0o700)  # same content, new mode: not shared
    os.utime(app / "conf" / "app.conf", ns=(T0, T0 + 99))  # same content, new mtime: not shared

    ctx2, reporter = deployment("d-2")
    second = Path((await SNAPSHOT.prepare(ctx2, undo(ctx2, params)))["snapshot"]) / "tree"

    for name in ["conf/secret.key", "static/css/site.css", "data.bin", "readonly/fixed.txt"]:
        assert inode(second / name) == inode(first / name), name
    for name in ["index.html", "bin/run.sh", "conf/app.conf"]:
        assert inode(second / name) != inode(first / name), name
    # Never linked to the live directory, in either snapshot.
    for live in app.rglob("*"):
        if live.is_file() and not live.is_symlink():
            rel = live.relative_to(app)
            assert inode(live) not in {inode(first / rel), inode(second / rel)}, rel
    assert any(
        "4 unchanged files hard-linked from the snapshot before d-1, 3 copied" in line
        for line in reporter.lines()
    )


async def test_restored_files_are_not_linked_to_the_snapshot(app, deployment, failed, tree_of):
    before = tree_of(app)
    params = snapshot_params(app)
    ctx, _ = deployment("d-1")
    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    failed(ctx, "script exited with code 1", params.model_dump(), state)
    await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    snapshot_inodes = {inode(p) for p in Path(state["snapshot"]).rglob("*")}
    live_inodes = {inode(p) for p in app.rglob("*")}
    assert not snapshot_inodes & live_inodes
    # An in-place write after the restore must not reach the snapshot: restore again.
    with open(app / "static" / "css" / "site.css", "r+b") as f:
        f.write(b"CORRUPT")
    await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    assert tree_of(app) == before


async def test_discard_keeps_only_the_newest_snapshots(app, data_dir, deployment, manual_rollback):
    params = snapshot_params(app, keep=2)
    states = {}
    for n in range(1, 5):
        ctx, _ = deployment(f"d-{n}")
        states[n] = await SNAPSHOT.prepare(ctx, undo(ctx, params))
        (app / f"release-{n}.txt").write_text(str(n))
        await SNAPSHOT.discard(ctx, undo(ctx, params, states[n]))

    assert snapshot_dirs(data_dir) == ["d-3", "d-4"]
    ctx, _ = manual_rollback(
        RollbackTarget(deploy_id="d-1", command_type="deploy.shell", rollback=params.model_dump())
    )
    with pytest.raises(RollbackError, match="no longer exists"):
        await SNAPSHOT.rollback(ctx, undo(ctx, params, states[1]))


async def test_absent_directory_is_removed_on_rollback(tmp_path, deployment, failed):
    app = tmp_path / "srv" / "fresh"
    params = snapshot_params(app)
    ctx, _ = deployment("d-1")

    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    assert state["absent"] is True
    assert (state["files"], state["bytes"]) == (0, 0)
    (app / "sub").mkdir(parents=True)
    (app / "sub" / "file.txt").write_text("new")
    failed(ctx, "health check failed", params.model_dump(), state)
    await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    assert not app.exists()
    assert list((tmp_path / "srv").iterdir()) == []


async def test_restart_runs_after_the_restore(app, deployment, failed, read_env, tmp_path):
    out = tmp_path / "restart"
    params = snapshot_params(
        app, restart=f"cat index.html > {out}.seen\nenv > {out}.env", timeout=10
    )
    ctx, reporter = deployment("d-1")
    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    deploy_v2(app)
    failed(ctx, "script exited with code 2", params.model_dump(), state)

    await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    assert Path(f"{out}.seen").read_text() == "<h1>v1</h1>\n"  # ran in the restored dir
    env = read_env(Path(f"{out}.env"))
    assert (env["DEPLOY_ACTION"], env["DEPLOY_ROLLBACK_OF"]) == ("rollback", "d-1")
    assert env["DEPLOY_FAILURE_REASON"] == "script exited with code 2"
    assert any("restart script finished" in line for line in reporter.lines())


async def test_failing_restart_fails_the_rollback_after_restoring(app, deployment, failed, tree_of):
    before = tree_of(app)
    params = snapshot_params(app, restart="echo 'unit not found' >&2; exit 5")
    ctx, _ = deployment("d-1")
    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    deploy_v2(app)
    failed(ctx, "script exited with code 2", params.model_dump(), state)

    with pytest.raises(
        RollbackError,
        match=r"was restored, but restart script exited with "
        r"code 5: unit not found",
    ):
        await SNAPSHOT.rollback(ctx, undo(ctx, params, state))
    assert tree_of(app) == before


async def test_manual_rollback_of_a_successful_deployment_restores_the_earlier_state(
    app, deployment, manual_rollback, tree_of
):
    before = tree_of(app)
    params = snapshot_params(app)
    rollback = {"strategy": "snapshot", "path": str(app)}
    ctx, _ = deployment("d-1", params={"script": "./install.sh"})
    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    deploy_v2(app)  # the deployment succeeds
    await SNAPSHOT.discard(ctx, undo(ctx, params, state))
    saved = json.loads(json.dumps(state))  # as kept by the server
    (app / "later.log").write_text("written while v2 ran\n")

    target = RollbackTarget(
        deploy_id="d-1",
        command_type="deploy.shell",
        params={"script": "./install.sh"},
        rollback=rollback,
        rollback_state=saved,
    )
    rctx, _ = manual_rollback(target)
    options = SnapshotParams.model_validate(target.rollback)
    await SNAPSHOT.rollback(rctx, undo(rctx, options, target.rollback_state))

    assert tree_of(app) == before


async def test_restore_without_atomic_exchange_falls_back_to_two_renames(
    app, deployment, failed, tree_of, monkeypatch
):
    monkeypatch.setattr(safefs, "exchange_at", lambda *args: False)
    before = tree_of(app)
    params = snapshot_params(app)
    ctx, _ = deployment("d-1")
    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    deploy_v2(app)
    failed(ctx, "script exited with code 1", params.model_dump(), state)

    await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    assert tree_of(app) == before


async def test_leftovers_of_an_interrupted_restore_are_cleared(app, deployment, failed):
    params = snapshot_params(app)
    ctx, _ = deployment("d-1")
    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    leftover = app.parent / ".app.rollback-new-0badf00d"
    (leftover / "half").mkdir(parents=True)
    leftover.chmod(0o700)  # a staging directory is private until it is swapped in
    failed(ctx, "script exited with code 1", params.model_dump(), state)

    await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    assert sorted(p.name for p in app.parent.iterdir()) == ["app"]


@pytest.mark.parametrize("path", ["/", "//", "/srv/..", "relative/app", ""])
def test_root_and_relative_paths_are_refused(path):
    with pytest.raises(ValidationError):
        SnapshotParams.model_validate({"strategy": "snapshot", "path": path})


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
async def test_paths_inside_or_holding_the_data_dir_are_refused(where, data_dir, deployment):
    path = {"inside": data_dir / "x", "same": data_dir, "parent": data_dir.parent}[where]
    ctx, _ = deployment("d-1")

    with pytest.raises(RollbackError, match="agent's data directory"):
        await SNAPSHOT.prepare(ctx, undo(ctx, snapshot_params(path)))


async def test_a_symlink_or_file_as_the_path_is_refused(app, tmp_path, deployment):
    link = tmp_path / "current"
    link.symlink_to(app)
    ctx, _ = deployment("d-1")

    with pytest.raises(RollbackError, match="not a directory"):
        await SNAPSHOT.prepare(ctx, undo(ctx, snapshot_params(link)))
    with pytest.raises(RollbackError, match="not a directory"):
        await SNAPSHOT.prepare(ctx, undo(ctx, snapshot_params(app / "index.html")))


async def test_rollback_without_a_snapshot_fails_clearly(app, deployment, failed):
    params = snapshot_params(app)
    ctx, _ = deployment("d-9")
    failed(ctx, "script exited with code 1", params.model_dump(), None)

    with pytest.raises(RollbackError, match="no snapshot was taken before deployment d-9"):
        await SNAPSHOT.rollback(ctx, undo(ctx, params, None))


async def test_a_state_pointing_outside_the_snapshot_store_is_refused(
    app, tmp_path, deployment, failed
):
    params = snapshot_params(app)
    ctx, _ = deployment("d-1")
    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    forged = {**state, "snapshot": str(tmp_path / "outside")}
    failed(ctx, "script exited with code 1", params.model_dump(), forged)

    with pytest.raises(RollbackError, match="no longer exists"):
        await SNAPSHOT.rollback(ctx, undo(ctx, params, forged))


async def test_timed_out_file_work_finishes_before_the_timeout_is_reported():
    finished = []

    def slow_swap() -> None:
        time.sleep(0.3)
        finished.append(True)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_bounded(slow_swap), 0.05)
    assert finished == [True]  # nothing still running behind the agent's back
