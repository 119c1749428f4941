"""The releases under one target directory: which is current, which are bad, which to keep.

::

    target_dir/
      current -> releases/<name>    relative symlink; replaced atomically (rename over it)
      releases/<name>/              one release per deployment, named by its deploy id
      releases/<name>/.deploy-tar-bad   marker: the release failed; never switched to again
      releases.json                 the releases in the order they were made, with the
                                    install script each was installed with

Everything here is quick file-system work on one directory, except :meth:`Releases.prune`,
which removes whole trees: call that one in a thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from deploy_core.models import ID_PATTERN

__all__ = ["BAD_MARKER", "LEDGER", "ReleaseError", "Releases"]

log = logging.getLogger(__name__)

BAD_MARKER = ".deploy-tar-bad"
LEDGER = "releases.json"
_NAME = re.compile(ID_PATTERN)


class ReleaseError(Exception):
    """The target directory is not in a state deploy.tar can work with; the text says why
    and what to do."""


class Releases:
    """The release layout of one target directory (which need not exist yet)."""

    def __init__(self, target_dir: Path) -> None:
        self.target_dir = target_dir
        self.root = target_dir / "releases"
        self.current_link = target_dir / "current"
        self.ledger_path = target_dir / LEDGER

    # ------------------------------------------------------------------ layout

    def create(self) -> None:
        """Create the target directory and ``releases/`` if missing; refuse a layout that is
        not ours (``releases`` or ``current`` of the wrong kind)."""
        self.target_dir.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(self.root) and not stat.S_ISDIR(self.root.lstat().st_mode):
            raise ReleaseError(
                f"{self.root} exists and is not a directory (a symlink or a file); move it "
                "away: deploy.tar keeps its releases there"
            )
        self.root.mkdir(exist_ok=True)
        self.current()  # refuses a ``current`` that is not our symlink

    def path(self, name: str) -> Path:
        """The directory of release ``name`` (whether or not it exists)."""
        if not _NAME.match(name):
            raise ReleaseError(f"{name!r} is not a release name")
        return self.root / name

    def exists(self, name: str) -> bool:
        """Whether release ``name`` is a real directory under ``releases/``."""
        try:
            return stat.S_ISDIR(self.path(name).lstat().st_mode)
        except FileNotFoundError:
            return False

    def names(self) -> list[str]:
        """The releases on disk, oldest first: in the ledger's order, with releases the ledger
        does not know (made by hand, or the ledger was lost) first, by modification time."""
        if not self.root.is_dir():
            return []
        on_disk = {
            entry.name
            for entry in os.scandir(self.root)
            if _NAME.match(entry.name) and entry.is_dir(follow_symlinks=False)
        }
        known = [name for name in self._ledger() if name in on_disk]
        unknown = sorted(on_disk - set(known), key=lambda n: (self.root / n).lstat().st_mtime)
        return unknown + known

    # ------------------------------------------------------------------ current

    def current(self) -> str | None:
        """The release ``current`` points at, ``None`` when there is no ``current`` yet.

        :raises ReleaseError: ``current`` is not a symlink, or points outside ``releases/``.
        """
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError:  # EINVAL: it exists but is not a symlink
            raise ReleaseError(
                f"{self.current_link} is not a symlink; move it away: deploy.tar points it "
                "at the live release"
            ) from None
        path = Path(target) if os.path.isabs(target) else self.target_dir / target
        if path.parent != self.root or not _NAME.match(path.name):
            raise ReleaseError(
                f"{self.current_link} points at {target}, not at a release in {self.root}; "
                "remove it or point it at one"
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
        temporary = self.target_dir / f".current-{secrets.token_hex(6)}"
        os.symlink(f"releases/{name}", temporary)
        try:
            os.replace(temporary, self.current_link)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def remove_current(self) -> None:
        """Remove the ``current`` symlink (nothing is live any more)."""
        self.current()
        self.current_link.unlink(missing_ok=True)

    # ------------------------------------------------------------------ bad releases

    def is_bad(self, name: str) -> bool:
        """Whether release ``name`` was marked bad."""
        return os.path.lexists(self.path(name) / BAD_MARKER)

    def mark_bad(self, name: str, reason: str) -> None:
        """Mark release ``name`` bad, saying why (kept for inspection, never used again)."""
        if self.exists(name):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            marker = self.path(name) / BAD_MARKER
            marker.unlink(missing_ok=True)  # a symlink there must not redirect the write
            marker.write_text(f"{stamp} {reason}\n")

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
            data = json.loads(self.ledger_path.read_text())
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
        temporary = self.ledger_path.with_name(f".{LEDGER}.{secrets.token_hex(4)}")
        temporary.write_text(json.dumps({"releases": entries}, indent=1) + "\n")
        os.replace(temporary, self.ledger_path)

    # ------------------------------------------------------------------ retention

    def prune(self, keep: int, protect: set[str]) -> list[str]:
        """Remove all but the newest ``keep`` releases, never one in ``protect`` (the current
        and the previous release); also staging directories an interrupted extraction left.
        Returns the names removed."""
        names = self.names()
        kept = set(names[-keep:]) | protect
        doomed = [name for name in names if name not in kept]
        for name in doomed:
            shutil.rmtree(self.path(name))
        if doomed or len(names) < len(self._ledger()):
            left = set(names) - set(doomed)
            self._write_ledger([e for e in self._entries() if e.get("name") in left])
        for entry in os.scandir(self.root):
            if entry.name.startswith(".staging-") and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
        return doomed
