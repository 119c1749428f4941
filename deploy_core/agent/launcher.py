"""A spare child kept ready in a tracking cgroup of its own, so a script run starts there
without moving a process on the hot path.

Moving a process into a cgroup (a write of ``cgroup.procs``) takes the kernel's
``cgroup_threadgroup_rwsem`` for writing, which waits for an RCU grace period: 5-18 ms on
the test host, on the path of every deployment.  A :class:`Spare` pays it ahead: a
``/bin/sh -s`` started with an empty environment in a new session, its pipes already made,
moved into a fresh cgroup ``<base>/pool-<id>`` while nothing waits for it.  A run takes the
spare (its cgroup becomes the run's, recorded in the journal like any other) and the agent
writes it one block of shell at once: change to the working directory, export the run's
environment, ``exec`` the program with stdin from /dev/null.  The shell runs nothing before
it has read the block's closing brace: if the agent dies first, the shell reads end of file
and exits with a syntax error, having run nothing.

The run's record goes to the journal beside the block, not before it: the spare's cgroup is
what finds the run if the agent dies before that commit.  A spare's cgroup is named for its
agent (pid and start time) and its journal, and the agent's next start (same journal) kills
whatever runs in its dead predecessor's spare cgroups that no journaled run names
(:func:`clear_stale`), before it recovers the journaled runs; so a run is never left behind,
and the deployment's first fsync after the command's is not on the path of its script.

A run whose environment has names the shell cannot export, no ``PATH``, or a confinement
(run-as user, rlimits, a limits cgroup) starts the classic way (a gate child moved by the
agent; see :mod:`deploy_core.agent.process`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy_core.agent import proctable
from deploy_core.agent.cgroup_tracking import TrackingHierarchy, kill_all, members, move, off_loop

SPARE_SHELL = "/bin/sh"
#: Bytes asked of a pipe per read, and the size asked for a child's output pipes (the spare's
#: pipes are made before its run is known, so they are sized here for every run).
READ_BYTES = 1 << 20
POOL_PREFIX = "pool-"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class Spare:
    """A waiting shell in its own tracking cgroup, made on ``loop``."""

    loop: asyncio.AbstractEventLoop
    proc: asyncio.subprocess.Process
    cgroup: Path

    def usable(self) -> bool:
        """Still waiting, on the running loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return running is self.loop and self.proc.returncode is None

    async def discard(self) -> None:
        """Kill the shell (it ran nothing) and wait for it."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 5)

    def discard_now(self) -> None:
        """Kill the shell without waiting (the loop may be gone); the cgroup is removed when
        it is empty, here or by the next :func:`clear_stale`."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.proc.pid, signal.SIGKILL)
        for _ in range(50):
            try:
                self.cgroup.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)  # until the kernel has taken it out


async def make_spare(hierarchy: TrackingHierarchy, read_limit: int, journal: str = "") -> Spare:
    """Start a spare shell and move it into a new cgroup of ``hierarchy`` (raises
    :class:`OSError`); ``read_limit``: the stream readers' buffer size; ``journal``: the
    :func:`journal_id` of the agent's journal, if it keeps one."""
    # Named with this agent's pid and start time: another agent on the host (sharing the
    # hierarchy) leaves it alone while this one lives; and with its journal: only the next
    # agent of that journal kills what runs in it (clear_stale).
    tag = f"j{journal}-" if journal else ""
    path = hierarchy.base / f"{POOL_PREFIX}{_owner()}-{tag}{uuid.uuid4().hex[:16]}"
    # The shell first, on the loop (it runs nothing before it is given a block), then the
    # cgroup's mkdir and the move, off it.  A refill starts while a run's script runs (the
    # run took the last spare): the fork then overlaps the script, where the loop would wait
    # anyway.  With the mkdir first, the fork waited for the kernel's cgroup_mutex and often
    # fell on the loop just as the run ended, in front of its callback (~1 ms of a 12 ms
    # dispatch, bench/dispatch.py).
    proc = await asyncio.create_subprocess_exec(
        SPARE_SHELL,
        "-s",
        env={},
        cwd="/",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=read_limit,
    )
    spare = Spare(asyncio.get_running_loop(), proc, path)
    made = False
    try:
        await off_loop(path.mkdir)
        made = True
        await off_loop(move, str(path), proc.pid)
    except BaseException:
        await spare.discard()
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return spare


def script(argv: Sequence[str], env: Mapping[str, str], cwd: Any) -> bytes | None:
    """The block a spare runs to become ``argv`` in ``cwd`` (``None``: the agent's) with
    exactly ``env`` (``None`` returned: it cannot, start it the classic way)."""
    if "PATH" not in env or not argv or not all(_NAME.match(name) for name in env):
        return None
    texts = [*env.values(), *(os.fspath(a) for a in argv), os.fspath(cwd or "")]
    if any("\0" in str(text) for text in texts):
        return None  # the classic start refuses it ("embedded null byte"), as it should
    lines = ["{", f"cd -- {_quote(os.fspath(cwd) if cwd is not None else os.getcwd())} || exit 126"]
    lines.append("unset OLDPWD")  # cd set it; the program gets exactly env (and PWD)
    lines += [f"export {name}={_quote(value)}" for name, value in env.items()]
    lines.append("exec " + " ".join(_quote(os.fspath(a)) for a in argv) + " </dev/null")
    lines.append("}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def check_cwd(cwd: Any) -> None:
    """Raise the error starting a child in ``cwd`` would (the spare changes to it only
    after the run started)."""
    if cwd is None:
        return
    path = os.fspath(cwd)
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", path)
    if not os.path.isdir(path):
        raise NotADirectoryError(20, "Not a directory", path)
    if not os.access(path, os.X_OK):
        raise PermissionError(13, "Permission denied", path)


#: ``pool-<pid>-<start ticks>-j<journal id>-<hex>`` (no ``j…`` part: an agent without a
#: journal); before the start ticks were added, ``pool-<pid>-<hex>``.
_POOL_NAME = re.compile(rf"{POOL_PREFIX}(\d+)-(?:(\d+)-)?(?:j([0-9a-f]{{12}})-)?[0-9a-f]+\Z")


def journal_id(path: os.PathLike[str] | str) -> str:
    """What names an agent's journal in its spare cgroups' names (12 hex digits)."""
    return hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:12]


def _owner() -> str:
    """This process as a spare cgroup names it: pid and start time (a pid alone may be
    reused by another process after the agent died)."""
    info = proctable.read(os.getpid())
    return f"{os.getpid()}-{info.start_ticks if info is not None else 0}"


def clear_stale(
    hierarchy: TrackingHierarchy, journal: str = "", recorded: Collection[str] = ()
) -> list[int]:
    """Clear the spare cgroups an earlier agent left (it died with them); the pids killed.

    Not those of another agent of this host that is alive (its spare's cgroup is empty for
    a moment between being made and the shell being moved in).  Of a dead agent of the same
    journal (``journal``, its :func:`journal_id`), those its journal's runs name are left to
    their recovery (``recorded``, cgroup paths: it kills or keeps what is in them); what
    runs in any other is a spare that took its run's block before the run's record was
    committed (see the module's text), or a spare that never did: killed, and the cgroup
    removed.  The spare cgroups of another journal's dead agent (a second agent of the host,
    down for now) and unrecognised names are only removed when empty: that agent's own next
    start decides."""
    killed: list[int] = []
    keep = {os.path.normpath(path) for path in recorded}
    with contextlib.suppress(OSError):
        for path in hierarchy.base.glob(f"{POOL_PREFIX}*"):
            named = _POOL_NAME.match(path.name)
            if named and _owner_alive(int(named.group(1)), named.group(2)):
                continue
            mine = bool(journal) and named is not None and named.group(3) == journal
            if mine and os.path.normpath(path) not in keep:
                with contextlib.suppress(OSError):
                    if members(path):
                        killed += sorted(kill_all(path))
            with contextlib.suppress(OSError):
                path.rmdir()
    return killed


def _owner_alive(pid: int, start_ticks: str | None) -> bool:
    """Whether the agent a spare cgroup names lives (this one does only under the name it
    gives now: its own cgroups of an older name are an earlier agent's with the same pid)."""
    if pid == os.getpid():
        return start_ticks is not None and f"{pid}-{start_ticks}" == _owner()
    if start_ticks is not None:
        return proctable.is_same(pid, int(start_ticks)) or not _readable(pid)
    return _alive(pid)


def _readable(pid: int) -> bool:
    """Whether /proc shows ``pid`` (or nothing has it): else it may be hidden from this agent
    (``hidepid``), and a hidden process is taken to be alive."""
    return proctable.read(pid) is not None or not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
