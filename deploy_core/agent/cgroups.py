"""A cgroup v2 per script run, under a subtree delegated to the agent (when there is one).

Rlimits bound each process; a cgroup bounds the whole run — every process the script starts
— and the kernel's OOM killer enforces ``memory.max`` on what is really resident.  It needs a
parent cgroup the agent may write, with the ``memory`` and ``pids`` controllers available,
that holds no processes itself (cgroup v2's "no internal processes" rule), e.g. a systemd
service with ``Delegate=yes`` whose agent moved itself into a leaf.  Without one the agent
runs scripts under rlimits only and says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids")


class CgroupParent:
    """A delegated cgroup v2 directory that per-run cgroups are created in."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self, name: str, *, memory_max: int | None, pids_max: int | None) -> Path:
        """A new child cgroup with the limits written; raises :class:`OSError`."""
        run = self.path / re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:200]
        run.mkdir()
        try:
            if memory_max is not None:
                (run / "memory.max").write_text(str(memory_max))
                # Without this the run could swap its way past memory.max.
                with contextlib.suppress(OSError):
                    (run / "memory.swap.max").write_text("0")
            if pids_max is not None:
                (run / "pids.max").write_text(str(pids_max))
        except OSError:
            self.remove(run)
            raise
        return run

    def oom_killed(self, run: Path) -> bool:
        """Whether the kernel killed something in ``run`` for going over ``memory.max``."""
        try:
            events = (run / "memory.events").read_text()
        except OSError:
            return False
        found = re.search(r"^oom_kill (\d+)$", events, re.M)
        return bool(found and int(found.group(1)) > 0)

    def remove(self, run: Path) -> None:
        """Remove a run's cgroup; one that still holds processes (a daemon the script left
        running) stays, and the kernel keeps enforcing its limits."""
        with contextlib.suppress(OSError):
            run.rmdir()


def find_cgroup_parent(setting: str) -> tuple[CgroupParent | None, str]:
    """The parent to create run cgroups in, or ``None`` and why there is none.

    :param setting: ``"off"``; the path of a delegated cgroup v2 directory holding no
        processes; or ``"auto"``: the agent's own cgroup, when it is delegated to the agent —
        the agent then moves itself into a leaf ``agent`` and creates runs under
        ``deploy-runs`` (the layout systemd documents for ``Delegate=yes``).
    """
    if setting == "off":
        return None, "limits.cgroup = off"
    if setting != "auto":
        reason = _enable(Path(setting))
        return (None, reason) if reason else (CgroupParent(Path(setting)), f"under {setting}")
    if not _is_cgroup2(CGROUP_ROOT):
        return None, f"{CGROUP_ROOT} is not a cgroup2 file system"
    own = _own_cgroup()
    if own is None:
        return None, "this process is in no cgroup v2"
    own_dir = CGROUP_ROOT / own.lstrip("/")
    reason = _enable(own_dir)
    if reason and "holds processes" in reason:
        try:
            leaf = own_dir / "agent"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            return None, f"{reason}; moving the agent into a leaf failed: {exc.strerror}"
        reason = _enable(own_dir)
    if reason:
        return None, reason
    runs = own_dir / "deploy-runs"
    try:
        runs.mkdir(exist_ok=True)
    except OSError as exc:
        return None, f"cannot create {runs}: {exc.strerror}"
    reason = _enable(runs)
    return (None, reason) if reason else (CgroupParent(runs), f"under {runs}")


def _enable(path: Path) -> str | None:
    """Make the controllers available to ``path``'s children; ``None``, or why not."""
    try:
        available = (path / "cgroup.controllers").read_text().split()
    except OSError as exc:
        return f"{path} is not a cgroup v2 directory ({exc.strerror or exc})"
    missing = [c for c in CONTROLLERS if c not in available]
    if missing:
        return f"{path} lacks the {' and '.join(missing)} controller(s)"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable by the agent (not delegated to it)"
    control = path / "cgroup.subtree_control"
    try:
        enabled = control.read_text().split()
        wanted = [f"+{c}" for c in CONTROLLERS if c not in enabled]
        if wanted:
            control.write_text(" ".join(wanted))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return f"{path} holds processes, so its children cannot have controllers"
        return f"cannot enable {' and '.join(CONTROLLERS)} in {path}: {exc.strerror or exc}"
    return None


def _is_cgroup2(path: Path) -> bool:
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in mounts:
        fields = line.split()
        if len(fields) > 4 and fields[4] == str(path) and " - cgroup2 " in line:
            return True
    return False


def _own_cgroup() -> str | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return None
