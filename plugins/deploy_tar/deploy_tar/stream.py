"""Reading an archive as one stream: decompression, tarfile, and the guards around them.

Nothing here holds the archive in memory: members are parsed one at a time and forgotten, pax
and GNU long-name headers are capped, the expansion ratio is watched as bytes come out of the
decompressor, and the end-of-archive marker and the compressor's checksum are required.
Decompression and tarfile errors become ``UnsafeArchive(rule="corrupt")``.

The header cap does not rely on tarfile internals (they changed in 3.13.4, and a subclass hook
that 3.11 to 3.13.3 call is bypassed since): every 512-byte header block is read here, from the
raw stream, before tarfile parses it, and an extended header (pax ``x``/``g``/``X``, GNU long
name ``L`` or long link ``K``) whose size field is over 1 MiB is refused before its data is read.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from deploy_core.plugin import work_step
from deploy_tar.rules import ExtractLimits, UnsafeArchive

__all__ = ["ArchiveStream", "MiB", "open_archive"]

MiB = 1024 * 1024
_RATIO_FLOOR = 1 * MiB  # below this much output the expansion ratio is not checked
_META_LIMIT = 1 * MiB  # largest pax / GNU long-name header tarfile may load into memory
_TRAILER_LIMIT = 1 * MiB  # data allowed after the end-of-archive marker (record padding)
_CHUNK = 64 * 1024
_BLOCK = tarfile.BLOCKSIZE
_LONG_TYPES = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})
_META_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}) | _LONG_TYPES
_JUDGED_TYPES = _META_TYPES | {tarfile.GNUTYPE_SPARSE}
_SPARSE_RECORD = re.compile(rb"[0-9] GNU\.sparse\.")


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...
    def close(self) -> object: ...


class _Corrupt(Exception):
    """The bytes are not an intact archive; turned into ``UnsafeArchive(rule="corrupt")``."""


def _number(field: bytes) -> int:
    """A numeric header field as tar writes it: octal digits, or GNU base-256 (+ or -).

    :raises ValueError: the field is neither (tarfile refuses such a header as invalid).
    """
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    text = field.split(b"\0", 1)[0].decode("ascii")
    return int(text.strip() or "0", 8)


def _check_header(block: bytes) -> tuple[str, bytes, int] | None:
    """Judge a header block before tarfile parses it.

    Refuses negative sizes, GNU sparse members (their extension blocks would pile up in memory)
    and extended headers over ``_META_LIMIT``. Blocks tarfile will not take as a header (zeros,
    bad checksum, unreadable fields) are left to it.

    :returns: the member name, type and size when this is an extended header (tarfile reads it,
        and the header after it, in the same step), else ``None``.
    """
    kind = block[156:157]
    if kind not in _JUDGED_TYPES and block[124] != 0o377:  # the common case: nothing to judge
        return None
    try:
        if _number(block[148:156]) not in (
            256 + sum(block[:148]) + sum(block[156:]),
            256 + sum(struct.unpack_from("148b8x356b", block)),  # signed, as some tars
        ):
            return None
        size = _number(block[124:136])
    except (ValueError, UnicodeDecodeError):
        return None
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix and kind not in _LONG_TYPES | {tarfile.GNUTYPE_SPARSE}:
        name = prefix + b"/" + name
    member = name.decode("utf-8", "surrogateescape")
    if size < 0:
        raise UnsafeArchive(member, "member-size", f"declares a negative size ({size})")
    if kind == tarfile.GNUTYPE_SPARSE:
        raise UnsafeArchive(member, "special-type", "sparse files are not supported")
    if kind not in _META_TYPES:
        return None
    if size > _META_LIMIT:
        raise UnsafeArchive(
            member,
            "header-size",
            f"extended header declares {size} bytes (at most {_META_LIMIT} allowed)",
        )
    return member, kind, size


def _check_pax(member: str, records: bytes) -> None:
    """Refuse pax records describing a GNU sparse file: tarfile reads the map of the 1.0 format
    from the member's data without a bound (and fails on a short one with a bare ValueError).

    Any ``GNU.sparse.`` after a record's length is refused; that includes every key tarfile
    could parse, whatever its version's record parser.
    """
    if _SPARSE_RECORD.search(records):
        raise UnsafeArchive(
            member, "special-type", "sparse files (pax GNU.sparse) are not supported"
        )


class _HeaderGuard:
    """Follows the header blocks tarfile is about to parse, judging each (:func:`_check_header`)
    and the pax records it announces (:func:`_check_pax`) from the bytes read so far."""

    def __init__(self) -> None:
        self._header: int | None = 0  # offset of the next header block to judge
        self._pax: tuple[str, int, int] | None = None  # member, start and end of pax records
        self._records = bytearray()

    def expect(self, offset: int) -> None:
        """tarfile's next header starts at ``offset``."""
        self._header = offset

    def judge(self, tail: bytearray, start: int) -> None:
        """Judge what ``tail`` (the stream's bytes from offset ``start`` to now) completes."""
        end = start + len(tail)
        while True:
            if self._pax is not None:
                member, first, last = self._pax
                have = first + len(self._records)
                if have < min(last, end):
                    self._require_remembered(have, start)
                    self._records += tail[have - start : min(last, end) - start]
                if end < last:
                    return
                _check_pax(member, bytes(self._records))
                self._pax, self._records = None, bytearray()
            offset = self._header
            if offset is None or offset + _BLOCK > end:
                return
            self._require_remembered(offset, start)
            extended = _check_header(bytes(tail[offset - start : offset - start + _BLOCK]))
            self._header = None
            if extended is not None:
                member, kind, size = extended
                self._header = offset + _BLOCK + -(-size // _BLOCK) * _BLOCK
                if kind not in _LONG_TYPES:
                    self._pax = (member, offset + _BLOCK, offset + _BLOCK + size)

    @staticmethod
    def _require_remembered(offset: int, start: int) -> None:
        if offset < start:
            # Reads are at most _CHUNK bytes and the tail keeps more, so this is a bug here.
            raise _Corrupt(f"bytes at offset {offset} were read before they were judged")


class _CountingReader:
    """The decompressed tar stream, as tarfile reads it.

    Counts bytes (for the expansion ratio and progress), keeps the last few so the end-of-archive
    marker can be checked, judges each header block before tarfile sees it
    (:class:`_HeaderGuard`), and reports decompression errors as corruption.
    """

    def __init__(self, source: _Readable, ratio: Callable[[int, str | None], None]) -> None:
        self._source = source
        self._ratio = ratio
        self._tail = bytearray()
        self._guard = _HeaderGuard()
        self.position = 0
        self.on_read: Callable[[int], None] | None = None

    def expect_header(self, offset: int) -> None:
        """tarfile's next header starts at ``offset``: judge it (and the extended headers chained
        after it) as soon as it has been read, before tarfile parses it."""
        self._guard.expect(offset)
        self._guard.judge(self._tail, self.position - len(self._tail))

    def read(self, size: int, /) -> bytes:
        work_step()  # bounded: stops when the deployment gives up on the pass
        try:
            data = self._source.read(size)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise _Corrupt(f"cannot decompress: {exc}") from exc
        self.position += len(data)
        self._tail += data
        self._guard.judge(self._tail, self.position - len(self._tail))
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
        return bytes(self._tail[offset - start : offset - start + _BLOCK])

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
        while True:
            self.reader.expect_header(self.tar.offset)
            member = self.tar.next()
            if member is None:
                return
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
        if len(block) < _BLOCK:
            raise _Corrupt(f"no end-of-archive marker at offset {offset}: truncated")
        if block.count(0) != _BLOCK:
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
            with tarfile.open(fileobj=archive.reader, mode="r|") as tar:
                archive.tar = tar
                yield archive
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
