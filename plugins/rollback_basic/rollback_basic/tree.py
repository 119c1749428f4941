"""Faithful copies of a directory tree, and swapping one in place of another.

Blocking code: the ``snapshot`` strategy runs it in a thread.

A copy keeps regular files, directories and symbolic links (copied as links, never followed),
with their modes, access and modification times, hard links between files of the tree, and
ownership when the agent runs as root.  Sockets, FIFOs and device files are left out and
named in :attr:`CopyStats.skipped`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import secrets
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 1024 * 1024
Inode = tuple[int, int]


@dataclass
class CopyStats:
    """What a copy held: counts by kind; ``linked`` files were hard-linked to an earlier
    snapshot and ``copied`` ones written anew (the rest are extra names of those)."""

    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    linked: int = 0
    copied: int = 0
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """``12 files (40.2 kB), 3 directories, 1 symlink`` for log lines."""
        return (
            f"{_count(self.files, 'file')} ({human_size(self.bytes)}), "
            f"{_count(self.dirs, 'directory', 'directories')}, {_count(self.symlinks, 'symlink')}"
        )


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def human_size(n: int) -> str:
    """``1.5 MB`` style sizes (powers of 1000)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- copying


def _apply_metadata(path: Path, st: os.stat_result, *, link: bool = False) -> None:
    # Ownership first: chown clears set-uid/set-gid bits that chmod then puts back.
    if os.geteuid() == 0:
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not link:  # a symlink's own mode means nothing on Linux and cannot be set
        os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _same_content(a: str | Path, b: str | Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk_a = fa.read(CHUNK)
            if chunk_a != fb.read(CHUNK):
                return False
            if not chunk_a:
                return True


class _Copier:
    """One copy of ``src`` to ``dst``; see :func:`copy_tree`."""

    def __init__(self, src: Path, dst: Path, previous: Path | None) -> None:
        self.src = src
        self.dst = dst
        self.previous = previous
        self.stats = CopyStats()
        # Source inode -> its first copy, so names hard-linked in the source stay linked.
        self.copies: dict[Inode, Path] = {}
        # Previous-snapshot inode -> the source inode it stands for in this copy; one previous
        # inode never stands for two different source files.
        self.reused: dict[Inode, Inode] = {}

    def run(self) -> CopyStats:
        root = os.lstat(self.src)
        if not stat.S_ISDIR(root.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.src))
        # Private until complete: modes are applied once everything is in place.
        os.mkdir(self.dst, 0o700)
        dirs: list[tuple[Path, os.stat_result]] = [(self.dst, root)]
        # Each directory still to copy, and whether the previous snapshot has it as a real
        # directory (never look up a file in it through a symlink: that could lead outside).
        pending = [(Path(), self.previous is not None)]
        while pending:
            rel, in_previous = pending.pop()
            with os.scandir(self.src / rel) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
            for entry in entries:
                path = rel / entry.name
                st = entry.stat(follow_symlinks=False)
                target = self.dst / path
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(target, 0o700)
                    dirs.append((target, st))
                    pending.append((path, in_previous and self._is_previous_dir(path)))
                    self.stats.dirs += 1
                elif stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(entry.path), target)
                    _apply_metadata(target, st, link=True)
                    self.stats.symlinks += 1
                elif stat.S_ISREG(st.st_mode):
                    self._file(Path(entry.path), path, target, st, in_previous)
                else:
                    self.stats.skipped.append(str(path))
        # Directory times last: creating their entries above moved them.
        for target, st in reversed(dirs):
            _apply_metadata(target, st)
        return self.stats

    def _is_previous_dir(self, rel: Path) -> bool:
        assert self.previous is not None
        try:
            return stat.S_ISDIR(os.lstat(self.previous / rel).st_mode)
        except OSError:
            return False

    def _file(
        self, source: Path, rel: Path, target: Path, st: os.stat_result, in_previous: bool
    ) -> None:
        self.stats.files += 1
        self.stats.bytes += st.st_size
        inode = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and inode in self.copies:
            os.link(self.copies[inode], target)
            return
        earlier = self._unchanged_in_previous(source, rel, st) if in_previous else None
        if earlier is not None:
            os.link(earlier, target)
            self.stats.linked += 1
        else:
            shutil.copyfile(source, target, follow_symlinks=False)
            _apply_metadata(target, st)
            self.stats.copied += 1
        if st.st_nlink > 1:
            self.copies[inode] = target

    def _unchanged_in_previous(self, source: Path, rel: Path, st: os.stat_result) -> Path | None:
        """The previous snapshot's copy of ``rel`` if it is identical to ``source`` in content,
        mode, owner and modification time.  Its directory is known to be a real one."""
        if self.previous is None:
            return None
        earlier = self.previous / rel
        try:
            old = os.lstat(earlier)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not (
            stat.S_ISREG(old.st_mode)
            and old.st_mode == st.st_mode
            and old.st_size == st.st_size
            and old.st_mtime_ns == st.st_mtime_ns
            and (old.st_uid, old.st_gid) == (st.st_uid, st.st_gid)
        ):
            return None
        inode = (st.st_dev, st.st_ino)
        if self.reused.get((old.st_dev, old.st_ino), inode) != inode:
            return None
        if not _same_content(source, earlier):
            return None
        self.reused[(old.st_dev, old.st_ino)] = inode
        return earlier


def copy_tree(src: Path, dst: Path, *, previous: Path | None = None) -> CopyStats:
    """Copy directory ``src`` to ``dst`` (which must not exist), faithfully.

    :param previous: an earlier copy of the same tree, never written to.  A file whose
        content, mode, owner and modification time match its copy there is hard-linked to
        that copy instead of copied again.  Never pass the live tree: a later in-place write
        to it would change the copy too.
    :raises NotADirectoryError: ``src`` is not a directory (a symlink to one counts as not).
    """
    return _Copier(src, dst, previous).run()


# --------------------------------------------------------------------------- removing


def _make_writable(path: Path) -> None:
    """Give the owner full access to every directory under ``path`` (never via a symlink), so
    read-only directories can be emptied."""
    os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IRWXU)
    for root, dirnames, _ in os.walk(path):
        for name in dirnames:
            sub = os.path.join(root, name)
            st = os.lstat(sub)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(sub, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)


def remove_tree(path: Path) -> None:
    """Remove ``path`` whatever it is (directory, file, symlink); nothing if it is missing.

    Read-only directories inside (a copy keeps them read-only) are made writable first.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    try:
        shutil.rmtree(path)
    except PermissionError:
        _make_writable(path)
        shutil.rmtree(path)


# --------------------------------------------------------------------------- swapping

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the entries ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``).

    :returns: ``False``, having changed nothing, where the system or file system cannot.
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _siblings(path: Path, marker: str) -> list[Path]:
    prefix = f".{path.name}.{marker}-"
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return [path.parent / name for name in names if name.startswith(prefix)]


def restore_tree(source: Path | None, path: Path) -> CopyStats:
    """Make ``path`` an exact copy of directory ``source``, or remove it when ``source`` is
    ``None``.

    The copy is built beside ``path`` and swapped in by rename (atomically where the system
    allows), so ``path`` is never seen half restored; what was there is removed afterwards.
    Files are always copied, never hard-linked to ``source``, so writes to the restored tree
    cannot reach ``source``.
    """
    # Left by a restore that was interrupted; the restore under way supersedes it.
    for leftover in _siblings(path, "rollback"):
        remove_tree(leftover)
    token = secrets.token_hex(4)
    trash = path.parent / f".{path.name}.rollback-old-{token}"
    stats = CopyStats()
    if source is None:
        if os.path.lexists(path):
            os.rename(path, trash)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.rollback-new-{token}"
        try:
            stats = copy_tree(source, staging)
        except BaseException:
            remove_tree(staging)
            raise
        if not os.path.lexists(path):
            os.rename(staging, path)
        elif exchange(staging, path):
            os.rename(staging, trash)
        else:
            os.rename(path, trash)
            os.rename(staging, path)
    remove_tree(trash)
    return stats
