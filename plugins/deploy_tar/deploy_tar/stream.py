"""Reading an archive as one stream: decompression, tarfile, and the guards around them.

Nothing here holds the archive in memory: members are parsed one at a time and forgotten, pax
and GNU long-name headers are capped, the expansion ratio is watched as bytes come out of the
decompressor, and the end-of-archive marker and the compressor's checksum are required.
Decompression and tarfile errors become ``UnsafeArchive(rule="corrupt")``.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, Self

from deploy_tar.rules import ExtractLimits, UnsafeArchive

__all__ = ["ArchiveStream", "MiB", "open_archive"]

MiB = 1024 * 1024
_RATIO_FLOOR = 1 * MiB  # below this much output the expansion ratio is not checked
_META_LIMIT = 1 * MiB  # largest pax / GNU long-name header tarfile may load into memory
_TRAILER_LIMIT = 1 * MiB  # data allowed after the end-of-archive marker (record padding)
_CHUNK = 64 * 1024
_META_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
    | {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...
    def close(self) -> object: ...


class _Corrupt(Exception):
    """The bytes are not an intact archive; turned into ``UnsafeArchive(rule="corrupt")``."""


class _GuardedTarInfo(tarfile.TarInfo):
    """Refuses pax and GNU long-name headers tarfile would otherwise load whole into memory."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _META_TYPES and not 0 <= info.size <= _META_LIMIT:
            raise UnsafeArchive(
                info.name,
                "header-size",
                f"extended header declares {info.size} bytes (at most {_META_LIMIT} allowed)",
            )
        return info


class _CountingReader:
    """The decompressed tar stream, as tarfile reads it.

    Counts bytes (for the expansion ratio and progress), keeps the last few so the end-of-archive
    marker can be checked, and reports decompression errors as corruption.
    """

    def __init__(self, source: _Readable, ratio: Callable[[int, str | None], None]) -> None:
        self._source = source
        self._ratio = ratio
        self._tail = bytearray()
        self.position = 0
        self.on_read: Callable[[int], None] | None = None

    def read(self, size: int, /) -> bytes:
        try:
            data = self._source.read(size)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise _Corrupt(f"cannot decompress: {exc}") from exc
        self.position += len(data)
        self._tail += data
        if len(self._tail) > 2 * _CHUNK:
            del self._tail[: len(self._tail) - _CHUNK]
        self._ratio(self.position, None)
        if self.on_read is not None:
            self.on_read(self.position)
        return data

    def block_at(self, offset: int) -> bytes:
        """The (up to) 512 bytes read at ``offset``, if still remembered, else ``b""``."""
        start = self.position - len(self._tail)
        if offset < start:
            return b""
        return bytes(self._tail[offset - start : offset - start + tarfile.BLOCKSIZE])

    def tell(self) -> int:
        return self.position

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("the archive is read as a stream")

    def write(self, b: bytes, /) -> int:
        raise io.UnsupportedOperation("the archive is read-only")

    def close(self) -> None:
        """The underlying file is closed by :func:`_open_archive`."""


class ArchiveStream:
    """One streaming pass: the reader over the decompressed bytes, the tarfile reading it (set
    by :func:`_open_archive`), and the last member seen."""

    tar: tarfile.TarFile

    def __init__(self, source: _Readable, size: int, limits: ExtractLimits) -> None:
        self._size = max(size, 1)
        self._limits = limits
        self.last: str | None = None
        self.reader = _CountingReader(source, self.ratio)

    def ratio(self, uncompressed: int, member: str | None) -> None:
        """Refuse once the tar stream grows past ``max_ratio`` times the file (over 1 MiB)."""
        if uncompressed > _RATIO_FLOOR and uncompressed / self._size > self._limits.max_ratio:
            raise UnsafeArchive(
                member if member is not None else self.last,
                "ratio",
                f"archive expands to {uncompressed / MiB:.1f} MiB from {self._size / MiB:.2f} MiB"
                f" (more than ExtractLimits.max_ratio={self._limits.max_ratio:g}): a"
                " decompression bomb?",
            )

    def members(self) -> Iterator[tarfile.TarInfo]:
        """The members, each parsed (pax headers applied) and then forgotten by tarfile."""
        while (member := self.tar.next()) is not None:
            # Stream mode still keeps every TarInfo in tar.members; the checker keeps what it
            # needs, so drop them to keep memory flat on archives with many members.
            seen = getattr(self.tar, "members", None)
            if isinstance(seen, list):
                seen.clear()
            self.last = member.name
            yield member

    def finish(self) -> None:
        """Require the end-of-archive marker, then read to the end so gzip checks its CRC."""
        offset = self.tar.offset  # where tarfile stopped: must be a block of zeros
        block = self.reader.block_at(offset)
        if len(block) < tarfile.BLOCKSIZE:
            raise _Corrupt(f"no end-of-archive marker at offset {offset}: truncated")
        if block.count(0) != tarfile.BLOCKSIZE:
            raise _Corrupt(f"damaged header at offset {offset}")
        while self.reader.read(_CHUNK):
            if self.reader.position - offset > _TRAILER_LIMIT:
                raise _Corrupt(f"more than {_TRAILER_LIMIT} bytes after the end-of-archive marker")


def _decompressor(raw: io.BufferedReader) -> _Readable:
    magic = raw.peek(6)[:6]
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


@contextlib.contextmanager
def open_archive(path: Path, limits: ExtractLimits) -> Iterator[ArchiveStream]:
    """Open ``path`` for one pass; tarfile and decompression errors become UnsafeArchive."""
    archive: ArchiveStream | None = None
    with path.open("rb") as raw, contextlib.closing(_decompressor(raw)) as source:
        try:
            archive = ArchiveStream(source, os.fstat(raw.fileno()).st_size, limits)
            with tarfile.open(fileobj=archive.reader, mode="r|", tarinfo=_GuardedTarInfo) as tar:
                archive.tar = tar
                yield archive
        except tarfile.FilterError as exc:
            raise UnsafeArchive(exc.tarinfo.name, "data-filter", str(exc)) from exc
        except (tarfile.TarError, _Corrupt, RecursionError) as exc:
            after = archive.last if archive is not None else None
            where = f" after member {after!r}" if after is not None else ""
            # tarfile reads chained extended headers recursively
            reason = (
                "too many extended headers in a row" if isinstance(exc, RecursionError) else exc
            )
            raise UnsafeArchive(
                None, "corrupt", f"not an intact tar archive{where}: {reason}"
            ) from exc
