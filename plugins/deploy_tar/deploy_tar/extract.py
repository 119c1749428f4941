"""Safe extraction of a package archive into a fresh release directory (issue 4, 30-60 %).

Two streaming passes over the file, neither of which holds the archive in memory:

1. :func:`scan_archive` reads every header once and refuses the archive on the first member that
   breaks a rule (traversal, absolute names, links leaving the release, hard links, special files,
   setuid/setgid/sticky bits, duplicate names, size, count and expansion limits, corruption).
   Nothing is written.
2. :func:`extract_archive` scans, then extracts into ``.staging-<name>`` next to the destination,
   running the same checks again (the archive may change between the passes) and writing each
   member itself through :class:`_ReleaseWriter`, which checks again what tarfile's ``data``
   filter checks (belt and braces), and renames the staging directory into place. On any error
   the staging directory is removed.

tarfile only parses here; it never writes. Its extraction filters arrived in 3.11.4 and its
extraction code changes between patch releases, so the same code and the same checks run on
every supported Python (3.11.2 and later).

Every refusal is an :class:`UnsafeArchive` naming the member and the rule. The rules are in
:mod:`deploy_tar.rules`, the streaming reader in :mod:`deploy_tar.stream`; this module writes.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

from deploy_tar.rules import (
    DEFAULT_LIMITS,
    ExtractLimits,
    ExtractStats,
    MemberRules,
    UnsafeArchive,
)
from deploy_tar.stream import MiB, open_archive

__all__ = [
    "DEFAULT_LIMITS",
    "ExtractLimits",
    "ExtractStats",
    "UnsafeArchive",
    "extract_archive",
    "scan_archive",
]

_PROGRESS_STEP = 1 * MiB
_COPY_CHUNK = 64 * 1024


def scan_archive(path: Path, limits: ExtractLimits = DEFAULT_LIMITS) -> ExtractStats:
    """Read the whole archive once, streaming, and write nothing.

    :param path: a tar archive, gzip-, bzip2- or xz-compressed or plain.
    :param limits: the caps to enforce.
    :returns: the counts :func:`extract_archive` will produce.
    :raises UnsafeArchive: on the first member that breaks a rule, or ``corrupt`` when the file is
        not a complete, intact archive.
    """
    with open_archive(path, limits) as archive:
        checker = MemberRules(limits, archive.ratio)
        for member in archive.members():
            checker.check(member)
        archive.finish()
        return checker.finish()


def extract_archive(
    path: Path,
    dest: Path,
    limits: ExtractLimits = DEFAULT_LIMITS,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractStats:
    """Scan the archive, then extract it into a new directory ``dest``.

    Extraction happens in ``dest.parent / f".staging-{dest.name}"`` (a stale one left by an
    interrupted run is removed first), which is renamed to ``dest`` once complete. On any error
    the staging directory is removed and ``dest`` is not created.

    :param path: the archive file.
    :param dest: the release directory to create; it must not exist, its parent must.
    :param limits: the caps to enforce.
    :param progress: called with ``(bytes_done, bytes_total)`` of regular-file content as
        extraction goes, from ``(0, total)`` to ``(total, total)``, never backwards; ``None`` for
        no reports.
    :returns: what was extracted.
    :raises UnsafeArchive: the archive was refused; nothing was written outside the staging
        directory.
    :raises FileExistsError: ``dest`` already exists.
    """
    _require_absent(dest)
    expected = scan_archive(path, limits)
    staging = dest.parent / f".staging-{dest.name}"
    _remove_stale(staging)
    staging.mkdir()
    try:
        # Fresh and ours: no symlink on disk can redirect what is written below it.
        if not stat.S_ISDIR(staging.lstat().st_mode) or any(staging.iterdir()):
            raise FileExistsError(f"staging directory {staging} was tampered with during creation")
        report = _Progress(progress, expected.bytes)
        with open_archive(path, limits) as archive:
            archive.reader.on_read = report.stream_at
            checker = MemberRules(limits, archive.ratio)
            writer = _ReleaseWriter(archive.tar, staging)
            for member in archive.members():  # each written before the next one is parsed
                checker.check(member)
                report.begin(member)
                writer.write(member)
                report.end()
            writer.finish()
            archive.finish()
            extracted = checker.finish()
        if extracted != expected:
            raise UnsafeArchive(
                None, "changed", f"archive changed between scan ({expected}) and extraction"
            )
        report.finish()
        _require_absent(dest)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return extracted


class _ReleaseWriter:
    """Writes members into a fresh directory, checking what tarfile's ``data`` filter checks.

    The rules (:mod:`deploy_tar.rules`) have already refused all of this; these checks hold even
    if they missed something. A member is refused (rule ``data-filter``) when its name is
    absolute, when it would land outside the directory once symlinks on disk are followed, when
    it is a symlink whose target is absolute or leaves the directory, when it is anything but a
    regular file, a directory or a symlink (hard links, devices, FIFOs), or when its path already
    exists as anything but a directory. Files are created with ``O_EXCL | O_NOFOLLOW``, so an
    existing entry is never followed or overwritten.

    Modes are the packaged ones without setuid, setgid and sticky bits; directories get at least
    u+rwx so their contents can be written and later removed. Ownership is never copied from the
    archive. Directory modes and times are applied by :meth:`finish`, deepest first, once nothing
    more is written into them.
    """

    def __init__(self, tar: tarfile.TarFile, root: Path) -> None:
        self._tar = tar
        self._root = os.path.realpath(root)
        self._dirs: list[tuple[str, int, float]] = []  # (path, mode, mtime)

    def write(self, member: tarfile.TarInfo) -> None:
        """Create ``member`` (the tar stream's current member) below the root."""
        path = self._target(member)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if member.isdir():
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise self._refuse(member, "already exists and is not a directory") from None
            self._dirs.append((path, member.mode & 0o777 | 0o700, member.mtime))
        elif member.issym():
            self._check_link(member, path)
            try:
                os.symlink(member.linkname, path)
            except FileExistsError:
                raise self._refuse(member, "already exists; not replaced") from None
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        elif member.isreg():
            self._write_file(member, path)
        else:
            raise self._refuse(member, f"member type {member.type!r} is not extracted")

    def finish(self) -> None:
        """Apply directory modes and times, deepest first."""
        for path, mode, mtime in sorted(self._dirs, key=lambda d: d[0].count("/"), reverse=True):
            os.chmod(path, mode)
            os.utime(path, (mtime, mtime))

    def _target(self, member: tarfile.TarInfo) -> str:
        if os.path.isabs(member.name):
            raise self._refuse(member, "absolute path")
        path = os.path.join(self._root, member.name)
        self._require_inside(member, os.path.realpath(path), "would be written")
        return os.path.normpath(path)

    def _check_link(self, member: tarfile.TarInfo, path: str) -> None:
        if os.path.isabs(member.linkname):
            raise self._refuse(member, f"symlink to absolute path {member.linkname!r}")
        target = os.path.realpath(os.path.join(os.path.dirname(path), member.linkname))
        self._require_inside(member, target, "symlink points")

    def _require_inside(self, member: tarfile.TarInfo, path: str, what: str) -> None:
        if os.path.commonpath([path, self._root]) != self._root:
            raise self._refuse(member, f"{what} to {path}, outside the release directory")

    def _write_file(self, member: tarfile.TarInfo, path: str) -> None:
        source = self._tar.extractfile(member)
        if source is None:  # isreg() members always have content; tarfile says so
            raise self._refuse(member, "tarfile has no content for this regular file")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise self._refuse(member, "already exists; not replaced") from None
        with source, open(fd, "wb") as out:
            shutil.copyfileobj(source, out, _COPY_CHUNK)
            out.flush()  # before the time is set: a later write would move it
            os.fchmod(fd, member.mode & 0o777)
            os.utime(fd, (member.mtime, member.mtime))

    @staticmethod
    def _refuse(member: tarfile.TarInfo, detail: str) -> UnsafeArchive:
        return UnsafeArchive(member.name, "data-filter", detail)


class _Progress:
    """Turns stream positions into ``(bytes_done, bytes_total)`` reports, throttled, monotonic."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int) -> None:
        self._callback = callback
        self._total = total
        self._done = 0  # content bytes of members already extracted
        self._start = self._size = 0  # the current member's data in the tar stream
        self._reported = 0
        if callback is not None:
            callback(0, total)

    def begin(self, member: tarfile.TarInfo) -> None:
        self._start, self._size = member.offset_data, member.size if member.isreg() else 0

    def end(self) -> None:
        self._done += self._size
        self._size = 0
        self._report(self._done)

    def stream_at(self, position: int) -> None:
        self._report(self._done + min(max(position - self._start, 0), self._size))

    def _report(self, done: int) -> None:
        # The final (total, total) is left to finish(), once the release is in place.
        if self._callback is not None and self._reported + _PROGRESS_STEP <= done < self._total:
            self._reported = done
            self._callback(done, self._total)

    def finish(self) -> None:
        if self._callback is not None and self._reported < self._total:
            self._reported = self._total
            self._callback(self._total, self._total)


def _require_absent(dest: Path) -> None:
    if os.path.lexists(dest):
        raise FileExistsError(f"release directory {dest} already exists; extract into a new one")


def _remove_stale(staging: Path) -> None:
    """Remove a staging directory left by an interrupted extraction."""
    if staging.is_dir() and not staging.is_symlink():
        shutil.rmtree(staging)
    elif os.path.lexists(staging):
        staging.unlink()
