"""Run a child process the way every deployment step needs it run.

One place for: a hard timeout that kills the whole process group, output captured with a
bound (the tail is kept), each output line handed to a callback as it arrives, no hang
when the script leaves a daemon behind that still holds its stdout open, and the
:class:`Confinement` (user, rlimits, cgroup) the agent's constraints put a child under.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_TAIL_BYTES = 64 * 1024
MAX_LINE_CHARS = 8192
# After the main process exits, how long to keep reading output a background child may still
# be writing before we stop listening (the child keeps running: it may be the service).
DRAIN_AFTER_EXIT = 0.5
KILL_GRACE = 2.0

LineSink = Callable[[str, str], None]


@dataclass(frozen=True)
class ProcessResult:
    """What a finished (or killed) child process left behind."""

    exit_code: int | None
    stdout_tail: str
    stderr_tail: str
    duration: float
    timed_out: bool
    truncated: bool
    # Set by the caller when the exit can be put down to a resource limit (which one, why).
    limit_hit: str | None = None


@dataclass(frozen=True)
class Confinement:
    """What a child is put under between ``fork`` and ``exec``.

    :param uid: switch to this user (with ``gid`` and ``groups``); ``None`` keeps the agent's.
    :param rlimits: ``(resource, soft, hard)`` triples for :func:`resource.setrlimit`.
    :param cgroup: a cgroup v2 directory the child joins before anything else.
    """

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    rlimits: tuple[tuple[int, int, int], ...] = ()
    cgroup: str | None = None
    # Lines to log when the child has started (what was applied), for the deployment's log.
    notes: tuple[str, ...] = field(default=(), compare=False)

    def preexec(self) -> Callable[[], None] | None:
        """The function run in the child before ``exec`` (``None`` when there is nothing to
        do).  It makes system calls only: no locks, so it is safe in a threaded agent."""
        if self.uid is None and not self.rlimits and self.cgroup is None:
            return None
        procs = os.path.join(self.cgroup, "cgroup.procs") if self.cgroup else None
        rlimits, uid, gid, groups = self.rlimits, self.uid, self.gid, list(self.groups)

        def apply() -> None:
            # The cgroup first, while still privileged; then limits; the identity last.
            if procs is not None:
                fd = os.open(procs, os.O_WRONLY)
                try:
                    os.write(fd, b"0")  # "0" = the writing process
                finally:
                    os.close(fd)
            for which, soft, hard in rlimits:
                resource.setrlimit(which, (soft, hard))
            if uid is not None:
                os.setgroups(groups)
                if gid is not None:
                    os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)

        return apply


class _OutputBudget:
    """How many bytes of output may still be streamed line by line (shared by both streams).

    Once spent, one marker line is sent and the rest is only kept in the tail."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.left = limit
        self.marked = False

    def admit(self, stream: str, line: str, on_line: LineSink) -> None:
        if self.left is None:
            on_line(stream, line)
            return
        size = len(line.encode()) + 1
        if size <= self.left:
            self.left -= size
            on_line(stream, line)
        elif not self.marked:
            self.left = 0
            self.marked = True
            on_line(stream, f"[output truncated after {self.limit} bytes]")


class _Tail:
    """Keeps the last ``limit`` bytes written to it and counts what it dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.dropped = 0

    def write(self, data: bytes) -> None:
        self.buf += data
        excess = len(self.buf) - self.limit
        if excess > 0:
            del self.buf[:excess]
            self.dropped += excess

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


async def _pump(
    reader: asyncio.StreamReader,
    tail: _Tail,
    stream: str,
    on_line: LineSink | None,
    budget: _OutputBudget,
) -> None:
    pending = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        tail.write(chunk)
        if on_line is None:
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            budget.admit(stream, raw.decode("utf-8", errors="replace")[:MAX_LINE_CHARS], on_line)
        if len(pending) > MAX_LINE_CHARS:
            budget.admit(
                stream, pending.decode("utf-8", errors="replace")[:MAX_LINE_CHARS], on_line
            )
            pending = b""
    if pending and on_line is not None:
        budget.admit(stream, pending.decode("utf-8", errors="replace")[:MAX_LINE_CHARS], on_line)


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def run_process(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineSink | None = None,
    tail_bytes: int = DEFAULT_TAIL_BYTES,
    kill_grace: float = KILL_GRACE,
    confinement: Confinement | None = None,
    output_limit: int | None = None,
) -> ProcessResult:
    """Run ``argv`` in its own process group, at most ``timeout`` seconds.

    On timeout the whole group gets SIGTERM, then SIGKILL after ``kill_grace`` seconds, so
    children the process started die with it.  ``env`` replaces the environment entirely
    when given.  ``on_line(stream, line)`` is called for each stdout/stderr line.

    :param confinement: the user, rlimits and cgroup the child runs under.
    :param output_limit: at most this many bytes of output go to ``on_line``; after them one
        ``[output truncated after N bytes]`` line, and the rest only reaches the tails.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=confinement.preexec() if confinement is not None else None,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Tail(tail_bytes), _Tail(tail_bytes)
    budget = _OutputBudget(output_limit)
    pumps = [
        asyncio.ensure_future(_pump(proc.stdout, out, "stdout", on_line, budget)),
        asyncio.ensure_future(_pump(proc.stderr, err, "stderr", on_line, budget)),
    ]
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), kill_grace)
            except TimeoutError:
                _kill_group(proc.pid, signal.SIGKILL)
                await proc.wait()
            # Whatever is left of the group goes too, even if it ignored SIGTERM.
            _kill_group(proc.pid, signal.SIGKILL)
        await asyncio.wait(pumps, timeout=DRAIN_AFTER_EXIT)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if proc.returncode is None:  # cancelled from outside: leave nothing running
            _kill_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), kill_grace)
    return ProcessResult(
        exit_code=proc.returncode,
        stdout_tail=out.text(),
        stderr_tail=err.text(),
        duration=time.monotonic() - started,
        timed_out=timed_out,
        truncated=bool(out.dropped or err.dropped),
    )
