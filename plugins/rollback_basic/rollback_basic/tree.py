"""Faithful copies of a directory tree, and swapping one in place of another.

Blocking code: the ``snapshot`` strategy runs it in a thread, with a
:class:`~deploy_core.agent.bounded.WorkBudget` it steps once per entry and per megabyte, so a
timed-out deployment stops it.

A copy keeps regular files, directories and symbolic links (copied as links, never followed),
with their modes, access and modification times, hard links between files of the tree, and
ownership when the agent runs as root.  Sockets, FIFOs and device files are left out and
named in :attr:`CopyStats.skipped`.

The trees copied from and swapped into are ones a deployment's script can change while the
agent works on them as root, so every step goes through :mod:`deploy_core.agent.safefs`:
directories are opened one component at a time without following links, entries are named
relative to open directories, and a swapped-in symlink or replaced directory is refused
with :class:`~deploy_core.agent.safefs.UnsafePath`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy_core.plugin import WorkBudget, safefs

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

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL


def _meta_fd(fd: int, st: os.stat_result) -> None:
    # Ownership first: chown clears set-uid/set-gid bits that chmod then puts back.
    if os.geteuid() == 0:
        os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _meta_link(parent: safefs.Dir, name: str, st: os.stat_result) -> None:
    # A symlink's own mode means nothing on Linux and cannot be set.
    if os.geteuid() == 0:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=parent.fd, follow_symlinks=False)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=parent.fd, follow_symlinks=False)


def _open_source(parent: safefs.Dir, name: str, st: os.stat_result) -> int:
    """Open regular file ``name`` listed as ``st``; refuse anything else found there now."""
    fd = safefs.open_file_at(parent, name, _FILE_FLAGS)
    if safefs.identity(os.fstat(fd)) != safefs.identity(st):
        os.close(fd)
        raise safefs.UnsafePath(parent.join(name), "it was replaced while being copied")
    return fd


def _copy_bytes(src: int, dst: int, budget: WorkBudget | None) -> None:
    while True:
        if budget is not None:
            budget.step()
        try:
            sent = os.sendfile(dst, src, None, CHUNK)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            block = os.read(src, CHUNK)
            sent = len(block)
            if block:
                os.write(dst, block)
        if not sent:
            return


def _same_content(a: int, b: int) -> bool:
    os.lseek(a, 0, os.SEEK_SET)
    os.lseek(b, 0, os.SEEK_SET)
    while True:
        chunk_a = os.read(a, CHUNK)
        if chunk_a != os.read(b, CHUNK):
            return False
        if not chunk_a:
            return True


@dataclass
class _Level:
    """One directory being copied: source, copy, the previous snapshot's (if a real
    directory there), the entries still to do, and the source's stat for its metadata."""

    src: safefs.Dir
    dst: safefs.Dir
    previous: safefs.Dir | None
    entries: list[os.DirEntry[str]]
    st: os.stat_result
    rel: str

    def close(self) -> None:
        for handle in (self.src, self.dst, self.previous):
            if handle is not None:
                handle.close()


class _Copier:
    """One copy of an open source directory into a new directory; see :func:`copy_tree`."""

    def __init__(self, budget: WorkBudget | None) -> None:
        self.budget = budget
        self.stats = CopyStats()
        # Source inode -> its first copy (relative to the copy's top), so names hard-linked
        # in the source stay linked.
        self.copies: dict[Inode, str] = {}
        # Previous-snapshot inode -> the source inode it stands for in this copy; one previous
        # inode never stands for two different source files.
        self.reused: dict[Inode, Inode] = {}
        self.top: safefs.Dir | None = None

    def run(
        self, src: safefs.Dir, dst_parent: safefs.Dir, name: str, previous: safefs.Dir | None
    ) -> CopyStats:
        # Private until complete: modes are applied once everything inside is in place.
        self.top = top = safefs.private_dir(dst_parent, name)
        stack = [_Level(src, top, previous, self._list(src), src.stat, "")]
        try:
            while stack:
                level = stack[-1]
                if not level.entries:
                    _meta_fd(level.dst.fd, level.st)  # its times last: entries moved them
                    stack.pop()
                    if stack:
                        level.close()
                    continue
                entry = level.entries.pop()
                child = self._entry(level, entry)
                if child is not None:
                    stack.append(child)
        finally:
            for level in stack[1:]:
                level.close()
            top.close()
        return self.stats

    def _list(self, handle: safefs.Dir) -> list[os.DirEntry[str]]:
        with os.scandir(handle.fd) as scan:
            return sorted(scan, key=lambda entry: entry.name, reverse=True)

    def _entry(self, level: _Level, entry: os.DirEntry[str]) -> _Level | None:
        if self.budget is not None:
            self.budget.step()
        name = entry.name
        rel = f"{level.rel}/{name}" if level.rel else name
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            src = safefs.open_subdir(level.src, name, expect=safefs.identity(st))
            try:
                os.mkdir(name, 0o700, dir_fd=level.dst.fd)
                dst = safefs.open_subdir(level.dst, name)
                previous = self._previous_dir(level.previous, name)
            except BaseException:
                src.close()
                raise
            self.stats.dirs += 1
            return _Level(src, dst, previous, self._list(src), st, rel)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=level.src.fd)
            os.symlink(target, name, dir_fd=level.dst.fd)
            _meta_link(level.dst, name, st)
            self.stats.symlinks += 1
        elif stat.S_ISREG(st.st_mode):
            self._file(level, name, rel, st)
        else:
            self.stats.skipped.append(rel)
        return None

    def _previous_dir(self, previous: safefs.Dir | None, name: str) -> safefs.Dir | None:
        """The previous snapshot's ``name`` if it is a real directory (never a link: a file
        looked up through one could lie outside)."""
        if previous is None:
            return None
        try:
            return safefs.open_subdir(previous, name)
        except OSError:
            return None

    def _file(self, level: _Level, name: str, rel: str, st: os.stat_result) -> None:
        self.stats.files += 1
        self.stats.bytes += st.st_size
        assert self.top is not None
        inode = safefs.identity(st)
        if st.st_nlink > 1 and inode in self.copies:
            os.link(
                self.copies[inode],
                name,
                src_dir_fd=self.top.fd,
                dst_dir_fd=level.dst.fd,
                follow_symlinks=False,
            )
            return
        src = _open_source(level.src, name, st)
        try:
            if self._link_unchanged(level, name, st, src):
                self.stats.linked += 1
            else:
                out = safefs.open_file_at(level.dst, name, _NEW_FILE, 0o600)
                try:
                    _copy_bytes(src, out, self.budget)
                    _meta_fd(out, st)
                finally:
                    os.close(out)
                self.stats.copied += 1
        finally:
            os.close(src)
        if st.st_nlink > 1:
            self.copies[inode] = rel

    def _link_unchanged(self, level: _Level, name: str, st: os.stat_result, src: int) -> bool:
        """Hard-link the previous snapshot's copy of ``name`` if it is identical to the
        source in content, mode, owner and modification time."""
        if level.previous is None:
            return False
        try:
            old = os.lstat(name, dir_fd=level.previous.fd)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not (
            stat.S_ISREG(old.st_mode)
            and old.st_mode == st.st_mode
            and old.st_size == st.st_size
            and old.st_mtime_ns == st.st_mtime_ns
            and (old.st_uid, old.st_gid) == (st.st_uid, st.st_gid)
        ):
            return False
        inode = safefs.identity(st)
        if self.reused.get(safefs.identity(old), inode) != inode:
            return False
        earlier = safefs.open_file_at(level.previous, name, _FILE_FLAGS)
        try:
            if not _same_content(src, earlier):
                return False
        finally:
            os.close(earlier)
        os.link(
            name,
            name,
            src_dir_fd=level.previous.fd,
            dst_dir_fd=level.dst.fd,
            follow_symlinks=False,
        )
        self.reused[safefs.identity(old)] = inode
        return True


def copy_into(
    src: safefs.Dir,
    dst_parent: safefs.Dir,
    name: str,
    *,
    previous: safefs.Dir | None = None,
    budget: WorkBudget | None = None,
) -> CopyStats:
    """Copy open directory ``src`` to new directory ``name`` of ``dst_parent``, faithfully;
    see :func:`copy_tree`.  On an error the partial copy is left for the caller to remove."""
    return _Copier(budget).run(src, dst_parent, name, previous)


def copy_tree(
    src: Path,
    dst: Path,
    *,
    previous: Path | None = None,
    budget: WorkBudget | None = None,
) -> CopyStats:
    """Copy directory ``src`` to ``dst`` (which must not exist), faithfully.

    :param previous: an earlier copy of the same tree, never written to.  A file whose
        content, mode, owner and modification time match its copy there is hard-linked to
        that copy instead of copied again.  Never pass the live tree: a later in-place write
        to it would change the copy too.
    :param budget: stepped once per entry and per megabyte; it stops the copy when spent.
    :raises NotADirectoryError: ``src`` is not a directory (a symlink to one counts as not).
    :raises UnsafePath: a component of ``src`` is a symlink, or the tree changed under the
        copy in a way that would have led it outside.
    """
    if not stat.S_ISDIR(os.lstat(src).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(src))
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(safefs.open_dir(src))
        parent = stack.enter_context(safefs.open_dir(dst.parent))
        earlier = None
        if previous is not None:
            with contextlib.suppress(OSError):
                earlier = stack.enter_context(safefs.open_dir(previous))
        return copy_into(source, parent, dst.name, previous=earlier, budget=budget)


# --------------------------------------------------------------------------- removing


def remove_tree(path: Path, *, budget: WorkBudget | None = None) -> None:
    """Remove ``path`` whatever it is (directory, file, symlink); nothing if it is missing.

    Never follows a symlink and never crosses into another file system (see
    :func:`deploy_core.agent.safefs.remove_at`); a symlinked parent is refused.
    """
    try:
        parent = safefs.open_dir(path.parent)
    except FileNotFoundError:
        return
    with parent:
        safefs.remove_at(parent, path.name, step=budget.step if budget else None)


# --------------------------------------------------------------------------- swapping


def _leftovers(parent: safefs.Dir, name: str) -> list[str]:
    """Staging directories of restores of ``name`` that were interrupted: ours (owned by
    the agent, still private).  Anything else of that name is left alone: a script could
    have renamed something there for the agent to delete."""
    prefix = f".{name}.rollback-new-"
    found = []
    for entry in os.scandir(parent.fd):
        if not entry.name.startswith(prefix):
            continue
        st = entry.stat(follow_symlinks=False)
        mine = stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        if mine and stat.S_IMODE(st.st_mode) == 0o700:
            found.append(entry.name)
    return found


def restore_tree(
    source: Path | None,
    path: Path,
    *,
    parent_identity: Sequence[int] | None = None,
    identity: Sequence[int] | None = None,
    owner: int | None = None,
    budget: WorkBudget | None = None,
) -> CopyStats:
    """Make ``path`` an exact copy of directory ``source``, or remove it when ``source`` is
    ``None``.

    The copy is built beside ``path`` and swapped in by rename (atomically where the system
    allows), so ``path`` is never seen half restored; what was there is removed afterwards.
    Files are always copied, never hard-linked to ``source``, so writes to the restored tree
    cannot reach ``source``.

    :param parent_identity: the identity of ``path``'s parent when the snapshot was taken;
        a different directory there now is refused (a missing one is created).
    :param identity: the identity of ``path`` itself then (``None`` if it was absent).
    :param owner: the uid scripts ran as: what stands at ``path`` now must be the recorded
        directory, or something that user made (or a symlink, file or anything the user can
        replace); a directory owned by someone else that was moved there is refused.
    :raises UnsafePath: the parent or ``path`` changed in a way the agent must not follow.
    """
    step = budget.step if budget is not None else None
    try:
        parent = safefs.open_dir(path.parent, expect=parent_identity)
    except FileNotFoundError:
        if source is None:
            return CopyStats()
        parent = safefs.open_dir(path.parent, create=True)
    with parent:
        name = path.name
        for leftover in _leftovers(parent, name):
            safefs.remove_at(parent, leftover, step=step)
        token = secrets.token_hex(4)
        trash = f".{name}.rollback-old-{token}"
        current = _replaceable(parent, name, identity, owner)
        stats = CopyStats()
        if source is None:
            if current is not None:
                safefs.rename_at(parent, name, parent, trash)
        else:
            staging = f".{name}.rollback-new-{token}"
            try:
                with safefs.open_dir(source) as src:
                    stats = copy_into(src, parent, staging, budget=budget)
            except BaseException:
                safefs.remove_at(parent, staging, step=step)
                raise
            if current is None:
                safefs.rename_at(parent, staging, parent, name)
            elif safefs.exchange_at(parent, staging, parent, name):
                safefs.rename_at(parent, staging, parent, trash)
            else:
                safefs.rename_at(parent, name, parent, trash)
                safefs.rename_at(parent, staging, parent, name)
        if current is not None:
            safefs.remove_at(parent, trash, expect=safefs.identity(current), step=step)
    return stats


def _replaceable(
    parent: safefs.Dir, name: str, recorded: Sequence[int] | None, owner: int | None
) -> os.stat_result | None:
    """What stands at ``name`` now, if the restore may replace it."""
    st = safefs.lstat_at(parent, name)
    if st is None or owner is None or not stat.S_ISDIR(st.st_mode):
        return st
    if recorded is not None and safefs.identity(st) == safefs.as_identity(recorded):
        return st
    if st.st_uid != owner:
        raise safefs.UnsafePath(
            parent.join(name),
            f"it is not the directory snapshotted and belongs to uid {st.st_uid}, not to uid "
            f"{owner} scripts run as: something was moved there; move it away first",
        )
    return st
