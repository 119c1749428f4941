"""The dangerous-command rules scripts are checked against, and how a script is read for them.

A script is read as *logical lines*: ``\\``-continued lines joined, comments stripped (a ``#``
that starts a word outside quotes), whitespace runs collapsed to one space.  Each rule is a
regex searched in each logical line.  The defaults aim at commands that destroy a host
outright, and leave their everyday near-misses alone (``rm -rf ./build`` is fine,
``rm -rf /`` is not).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DenyRule(BaseModel):
    """A named regex; a script with a logical line it matches is refused."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    pattern: str = Field(min_length=1)
    description: str = ""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regex: {exc}") from None
        return value


# A command name: not part of a longer word, file name or option (``/bin/rm`` still counts).
_B = r"(?<![\w.\-])"
_E = r"(?![\w.\-])"
# The end of a shell word.
_END = r"(?=[\s;&|)]|$)"
_SYSTEM_DIRS = "bin|boot|dev|etc|home|lib|lib32|lib64|libx32|opt|proc|root|run|sbin|srv|sys|usr|var"
# ``/``, ``/*``, ``~``, ``$HOME`` or a top-level system directory, quoted or not.
_ROOT_TARGET = rf"""["']?(?:/+|(?:~|\$HOME|\$\{{HOME\}}|/(?:{_SYSTEM_DIRS}))/?)\*?["']?{_END}"""
_DISK = r"(?:sd[a-z]|hd[a-z]|vd[a-z]|xvd[a-z]|nvme\d|mmcblk\d|md\d|dm-\d|mapper/|disk/)"
_SHELL = r"(?:ba|da|k|z|c|tc|fi)?sh"
_REDIRECT_OR_TEE = rf"(?:>\|?|{_B}tee\s+(?:-\S+\s+)*)"
# The rest of one command, bounded: an unbounded scan from every ``rm`` of a long line is
# quadratic, and a check must stay fast on a 100 KB script written to defeat it.
_ARGS = r"[^;&|]{0,1024}?"


def _rule(name: str, pattern: str, description: str) -> DenyRule:
    return DenyRule(name=name, pattern=pattern, description=description)


DEFAULT_DENY: tuple[DenyRule, ...] = (
    _rule(
        "rm-root",
        rf"{_B}rm(?=\s)(?={_ARGS}\s(?:-[A-Za-z]*[rR][A-Za-z]*|--recursive){_END})"
        rf"(?={_ARGS}\s{_ROOT_TARGET})",
        "recursive rm of /, /*, ~, $HOME or a top-level system directory",
    ),
    _rule(
        "rm-no-preserve-root",
        rf"{_B}rm\s{_ARGS}--no-preserve-root",
        "rm told to go ahead on /",
    ),
    _rule(
        "mkfs",
        rf"{_B}(?:mkfs(?:\.\w+)?|mke2fs|mkdosfs|mkntfs){_E}",
        "making a file system (erases a device)",
    ),
    _rule(
        "dd-to-disk",
        rf"{_B}dd\s{_ARGS}\bof=[\"']?/dev/{_DISK}",
        "dd writing to a disk device",
    ),
    _rule(
        "write-to-disk",
        rf"{_REDIRECT_OR_TEE}\s*[\"']?/dev/{_DISK}",
        "redirecting output onto a disk device",
    ),
    _rule(
        "wipe-disk",
        rf"{_B}(?:shred|wipefs|blkdiscard)\s{_ARGS}/dev/{_DISK}",
        "shredding or wiping a disk device",
    ),
    _rule(
        "fork-bomb",
        r"(?<![\w:.\-])([\w:.\-]{1,64})\s*(?:\(\s*\))?\s*\{[^}]{0,512}?(?<![\w.\-:])\1\s*[|&]\s*\1"
        r"(?![\w.\-:])|fork\s+while\s+fork",
        "a function that starts two copies of itself (:(){ :|:& };:)",
    ),
    _rule(
        "curl-pipe-shell",
        rf"{_B}(?:curl|wget)\b[^;&]{{0,1024}}?\|\s*(?:sudo\s+(?:-\S+\s+)*)?(?:env\s+(?:\S+=\S*\s+)*)?"
        rf"(?:/\S*/)?(?:{_SHELL}{_E}|(?:python[\d.]*|perl|ruby|node)\s*(?:-\s*)?(?:$|[;&|)]))"
        rf"|{_B}(?:{_SHELL}|source|eval|\.)\s+(?:-\S+\s+)*(?:<\(|[\"']?\$\()\s*(?:curl|wget)\b",
        "running what was just downloaded (curl … | sh, bash <(curl …))",
    ),
    _rule(
        "chmod-root",
        rf"{_B}(?:chmod|chown|chgrp)(?=\s)(?={_ARGS}\s(?:-[A-Za-z]*R[A-Za-z]*|--recursive){_END})"
        rf"(?={_ARGS}\s{_ROOT_TARGET})",
        "recursive chmod/chown of / or a top-level system directory",
    ),
    _rule(
        "shutdown",
        rf"{_B}(?:shutdown|reboot|halt|poweroff){_E}|{_B}(?:tel)?init\s+[06]{_E}"
        rf"|{_B}systemctl\s+(?:-\S+\s+)*(?:kexec|suspend|hibernate){_E}",
        "shutting down or rebooting the host",
    ),
    _rule(
        "write-etc-passwd",
        rf"{_REDIRECT_OR_TEE}\s*[\"']?/etc/(?:passwd|shadow|group|gshadow|sudoers){_E}",
        "overwriting or appending to the account databases or sudoers",
    ),
    _rule(
        "find-root-delete",
        rf"{_B}find\s+{_ROOT_TARGET}[^|&]{{0,1024}}?\s-(?:delete|exec\s+rm){_E}",
        "find over / or a system directory deleting what it finds",
    ),
)


def logical_lines(script: str) -> list[tuple[int, str]]:
    """``(first line number, normalised text)`` of each non-empty logical line."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(script.splitlines(), 1):
        if not pending:
            start = number
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            pending += raw[:-1] + " "
            continue
        text = " ".join(_strip_comment(pending + raw).split())
        pending = ""
        if text:
            out.append((start, text))
    if pending.strip():
        out.append((start, " ".join(_strip_comment(pending).split())))
    return out


def _strip_comment(line: str) -> str:
    """``line`` without its comment; with an unclosed quote, nothing is stripped (a check
    errs on the side of reading more)."""
    quote = ""
    escaped = False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t;&|()"):
            return line[:i]
    return line
