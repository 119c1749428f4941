"""Cgroups that group a deployment's processes, so that none can slip away.

A process can leave its process group and session (``setsid``, ``set -m``, a double fork), but
not its cgroup: the kernel puts every child in its parent's cgroup, and only a privileged
writer of ``cgroup.procs`` moves it out.  So a cgroup per script run, under one per
deployment, lists every process the run started — the agent reads that list to kill them all
on a timeout, or after a restart.

These cgroups only track: limits stay with :mod:`deploy_core.agent.cgroups` (a delegated
cgroup v2 with controllers).  Any hierarchy the agent may write will do:

- cgroup v2, at the agent's own cgroup of whatever cgroup2 file system is mounted
  (``/sys/fs/cgroup`` on a v2 host, ``/sys/fs/cgroup/unified`` on a hybrid one): members in
  ``cgroup.procs``, killed at once through ``cgroup.kill`` (Linux 5.14+) or frozen first;
- cgroup v1, the ``freezer`` hierarchy (frozen, killed, thawed: no member can fork while the
  agent kills) or else ``pids``.

The layout is ``<base>/deploy-center/<deploy_id>/<run>``, or ``<base>/deploy-center/pool-<id>``
for a run started from a spare child (:mod:`deploy_core.agent.launcher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

TRACKING_DIR = "deploy-center"
# Rounds of "kill every member, look again" before giving up on a cgroup that keeps forking.
KILL_ROUNDS = 200
FREEZE_WAIT = 1.0
#: Threads (per process) for cgroup file-system calls that wait for the kernel (see
#: :func:`off_loop`).
CGROUP_THREADS = 2

T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def off_loop(call: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """Run ``call(*args)`` (a cgroup ``mkdir``, move or ``rmdir``) on a thread of a small
    pool of its own, for the running event loop to await.

    Moving a process into a cgroup waits for an RCU grace period (5-18 ms on the test host),
    and a ``mkdir`` or ``rmdir`` waits for the kernel's ``cgroup_mutex``, which every move
    holds meanwhile: a host-wide queue.  On the default executor such calls took its few
    threads from everything else an agent does there (reading its journal's outbox before
    it sends): a thousand agents of one benchmark host, each making its next spare and
    removing its last run's cgroup, held up their reports by seconds.  Here they wait among
    themselves.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(CGROUP_THREADS, thread_name_prefix="cgroup")
    return asyncio.get_running_loop().run_in_executor(_pool, call, *args)


@dataclass(frozen=True)
class TrackingHierarchy:
    """Where run cgroups are made: ``base`` (…/deploy-center) in a v2 or v1 hierarchy.

    :param version: 2 or 1.
    :param controller: for v1, the controller the hierarchy is mounted with (``freezer`` or
        ``pids``); ``""`` for v2.
    """

    base: Path
    version: int
    controller: str = ""

    def describe(self) -> str:
        """The hierarchy in words, for the agent's log."""
        kind = "cgroup v2" if self.version == 2 else f"cgroup v1 {self.controller}"
        return f"{kind} under {self.base}"

    def create(self, deploy_id: str, run: str) -> Path:
        """A new, empty cgroup for one run of ``deploy_id``; raises :class:`OSError`."""
        path = self.base / _name(deploy_id) / _name(run)
        path.mkdir(parents=True)
        return path

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is a run cgroup of this hierarchy (a journal could name another)."""
        try:
            path.relative_to(self.base)
        except ValueError:
            return False
        return ".." not in path.parts

    def remove(self, path: Path) -> None:
        """Remove a run's cgroup and its deployment's when they are empty; ones that still
        hold processes (a service the run left) stay."""
        for directory in (path, path.parent):
            if directory == self.base or not self.owns(directory):
                return
            try:
                directory.rmdir()
            except OSError:
                return


def join(path: str) -> None:
    """Move the calling process into the cgroup ``path`` (safe between fork and exec)."""
    fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, b"0")  # "0": the writing process
    finally:
        os.close(fd)


def move(path: str, pid: int) -> None:
    """Move process ``pid`` (all its threads) into the cgroup ``path``."""
    fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)


def members(path: Path) -> set[int]:
    """Every process in ``path`` and the cgroups below it (none when it is gone)."""
    found: set[int] = set()
    for directory, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            found.update(int(p) for p in Path(directory, "cgroup.procs").read_text().split())
    return found


def contains(path: Path, pid: int) -> bool:
    """Whether process ``pid`` is in ``path`` or below it, as ``/proc/PID/cgroup`` says."""
    return pid in members(path)


def signal_members(path: Path, sig: int) -> int:
    """Send ``sig`` to every member; how many there were."""
    pids = members(path)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return len(pids)


def kill_all(path: Path) -> set[int]:
    """SIGKILL every member of ``path`` until none is left; the pids killed.

    v2 with ``cgroup.kill`` kills the whole subtree in the kernel, forks included.  Otherwise
    the cgroup is frozen while its members are sent SIGKILL (v2 ``cgroup.freeze``, v1
    ``freezer.state``), so none can fork meanwhile; without a freezer the agent repeats
    kill-and-look until the cgroup is empty.
    """
    killed: set[int] = set()
    for _round in range(KILL_ROUNDS):
        pids = members(path)
        if not pids:
            return killed
        killed |= pids
        if (path / "cgroup.kill").exists() and _write(path / "cgroup.kill", "1"):
            _wait_empty(path, 0.5)
            continue
        frozen = _freeze(path, True)
        try:
            for pid in members(path):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            if frozen:
                _freeze(path, False)
        _wait_empty(path, 0.05)
    return killed


def find_tracking_hierarchy(setting: str = "auto") -> tuple[TrackingHierarchy | None, str]:
    """The hierarchy to track runs in, or ``None`` and why there is none.

    :param setting: ``"auto"`` (cgroup v2, else v1 ``freezer``, else v1 ``pids``), one of
        ``"v2"``, ``"freezer"``, ``"pids"`` to use only that, or ``"off"``.
    """
    if setting == "off":
        return None, "process tracking by cgroup is off"
    wanted = ("v2", "freezer", "pids") if setting == "auto" else (setting,)
    reasons = []
    for kind in wanted:
        hierarchy, reason = _try(kind)
        if hierarchy is not None:
            return hierarchy, hierarchy.describe()
        reasons.append(f"{kind}: {reason}")
    return None, "; ".join(reasons)


def _try(kind: str) -> tuple[TrackingHierarchy | None, str]:
    mount, own = _mount_and_own(kind)
    if mount is None or own is None:
        return None, "not mounted" if mount is None else "this process is in none of its cgroups"
    base = mount / own.lstrip("/") / TRACKING_DIR
    try:
        base.mkdir(exist_ok=True)
    except OSError as exc:
        return None, f"cannot create {base}: {exc.strerror or exc}"
    if not os.access(base / "cgroup.procs", os.W_OK):
        return None, f"{base} is not writable by the agent"
    if kind == "v2":
        return TrackingHierarchy(base, 2), ""
    return TrackingHierarchy(base, 1, kind), ""


def _mount_and_own(kind: str) -> tuple[Path | None, str | None]:
    """The mount point of the hierarchy ``kind`` and this process's cgroup in it."""
    mount = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields, _sep, tail = line.partition(" - ")
            parts, after = fields.split(), tail.split()
            if len(parts) < 5 or len(after) < 3:
                continue
            if kind == "v2" and after[0] == "cgroup2":
                mount = Path(parts[4])
                break
            if kind != "v2" and after[0] == "cgroup" and kind in after[2].split(","):
                mount = Path(parts[4])
                break
    own = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            number, controllers, path = line.split(":", 2)
            if (kind == "v2" and number == "0" and controllers == "") or (
                kind != "v2" and kind in controllers.split(",")
            ):
                own = path
                break
    return mount, own


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:200] or "_"


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EACCES, errno.EINVAL, errno.EPERM):
            raise
        return False
    return True


def _freeze(path: Path, frozen: bool) -> bool:
    """Freeze or thaw ``path``; whether this hierarchy can (waits until frozen, bounded)."""
    if (path / "cgroup.freeze").exists():
        ok = _write(path / "cgroup.freeze", "1" if frozen else "0")
        state_file, want = path / "cgroup.events", "frozen 1"
    elif (path / "freezer.state").exists():
        ok = _write(path / "freezer.state", "FROZEN" if frozen else "THAWED")
        state_file, want = path / "freezer.state", "FROZEN"
    else:
        return False
    end = time.monotonic() + FREEZE_WAIT
    while ok and frozen and time.monotonic() < end:
        with contextlib.suppress(OSError):
            if want in state_file.read_text():
                break
        time.sleep(0.005)
    return ok


def _wait_empty(path: Path, seconds: float) -> None:
    end = time.monotonic() + seconds
    while members(path) and time.monotonic() < end:
        time.sleep(0.005)
