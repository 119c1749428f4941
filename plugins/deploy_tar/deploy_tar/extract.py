"""Safe extraction of a package archive into a fresh release directory (issue 4, 30-60 %).

Two streaming passes over the file, neither of which holds the archive in memory:

1. :func:`scan_archive` reads every header once and refuses the archive on the first member that
   breaks a rule (traversal, absolute names, links leaving the release, hard links, special files,
   setuid/setgid/sticky bits, duplicate names, size, count and expansion limits, corruption).
   Nothing is written.
2. :func:`extract_archive` scans, then extracts into ``.staging-<name>`` next to the destination,
   running the same checks again plus tarfile's ``data`` filter (belt and braces, and the archive
   may change between the passes), and renames the staging directory into place. On any error the
   staging directory is removed.

Every refusal is an :class:`UnsafeArchive` naming the member and the rule. The rules are in
:mod:`deploy_tar.rules`, the streaming reader in :mod:`deploy_tar.stream`; this module writes.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
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

            def checked() -> Iterator[tarfile.TarInfo]:
                for member in archive.members():
                    checker.check(member)
                    report.begin(member)
                    yield member  # tarfile extracts it before asking for the next one
                    report.end()

            archive.tar.extractall(str(staging), members=checked(), filter=_release_filter)
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


def _release_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's ``data`` filter, keeping the archive's permission bits (s-bits were refused).

    The data filter drops group/other write on files and leaves directories at 0700; a release
    is meant to be installed as packaged, so the packaged bits are restored, and directories
    get at least u+rwx so their contents can be written and later removed.
    """
    filtered = tarfile.data_filter(member, dest)
    if member.isreg():
        return filtered.replace(mode=member.mode & 0o777, deep=False)
    if member.isdir():
        return filtered.replace(mode=member.mode & 0o777 | 0o700, deep=False)
    return filtered


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
