"""The host's process table as Linux's ``/proc`` shows it: who is whose child, in which process
group and session, started when.

A pid alone names a process only while it lives: the kernel hands the number to a new process
later.  ``(pid, start_ticks)`` — ``start_ticks`` being field 22 of ``/proc/PID/stat``, clock
ticks since boot — names one process for the whole uptime, and with the boot id
(``/proc/sys/kernel/random/boot_id``) across reboots.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    """One process as ``/proc/PID/stat`` describes it."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgid: int
    sid: int
    start_ticks: int

    @property
    def zombie(self) -> bool:
        """Exited, waiting for its parent to collect its status."""
        return self.state in ("Z", "X")


def read(pid: int) -> ProcInfo | None:
    """The process ``pid``, or ``None`` when there is none (or ``/proc`` hides it)."""
    try:
        raw = (PROC / str(pid) / "stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    # comm may hold spaces and parentheses: it ends at the last ")".
    open_at, close_at = raw.find("("), raw.rfind(")")
    rest = raw[close_at + 2 :].split()
    try:
        return ProcInfo(
            pid=pid,
            comm=raw[open_at + 1 : close_at],
            state=rest[0],
            ppid=int(rest[1]),
            pgid=int(rest[2]),
            sid=int(rest[3]),
            start_ticks=int(rest[19]),
        )
    except (IndexError, ValueError):
        return None


def processes() -> list[ProcInfo]:
    """Every process visible now (ones that exit while being read are left out)."""
    out = []
    for name in os.listdir(PROC):
        if name.isdigit():
            info = read(int(name))
            if info is not None:
                out.append(info)
    return out


def own_children() -> list[ProcInfo]:
    """The children of this process (of all its threads), zombies included: read from
    ``/proc/self/task/*/children`` where the kernel provides it, else from every process."""
    me = os.getpid()
    task_dir = PROC / "self" / "task"
    if not (task_dir / str(me) / "children").exists():
        return [i for i in processes() if i.ppid == me]
    pids: set[int] = set()
    for tid in os.listdir(task_dir):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (task_dir / tid / "children").read_text().split())
    infos = [read(pid) for pid in pids]
    return [i for i in infos if i is not None and i.ppid == me]


def is_same(pid: int, start_ticks: int) -> bool:
    """Whether ``pid`` still names the process that started at ``start_ticks`` (and has not
    exited: a zombie is already dead)."""
    info = read(pid)
    return info is not None and info.start_ticks == start_ticks and not info.zombie


def has_env(pid: int, name: str, value: str) -> bool:
    """Whether the process was started with ``name=value`` in its environment.

    This is the environment ``exec`` gave it: a script that unsets the variable still shows
    it, but the programs it starts afterwards do not — so it is a hint, never the only proof.
    """
    try:
        data = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return f"{name}={value}".encode() in data.split(b"\0")


@functools.cache
def boot_id() -> str:
    """This boot's random id; pids and start ticks of another boot name nothing now."""
    with contextlib.suppress(OSError):
        return (PROC / "sys/kernel/random/boot_id").read_text().strip()
    return ""


def descendants(roots: set[int], table: list[ProcInfo]) -> set[int]:
    """``roots`` and every process below them in ``table`` by parent pid."""
    children: dict[int, list[int]] = {}
    for info in table:
        children.setdefault(info.ppid, []).append(info.pid)
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
