"""What runs from a directory (SPEC deploy-29, "记录当前运行的进程/服务"): the processes whose
working directory or executable lies under it, with their command lines and listening TCP
ports, and the systemd units a request names.

The snapshot strategy records this before a deployment; on restore it stops what the failed
release started there and brings back what ran before.  Everything is read from ``/proc``
(``/proc/PID/{stat,cwd,exe,cmdline,fd}``, ``/proc/net/tcp{,6}``) and ``systemctl``; a process
is known by its pid *and* its start time, so a reused pid is never taken for another.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROC = Path("/proc")
UNIT_NAME = r"^[A-Za-z0-9_][A-Za-z0-9@._:\\-]{0,255}$"
MAX_CMDLINE = 1024
SYSTEMCTL_TIMEOUT = 30.0
POLL = 0.05


@dataclass(frozen=True)
class RunningProcess:
    """One process running from the directory, as recorded and reported."""

    pid: int
    start: int  # clock ticks after boot (/proc/PID/stat field 22): with pid, the identity
    uid: int
    cmdline: str
    cwd: str | None = None
    exe: str | None = None
    ports: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The process as kept in the snapshot state and shown in the rollback result."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunningProcess:
        """Back from :meth:`to_json` (unknown keys ignored)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        """``pid 42 python3 -m http.server (listening 127.0.0.1:8000)``."""
        ports = f" (listening {', '.join(self.ports)})" if self.ports else ""
        return f"pid {self.pid} {self.cmdline[:200]}{ports}"


def now_ticks() -> int:
    """The current time in the clock ticks ``/proc/PID/stat`` counts start times in."""
    uptime = float((PROC / "uptime").read_text().split()[0])
    return int(uptime * os.sysconf("SC_CLK_TCK"))


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start ticks) of ``pid``; ``None`` when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def _link(path: Path) -> str | None:
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return target.removesuffix(" (deleted)")


def _under(path: str | None, root: str) -> bool:
    return path is not None and (path == root or path.startswith(root.rstrip("/") + "/"))


def _agent_and_ancestors() -> set[int]:
    """The agent's own process and those above it: never stopped, whatever their cwd."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        info = _stat(pid)
        if info is None:
            break
        pid = info[1]
    return pids


def _listening_sockets() -> dict[str, str]:
    """Socket inode → ``address:port`` of every listening TCP socket in this namespace."""
    out: dict[str, str] = {}
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = (PROC / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] != "0A":  # 0A: LISTEN
                continue
            address, port = parts[1].split(":")
            if len(address) != width:
                continue
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, width, 8))
            if width == 8:
                host = ".".join(str(b) for b in raw)
            else:
                host = f"[{ipaddress.IPv6Address(raw).compressed}]"
            out[parts[9]] = f"{host}:{int(port, 16)}"
    return out


def _ports(pid: int, sockets: dict[str, str]) -> list[str]:
    found = []
    try:
        fds = os.listdir(PROC / str(pid) / "fd")
    except OSError:
        return []
    for fd in fds:
        target = _link(PROC / str(pid) / "fd" / fd) or ""
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match and match.group(1) in sockets:
            found.append(sockets[match.group(1)])
    return sorted(set(found))


def processes_under(root: str) -> list[RunningProcess]:
    """Every process (but the agent and its ancestors) whose working directory or executable
    lies under ``root`` (a resolved path), with its listening ports."""
    mine = _agent_and_ancestors()
    sockets: dict[str, str] | None = None
    found = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        pid = int(entry.name)
        base = PROC / entry.name
        cwd, exe = _link(base / "cwd"), _link(base / "exe")
        if not (_under(cwd, root) or _under(exe, root)):
            continue
        info = _stat(pid)
        if info is None or info[0] in "ZX":  # gone, or a zombie waiting to be collected
            continue
        try:
            raw = (base / "cmdline").read_bytes()
            uid = os.stat(base).st_uid
        except OSError:
            continue
        if sockets is None:
            sockets = _listening_sockets()
        found.append(
            RunningProcess(
                pid=pid,
                start=info[2],
                uid=uid,
                cmdline=raw.rstrip(b"\0")
                .replace(b"\0", b" ")
                .decode(errors="replace")[:MAX_CMDLINE],
                cwd=cwd,
                exe=exe,
                ports=_ports(pid, sockets),
            )
        )
    return sorted(found, key=lambda p: p.pid)


def _alive(proc: RunningProcess) -> bool:
    info = _stat(proc.pid)
    return info is not None and info[2] == proc.start and info[0] not in "ZX"


def _signal(proc: RunningProcess, sig: int) -> None:
    """Signal ``proc`` through a pidfd, so a pid reused since it was read is never hit."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError as exc:
        if exc.errno == errno.ENOSYS and _alive(proc):  # a kernel before 5.3: no pidfds
            with contextlib.suppress(OSError):
                os.kill(proc.pid, sig)
        return  # else gone
    try:
        if _alive(proc):  # the pidfd holds the pid now: this check stays true
            signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass  # it ended in between
    finally:
        os.close(fd)


def stop(procs: list[RunningProcess], grace: float) -> list[RunningProcess]:
    """SIGTERM, then after ``grace`` seconds SIGKILL, every process of ``procs``; waits (a
    bounded time) until they are gone.  Returns those still alive after all."""
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    end = time.monotonic() + grace
    left = [p for p in procs if _alive(p)]
    while left and time.monotonic() < end:
        time.sleep(POLL)
        left = [p for p in left if _alive(p)]
    for proc in left:
        _signal(proc, signal.SIGKILL)
    end = time.monotonic() + 5.0
    while left and time.monotonic() < end:
        time.sleep(POLL)
        left = [p for p in left if _alive(p)]
    return left


# --------------------------------------------------------------------------- systemd units


def systemctl() -> str | None:
    """The ``systemctl`` program, or ``None`` on a host without systemd tools."""
    return shutil.which("systemctl")


def unit_states(units: list[str]) -> dict[str, str]:
    """``systemctl is-active`` of each unit (``active``, ``inactive``, ``failed`` …);
    ``unknown: …`` when it cannot be asked."""
    program = systemctl()
    states = {}
    for unit in units:
        if program is None:
            states[unit] = "unknown: no systemctl on this host"
            continue
        try:
            done = subprocess.run(
                [program, "is-active", "--", unit],
                capture_output=True,
                text=True,
                timeout=SYSTEMCTL_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            states[unit] = f"unknown: {exc}"
            continue
        said = (done.stderr.strip().splitlines() or [""])[0][:200]
        states[unit] = done.stdout.strip() or f"unknown: {said}"
    return states


def restart_unit(unit: str) -> str:
    """``systemctl restart UNIT``; what happened, in words."""
    program = systemctl()
    if program is None:
        return f"unit {unit} not restarted: no systemctl on this host"
    try:
        done = subprocess.run(
            [program, "restart", "--", unit],
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unit {unit} not restarted: {exc}"
    if done.returncode != 0:
        said = ((done.stderr or done.stdout).strip().splitlines() or [""])[0][:300]
        return f"unit {unit} not restarted: {said}"
    state = unit_states([unit])[unit]
    return f"unit {unit} restarted ({state})"


def unit_restarted(outcome: str) -> bool:
    """Whether a :func:`restart_unit` outcome says the unit was restarted."""
    return " restarted (" in outcome
