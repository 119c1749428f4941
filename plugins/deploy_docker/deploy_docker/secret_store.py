"""Secret variables of replaced containers, kept on the agent only.

The rollback state travels to the server, so a replaced container's spec is captured without
the values of its secret variables; they are written here (a 0600 file per deployment under
the agent's data directory) for the case where the container must be created again.  Files
older than :data:`RETENTION` are deleted whenever one is written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

RETENTION = 30 * 86400.0


def _folder(data_dir: Path) -> Path:
    return data_dir / "deploy_docker" / "secrets"


def keep(data_dir: Path, deploy_id: str, values: Mapping[str, str]) -> None:
    """Keep ``values`` for deployment ``deploy_id`` (nothing is written when empty)."""
    folder = _folder(data_dir)
    if values:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{deploy_id}.json"
        # Under the agent's private data directory; still never through a planted link.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(dict(values), out)
    if folder.is_dir():
        cutoff = time.time() - RETENTION
        for old in folder.glob("*.json"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)


def recall(data_dir: Path, deploy_id: str) -> dict[str, str]:
    """What :func:`keep` kept for ``deploy_id``, or nothing."""
    path = _folder(data_dir) / f"{deploy_id}.json"
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in values.items()} if isinstance(values, dict) else {}
