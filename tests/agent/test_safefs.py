"""Root file operations on paths a script can change (deploy_core.agent.safefs), with real
files and real symlink swaps: nothing outside the named path changes, and a swap is refused
with a message naming the path and what changed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import missing_part

from deploy_core.plugin import WorkBudget, WorkStopped, run_bounded, safefs
from deploy_core.testing import tree_fingerprint


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """A directory standing for a root-only one outside what a deployment may touch."""
    root = tmp_path / "decoy"
    (root / "sub").mkdir(parents=True)
    (root / "secret").write_text("do not touch\n")
    (root / "sub" / "deep").write_text("nor this\n")
    root.chmod(0o700)
    return root


def test_open_dir_refuses_a_symlinked_component_and_names_it(tmp_path: Path, decoy: Path) -> None:
    (tmp_path / "app").symlink_to(decoy)
    with pytest.raises(safefs.UnsafePath) as caught:
        safefs.open_dir(tmp_path / "app" / "sub")
    assert str(caught.value).startswith(f"refusing to work as root on {tmp_path}/app: ")
    assert f"symbolic link (to {decoy})" in str(caught.value)


def test_open_dir_creates_missing_components_and_refuses_a_replaced_one(tmp_path: Path) -> None:
    with safefs.open_dir(tmp_path / "a" / "b", create=True) as made:
        recorded = made.identity
    assert (tmp_path / "a" / "b").is_dir()
    os.rename(tmp_path / "a" / "b", tmp_path / "a" / "old")
    (tmp_path / "a" / "b").mkdir()
    with pytest.raises(safefs.UnsafePath, match="was replaced since it was recorded"):
        safefs.open_dir(tmp_path / "a" / "b", expect=recorded)


def test_remove_at_unlinks_links_and_never_follows_them(tmp_path: Path, decoy: Path) -> None:
    before = tree_fingerprint(decoy)
    doomed = tmp_path / "doomed"
    (doomed / "a" / "b").mkdir(parents=True)
    (doomed / "a" / "file").write_text("x")
    (doomed / "a" / "b" / "to-decoy").symlink_to(decoy)
    (doomed / "to-secret").symlink_to(decoy / "secret")
    (doomed / "a" / "b").chmod(0o500)  # read-only directories are emptied all the same
    with safefs.open_dir(tmp_path) as parent:
        assert safefs.remove_at(parent, "doomed")
        assert not safefs.remove_at(parent, "doomed")  # already gone
    assert not doomed.exists()
    assert tree_fingerprint(decoy) == before


def test_remove_at_a_symlink_removes_the_link_only(tmp_path: Path, decoy: Path) -> None:
    before = tree_fingerprint(decoy)
    (tmp_path / "releases").symlink_to(decoy)
    with safefs.open_dir(tmp_path) as parent:
        safefs.remove_at(parent, "releases")
    assert not os.path.lexists(tmp_path / "releases")
    assert tree_fingerprint(decoy) == before


def test_remove_at_refuses_what_replaced_the_recorded_directory(
    tmp_path: Path, decoy: Path
) -> None:
    (tmp_path / "snap").mkdir()
    recorded = safefs.identity((tmp_path / "snap").lstat())
    (tmp_path / "snap").rename(tmp_path / "moved-away")  # kept, so its inode is not reused
    (tmp_path / "snap").symlink_to(decoy)
    before = tree_fingerprint(decoy)
    with safefs.open_dir(tmp_path) as parent, pytest.raises(safefs.UnsafePath) as caught:
        safefs.remove_at(parent, "snap", expect=recorded)
    assert f"{tmp_path}/snap: it was replaced since it was recorded" in str(caught.value)
    assert tree_fingerprint(decoy) == before and (tmp_path / "snap").is_symlink()


def test_remove_at_a_deep_tree_needs_no_recursion(tmp_path: Path) -> None:
    path = tmp_path / "deep"
    path.mkdir()
    fd = os.open(path, os.O_RDONLY)
    for _ in range(1500):  # deeper than Python's recursion limit
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    with safefs.open_dir(tmp_path) as parent:
        safefs.remove_at(parent, "deep")
    assert not path.exists()


def test_remove_at_never_crosses_into_another_file_system(tmp_path: Path) -> None:
    mount = tmp_path / "tree" / "mnt"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        missing_part(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        (mount / "kept").write_text("on another file system")
        with safefs.open_dir(tmp_path) as parent, pytest.raises(safefs.UnsafePath) as caught:
            safefs.remove_at(parent, "tree")
        assert "mount point (another file system)" in str(caught.value)
        assert (mount / "kept").read_text() == "on another file system"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_replace_symlink_swaps_atomically_and_replaces_a_planted_link(
    tmp_path: Path, decoy: Path
) -> None:
    (tmp_path / "current").symlink_to(decoy)
    before = tree_fingerprint(decoy)
    with safefs.open_dir(tmp_path) as parent:
        safefs.replace_symlink(parent, "current", "releases/r2")
    assert os.readlink(tmp_path / "current") == "releases/r2"
    assert tree_fingerprint(decoy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "decoy"]


def test_write_file_at_replaces_a_planted_link_without_writing_through_it(
    tmp_path: Path, decoy: Path
) -> None:
    (tmp_path / "ledger.json").symlink_to(decoy / "secret")
    before = tree_fingerprint(decoy)
    with safefs.open_dir(tmp_path) as parent:
        safefs.write_file_at(parent, "ledger.json", b"{}\n", 0o640)
    assert not (tmp_path / "ledger.json").is_symlink()
    assert (tmp_path / "ledger.json").read_text() == "{}\n"
    assert (tmp_path / "ledger.json").stat().st_mode & 0o777 == 0o640
    assert tree_fingerprint(decoy) == before


def test_open_file_at_refuses_a_symlink(tmp_path: Path, decoy: Path) -> None:
    (tmp_path / "partial").symlink_to(decoy / "secret")
    with safefs.open_dir(tmp_path) as parent, pytest.raises(safefs.UnsafePath, match="symbolic"):
        safefs.open_file_at(parent, "partial", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert (decoy / "secret").read_text() == "do not touch\n"


def test_private_dir_is_new_empty_and_ours(tmp_path: Path) -> None:
    with safefs.open_dir(tmp_path) as parent:
        with safefs.private_dir(parent, "staging") as made:
            assert made.stat.st_mode & 0o777 == 0o700
        with pytest.raises(FileExistsError):
            safefs.private_dir(parent, "staging")


def test_exchange_at_swaps_two_entries(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").mkdir()
    with safefs.open_dir(tmp_path) as parent:
        if not safefs.exchange_at(parent, "a", parent, "b"):
            missing_part("renameat2(RENAME_EXCHANGE) is not available here")
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").read_text() == "a"


def test_names_with_slashes_are_refused(tmp_path: Path) -> None:
    with safefs.open_dir(tmp_path) as parent, pytest.raises(safefs.UnsafePath, match="plain"):
        safefs.remove_at(parent, "../x")


# --------------------------------------------------------------------------- bounded work


def test_a_budget_stops_work_past_its_steps() -> None:
    budget = WorkBudget("scan", steps=5000, seconds=60)
    with pytest.raises(WorkStopped) as caught:
        for _ in range(100_000):
            budget.step()
    assert caught.value.reason == "steps"
    assert "scan stopped: more than 5000 steps" in str(caught.value)


def test_a_budget_stops_work_past_its_time() -> None:
    budget = WorkBudget("scan", steps=10**12, seconds=0.05)
    with pytest.raises(WorkStopped) as caught:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            budget.step()
    assert caught.value.reason == "time"


async def test_a_cancelled_caller_stops_the_thread_before_going_on() -> None:
    budget = WorkBudget("endless loop", steps=10**15, seconds=3600)
    stopped = threading.Event()

    def spin() -> None:
        try:
            end = time.monotonic() + 60
            while time.monotonic() < end:
                budget.step()
        finally:
            stopped.set()

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_bounded(spin, budget), 0.2)
    assert stopped.is_set()  # by the time the timeout is heard, the thread has stopped
    assert budget.cancelled


# --------------------------------------------------------------------------- cache writes


def test_a_partial_download_never_appends_through_a_planted_link(
    tmp_path: Path, decoy: Path
) -> None:
    from deploy_core.hashed_file import HashedFile, hash_file

    before = tree_fingerprint(decoy)
    partial = tmp_path / ("ab" * 32 + ".partial")
    partial.symlink_to(decoy / "secret")
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        HashedFile(partial, resume=True)
    with pytest.raises(OSError):
        hash_file(partial)
    assert tree_fingerprint(decoy) == before
    partial.unlink()
    fresh = HashedFile(partial, resume=True)
    fresh.write(b"abc")
    fresh.seal()
    assert partial.stat().st_mode & 0o777 == 0o600
    assert hash_file(partial)[1] == 3
