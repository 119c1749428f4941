"""A file written piece by piece while its SHA-256 and size are kept: the server's artifact
uploads and the agent's partial downloads are both one of these."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO

_READ = 1 << 20


# Never through a symlink: a planted link must not make the writer (root, on an agent)
# append to or hash some other file.
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def hash_file(path: Path) -> tuple[Any, int]:
    """The running SHA-256 (a ``hashlib`` object, still open to updates) and size of what
    ``path`` holds, read in blocks (a symlink at ``path`` is refused, not followed)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


def _hash_fd(fd: int) -> tuple[Any, int]:
    hasher = hashlib.sha256()
    size = 0
    while block := os.pread(fd, _READ, size):
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
        # Private (0600) and never through a symlink, whether created or resumed.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | _NOFOLLOW
        fd = os.open(path, flags if resume else flags | os.O_EXCL, 0o600)
        self.file: BinaryIO = os.fdopen(fd, "ab")
        if resume:
            self.hasher, self.size = _hash_fd(fd)
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
