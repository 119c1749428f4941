"""Where the ``snapshot`` strategy keeps its snapshots, and their retention.

Layout, under the agent's data directory::

    snapshots/<hash of path>/PATH               the directory snapshotted, for people
    snapshots/<hash of path>/<deploy_id>/       one snapshot, taken before that deployment
        meta.json                               what it is (see SnapshotInfo)
        tree/                                   the copy (missing when the path was absent)
    snapshots/<hash of path>/.tmp-<deploy_id>/  a snapshot being taken

A snapshot is built under ``.tmp-…`` and renamed into place once complete, so a snapshot
directory with a ``meta.json`` is always whole.  Blocking code, run in a thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy_core.plugin import WorkBudget

from rollback_basic.tree import CopyStats, copy_tree, remove_tree

META = "meta.json"
TREE = "tree"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class SnapshotInfo:
    """One complete snapshot, as its ``meta.json`` describes it.

    :param seq: increases by one per snapshot of the same path; newest is highest.
    :param absent: the path did not exist when the snapshot was taken.
    """

    path: str
    deploy_id: str
    command_type: str
    seq: int
    created: float
    absent: bool
    files: int
    bytes: int

    def write(self, directory: Path) -> None:
        """Store as ``directory/meta.json``."""
        (directory / META).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> SnapshotInfo | None:
        """The snapshot in ``directory``, or ``None`` if there is no readable one."""
        try:
            raw = json.loads((directory / META).read_text())
            return cls(**raw)
        except (OSError, ValueError, TypeError):
            return None


class SnapshotStore:
    """The snapshots under ``<data_dir>/snapshots``."""

    def __init__(self, data_dir: Path) -> None:
        # Resolved once: the agent's own directory may be reached through a link (a state
        # directory moved to another disk); below it, file work follows none.
        self.root = Path(os.path.realpath(data_dir)) / "snapshots"

    def path_dir(self, path: str) -> Path:
        """The directory holding every snapshot of ``path``."""
        return self.root / hashlib.sha256(path.encode()).hexdigest()[:16]

    def snapshot_dir(self, path: str, deploy_id: str) -> Path:
        """Where the snapshot of ``path`` taken before ``deploy_id`` lives."""
        return self.path_dir(path) / deploy_id

    def load(self, directory: Path) -> SnapshotInfo | None:
        """The complete snapshot in ``directory``; ``None`` if there is none, or if
        ``directory`` is not a snapshot directory of this store."""
        resolved = directory.resolve()
        if resolved.parent.parent != self.root.resolve() or resolved.name.startswith("."):
            return None
        return SnapshotInfo.read(resolved)

    def snapshots(self, path: str) -> list[tuple[Path, SnapshotInfo]]:
        """Every complete snapshot of ``path``, newest first."""
        found = []
        try:
            entries = list(os.scandir(self.path_dir(path)))
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            info = SnapshotInfo.read(Path(entry.path))
            if info is not None and info.path == path:
                found.append((Path(entry.path), info))
        found.sort(key=lambda item: (item[1].seq, item[1].created), reverse=True)
        return found

    def take(
        self,
        path: str,
        deploy_id: str,
        command_type: str,
        *,
        source: Path | None = None,
        budget: WorkBudget | None = None,
    ) -> tuple[Path, SnapshotInfo, CopyStats, str | None]:
        """Snapshot directory ``path`` (or record that it is absent) before ``deploy_id``.

        Unchanged files are hard-linked from the newest earlier snapshot of ``path``.

        :param source: where ``path`` resolved to when it was checked: the copy reads that,
            refusing any symlink met on the way (default ``path`` itself).
        :param budget: stops the copy when spent or cancelled.

        :returns: the snapshot directory, its info, the copy's counts, and the deploy id of
            the snapshot files were hard-linked from (``None`` if none).
        :raises NotADirectoryError: ``path`` exists but is not a directory.
        """
        holder = self.path_dir(path)
        holder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)  # snapshots may hold secrets from the application
        (holder / "PATH").write_text(path + "\n")
        for entry in os.scandir(holder):  # snapshots interrupted earlier
            if entry.name.startswith(TMP_PREFIX):
                remove_tree(Path(entry.path))

        existing = self.snapshots(path)
        previous = next(
            ((d, i) for d, i in existing if not i.absent and i.deploy_id != deploy_id), None
        )
        tmp = holder / f"{TMP_PREFIX}{deploy_id}"
        tmp.mkdir(mode=0o700)
        source = source if source is not None else Path(path)
        try:
            absent = not os.path.lexists(source)
            stats = CopyStats()
            if not absent:
                stats = copy_tree(
                    source,
                    tmp / TREE,
                    previous=previous[0] / TREE if previous else None,
                    budget=budget,
                )
            info = SnapshotInfo(
                path=path,
                deploy_id=deploy_id,
                command_type=command_type,
                seq=max((i.seq for _, i in existing), default=0) + 1,
                created=time.time(),
                absent=absent,
                files=stats.files,
                bytes=stats.bytes,
            )
            info.write(tmp)
            final = holder / deploy_id
            remove_tree(final)  # the same deployment prepared again
            os.rename(tmp, final)
        except BaseException:
            remove_tree(tmp)
            raise
        return final, info, stats, previous[1].deploy_id if previous else None

    def prune(self, path: str, keep: int, *, budget: WorkBudget | None = None) -> list[str]:
        """Remove all but the newest ``keep`` snapshots of ``path``.

        :returns: the deploy ids whose snapshots were removed.
        """
        removed = []
        for directory, info in self.snapshots(path)[keep:]:
            remove_tree(directory, budget=budget)
            removed.append(info.deploy_id)
        return removed
