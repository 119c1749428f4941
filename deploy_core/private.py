"""Files and directories that hold secrets: private to the user the process runs as.

The server's and the agent's state directories hold keys, tokens and (while a deployment
runs) its secret environment; their SQLite databases hold the rest.  Both are tightened at
every start, not only when created, so a directory made by an older version (or by hand,
with a loose umask) is closed too.
"""

from __future__ import annotations

import os
from pathlib import Path

# Besides the database itself, what SQLite may create next to it.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if missing, and make it 0700 either way."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def private_database(database: Path) -> None:
    """Make a SQLite database file and its WAL, shared-memory and journal files 0600,
    creating the database file with that mode when it is missing: SQLite gives the files it
    creates later the database file's mode."""
    if not database.exists():
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
    for suffix in ("", *SQLITE_COMPANIONS):
        path = database.with_name(database.name + suffix)
        if path.exists():
            os.chmod(path, 0o600)
