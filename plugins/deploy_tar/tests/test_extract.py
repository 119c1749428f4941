"""deploy_tar.extract: malicious archives are refused with a clear error and leave nothing behind;
good packages extract whole, with their modes and links, in bounded memory.

Archives are built here with tarfile, or block by block where tarfile refuses to write the
trick (NUL bytes, negative or absurd sizes, oversized headers, unknown member types).
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import lzma
import os
import random
import stat
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import deploy_tar.extract as extract_module
from deploy_tar import rules
from deploy_tar.extract import (
    ExtractLimits,
    ExtractStats,
    UnsafeArchive,
    extract_archive,
    scan_archive,
)

MiB = 1024 * 1024
Entry = tuple[tarfile.TarInfo, bytes | None]
Builder = Callable[[Path], Path]

# -- building archives -----------------------------------------------------------------------


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
    return info, data


def directory(name: str, mode: int = 0o755) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, target, 0o777
    return info, None


def node(name: str, kind: bytes) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, None


def pack(*entries: Entry) -> Builder:
    """A builder writing ``entries`` as a pax-format tar.gz."""

    def build(path: Path) -> Path:
        with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            for info, data in entries:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return path

    return build


def header(
    name: bytes,
    *,
    size: int = 0,
    size_field: bytes | None = None,
    kind: bytes = b"0",
    mode: int = 0o644,
    linkname: bytes = b"",
) -> bytes:
    """One ustar header block, written by hand so any field can hold anything."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"%07o\0" % mode
    block[108:124] = b"0000000\0" * 2
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_700_000_000
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def member(name: bytes, data: bytes = b"", **fields: Any) -> bytes:
    return header(name, size=len(data), **fields) + data + bytes(-len(data) % 512)


def pax_member(**records: bytes) -> bytes:
    """A pax extended header applying ``records`` to the member after it."""
    body = b""
    for key, value in records.items():
        record = b" " + key.encode() + b"=" + value + b"\n"
        length = len(record) + 1
        while length != len(record) + len(str(length)):
            length = len(record) + len(str(length))
        body += str(length).encode() + record
    return member(b"././@PaxHeader", body, kind=b"x")


END = bytes(1024)


def raw(*blocks: bytes, compress: bool = True) -> Builder:
    def build(path: Path) -> Path:
        data = b"".join(blocks)
        path.write_bytes(gzip.compress(data) if compress else data)
        return path

    return build


def good_tar_gz() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for info, data in (file("a", b"x" * 3000), file("b", b"y" * 3000)):
            tar.addfile(info, io.BytesIO(data or b""))
    return out.getvalue()


def random_tar_gz() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info, data = file("random", random.Random(1).randbytes(20_000))
        tar.addfile(info, io.BytesIO(data or b""))
    return out.getvalue()


def flip_byte(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x55]) + data[offset + 1 :]


def repeated(path: Path, files: list[tuple[str, int]], block: bytes = bytes(MiB)) -> Path:
    """A tar.gz whose members each hold ``count`` copies of a 1 MiB ``block``, written as
    concatenated gzip members with the block compressed once: a 200 MiB bomb or a 50 MiB
    package is built in milliseconds without holding it in memory."""
    assert len(block) == MiB
    compressed_block = gzip.compress(block, compresslevel=9 if not any(block) else 1)
    with path.open("wb") as out:
        for name, count in files:
            out.write(gzip.compress(header(name.encode(), size=count * MiB)))
            for _ in range(count):
                out.write(compressed_block)
        out.write(gzip.compress(END))
    return path


def empty_members(path: Path, count: int) -> Path:
    """``count`` empty files m0, m1, ...: one header template, only name and checksum vary."""
    blank = header(b"")
    checksum = int(blank[148:154], 8)
    with gzip.open(path, "wb", compresslevel=1) as out:
        for start in range(0, count, 1000):
            out.write(
                b"".join(
                    name
                    + blank[len(name) : 148]
                    + b"%06o\0 " % (checksum + sum(name))
                    + blank[156:]
                    for name in (b"m%d" % i for i in range(start, min(start + 1000, count)))
                )
            )
        out.write(END)
    return path


@pytest.fixture(scope="module")
def many_members(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100,001 empty members, one past the default cap; built once for the module."""
    return empty_members(tmp_path_factory.mktemp("many") / "many.tar.gz", 100_001)


# -- the site a release is extracted into ----------------------------------------------------


class Site:
    """``releases/`` with a canary beside the release, and an ``outside/`` canary next to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases = root / "releases"
        self.dest = self.releases / "r1"
        self.releases.mkdir(parents=True)
        (self.releases / "canary.txt").write_text("release canary\n")
        (root / "outside").mkdir()
        (root / "outside" / "canary.txt").write_text("outside canary\n")

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        """Every entry under the root: kind, mode, size, mtime, content or link target."""
        seen: dict[str, tuple[object, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                extra: str | bytes | None = None
                if stat.S_ISLNK(st.st_mode):
                    extra = os.readlink(path)
                if stat.S_ISREG(st.st_mode):
                    extra = Path(path).read_bytes()
                rel = os.path.relpath(path, self.root)
                if stat.S_ISDIR(st.st_mode):  # entries are listed; mtime moves with staging
                    seen[rel] = (st.st_mode,)
                else:
                    seen[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, extra)
        return seen


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


@pytest.fixture
def archives(tmp_path: Path) -> Path:
    path = tmp_path / "archives"
    path.mkdir()
    return path


def assert_refused(
    site: Site,
    archive: Path,
    rule: str,
    member: str | None,
    limits: ExtractLimits | None = None,
) -> UnsafeArchive:
    """Extraction fails with ``rule`` naming ``member``, and the site is exactly as before."""
    before = site.snapshot()
    with pytest.raises(UnsafeArchive) as caught:
        extract_archive(archive, site.dest, limits or ExtractLimits())
    error = caught.value
    assert (error.rule, error.member) == (rule, member), str(error)
    assert f"(rule {rule})" in str(error)
    if member is not None:
        assert str(error).startswith(f"member {member!r}: ")
    assert site.snapshot() == before  # no staging, no release, canaries untouched
    assert not os.path.lexists("/tmp/deploy-tar-evil")
    return error


# -- malicious archives ----------------------------------------------------------------------

SPARSE = header(b"sparse", kind=b"S")
HUGE_SIZE = b"\x80" + (2**80).to_bytes(11, "big")  # GNU base-256: 1.2e24 bytes
NEGATIVE_SIZE = b"\xff" * 11 + b"\xfb"  # GNU base-256: -5
SPARSE_1_0 = {"GNU.sparse.major": b"1", "GNU.sparse.minor": b"0", "GNU.sparse.realsize": b"9"}

MALICIOUS = [
    pytest.param(pack(file("../x")), "traversal", "../x", id="dotdot"),
    pytest.param(pack(file("a/../../x")), "traversal", "a/../../x", id="dotdot-inner"),
    pytest.param(pack(file("./../x")), "traversal", "./../x", id="dot-dotdot"),
    pytest.param(pack(file("/etc/x")), "absolute", "/etc/x", id="absolute"),
    pytest.param(
        pack(link("passwd", "/etc/passwd")), "symlink-absolute", "passwd", id="symlink-absolute"
    ),
    pytest.param(
        pack(directory("a"), link("a/up", "../../outside")),
        "symlink-escape",
        "a/up",
        id="symlink-up",
    ),
    pytest.param(
        pack(link("a", "."), link("b", "a/..")), "symlink-escape", "b", id="symlink-chain"
    ),
    pytest.param(
        pack(directory("x"), link("x/l1", ".."), link("l2", "x/l1"), link("l3", "l2/..")),
        "symlink-escape",
        "l3",
        id="symlink-chain-3",
    ),
    pytest.param(
        # harmless when written; a later symlink makes it point outside
        pack(link("l", "s/../canary"), link("s", ".")),
        "symlink-escape",
        "l",
        id="symlink-retargeted-later",
    ),
    pytest.param(pack(link("a", "b"), link("b", "a")), "symlink-loop", "a", id="symlink-loop"),
    pytest.param(
        pack(link("d", "/tmp"), file("d/deploy-tar-evil", b"pwned")),
        "symlink-absolute",
        "d",
        id="through-symlink-to-tmp",
    ),
    pytest.param(
        pack(directory("sub"), link("d", "sub"), file("d/evil")),
        "through-symlink",
        "d/evil",
        id="through-symlink-inside",
    ),
    pytest.param(pack(file("f"), file("f/x")), "not-a-directory", "f/x", id="through-regular-file"),
    pytest.param(
        pack(link("pw", "/etc/passwd", tarfile.LNKTYPE)), "hardlink", "pw", id="hardlink-out"
    ),
    pytest.param(
        pack(file("a", b"x"), link("b", "a", tarfile.LNKTYPE)),
        "hardlink",
        "b",
        id="hardlink-inside",
    ),
    pytest.param(pack(node("null", tarfile.CHRTYPE)), "device", "null", id="char-device"),
    pytest.param(pack(node("sda", tarfile.BLKTYPE)), "device", "sda", id="block-device"),
    pytest.param(pack(node("pipe", tarfile.FIFOTYPE)), "fifo", "pipe", id="fifo"),
    pytest.param(raw(SPARSE + END), "special-type", "sparse", id="gnu-sparse"),
    pytest.param(raw(member(b"vol", kind=b"V") + END), "special-type", "vol", id="unknown-type"),
    pytest.param(
        pack(file("bin/su", b"#!/bin/sh\n", 0o4755)), "setuid", "bin/su", id="setuid-file"
    ),
    pytest.param(pack(directory("shared", 0o2775)), "setgid", "shared", id="setgid-dir"),
    pytest.param(pack(directory("tmp", 0o1777)), "sticky", "tmp", id="sticky-dir"),
    pytest.param(pack(file("a", b"1"), file("a", b"2")), "duplicate", "a", id="dup-file"),
    pytest.param(pack(file("a"), file("./a")), "duplicate", "./a", id="dup-dot-slash"),
    pytest.param(pack(directory("a"), file("a")), "duplicate", "a", id="dup-dir-then-file"),
    pytest.param(pack(file("a"), link("a", "b")), "duplicate", "a", id="dup-file-then-symlink"),
    pytest.param(pack(link("a", "b"), file("a")), "duplicate", "a", id="dup-symlink-then-file"),
    pytest.param(pack(directory("a"), directory("a/")), "duplicate", "a", id="dup-dir"),
    pytest.param(pack(file(".")), "empty-name", ".", id="dot-as-file"),
    pytest.param(
        raw(pax_member(path=b"evil\0x") + member(b"placeholder") + END),
        "nul",
        "evil\0x",
        id="nul-in-name",
    ),
    pytest.param(
        raw(pax_member(linkpath=b"x\0y") + member(b"l", kind=b"2", mode=0o777) + END),
        "nul",
        "l",
        id="nul-in-link-target",
    ),
    pytest.param(pack(file("a" * 5000)), "path-length", "a" * 5000, id="name-5000-chars"),
    pytest.param(pack(file("d/" * 100 + "f")), "depth", "d/" * 100 + "f", id="depth-100"),
    pytest.param(
        raw(member(b"neg", size_field=NEGATIVE_SIZE) + END),
        "member-size",
        "neg",
        id="negative-size",
    ),
    pytest.param(
        raw(header(b"huge", size_field=HUGE_SIZE) + END), "member-size", "huge", id="huge-size"
    ),
    pytest.param(
        raw(pax_member(size=b"10000000000000") + member(b"paxsize", b"tiny") + END),
        "member-size",
        "paxsize",
        id="pax-size-override",
    ),
    pytest.param(
        # GNU sparse 1.0: tarfile reads the map from the data unbounded (bare ValueError if short)
        raw(pax_member(**SPARSE_1_0) + member(b"placeholder", b"3\n1\n2\n") + END),
        "special-type",
        "././@PaxHeader",
        id="pax-gnu-sparse-1.0",
    ),
    pytest.param(
        raw(
            member(b"././@PaxHeader", pax_member(**SPARSE_1_0)[512:].rstrip(b"\0"), kind=b"g")
            + member(b"f", b"1\n")
            + END
        ),
        "special-type",
        "././@PaxHeader",
        id="global-pax-gnu-sparse",
    ),
    pytest.param(
        raw(header(b"././@PaxHeader", kind=b"x", size=2 * MiB) + bytes(2 * MiB) + END),
        "header-size",
        "././@PaxHeader",
        id="oversized-pax-header",
    ),
]


@pytest.mark.parametrize(("build", "rule", "name"), MALICIOUS)
def test_malicious_archive_is_refused_and_leaves_nothing(
    site: Site, archives: Path, build: Builder, rule: str, name: str
) -> None:
    archive = build(archives / "pkg.tar.gz")
    assert_refused(site, archive, rule, name)
    with pytest.raises(UnsafeArchive) as caught:  # the pre-scan alone refuses it too
        scan_archive(archive)
    assert caught.value.rule == rule


@pytest.mark.parametrize("kind", [b"x", b"g", b"L", b"K"])
def test_oversized_extended_header_is_refused_before_it_is_read(
    archives: Path, kind: bytes
) -> None:
    """The 8 MiB header is refused from its size field: it is never loaded into memory, whatever
    the Python version's tarfile does with extended headers."""
    body = random.Random(8).randbytes(8 * MiB)  # incompressible: no ratio refusal first
    archive = raw(member(b"././@LongHeader", body, kind=kind) + member(b"f") + END)(
        archives / "p.tgz"
    )
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeArchive) as caught:
            scan_archive(archive)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (caught.value.rule, caught.value.member) == ("header-size", "././@LongHeader")
    assert "declares 8388608 bytes (at most 1048576 allowed)" in str(caught.value)
    assert peak < 2 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_extended_header_under_the_cap_is_read(site: Site, archives: Path) -> None:
    name = "n" * 300_000  # a GNU long name of 300 kB, chained with a pax header
    archive = raw(
        member(b"././@LongLink", name.encode() + b"\0", kind=b"L")
        + pax_member(mtime=b"1700000001")
        + member(b"placeholder", b"data")
        + END
    )(archives / "p.tgz")
    error = assert_refused(site, archive, "path-length", name)  # parsed, then judged by the rules
    assert "300000 bytes" in str(error)


def test_ustar_prefix_names_the_refused_member(site: Site, archives: Path) -> None:
    block = bytearray(member(b"neg", size_field=NEGATIVE_SIZE))
    block[345:348] = b"dir"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    assert_refused(site, raw(bytes(block) + END)(archives / "p.tgz"), "member-size", "dir/neg")


def test_symlink_retargeted_later_says_so(site: Site, archives: Path) -> None:
    archive = pack(link("l", "s/../x"), link("s", "."))(archives / "p.tar.gz")
    error = assert_refused(site, archive, "symlink-escape", "l")
    assert "once later symlinks are in place" in str(error)


def test_traversal_message_names_member_and_rule(site: Site, archives: Path) -> None:
    error = assert_refused(
        site, pack(file("../../etc/passwd"))(archives / "p.tgz"), "traversal", "../../etc/passwd"
    )
    assert str(error) == (
        "member '../../etc/passwd': path escapes the release directory ('..') (rule traversal)"
    )


def test_setuid_message_says_which_bit(site: Site, archives: Path) -> None:
    archive = pack(file("x", mode=0o2755))(archives / "p.tgz")
    error = assert_refused(site, archive, "setgid", "x")
    assert "mode 2755 has the setgid bit set" in str(error)


CORRUPT = [
    pytest.param(
        lambda p: p.write_bytes(good_tar_gz()[:-40]),
        "Compressed file ended before the end-of-stream marker was reached",
        id="truncated-gzip",
    ),
    pytest.param(
        lambda p: p.write_bytes(b"this is a text file, not a package\n" * 50),
        "invalid header",
        id="not-a-tar",
    ),
    pytest.param(
        lambda p: p.write_bytes(gzip.compress(b"gzip of text, not of a tar\n" * 50)),
        "invalid header",
        id="gzip-not-a-tar",
    ),
    pytest.param(lambda p: p.write_bytes(b""), "empty file", id="empty-file"),
    pytest.param(
        # valid gzip around a tar cut at a member boundary: no end-of-archive marker
        raw(member(b"a", b"x" * 600)),
        "no end-of-archive marker at offset 1536: truncated",
        id="truncated-tar-in-valid-gzip",
    ),
    pytest.param(
        raw(member(b"a", b"x" * 600) + b"\x01" * 512 + member(b"b") + END),
        "damaged header at offset 1536",
        id="damaged-second-header",
    ),
    pytest.param(
        raw(member(b"a", b"x" * 600)[:1000]), "unexpected end of data", id="truncated-data"
    ),
    pytest.param(
        raw(member(b"././@PaxHeader", b"11 a=bcdef\n", kind=b"g") * 3000 + member(b"f") + END),
        "too many extended headers in a row",
        id="pax-header-flood",
    ),
    pytest.param(
        raw(member(b"f", b"ok") + END + random.Random(2).randbytes(2 * MiB)),
        "bytes after the end-of-archive marker",
        id="trailing-junk",
    ),
    pytest.param(
        # tarfile alone (r|gz or r:gz) stops before the gzip trailer: it never sees the bad CRC
        lambda p: p.write_bytes(flip_byte(random_tar_gz(), 5000)),
        "cannot decompress: CRC check failed",
        id="flipped-byte-crc",
    ),
]


@pytest.mark.parametrize(("build", "text"), CORRUPT)
def test_corrupt_archive_is_refused_with_tarfile_error(
    site: Site, archives: Path, build: Callable[[Path], object], text: str
) -> None:
    archive = archives / "pkg.tar.gz"
    build(archive)
    error = assert_refused(site, archive, "corrupt", None)
    assert str(error).startswith("archive: not an intact tar archive")
    assert text in str(error)


def test_decompression_bomb_is_refused_before_decompressing(site: Site, archives: Path) -> None:
    archive = repeated(archives / "bomb.tar.gz", [("zeros.bin", 200)])
    assert archive.stat().st_size < 400_000  # 200 MiB of zeros in a few hundred KB
    error = assert_refused(site, archive, "ratio", "zeros.bin")
    # Refused on the declared size (200 MiB), not after decompressing up to the limit (~75 MiB).
    assert "archive expands to 200.0 MiB" in str(error)
    assert "max_ratio=200" in str(error)


def test_bomb_spread_over_many_members_is_refused(site: Site, archives: Path) -> None:
    archive = repeated(archives / "bomb.tar.gz", [(f"zeros-{i}", 1) for i in range(300)])
    # Refused at the first member whose declared end passes 200 x the file size (or, if the
    # read-ahead crosses the line first, while reading the member before it).
    limit = 200 * archive.stat().st_size
    first = next(i for i in range(300) if (i + 1) * (512 + MiB) > limit)
    with pytest.raises(UnsafeArchive) as caught:
        scan_archive(archive)
    assert caught.value.member in {f"zeros-{first}", f"zeros-{first - 1}"}
    assert_refused(site, archive, "ratio", caught.value.member)


def test_many_members_are_refused_at_the_limit(site: Site, many_members: Path) -> None:
    limits = ExtractLimits(max_members=10_000)
    error = assert_refused(site, many_members, "max-members", "m10000", limits)
    assert "max_members=10000" in str(error)


def test_default_member_cap_refuses_100_001_members(site: Site, many_members: Path) -> None:
    assert_refused(site, many_members, "max-members", "m100000")


@pytest.mark.parametrize(
    ("entries", "limits", "rule", "name"),
    [
        ([file("big", b"x" * 11)], ExtractLimits(max_member_bytes=10), "member-size", "big"),
        (
            [file("a", b"x" * 10), file("b", b"x" * 10)],
            ExtractLimits(max_total_bytes=15),
            "total-size",
            "b",
        ),
        ([file("a/b/c/d")], ExtractLimits(max_depth=3), "depth", "a/b/c/d"),
        ([file("abcdef")], ExtractLimits(max_path_length=5), "path-length", "abcdef"),
        ([link("l", "abcdef")], ExtractLimits(max_path_length=5), "path-length", "l"),
    ],
)
def test_configured_limits_are_enforced(
    site: Site, archives: Path, entries: list[Entry], limits: ExtractLimits, rule: str, name: str
) -> None:
    assert_refused(site, pack(*entries)(archives / "p.tgz"), rule, name, limits)


def test_extraction_rechecks_members_when_scan_is_bypassed(
    site: Site, archives: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Belt and braces: if the file changes after the scan, the extraction pass still refuses,
    and what it had already written is removed."""
    archive = pack(directory("d"), file("d/f", b"data"), file("../escape"))(archives / "p.tgz")
    monkeypatch.setattr(
        extract_module, "scan_archive", lambda path, limits: ExtractStats(3, 2, 1, 0, 4)
    )
    assert_refused(site, archive, "traversal", "../escape")


BEHIND_THE_RULES = [
    pytest.param(pack(file("../x")), "../x", id="dotdot"),
    pytest.param(pack(file("/tmp/deploy-tar-evil")), "/tmp/deploy-tar-evil", id="absolute"),
    pytest.param(pack(link("l", "/etc")), "l", id="symlink-absolute"),
    pytest.param(pack(directory("a"), link("a/up", "../../outside")), "a/up", id="symlink-up"),
    pytest.param(
        # l points inside when written; once s exists it points next to the release
        pack(link("l", "s/../outside"), link("s", "."), file("l/deploy-tar-evil", b"pwned")),
        "l/deploy-tar-evil",
        id="through-symlink-retargeted",
    ),
    pytest.param(pack(file("a", b"x"), link("b", "a", tarfile.LNKTYPE)), "b", id="hardlink"),
    pytest.param(pack(node("null", tarfile.CHRTYPE)), "null", id="char-device"),
    pytest.param(pack(node("pipe", tarfile.FIFOTYPE)), "pipe", id="fifo"),
    pytest.param(pack(file("a", b"1"), file("a", b"2")), "a", id="file-over-file"),
    pytest.param(pack(file("a", b"1"), link("a", "b")), "a", id="symlink-over-file"),
    pytest.param(pack(link("a", "b"), file("a", b"x")), "a", id="file-over-symlink"),
    pytest.param(pack(file("a", b"1"), directory("a")), "a", id="dir-over-file"),
]


@pytest.mark.parametrize(("build", "name"), BEHIND_THE_RULES)
def test_writer_backs_up_the_rules(
    site: Site, archives: Path, monkeypatch: pytest.MonkeyPatch, build: Builder, name: str
) -> None:
    """With the rules switched off, the writer alone still refuses what tarfile's data filter
    refuses, on every Python (tarfile's own filter is absent before 3.11.4)."""
    monkeypatch.setattr(rules.MemberRules, "check", lambda self, member: None)
    assert_refused(site, build(archives / "p.tgz"), "data-filter", name)


def test_writer_drops_special_mode_bits_behind_the_rules(
    site: Site, archives: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules.MemberRules, "check", lambda self, member: None)
    archive = pack(directory("shared", 0o3775), file("shared/su", b"#!/bin/sh\n", 0o6755))(
        archives / "p.tgz"
    )
    extract_archive(archive, site.dest)
    assert stat.S_IMODE(os.lstat(site.dest / "shared").st_mode) == 0o775
    assert stat.S_IMODE(os.lstat(site.dest / "shared/su").st_mode) == 0o755


def test_archive_changed_between_scan_and_extraction(
    site: Site, archives: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fully extracted, read-only directory included, before the mismatch is noticed
    archive = pack(directory("ro", 0o555), file("ro/f", b"1", 0o444))(archives / "p.tgz")
    fake = ExtractStats(2, 1, 1, 0, 2)
    monkeypatch.setattr(extract_module, "scan_archive", lambda path, limits: fake)
    assert_refused(site, archive, "changed", None)


# -- good packages ---------------------------------------------------------------------------


def test_package_extracts_with_tree_links_and_modes(site: Site, archives: Path) -> None:
    archive = pack(
        directory("./", 0o755),
        directory("bin"),
        directory("lib"),
        file("lib/tool", b"#!/bin/sh\necho tool\n", 0o755),
        link("bin/tool", "../lib/tool"),
        link("current-lib", "lib"),
        file("etc/app.conf", b"port=8080\n", 0o640),
        file("etc/shared.conf", b"x\n", 0o664),
        directory("var/empty", 0o750),
        directory("ro", 0o555),
        file("ro/readme", b"read me\n", 0o444),
        file("docs/a/b/c/guide.txt", b"guide\n"),
        file("install.sh", b"#!/bin/sh\n", 0o700),
    )(archives / "pkg.tar.gz")
    stats = extract_archive(archive, site.dest)

    dest = site.dest
    assert stats == ExtractStats(members=13, files=6, dirs=5, symlinks=2, bytes=56)
    assert sorted(os.listdir(site.releases)) == ["canary.txt", "r1"]  # staging renamed away
    assert os.readlink(dest / "bin/tool") == "../lib/tool"
    assert (dest / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert os.access(dest / "bin/tool", os.X_OK)

    def mode(rel: str) -> int:
        return stat.S_IMODE(os.lstat(dest / rel).st_mode)

    assert mode("lib/tool") == 0o755
    assert mode("install.sh") == 0o700
    assert mode("etc/app.conf") == 0o640
    assert mode("etc/shared.conf") == 0o664  # tarfile's data filter alone would drop g+w
    assert mode("ro/readme") == 0o444
    assert mode("ro") == 0o755  # u+rwx added to directories
    assert mode("var/empty") == 0o750
    assert os.listdir(dest / "var/empty") == []
    assert (dest / "docs/a/b/c/guide.txt").read_text() == "guide\n"
    assert (dest / "current-lib" / "tool").is_file()
    # times as packaged: files and directories, and the symlink itself, not its target
    assert os.lstat(dest / "docs/a/b/c/guide.txt").st_mtime == 1_700_000_000
    assert os.lstat(dest / "install.sh").st_mtime == 1_700_000_000
    assert os.lstat(dest / "var/empty").st_mtime == 0
    assert os.lstat(dest / "bin/tool").st_mtime == 0
    assert os.lstat(dest / "lib/tool").st_mtime == 1_700_000_000


def test_scan_counts_members_and_writes_nothing(site: Site, archives: Path) -> None:
    archive = pack(directory("d"), file("d/f", b"abc"), link("l", "d/f"))(archives / "p.tgz")
    before = site.snapshot()
    assert scan_archive(archive) == ExtractStats(members=3, files=1, dirs=1, symlinks=1, bytes=3)
    assert site.snapshot() == before


def test_progress_is_monotonic_and_ends_at_total(site: Site, archives: Path) -> None:
    rng = random.Random(4)
    blobs = [rng.randbytes(1_500_000) for _ in range(4)]
    entries = [file(f"f{i}", blob) for i, blob in enumerate(blobs)] + [file("small", b"x")]
    archive = pack(*entries)(archives / "p.tgz")
    reports: list[tuple[int, int]] = []
    extract_archive(archive, site.dest, progress=lambda done, total: reports.append((done, total)))

    total = 4 * 1_500_000 + 1
    assert reports[0] == (0, total)
    assert reports[-1] == (total, total)
    assert len(reports) >= 5
    assert {t for _, t in reports} == {total}
    assert all(a[0] < b[0] for a, b in itertools.pairwise(reports))


def test_50mb_package_extracts_in_bounded_memory(site: Site, archives: Path) -> None:
    block = random.Random(50).randbytes(MiB)  # repeated MiB: gzip's 32 KiB window can't see it
    archive = repeated(archives / "big.tar.gz", [("payload.bin", 50)], block)
    assert archive.stat().st_size > 50 * MiB

    tracemalloc.start()
    try:
        stats = extract_archive(archive, site.dest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.bytes == 50 * MiB
    assert peak < 20 * MiB, f"peak {peak / MiB:.1f} MiB"
    with (site.dest / "payload.bin").open("rb") as f:
        assert f.read(MiB) == block
        f.seek(49 * MiB)
        assert f.read() == block


@pytest.mark.parametrize(
    "compress",
    [
        pytest.param(lambda data: data, id="plain-tar"),
        pytest.param(bz2.compress, id="bzip2"),
        pytest.param(lzma.compress, id="xz"),
    ],
)
def test_other_compressions_extract(
    site: Site, archives: Path, compress: Callable[[bytes], bytes]
) -> None:
    archive = archives / "pkg.tar"
    archive.write_bytes(compress(gzip.decompress(good_tar_gz())))
    assert extract_archive(archive, site.dest).files == 2
    assert (site.dest / "a").read_bytes() == b"x" * 3000


def test_small_archive_with_high_ratio_is_accepted(site: Site, archives: Path) -> None:
    archive = pack(file("zeros", bytes(900 * 1024)))(archives / "p.tgz")
    assert archive.stat().st_size < 10_000  # ratio ~ 100x the limit, but under 1 MiB in all
    assert extract_archive(archive, site.dest).bytes == 900 * 1024


def test_existing_dest_is_refused_untouched(site: Site, archives: Path) -> None:
    site.dest.mkdir()
    (site.dest / "keep").write_text("old release")
    before = site.snapshot()
    with pytest.raises(FileExistsError, match="already exists"):
        extract_archive(pack(file("a"))(archives / "p.tgz"), site.dest)
    assert site.snapshot() == before


def test_stale_staging_from_interrupted_run_is_replaced(site: Site, archives: Path) -> None:
    stale = site.releases / ".staging-r1"
    (stale / "old").mkdir(parents=True)
    extract_archive(pack(file("a", b"new"))(archives / "p.tgz"), site.dest)
    assert sorted(os.listdir(site.releases)) == ["canary.txt", "r1"]
    assert os.listdir(site.dest) == ["a"]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"ExtractLimits\.max_ratio must be positive"):
        ExtractLimits(max_ratio=0)
