"""The rules an archive's members must follow, the limits that cap it, and the error that
refuses it.

:class:`MemberRules` sees the members in archive order, refuses the first that breaks a rule
(traversal, absolute names, links leaving the release, hard links, special files, setuid/setgid/
sticky bits, duplicate names, size and count limits) and models the tree they build, so a
symlink is judged against every other symlink, including those that come later.
"""

from __future__ import annotations

import math
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

from deploy_core.plugin import work_step
from deploy_tar.limits import DEFAULT_LIMITS, ExtractLimits

__all__ = ["DEFAULT_LIMITS", "ExtractLimits", "ExtractStats", "MemberRules", "UnsafeArchive"]

_MAX_LINK_HOPS = 40  # symlinks followed while resolving one target, as Linux does
_MAX_MTIME = 2.0**40  # seconds; beyond this utime() overflows
_PLAIN_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_MODE_BITS = ((stat.S_ISUID, "setuid"), (stat.S_ISGID, "setgid"), (stat.S_ISVTX, "sticky"))


class UnsafeArchive(Exception):
    """The archive was refused; ``str()`` names the member (if any) and the rule it broke.

    :param member: the member name as written in the archive, or ``None`` when the problem is
        with the archive as a whole (corruption before the first member, for example).
    :param rule: a short stable identifier such as ``traversal``, ``hardlink`` or ``corrupt``.
    :param detail: what was wrong, in a sentence.
    """

    def __init__(self, member: str | None, rule: str, detail: str) -> None:
        self.member = member
        self.rule = rule
        self.detail = detail
        where = "archive" if member is None else f"member {member!r}"
        super().__init__(f"{where}: {detail} (rule {rule})")


@dataclass(frozen=True)
class ExtractStats:
    """What an archive holds: members of each kind and the bytes of its regular files."""

    members: int
    files: int
    dirs: int
    symlinks: int
    bytes: int


class MemberRules:
    """Applies every rule to the members in archive order and models the tree they build."""

    def __init__(self, limits: ExtractLimits, ratio: Callable[[int, str | None], None]) -> None:
        self._limits = limits
        self._ratio = ratio
        self._kinds: dict[str, str] = {}  # normalised path -> file, dir, symlink or implicit dir
        self._links: dict[str, tuple[str, str]] = {}  # normalised path -> (name, target)
        self.members = self.files = self.dirs = self.symlinks = self.bytes = 0

    def check(self, member: tarfile.TarInfo) -> None:
        """Refuse ``member`` with UnsafeArchive if it breaks a rule, else record it."""
        name = member.name
        self.members += 1
        if self.members > self._limits.max_members:
            raise UnsafeArchive(
                name,
                "max-members",
                f"more than ExtractLimits.max_members={self._limits.max_members}",
            )
        parts = self._parts(name)
        self._check_type(member)
        for bit, rule in _MODE_BITS:
            if member.mode & bit:
                raise UnsafeArchive(name, rule, f"mode {member.mode:o} has the {rule} bit set")
        if not (math.isfinite(member.mtime) and abs(member.mtime) < _MAX_MTIME):
            raise UnsafeArchive(name, "header", f"impossible modification time {member.mtime}")
        self._check_size(member)
        self._place(name, parts, member)

    def finish(self) -> ExtractStats:
        """Re-check every symlink now that all are known, and return the counts.

        A symlink created later can change where an earlier one points (``l -> s/../x``, then
        ``s -> .``), so the targets are resolved again against the complete tree.
        """
        for path, (name, target) in self._links.items():
            directory = path.split("/")[:-1]
            self._check_resolves(name, directory, target, " once later symlinks are in place")
        return ExtractStats(self.members, self.files, self.dirs, self.symlinks, self.bytes)

    def _parts(self, name: str) -> list[str]:
        if "\0" in name:
            raise UnsafeArchive(name, "nul", "name contains a NUL byte")
        length = len(name.encode("utf-8", "surrogateescape"))
        if length > self._limits.max_path_length:
            raise UnsafeArchive(
                name,
                "path-length",
                f"name is {length} bytes (ExtractLimits.max_path_length="
                f"{self._limits.max_path_length})",
            )
        if name.startswith("/"):
            raise UnsafeArchive(name, "absolute", "absolute path; members must be relative")
        raw = name.split("/")
        if ".." in raw:
            raise UnsafeArchive(name, "traversal", "path escapes the release directory ('..')")
        parts = [part for part in raw if part not in ("", ".")]
        if len(parts) > self._limits.max_depth:
            raise UnsafeArchive(
                name,
                "depth",
                f"{len(parts)} levels deep (ExtractLimits.max_depth={self._limits.max_depth})",
            )
        return parts

    def _check_type(self, member: tarfile.TarInfo) -> None:
        name = member.name
        if member.islnk():
            raise UnsafeArchive(
                name, "hardlink", f"hard link to {member.linkname!r}; hard links are not allowed"
            )
        if member.ischr() or member.isblk():
            kind = "character" if member.ischr() else "block"
            raise UnsafeArchive(name, "device", f"{kind} device files are not allowed")
        if member.isfifo():
            raise UnsafeArchive(name, "fifo", "FIFOs (named pipes) are not allowed")
        if member.sparse is not None or member.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchive(name, "special-type", "sparse files are not supported")
        if member.type not in _PLAIN_TYPES and not (member.isdir() or member.issym()):
            raise UnsafeArchive(name, "special-type", f"unsupported member type {member.type!r}")

    def _check_size(self, member: tarfile.TarInfo) -> None:
        name, size, limits = member.name, member.size, self._limits
        if size < 0:
            raise UnsafeArchive(name, "member-size", f"declares a negative size ({size})")
        if not member.isreg():
            return
        if size > limits.max_member_bytes:
            raise UnsafeArchive(
                name,
                "member-size",
                f"{size} bytes (ExtractLimits.max_member_bytes={limits.max_member_bytes})",
            )
        self.bytes += size
        if self.bytes > limits.max_total_bytes:
            raise UnsafeArchive(
                name,
                "total-size",
                f"files add up to more than ExtractLimits.max_total_bytes={limits.max_total_bytes}",
            )
        # Checked on the declared size, before a single byte of the member is decompressed.
        self._ratio(member.offset_data + size, name)

    def _place(self, name: str, parts: list[str], member: tarfile.TarInfo) -> None:
        kinds = self._kinds
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            kind = kinds.setdefault(parent, "implicit dir")
            if kind == "symlink":
                raise UnsafeArchive(
                    name, "through-symlink", f"path goes through the symlink {parent!r}"
                )
            if kind == "file":
                raise UnsafeArchive(
                    name, "not-a-directory", f"path goes through the regular file {parent!r}"
                )
        path = "/".join(parts)
        previous = kinds.get(path)
        if previous is not None and not (previous == "implicit dir" and member.isdir()):
            raise UnsafeArchive(
                name,
                "duplicate",
                f"{path or '.'!r} already appeared earlier in the archive as a {previous};"
                " a later member must not replace it",
            )
        if member.isdir():
            kinds[path] = "dir"
            self.dirs += 1
        elif not parts:
            raise UnsafeArchive(name, "empty-name", "name is empty or '.' but not a directory")
        elif member.issym():
            self._check_link(name, parts, member.linkname)
            kinds[path] = "symlink"
            self._links[path] = (name, member.linkname)
            self.symlinks += 1
        else:
            kinds[path] = "file"
            self.files += 1

    def _check_link(self, name: str, parts: list[str], target: str) -> None:
        if "\0" in target:
            raise UnsafeArchive(name, "nul", "symlink target contains a NUL byte")
        if not target:
            raise UnsafeArchive(name, "empty-name", "symlink target is empty")
        if len(target.encode("utf-8", "surrogateescape")) > self._limits.max_path_length:
            raise UnsafeArchive(name, "path-length", "symlink target is too long")
        if target.startswith("/"):
            raise UnsafeArchive(name, "symlink-absolute", f"symlink to absolute path {target!r}")
        self._check_resolves(name, parts[:-1], target, "")

    def _check_resolves(self, name: str, directory: list[str], target: str, when: str) -> None:
        """Follow ``target`` from ``directory`` through the symlinks known so far."""
        resolved: list[str] = list(directory)
        todo = target.split("/")[::-1]
        hops = 0
        while todo:
            work_step()  # bounded: a pre-scan of pathological links stops, and on cancellation
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    raise UnsafeArchive(
                        name,
                        "symlink-escape",
                        f"symlink target {target!r} resolves outside the release directory{when}",
                    )
                resolved.pop()
                continue
            resolved.append(part)
            link = self._links.get("/".join(resolved))
            if link is not None:  # a symlink in the archive: carry on from its target
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise UnsafeArchive(
                        name, "symlink-loop", f"symlink target {target!r} loops{when}"
                    )
                resolved.pop()
                todo.extend(link[1].split("/")[::-1])
