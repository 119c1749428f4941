"""Faithful tree copies and the atomic swap used by restores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rollback_basic.tree import copy_tree, restore_tree

T0 = 1_600_000_000_000_000_000


def test_copy_keeps_hard_links_between_files_of_the_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("same inode")
    os.link(src / "a", src / "b")
    (src / "c").write_text("own inode")

    stats = copy_tree(src, tmp_path / "dst")

    dst = tmp_path / "dst"
    assert os.lstat(dst / "a").st_ino == os.lstat(dst / "b").st_ino
    assert os.lstat(dst / "a").st_ino != os.lstat(src / "a").st_ino
    assert os.lstat(dst / "c").st_nlink == 1
    assert (stats.files, stats.copied, stats.linked) == (3, 2, 0)


def test_previous_copy_is_never_read_through_a_symlink(tmp_path):
    # The previous snapshot had lib -> an outside directory holding an identical file; the
    # new tree has a real lib/.  Linking lib/x.txt "from the previous snapshot" would really
    # link to the outside file.
    outside = tmp_path / "outside"
    outside.mkdir()
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "lib").symlink_to(outside)
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    for parent in (outside, src / "lib"):
        (parent / "x.txt").write_text("identical\n")
        os.utime(parent / "x.txt", ns=(T0, T0))

    stats = copy_tree(src, tmp_path / "dst", previous=previous)

    assert stats.linked == 0
    assert os.lstat(tmp_path / "dst" / "lib" / "x.txt").st_ino != os.lstat(outside / "x.txt").st_ino


def test_special_files_are_left_out_and_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    (src / "file").write_text("kept")

    stats = copy_tree(src, tmp_path / "dst")

    assert stats.skipped == ["pipe"]
    assert sorted(os.listdir(tmp_path / "dst")) == ["file"]


def test_copy_of_a_symlinked_directory_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")

    with pytest.raises(NotADirectoryError):
        copy_tree(tmp_path / "link", tmp_path / "dst")


def test_restore_replaces_a_file_or_symlink_standing_at_the_path(tmp_path):
    source = tmp_path / "snapshot"
    source.mkdir()
    (source / "index.html").write_text("v1")
    target = tmp_path / "app"
    target.symlink_to(tmp_path)  # the deployment turned the directory into a symlink

    restore_tree(source, target)

    assert not target.is_symlink()
    assert (target / "index.html").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app", "snapshot"]


def test_restore_creates_missing_parent_directories(tmp_path):
    source = tmp_path / "snapshot"
    source.mkdir()
    (source / "f").write_text("x")

    restore_tree(source, tmp_path / "gone" / "app")

    assert (tmp_path / "gone" / "app" / "f").read_text() == "x"


def test_restore_of_nothing_removes_the_path(tmp_path):
    target: Path = tmp_path / "app"
    (target / "deep").mkdir(parents=True)

    restore_tree(None, target)

    assert list(tmp_path.iterdir()) == []
