"""A file written piece by piece while its SHA-256 and size are kept: the server's artifact
uploads and the agent's partial downloads are both one of these."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO

_READ = 1 << 20


def hash_file(path: Path) -> tuple[Any, int]:
    """The running SHA-256 (a ``hashlib`` object, still open to updates) and size of what
    ``path`` holds, read in blocks."""
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while block := file.read(_READ):
            hasher.update(block)
            size += len(block)
    return hasher, size


class HashedFile:
    """Bytes appended to ``path``, hashed as they go.

    :param resume: open for appending and start from what the file already holds (a
        resumed download); otherwise the file must not exist yet.
    :param flush_each: hand every write to the OS at once, so a killed process loses
        nothing it reported as written.
    """

    def __init__(self, path: Path, *, resume: bool = False, flush_each: bool = False) -> None:
        self.path = path
        self.flush_each = flush_each
        self.file: BinaryIO = path.open("ab" if resume else "xb")
        if resume:
            self.hasher, self.size = hash_file(path)
        else:
            self.hasher, self.size = hashlib.sha256(), 0

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of what was written so far."""
        return str(self.hasher.hexdigest())

    def write(self, data: bytes) -> None:
        """Append ``data``."""
        self.file.write(data)
        if self.flush_each:
            self.file.flush()
        self.hasher.update(data)
        self.size += len(data)

    def restart(self) -> None:
        """Throw away what was written and start from zero (bad data)."""
        self.file.truncate(0)
        self.hasher, self.size = hashlib.sha256(), 0

    def seal(self) -> None:
        """Flush to disk (fsync) and close."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def close(self) -> None:
        """Close, keeping what was written (to resume later)."""
        self.file.close()

    def discard(self) -> None:
        """Close and delete the file."""
        self.file.close()
        self.path.unlink(missing_ok=True)
