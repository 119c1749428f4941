"""The releases under one target directory: which is current, which are bad, which to keep.

::

    target_dir/
      current -> releases/<name>    relative symlink; replaced atomically (rename over it)
      releases/<name>/              one release per deployment, named by its deploy id
      releases/<name>/.deploy-tar-bad   marker: the release failed; never switched to again
      releases.json                 the releases in the order they were made, with the
                                    install script each was installed with

The agent works here as root while a deployment's script (perhaps as ``run_as``, who may own
``target_dir``) can rename and swap entries.  So every operation goes through
:mod:`deploy_core.agent.safefs`: ``target_dir`` is opened from ``/`` without following a
link (and must be the directory recorded when the deployment created the layout),
``releases/`` and each release are opened by name relative to it, never through a link, and
``current``, the ledger and the bad markers are written by ``dir_fd``.  A swapped-in symlink
is refused with a :class:`ReleaseError` naming the path.

Everything here is quick file-system work on one directory, except :meth:`Releases.prune`,
which removes whole trees: call that one in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deploy_core.plugin import ID_PATTERN, WorkBudget, safefs

__all__ = ["BAD_MARKER", "LEDGER", "ReleaseError", "Releases"]

log = logging.getLogger(__name__)

BAD_MARKER = ".deploy-tar-bad"
LEDGER = "releases.json"
RELEASES = "releases"
CURRENT = "current"
_NAME = re.compile(ID_PATTERN)


class ReleaseError(Exception):
    """The target directory is not in a state deploy.tar can work with; the text says why
    and what to do."""


class Releases:
    """The release layout of one target directory (which need not exist yet).

    :param target_dir: the resolved target directory: from here on no component of it may
        be a symlink.
    :param identity: ``(st_dev, st_ino)`` of ``target_dir`` recorded earlier (see
        :meth:`create`); a different directory there is refused.
    """

    def __init__(self, target_dir: Path, *, identity: Sequence[int] | None = None) -> None:
        self.target_dir = target_dir
        self.root = target_dir / RELEASES
        self.current_link = target_dir / CURRENT
        self.ledger_path = target_dir / LEDGER
        self.identity = list(identity) if identity is not None else None

    # ------------------------------------------------------------------ opening

    @contextlib.contextmanager
    def _target(self, *, create: bool = False) -> Iterator[safefs.Dir]:
        try:
            target = safefs.open_dir(self.target_dir, create=create, expect=self.identity)
        except safefs.UnsafePath as exc:
            raise ReleaseError(str(exc)) from None
        with target:
            yield target

    @contextlib.contextmanager
    def _releases(self, *, create: bool = False) -> Iterator[safefs.Dir]:
        with self._target(create=create) as target:
            try:
                releases = safefs.open_subdir(target, RELEASES, create=create)
            except safefs.UnsafePath:
                raise ReleaseError(
                    f"{self.root} exists and is not a directory (a symlink or a file); move "
                    "it away: deploy.tar keeps its releases there"
                ) from None
        with releases:
            yield releases

    @contextlib.contextmanager
    def _release(self, name: str) -> Iterator[safefs.Dir]:
        self.path(name)  # refuses a name that is not a release name
        with self._releases() as releases:
            try:
                release = safefs.open_subdir(releases, name)
            except safefs.UnsafePath as exc:
                raise ReleaseError(str(exc)) from None
        with release:
            yield release

    # ------------------------------------------------------------------ layout

    def create(self) -> None:
        """Create the target directory and ``releases/`` if missing; refuse a layout that is
        not ours (``releases`` or ``current`` of the wrong kind).  Records the target
        directory's identity: later operations refuse another directory put in its place."""
        with self._target(create=True) as target:
            if self.identity is None:
                self.identity = list(target.identity)
        with self._releases(create=True):
            pass
        self.current()  # refuses a ``current`` that is not our symlink

    def identify(self) -> list[int] | None:
        """``[st_dev, st_ino]`` of the target directory (reached without following a link),
        to pass back as ``identity`` later; ``None`` while it does not exist."""
        try:
            with self._target() as target:
                return list(target.identity)
        except FileNotFoundError:
            return None

    def adopt(self, name: str, source: safefs.Dir, source_name: str) -> None:
        """Move the complete directory ``source_name`` of ``source`` (extracted where no
        script can reach) into place as release ``name``, by ``renameat``."""
        self.path(name)
        with self._releases() as releases:
            if safefs.lstat_at(releases, name) is not None:
                raise ReleaseError(f"release directory {self.path(name)} already exists")
            try:
                safefs.rename_at(source, source_name, releases, name)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise ReleaseError(
                        f"cannot move the extracted release into {self.root}: another file "
                        "system than the staging directory"
                    ) from None
                raise

    def path(self, name: str) -> Path:
        """The directory of release ``name`` (whether or not it exists)."""
        if not _NAME.match(name):
            raise ReleaseError(f"{name!r} is not a release name")
        return self.root / name

    def exists(self, name: str) -> bool:
        """Whether release ``name`` is a real directory under ``releases/``."""
        self.path(name)
        try:
            with self._releases() as releases:
                st = safefs.lstat_at(releases, name)
        except FileNotFoundError:
            return False
        return st is not None and stat.S_ISDIR(st.st_mode)

    def names(self) -> list[str]:
        """The releases on disk, oldest first: in the ledger's order, with releases the ledger
        does not know (made by hand, or the ledger was lost) first, by modification time."""
        try:
            with self._releases() as releases:
                times = {}
                for entry in os.scandir(releases.fd):
                    if _NAME.match(entry.name) and entry.is_dir(follow_symlinks=False):
                        times[entry.name] = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return []
        known = [name for name in self._ledger() if name in times]
        unknown = sorted(set(times) - set(known), key=lambda n: times[n])
        return unknown + known

    # ------------------------------------------------------------------ current

    def current(self) -> str | None:
        """The release ``current`` points at, ``None`` when there is no ``current`` yet.

        :raises ReleaseError: ``current`` is not a symlink, or points outside ``releases/``.
        """
        try:
            with self._target() as target:
                target_text = safefs.readlink_at(target, CURRENT)
        except FileNotFoundError:
            return None
        except safefs.UnsafePath:
            raise ReleaseError(
                f"{self.current_link} is not a symlink; move it away: deploy.tar points it "
                "at the live release"
            ) from None
        if target_text is None:
            return None
        path = Path(target_text) if os.path.isabs(target_text) else self.target_dir / target_text
        if path.parent != self.root or not _NAME.match(path.name):
            raise ReleaseError(
                f"{self.current_link} points at {target_text}, not at a release in "
                f"{self.root}; remove it or point it at one"
            )
        return path.name

    def switch(self, name: str) -> None:
        """Point ``current`` at release ``name`` in one step: a new symlink renamed over it,
        so ``current`` always exists and names a complete release."""
        if self.is_bad(name):
            raise ReleaseError(f"release {name} is marked bad; it is never switched to again")
        if not self.exists(name):
            raise ReleaseError(f"release {name} does not exist in {self.root}")
        self.current()  # refuses to replace something that is not our symlink
        with self._target() as target:
            safefs.replace_symlink(target, CURRENT, f"{RELEASES}/{name}")

    def remove_current(self) -> None:
        """Remove the ``current`` symlink (nothing is live any more)."""
        self.current()
        with self._target() as target, contextlib.suppress(FileNotFoundError):
            os.unlink(CURRENT, dir_fd=target.fd)

    # ------------------------------------------------------------------ bad releases

    def is_bad(self, name: str) -> bool:
        """Whether release ``name`` was marked bad."""
        try:
            with self._release(name) as release:
                return safefs.lstat_at(release, BAD_MARKER) is not None
        except FileNotFoundError:
            return False

    def mark_bad(self, name: str, reason: str) -> None:
        """Mark release ``name`` bad, saying why (kept for inspection, never used again)."""
        if self.exists(name):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            with self._release(name) as release:
                # Written by dir_fd and renamed over: a symlink there is replaced, not followed.
                safefs.write_file_at(release, BAD_MARKER, f"{stamp} {reason}\n".encode(), 0o644)

    def fallback(self, failed: str, recorded: str | None) -> str | None:
        """The release to go back to from ``failed``: ``recorded`` (the one that was current
        before it) if it is still there and not bad, else the newest good release made
        before ``failed``. ``None`` when nothing was current before (``recorded`` is
        ``None``) or no good release is left."""
        if recorded is None:
            return None
        if recorded != failed and self.exists(recorded) and not self.is_bad(recorded):
            return recorded
        names = self.names()
        older = names[: names.index(failed)] if failed in names else names
        for name in reversed(older):
            if name != failed and not self.is_bad(name):
                return name
        return None

    # ------------------------------------------------------------------ ledger

    def record(self, name: str, *, sha256: str, install_script: str | None) -> None:
        """Add release ``name`` to the ledger, as the newest."""
        entries = [e for e in self._entries() if e.get("name") != name]
        entries.append(
            {
                "name": name,
                "sha256": sha256,
                "install_script": install_script,
                "created_at": round(time.time(), 3),
            }
        )
        self._write_ledger(entries)

    def entry(self, name: str) -> dict[str, Any] | None:
        """What the ledger knows about release ``name``."""
        return next((e for e in self._entries() if e.get("name") == name), None)

    def _ledger(self) -> list[str]:
        return [str(e["name"]) for e in self._entries() if isinstance(e.get("name"), str)]

    def _entries(self) -> list[dict[str, Any]]:
        try:
            with self._target() as target:
                fd = safefs.open_file_at(target, LEDGER, os.O_RDONLY)
            with os.fdopen(fd, "rb") as file:
                data = json.loads(file.read())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning(
                "%s is unreadable (%s); releases are ordered by time", self.ledger_path, exc
            )
            return []
        entries = data.get("releases") if isinstance(data, dict) else None
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    def _write_ledger(self, entries: list[dict[str, Any]]) -> None:
        data = (json.dumps({"releases": entries}, indent=1) + "\n").encode()
        with self._target() as target:
            safefs.write_file_at(target, LEDGER, data, 0o644)

    # ------------------------------------------------------------------ retention

    def prune(self, keep: int, protect: set[str], *, budget: WorkBudget | None = None) -> list[str]:
        """Remove all but the newest ``keep`` releases, never one in ``protect`` (the current
        and the previous release); also staging directories an interrupted extraction left.
        Returns the names removed.

        Removal never follows a symlink and never leaves ``releases/``: a ``releases`` that
        became a link, or a release replaced while being removed, is refused.
        """
        step = budget.step if budget is not None else None
        names = self.names()
        kept = set(names[-keep:]) | protect
        doomed = [name for name in names if name not in kept]
        with self._releases() as releases:
            for name in doomed:
                safefs.remove_at(releases, name, step=step)
            if doomed or len(names) < len(self._ledger()):
                left = set(names) - set(doomed)
                self._write_ledger([e for e in self._entries() if e.get("name") in left])
            for entry in os.scandir(releases.fd):
                if entry.name.startswith(".staging-") and entry.is_dir(follow_symlinks=False):
                    safefs.remove_at(releases, entry.name, step=step)
        return doomed
