"""The release layout on disk: the atomic switch of ``current``, bad marks, the ledger's
order, the choice of a release to go back to, and retention."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from deploy_tar.releases import BAD_MARKER, LEDGER, ReleaseError, Releases


def made(root: Path, *names: str) -> Releases:
    releases = Releases(root / "app")
    releases.create()
    for name in names:
        releases.path(name).mkdir()
        releases.record(name, sha256="0" * 64, install_script=None)
    return releases


def test_create_makes_the_layout_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    releases = Releases(tmp_path / "a" / "b")
    releases.create()
    assert (tmp_path / "a" / "b" / "releases").is_dir()
    assert releases.current() is None

    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "linked").mkdir()
    os.symlink(tmp_path / "linked", other / "releases")
    with pytest.raises(ReleaseError, match=r"is not a directory \(a symlink or a file\); move it"):
        Releases(other).create()


def test_switch_points_current_at_the_release_with_a_relative_link(tmp_path: Path) -> None:
    releases = made(tmp_path, "r1", "r2")
    releases.switch("r1")
    releases.switch("r2")
    assert os.readlink(releases.current_link) == "releases/r2"
    assert releases.current() == "r2"
    assert sorted(os.listdir(releases.target_dir)) == sorted(["current", LEDGER, "releases"])


def test_current_always_exists_while_it_is_switched(tmp_path: Path) -> None:
    releases = made(tmp_path, "r1", "r2")
    releases.switch("r1")
    missing: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if not os.path.exists(releases.current_link / "."):
                missing.append("gone")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(300):
            releases.switch("r2")
            releases.switch("r1")
    finally:
        done.set()
        watcher.join()
    assert missing == []


def test_current_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    releases = made(tmp_path, "r1")
    os.symlink("/etc", releases.current_link)
    with pytest.raises(ReleaseError, match="points at /etc, not at a release"):
        releases.current()
    with pytest.raises(ReleaseError, match="points at /etc"):
        releases.switch("r1")
    releases.current_link.unlink()
    releases.current_link.write_text("a file")
    with pytest.raises(ReleaseError, match="is not a symlink; move it away"):
        releases.switch("r1")
    assert releases.current_link.read_text() == "a file"


def test_bad_release_is_never_switched_to(tmp_path: Path) -> None:
    releases = made(tmp_path, "r1")
    releases.mark_bad("r1", "install exited 3")
    assert releases.is_bad("r1")
    assert (releases.path("r1") / BAD_MARKER).read_text().endswith(" install exited 3\n")
    with pytest.raises(ReleaseError, match="release r1 is marked bad"):
        releases.switch("r1")
    assert releases.current() is None


def test_names_follow_the_ledger_with_unknown_releases_first(tmp_path: Path) -> None:
    releases = made(tmp_path, "zz", "aa", "mm")
    releases.path("by-hand").mkdir()
    (releases.root / ".staging-x").mkdir()
    (releases.root / "file").write_text("")
    os.symlink("/tmp", releases.root / "link")
    assert releases.names() == ["by-hand", "zz", "aa", "mm"]


def test_damaged_ledger_falls_back_to_modification_time(tmp_path: Path) -> None:
    releases = made(tmp_path, "b", "a")
    os.utime(releases.path("a"), (1, 1))
    releases.ledger_path.write_text("{not json")
    assert releases.names() == ["a", "b"]


def test_fallback_skips_bad_and_missing_releases(tmp_path: Path) -> None:
    releases = made(tmp_path, "r1", "r2", "r3", "r4")
    assert releases.fallback("r4", "r3") == "r3"
    releases.mark_bad("r3", "bad")
    assert releases.fallback("r4", "r3") == "r2"
    assert releases.fallback("r4", "gone") == "r2"
    assert releases.fallback("r2", "r1") == "r1"
    assert releases.fallback("r2", None) is None  # nothing was live before r2
    releases.mark_bad("r1", "bad")
    assert releases.fallback("r2", "r1") is None


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    releases = made(tmp_path, "r1", "r2", "r3", "r4", "r5")
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", releases.root / "r0")  # not a release: left alone
    removed = releases.prune(2, {"r1"})
    assert removed == ["r2", "r3"]
    assert releases.names() == ["r1", "r4", "r5"]
    assert [e["name"] for e in releases._entries()] == ["r1", "r4", "r5"]
    assert (tmp_path / "outside").is_dir()


def test_release_names_must_be_deploy_ids(tmp_path: Path) -> None:
    with pytest.raises(ReleaseError, match="not a release name"):
        Releases(tmp_path).path("../x")
