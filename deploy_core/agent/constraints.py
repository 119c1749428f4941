"""What an agent agrees to run (SPEC deploy-30): checked before anything starts.

The agent's TOML config holds a ``[constraints]`` table (:class:`Constraints`).  The agent
compiles it once into a :class:`ConstraintPolicy`, and every script of every plugin passes
through it in :meth:`~deploy_core.agent.context.DeployContext.run_script`:

- size: at most ``max_script_bytes``;
- content: no line matches a ``deny`` rule (unless an ``allow`` pattern matches the whole
  line), or, with ``policy = "allow-list"``, every line matches an ``allow`` pattern;
- place: the working directory lies under one of ``workdir_roots`` (symlinks resolved);
  so does every path a plugin writes as root (:meth:`ConstraintPolicy.check_path`), which,
  with ``run_as``, must also be one the run-as user could write itself;
- identity and resources: the script runs as ``run_as`` under ``limits`` (rlimits, and a
  cgroup v2 where one is delegated to the agent).

A refusal is a :class:`ConstraintRefusal` naming the rule; the context turns it into a
failed deployment.  The deny list is a guard rail against mistakes, not a sandbox: shell is
too flexible for pattern matching to stop a determined author.  ``run_as`` and ``limits`` are
what hold.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import pwd
import re
import resource
import signal
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from deploy_core.agent.cgroups import CgroupParent, find_cgroup_parent
from deploy_core.agent.deny_rules import DEFAULT_DENY, DenyRule, logical_lines
from deploy_core.agent.process import Confinement, ProcessResult

log = logging.getLogger(__name__)

DEFAULT_MAX_SCRIPT_BYTES = 100 * 1024
# Out-of-memory as programs say it: Python, libc's strerror(ENOMEM), bash, C++, Go, Java.
_OOM_WORDS = re.compile(
    r"MemoryError|Cannot allocate memory|out of memory|bad_alloc|xmalloc|memory exhausted"
    r"|OutOfMemoryError",
    re.IGNORECASE,
)
_NPROC_WORDS = re.compile(r"Resource temporarily unavailable|Cannot fork|fork: retry", re.I)
_NOFILE_WORDS = re.compile(r"Too many open files", re.I)
_OOM_SIGNALS = (signal.SIGSEGV, signal.SIGABRT)


#: How a plugin uses a path it hands to :meth:`ConstraintPolicy.check_path`.
PathAccess = Literal["read", "write", "replace"]


class ConstraintConfigError(ValueError):
    """The constraints cannot be enforced on this host (unknown user, not root …)."""


class ConstraintRefusal(Exception):
    """A script or working directory the constraints refuse.

    :param rule: what refused it: ``max_script_bytes``, ``deny:NAME``, ``allow-list``,
        ``workdir_roots``, ``run_as``.
    """

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"refused by constraint {rule}: {detail}")
        self.rule = rule
        self.detail = detail


class Limits(BaseModel):
    """Resource limits for every script (``[constraints.limits]``); unset means no limit."""

    model_config = ConfigDict(extra="forbid")

    # Sizes take a number of bytes or a string such as "200MiB" or "1GB".
    cpu_seconds: int | None = Field(None, ge=1, description="CPU time (RLIMIT_CPU)")
    memory_bytes: ByteSize | None = Field(
        None, ge=16 * 1024 * 1024, description="address space (RLIMIT_AS), and memory.max"
    )
    processes: int | None = Field(
        None, ge=1, description="processes of the run-as user (RLIMIT_NPROC), and pids.max"
    )
    open_files: int | None = Field(None, ge=8, description="file descriptors (RLIMIT_NOFILE)")
    file_size: ByteSize | None = Field(
        None, ge=1, description="largest file a script writes (RLIMIT_FSIZE)"
    )
    output_bytes: ByteSize | None = Field(
        None, ge=1024, description="output streamed to the server and kept in the tails"
    )
    cgroup: str = Field(
        "auto",
        description='"auto", "off", or the path of a delegated cgroup v2 to create runs under',
    )

    @field_validator("cgroup")
    @classmethod
    def _cgroup(cls, value: str) -> str:
        if value not in ("auto", "off") and not value.startswith("/"):
            raise ValueError('cgroup must be "auto", "off" or an absolute path')
        return value


class Constraints(BaseModel):
    """The ``[constraints]`` table of an agent's config file.  Defaults are on."""

    model_config = ConfigDict(extra="forbid")

    max_script_bytes: ByteSize = Field(ByteSize(DEFAULT_MAX_SCRIPT_BYTES), ge=1)
    policy: Literal["deny-list", "allow-list"] = "deny-list"
    deny: list[DenyRule] = Field(default_factory=lambda: list(DEFAULT_DENY))
    deny_extra: list[DenyRule] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)
    workdir_roots: list[str] = Field(default_factory=list)
    run_as: str | None = Field(None, min_length=1)
    limits: Limits = Field(default_factory=Limits)

    @field_validator("allow")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"allow pattern {pattern!r} is not a regex: {exc}") from None
        return value

    @field_validator("workdir_roots")
    @classmethod
    def _roots(cls, value: list[str]) -> list[str]:
        for root in value:
            if not root.startswith("/"):
                raise ValueError(f"workdir root {root!r} is not an absolute path")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Constraints:
        names = [rule.name for rule in [*self.deny, *self.deny_extra]]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"deny rule names used twice: {', '.join(twice)}")
        if self.policy == "allow-list" and not self.allow:
            raise ValueError('policy = "allow-list" needs at least one allow pattern')
        return self


@dataclass(frozen=True)
class RunAs:
    """The user scripts run as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


_RLIMITS = (
    ("cpu_seconds", resource.RLIMIT_CPU),
    ("memory_bytes", resource.RLIMIT_AS),
    ("processes", resource.RLIMIT_NPROC),
    ("open_files", resource.RLIMIT_NOFILE),
    ("file_size", resource.RLIMIT_FSIZE),
)


class ConstraintPolicy:
    """:class:`Constraints` compiled for this host; raises :class:`ConstraintConfigError`
    when they cannot be enforced here."""

    def __init__(self, config: Constraints | None = None) -> None:
        self.config = config = config if config is not None else Constraints()
        self.deny = [(rule.name, re.compile(rule.pattern)) for rule in config.deny]
        self.deny += [(rule.name, re.compile(rule.pattern)) for rule in config.deny_extra]
        self.allow = [re.compile(pattern) for pattern in config.allow]
        self.roots = [os.path.realpath(root) for root in config.workdir_roots]
        self.run_as = _resolve_user(config.run_as)
        # The user to switch to: none when the agent already is that user.
        self.switch_to = (
            self.run_as if self.run_as is not None and self.run_as.uid != os.geteuid() else None
        )
        self.limits = config.limits
        self.rlimits = self._rlimits()
        self.cgroup: CgroupParent | None = None
        self.cgroup_reason = "no memory or process limit to enforce"
        if self.limits.memory_bytes or self.limits.processes:
            self.cgroup, self.cgroup_reason = find_cgroup_parent(self.limits.cgroup)

    def describe(self) -> str:
        """One line for the agent's log: what is enforced."""
        parts = [f"max {self.config.max_script_bytes} bytes", f"{self.config.policy}"]
        parts.append(f"{len(self.deny)} deny rules, {len(self.allow)} allow patterns")
        if self.roots:
            parts.append("workdirs under " + ", ".join(self.roots))
        if self.run_as is not None:
            parts.append(f"scripts run as {self.run_as.name} (uid {self.run_as.uid})")
        set_limits = {k: v for k, v in self.limits.model_dump().items() if v and k != "cgroup"}
        if set_limits:
            parts.append("limits " + " ".join(f"{k}={v}" for k, v in set_limits.items()))
        if self.limits.memory_bytes or self.limits.processes:
            parts.append(
                f"cgroup v2 under {self.cgroup.path}"
                if self.cgroup is not None
                else f"cgroups v2 not used ({self.cgroup_reason})"
            )
        if self.limits.processes and self.run_as is None and os.geteuid() == 0:
            parts.append("limits.processes does not bind scripts running as root: set run_as")
        return "; ".join(parts)

    # ------------------------------------------------------------------ before running

    def check_script(self, script: str) -> None:
        """Refuse a script that is too large, matches a deny rule, or (allow-list policy)
        has a line no allow pattern matches."""
        size = len(script.encode())
        if size > self.config.max_script_bytes:
            raise ConstraintRefusal(
                "max_script_bytes",
                f"the script is {size} bytes; this agent accepts at most "
                f"{self.config.max_script_bytes}",
            )
        for number, line in logical_lines(script):
            if any(pattern.fullmatch(line) for pattern in self.allow):
                continue
            for name, pattern in self.deny:
                if pattern.search(line):
                    raise ConstraintRefusal(f"deny:{name}", f"{_quote(line)} (line {number})")
            if self.config.policy == "allow-list":
                raise ConstraintRefusal(
                    "allow-list", f"{_quote(line)} (line {number}) matches no allow pattern"
                )

    def check_workdir(self, cwd: str | os.PathLike[str] | None) -> None:
        """Refuse a working directory outside ``workdir_roots`` (after resolving symlinks)."""
        if cwd is None or not self.roots:
            return
        real = os.path.realpath(cwd)
        if any(_under(real, root) for root in self.roots):
            return
        shown = str(cwd) if real == os.path.normpath(cwd) else f"{cwd} (resolves to {real})"
        raise ConstraintRefusal(
            "workdir_roots",
            f"working directory {shown} is outside the allowed roots {', '.join(self.roots)}",
        )

    def check_path(
        self, path: str | os.PathLike[str], purpose: str, *, access: PathAccess = "write"
    ) -> str:
        """The resolved ``path`` a plugin is about to touch for ``purpose``, refused (a
        :class:`ConstraintRefusal` naming the rule) when it lies outside ``workdir_roots``
        or, with ``run_as``, when the run-as user could not do the same there itself.

        The agent acts as root; this keeps it to what the constraints allow a script.

        :param purpose: what the path is, for the message (``"tar target_dir"``).
        :param access: ``read`` (reach and read it), ``write`` (create or write into it:
            the nearest existing ancestor must be writable when it does not exist yet), or
            ``replace`` (swap the whole entry: write on its parent and on itself).
        """
        real = os.path.realpath(path)
        shown = str(path) if real == os.path.normpath(path) else f"{path} (resolves to {real})"
        if self.roots and not any(_under(real, root) for root in self.roots):
            raise ConstraintRefusal(
                "workdir_roots",
                f"{purpose} {shown} is outside the allowed roots {', '.join(self.roots)}",
            )
        user = self.switch_to
        if user is None or user.uid == 0:
            return real
        denied = _denied(user, real, access)
        if denied is not None:
            raise ConstraintRefusal(
                "run_as",
                f"{purpose} {shown}: {user.name} (uid {user.uid}) {denied}; the agent does "
                f"as root only what {user.name} could do there itself",
            )
        return real

    # ------------------------------------------------------------------ while running

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with ``HOME``, ``USER`` and ``LOGNAME`` of the run-as user."""
        env = dict(env)
        if self.run_as is not None:
            env.update(HOME=self.run_as.home, USER=self.run_as.name, LOGNAME=self.run_as.name)
        return env

    @contextlib.contextmanager
    def confinement(self, run_name: str) -> Iterator[Confinement | None]:
        """The confinement for one run; a per-run cgroup lives as long as the block."""
        if self.switch_to is None and not self.rlimits and self.cgroup is None:
            yield None
            return
        notes = []
        cgroup: Path | None = None
        if self.cgroup is not None:
            try:
                cgroup = self.cgroup.create(
                    run_name, memory_max=self.limits.memory_bytes, pids_max=self.limits.processes
                )
                notes.append(f"constraints: cgroup v2 {cgroup} used")
            except OSError as exc:
                notes.append(f"constraints: cgroups v2 not used: cannot create a cgroup: {exc}")
        elif self.limits.memory_bytes or self.limits.processes:
            notes.append(f"constraints: cgroups v2 not used: {self.cgroup_reason}")
        run_as = self.switch_to
        try:
            yield Confinement(
                uid=run_as.uid if run_as else None,
                gid=run_as.gid if run_as else None,
                groups=run_as.groups if run_as else (),
                rlimits=self.rlimits,
                cgroup=str(cgroup) if cgroup else None,
                notes=tuple(notes),
            )
        finally:
            if cgroup is not None and self.cgroup is not None:
                self.cgroup.remove(cgroup)

    def explain(self, result: ProcessResult, confinement: Confinement | None) -> str | None:
        """Which limit (if any) a failed run most likely hit, in words, else ``None``."""
        code, lim = result.exit_code, self.limits
        if result.timed_out or code is None or code == 0:
            return None
        said = result.stderr_tail[-4096:] + result.stdout_tail[-4096:]
        # Killed by a signal itself, or a shell reporting a command it ran was (128 + n).
        sig = -code if code < 0 else code - 128 if 128 < code < 128 + 65 else None
        if sig == signal.SIGXCPU and lim.cpu_seconds:
            return f"killed by SIGXCPU: it used up limits.cpu_seconds = {lim.cpu_seconds}"
        if sig == signal.SIGXFSZ and lim.file_size:
            return f"killed by SIGXFSZ: it wrote past limits.file_size = {_size(lim.file_size)}"
        run_cgroup = confinement.cgroup if confinement is not None else None
        parent = self.cgroup
        if sig == signal.SIGKILL and run_cgroup and parent and parent.oom_killed(Path(run_cgroup)):
            return f"killed by the kernel: over the cgroup memory.max = {_size(lim.memory_bytes)}"
        # Out of address space: a program says so, or dies of what it could not allocate.
        if lim.memory_bytes and (_OOM_WORDS.search(said) or sig in _OOM_SIGNALS):
            return f"it ran out of memory under limits.memory_bytes = {_size(lim.memory_bytes)}"
        if sig == signal.SIGKILL and lim.cpu_seconds:
            return f"killed by SIGKILL, possibly at limits.cpu_seconds = {lim.cpu_seconds} + 1"
        if lim.processes and _NPROC_WORDS.search(said):
            return f"it could not start a process under limits.processes = {lim.processes}"
        if lim.open_files and _NOFILE_WORDS.search(said):
            return f"it ran out of file descriptors under limits.open_files = {lim.open_files}"
        return None

    def explain_start_error(self, exc: OSError) -> str | None:
        """Why a confined child could not even start, when a limit explains it."""
        if exc.errno == errno.EAGAIN and self.limits.processes:
            who = self.run_as.name if self.run_as else "the agent's user"
            return (
                f"{who} already has limits.processes = {self.limits.processes} processes "
                "running; the script could not start"
            )
        return None

    def _rlimits(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for key, which in _RLIMITS:
            value = getattr(self.limits, key)
            if value is None:
                continue
            _soft, hard = resource.getrlimit(which)
            # CPU: SIGXCPU at the soft limit names the cause; SIGKILL a second later if caught.
            want_hard = value + 1 if which == resource.RLIMIT_CPU else value
            if hard != resource.RLIM_INFINITY:
                want_hard = min(want_hard, hard)
            out.append((which, min(value, want_hard), want_hard))
        return tuple(out)


@functools.cache
def default_policy() -> ConstraintPolicy:
    """The policy of an agent whose config says nothing: the defaults, compiled once."""
    return ConstraintPolicy()


def _resolve_user(name: str | None) -> RunAs | None:
    if name is None:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConstraintConfigError(f"run_as = {name!r}: no such user on this host") from None
    euid = os.geteuid()
    if euid != 0 and euid != entry.pw_uid:
        me = pwd.getpwuid(euid).pw_name if euid >= 0 else str(euid)
        raise ConstraintConfigError(
            f"run_as = {name!r} needs the agent to run as root, but it runs as {me} "
            f"(uid {euid}): start the agent as root, or remove run_as"
        )
    groups = tuple(os.getgrouplist(name, entry.pw_gid))
    return RunAs(name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


_R, _W, _X = 4, 2, 1


def _may(user: RunAs, st: os.stat_result, want: int) -> bool:
    """Whether ``user`` has ``want`` (rwx bits) on ``st`` by its mode bits (ACLs are not
    read: they can only make this stricter than needed, never looser)."""
    if st.st_uid == user.uid:
        bits = st.st_mode >> 6
    elif st.st_gid == user.gid or st.st_gid in user.groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want == want


def _denied(user: RunAs, real: str, access: PathAccess) -> str | None:
    """Why ``user`` could not ``access`` resolved path ``real``, or ``None`` if it could."""
    parts = [part for part in real.split("/") if part]
    at = "/"
    chain: list[tuple[str, os.stat_result]] = []
    for part in ["", *parts]:
        at = os.path.join(at, part) if part else "/"
        try:
            chain.append((at, os.stat(at)))
        except FileNotFoundError:
            break
    exists = len(chain) == len(parts) + 1
    # Every existing directory on the way must be searchable.
    for where, st in chain[:-1] if exists else chain:
        if not _may(user, st, _X):
            return f"cannot enter {where}"
    last, st = chain[-1]
    if not exists:  # created: the nearest existing ancestor must take new entries
        return None if _may(user, st, _W | _X) else f"cannot create entries in {last}"
    if access == "read":
        want = _R | _X if stat.S_ISDIR(st.st_mode) else _R
        return None if _may(user, st, want) else f"cannot read {last}"
    if stat.S_ISDIR(st.st_mode) and not _may(user, st, _W | _X):
        return f"cannot write in {last}"
    if not stat.S_ISDIR(st.st_mode) and not _may(user, st, _W):
        return f"cannot write {last}"
    if access == "replace" and len(chain) > 1:
        parent, pst = chain[-2]
        if not _may(user, pst, _W | _X):
            return f"cannot replace entries of {parent}"
        if pst.st_mode & stat.S_ISVTX and user.uid not in (pst.st_uid, st.st_uid):
            return f"cannot replace {last} in the sticky directory {parent}"
    return None


def _size(value: int | None) -> str:
    return f"{value} bytes ({ByteSize(value or 0).human_readable()})"


def _quote(line: str, limit: int = 200) -> str:
    shown = line if len(line) <= limit else line[: limit - 1] + "…"
    return '"' + shown.replace('"', '\\"') + '"'
