"""A script swapping symlinks (or directories) in at each step of a snapshot, a restore and a
removal cannot make the agent, as root, read, write or delete anything outside the path.

Each test keeps a decoy directory standing for a root-only one and checks it is unchanged
(every entry's kind, mode and content) after the operation, whether the operation refused
(with a message naming the path and what changed) or carried on safely.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from deploy_core.plugin import WorkBudget
from deploy_core.plugin.safefs import UnsafePath
from deploy_core.testing import make_context, tree_fingerprint
from rollback_bed import undo

from rollback_basic.errors import RollbackError
from rollback_basic.snapshot import SNAPSHOT, SnapshotParams
from rollback_basic.tree import copy_tree, remove_tree, restore_tree


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """Stands for a root-only directory: same shape as the app, different content."""
    root = tmp_path / "decoy"
    (root / "app" / "sub").mkdir(parents=True)
    (root / "app" / "sub" / "shadow").write_text("root:secret\n")
    (root / "app" / "keys").write_text("private\n")
    (root / "sub").mkdir()
    (root / "sub" / "shadow").write_text("root:secret\n")
    root.chmod(0o700)
    return root


def make_tree(root: Path, files: int = 6) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(files):
        (root / "sub" / f"f{i}").write_text(f"file {i}\n")
        (root / "sub" / "deeper" / f"g{i}").write_text(f"deep {i}\n")
    (root / "top.txt").write_text("top\n")


class SwapAt(WorkBudget):
    """A budget that, at its ``at``-th step, runs ``swap``: a script acting mid-operation."""

    def __init__(self, at: int, swap: Callable[[], None]) -> None:
        super().__init__("test", steps=10**9, seconds=3600)
        self.at = at
        self.swap = swap
        self.count = 0
        self.swapped = False

    def step(self, n: int = 1) -> None:
        self.count += n
        if not self.swapped and self.count >= self.at:
            self.swapped = True
            self.swap()
        super().step(n)


def steps_of(operation: Callable[[WorkBudget], object]) -> int:
    budget = WorkBudget("count", steps=10**9, seconds=3600)
    operation(budget)
    return budget.used


def swap_for_link(path: Path, target: Path) -> Callable[[], None]:
    """Move ``path`` aside and put a symlink to ``target`` in its place."""

    def swap() -> None:
        if os.path.lexists(path):
            os.rename(path, path.with_name(path.name + ".moved"))
        path.symlink_to(target)

    return swap


# --------------------------------------------------------------------------- taking a copy


def test_a_subdirectory_swapped_for_a_link_while_copied_is_never_followed(
    tmp_path: Path, decoy: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src)
    total = steps_of(lambda b: copy_tree(src, tmp_path / "count", budget=b))
    before = tree_fingerprint(decoy)
    for at in range(1, total + 1):
        shutil.rmtree(src)
        make_tree(src)
        dst = tmp_path / f"copy-{at}"
        budget = SwapAt(at, swap_for_link(src / "sub", decoy / "sub"))
        try:
            copy_tree(src, dst, budget=budget)
        except UnsafePath as exc:
            assert "refusing to work as root on" in str(exc)
        assert budget.swapped
        assert tree_fingerprint(decoy) == before
        copied = "".join(
            p.read_text() for p in dst.rglob("*") if p.is_file() and not p.is_symlink()
        )
        assert "root:secret" not in copied, f"decoy content copied when swapped at step {at}"


# --------------------------------------------------------------------------- restoring


@pytest.mark.parametrize("swapped", ["parent", "chain"])
def test_restore_refuses_a_parent_swapped_for_a_link_at_any_step(
    tmp_path: Path, decoy: Path, swapped: str
) -> None:
    snapshot = tmp_path / "snapshot"
    make_tree(snapshot)
    app = tmp_path / "srv" / "app"

    def fresh() -> tuple[list[int], list[int]]:
        if (tmp_path / "srv").is_symlink():
            (tmp_path / "srv").unlink()
        shutil.rmtree(tmp_path / "srv", ignore_errors=True)
        shutil.rmtree(tmp_path / "srv.moved", ignore_errors=True)
        make_tree(app)
        (app / "new-in-v2").write_text("v2\n")
        return (
            [app.parent.stat().st_dev, app.parent.stat().st_ino],
            [app.stat().st_dev, app.stat().st_ino],
        )

    fresh()
    total = steps_of(lambda b: restore_tree(snapshot, app, budget=b))
    before = tree_fingerprint(decoy)
    for at in range(1, total + 1):
        parent_id, own_id = fresh()
        # /srv itself becomes a link to the decoy (whose app/ looks like ours), directly or
        # through a chain of links.
        if swapped == "parent":
            swap = swap_for_link(tmp_path / "srv", decoy)
        else:
            if not (tmp_path / "outer").is_symlink():
                (tmp_path / "outer").symlink_to(decoy)
            swap = swap_for_link(tmp_path / "srv", tmp_path / "outer")
        budget = SwapAt(at, swap)
        try:
            restore_tree(snapshot, app, parent_identity=parent_id, identity=own_id, budget=budget)
        except UnsafePath as exc:
            assert str(exc).startswith("refusing to work as root on ")
        assert budget.swapped
        assert tree_fingerprint(decoy) == before, f"decoy changed when swapped at step {at}"


def test_restore_refuses_a_parent_replaced_between_snapshot_and_restore(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot"
    make_tree(snapshot)
    app = tmp_path / "srv" / "app"
    make_tree(app)
    recorded = [app.parent.stat().st_dev, app.parent.stat().st_ino]
    os.rename(tmp_path / "srv", tmp_path / "srv.old")
    (tmp_path / "srv" / "app").mkdir(parents=True)
    with pytest.raises(UnsafePath) as caught:
        restore_tree(snapshot, app, parent_identity=recorded)
    assert f"on {tmp_path / 'srv'}: it was replaced since it was recorded" in str(caught.value)
    assert list((tmp_path / "srv" / "app").iterdir()) == []


def test_restore_removes_the_old_tree_without_following_links_swapped_into_it(
    tmp_path: Path, decoy: Path
) -> None:
    snapshot = tmp_path / "snapshot"
    make_tree(snapshot)
    app = tmp_path / "srv" / "app"
    make_tree(app, files=3)
    copy_steps = steps_of(lambda b: copy_tree(snapshot, tmp_path / "count", budget=b))
    before = tree_fingerprint(decoy)
    # The steps after the copy remove the old tree, renamed aside: swap a link into it.
    for at in range(copy_steps + 1, copy_steps + 12):
        shutil.rmtree(app.parent)
        make_tree(app, files=3)

        def swap() -> None:
            (trash,) = app.parent.glob(".app.rollback-old-*")
            if (trash / "sub").exists():
                shutil.rmtree(trash / "sub")
                (trash / "sub").symlink_to(decoy / "sub")

        budget = SwapAt(at, swap)
        with contextlib.suppress(UnsafePath):
            restore_tree(snapshot, app, budget=budget)
        assert tree_fingerprint(decoy) == before, f"decoy changed when swapped at step {at}"
        assert (app / "top.txt").read_text() == "top\n"


def test_restore_leaves_a_leftover_that_is_not_its_own_staging(tmp_path: Path, decoy: Path) -> None:
    snapshot = tmp_path / "snapshot"
    make_tree(snapshot)
    app = tmp_path / "srv" / "app"
    make_tree(app)
    planted = app.parent / ".app.rollback-new-0badf00d"
    planted.symlink_to(decoy)
    moved = app.parent / ".app.rollback-new-1badf00d"
    moved.mkdir(mode=0o755)  # not private: not a staging directory of the agent's
    (moved / "keep").write_text("kept")
    before = tree_fingerprint(decoy)
    restore_tree(snapshot, app)
    assert tree_fingerprint(decoy) == before
    assert planted.is_symlink() and (moved / "keep").read_text() == "kept"


def test_restore_refuses_a_directory_of_another_user_moved_onto_the_path(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot"
    make_tree(snapshot)
    app = tmp_path / "srv" / "app"
    make_tree(app)
    recorded = [app.stat().st_dev, app.stat().st_ino]
    os.rename(app, tmp_path / "srv" / "app.v1")
    (app / "root-owned").mkdir(parents=True)  # root's, as if moved here from elsewhere
    with pytest.raises(UnsafePath, match="not the directory snapshotted and belongs to uid"):
        restore_tree(snapshot, app, identity=recorded, owner=65534)
    assert (app / "root-owned").is_dir()
    # The recorded directory itself, or what the run-as user made, is replaced as usual.
    shutil.rmtree(app)
    os.rename(tmp_path / "srv" / "app.v1", app)
    restore_tree(snapshot, app, identity=recorded, owner=65534)
    assert (app / "top.txt").read_text() == "top\n"


def test_remove_tree_refuses_a_symlinked_parent(tmp_path: Path, decoy: Path) -> None:
    (tmp_path / "releases").symlink_to(decoy)
    before = tree_fingerprint(decoy)
    with pytest.raises(UnsafePath, match="symbolic link"):
        remove_tree(tmp_path / "releases" / "sub")
    assert tree_fingerprint(decoy) == before


# --------------------------------------------------------------------------- the strategy


async def test_rollback_refuses_when_a_parent_became_a_link_after_the_snapshot(
    tmp_path: Path, decoy: Path, deployment, failed
) -> None:
    app = tmp_path / "srv" / "app"
    make_tree(app)
    params = SnapshotParams.model_validate({"strategy": "snapshot", "path": str(app)})
    ctx, _ = deployment("d-1")
    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    # The script (as run_as, owning /srv's parent here) swaps /srv for a link to the decoy.
    os.rename(tmp_path / "srv", tmp_path / "srv.moved")
    (tmp_path / "srv").symlink_to(decoy)
    before = tree_fingerprint(decoy)
    failed(ctx, "script exited with code 1", params.model_dump(), state)

    with pytest.raises(RollbackError) as caught:
        await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    assert str(caught.value).startswith(
        f"restoring {app} refused: refusing to work as root on {tmp_path / 'srv'}: it is a "
        f"symbolic link (to {decoy})"
    )
    assert tree_fingerprint(decoy) == before


async def test_snapshots_work_when_the_agents_data_dir_is_reached_through_a_link(
    tmp_path: Path,
) -> None:
    (tmp_path / "disk2" / "data").mkdir(parents=True)
    (tmp_path / "state").symlink_to(tmp_path / "disk2")  # a state directory moved elsewhere
    ctx, _ = make_context(tmp_path / "state" / "data", command_type="deploy.shell")
    app = tmp_path / "srv" / "app"
    make_tree(app)
    params = SnapshotParams.model_validate({"strategy": "snapshot", "path": str(app)})
    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    (app / "top.txt").write_text("v2\n")
    await SNAPSHOT.rollback(ctx, undo(ctx, params, state))
    assert (app / "top.txt").read_text() == "top\n"
    await SNAPSHOT.discard(ctx, undo(ctx, params, state))
