"""Run a child process the way every deployment step needs it run.

One place for: a hard timeout that kills the whole process group, output captured with a
bound (the tail is kept), each output line handed to a callback as it arrives, no hang
when the script leaves a daemon behind that still holds its stdout open, and the
:class:`Confinement` (user, rlimits, cgroup) the agent's constraints put a child under.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import resource
import shutil
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from deploy_core.agent import launcher
from deploy_core.agent.cgroup_tracking import join as join_cgroup
from deploy_core.agent.cgroup_tracking import move as move_to_cgroup
from deploy_core.agent.cgroup_tracking import off_loop
from deploy_core.agent.tracking import ProcessTracker, TrackedRun

DEFAULT_TAIL_BYTES = 64 * 1024
# A child started the classic way (no spare, see launcher) waits in this gate: it waits for
# one line on stdin (sent once the journal holds its pid and the agent moved it into the
# run's cgroup), then becomes the real program, or exits unrun if the agent died first.
GATE_SHELL = "/bin/sh"
GATE = 'read -r _ || exit 125; exec "$@" </dev/null'
MAX_LINE_CHARS = 8192
# Bytes asked of a pipe per read, and the size asked for the child's output pipes.
READ_BYTES = launcher.READ_BYTES
PIPE_BYTES = 1 << 20
# After the main process exits, how long to keep reading output a background child may still
# be writing before we stop listening (the child keeps running: it may be the service).
DRAIN_AFTER_EXIT = 0.5
KILL_GRACE = 2.0

LineSink = Callable[[str, str], None]
# Called with a stream's name and a chunk's worth of its lines at once.
LinesSink = Callable[[str, list[str]], None]
# Awaited by the pump after each chunk it turned into lines: where back-pressure enters.
Pace = Callable[[], Awaitable[None]]


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
    # The seconds it was allowed; and, when the deployment's deadline cut that shorter than
    # the step's own timeout, that timeout (so a message names the limit that fired).
    timeout: float = 0.0
    step_timeout: float | None = None

    def timeout_text(self) -> str:
        """How it was stopped, naming the limit that fired: ``timed out after 30 s``, or
        ``was stopped at the deployment's deadline, after 3 s (its own timeout is 30 s)``."""
        if self.step_timeout is not None and self.step_timeout > self.timeout:
            return (
                f"was stopped at the deployment's deadline, after {self.timeout:g} s "
                f"(its own timeout is {self.step_timeout:g} s)"
            )
        return f"timed out after {self.timeout:g} s"


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


class OutputBudget:
    """How many bytes of output lines one run may stream to ``on_line`` (both streams
    together), and what becomes of the rest.

    Past ``limit`` the pump stops splitting output into lines, so a script that prints
    gigabytes costs the agent a pipe read per chunk and no more.  With ``tail_bytes`` 0 one
    ``[output truncated after N bytes]`` line is sent at once and the rest is dropped (the
    agent's own ``limits.output_bytes``).  Otherwise the last ``tail_bytes`` of the rest are
    kept and sent when the run ends, after one line saying how many bytes were left out (the
    server's per-deployment log budget: the head and the tail of a flood both reach it).

    :param limit: bytes of lines to stream, a newline counted for each; ``None``: no limit.
    :param tail_bytes: bytes of the rest to send at the end.
    """

    def __init__(self, limit: int | None, *, tail_bytes: int = 0) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"an output limit cannot be negative, got {limit}")
        if tail_bytes < 0:
            raise ValueError(f"tail_bytes cannot be negative, got {tail_bytes}")
        self.limit = limit
        self.left = limit
        self.tail_bytes = tail_bytes
        #: Bytes of lines streamed while within the limit.
        self.streamed = 0
        #: Bytes that came past the limit (some of them kept for the tail).
        self.dropped = 0
        #: Bytes of lines sent by :meth:`finish` (the marker and the tail).
        self.sent_after = 0
        self.spent = limit == 0
        self._marked = False
        self._kept: deque[tuple[str, bytes]] = deque()
        self._kept_bytes = 0

    def admit(self, stream: str, raws: list[bytes], sink: LinesSink) -> int:
        """Stream as many of ``raws`` (whole lines, without their newlines) as fit, in one
        call of ``sink``; returns how many.  The rest is the caller's to :meth:`drop`."""
        if not raws:
            return 0
        if self.left is None:
            sink(stream, _texts(raws))
            return len(raws)
        count, size = len(raws), sum(map(len, raws)) + len(raws)
        if self.spent:
            count, size = 0, 0
        elif size > self.left:  # the limit falls inside: up to the line that does not fit
            count, size = 0, 0
            for raw in raws:
                if size + len(raw) + 1 > self.left:
                    break
                size += len(raw) + 1
                count += 1
        if count:
            self.left -= size
            self.streamed += size
            sink(stream, _texts(raws[:count]))
        if count < len(raws):
            self.spent = True
            if not self.tail_bytes and not self._marked:
                self._marked = True
                sink(stream, [f"[output truncated after {self.limit} bytes]"])
        return count

    def drop(self, stream: str, data: bytes) -> None:
        """Output past the limit: counted, and its last ``tail_bytes`` kept."""
        self.spent = True
        self.dropped += len(data)
        if not self.tail_bytes or not data:
            return
        self._kept.append((stream, data))
        self._kept_bytes += len(data)
        while self._kept_bytes - len(self._kept[0][1]) >= self.tail_bytes:
            self._kept_bytes -= len(self._kept.popleft()[1])

    def finish(self, sink: LinesSink) -> None:
        """The run is over: send the marker and the kept tail, if anything was dropped."""
        if not self.dropped:
            return
        if not self.tail_bytes:
            if not self._marked:
                self._marked = True
                sink("agent", [f"[output truncated after {self.limit} bytes]"])
            return
        segments = _merge(self._kept, self._kept_bytes - self.tail_bytes)
        kept = sum(len(data) for _, data in segments)
        if kept < self.dropped and segments:  # cut mid-line: start at the next whole line
            stream, data = segments[0]
            cut = data.find(b"\n")
            segments[0] = (stream, data[cut + 1 :] if cut >= 0 else b"")
            kept = sum(len(data) for _, data in segments)
        marker = (
            f"[output truncated: {self.dropped - kept} bytes left out after the first "
            f"{self.streamed} bytes (the deployment's log budget); the last {kept} bytes follow]"
        )
        self._send(sink, "agent", [marker])
        for stream, data in segments:
            raws = data.split(b"\n")
            if raws and not raws[-1]:
                raws.pop()
            self._send(sink, stream, _texts(raws))
        self._kept.clear()
        self._kept_bytes = 0

    def _send(self, sink: LinesSink, stream: str, lines: list[str]) -> None:
        if lines:
            self.sent_after += sum(len(line.encode()) + 1 for line in lines)
            sink(stream, lines)


def _texts(raws: list[bytes]) -> list[str]:
    """Lines as text: one decode for them all, each cut to :data:`MAX_LINE_CHARS`."""
    if max(map(len, raws)) > MAX_LINE_CHARS * 4:  # decode no more of a huge line than shown
        raws = [raw[: MAX_LINE_CHARS * 4] for raw in raws]
    lines = b"\n".join(raws).decode("utf-8", errors="replace").split("\n")
    if max(map(len, lines)) > MAX_LINE_CHARS:
        lines = [line[:MAX_LINE_CHARS] for line in lines]
    return lines


def _merge(chunks: deque[tuple[str, bytes]], skip: int) -> list[tuple[str, bytes]]:
    """Consecutive chunks of one stream joined, the first ``skip`` bytes left out."""
    merged: list[tuple[str, bytes]] = []
    for stream, data in chunks:
        if skip > 0:
            data, skip = data[skip:], skip - len(data)
            if not data:
                continue
        if merged and merged[-1][0] == stream:
            merged[-1] = (stream, merged[-1][1] + data)
        else:
            merged.append((stream, data))
    return merged


class _Tail:
    """Keeps the last ``limit`` bytes written to it and counts what it dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.dropped = 0

    def write(self, data: bytes) -> None:
        if len(data) >= self.limit:  # a big chunk: no need to copy the old tail first
            self.dropped += len(self.buf) + len(data) - self.limit
            self.buf = bytearray(data[len(data) - self.limit :])
            return
        self.buf += data
        excess = len(self.buf) - self.limit
        if excess > 0:
            del self.buf[:excess]
            self.dropped += excess

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


def _widen_pipes(proc: asyncio.subprocess.Process) -> None:
    """Give the child's output pipes :data:`PIPE_BYTES` (Linux; the default is 64 KiB): a
    script that floods its output then wakes the agent once per megabyte, not per 64 KiB,
    which is what bounds the speed of reading it on a busy machine."""
    transport = getattr(proc, "_transport", None)
    if transport is None or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    for fd in (1, 2):
        pipe = transport.get_pipe_transport(fd)
        handle = pipe.get_extra_info("pipe") if pipe is not None else None
        if handle is not None:
            with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size
                fcntl.fcntl(handle.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _per_line(on_line: LineSink | None) -> LinesSink | None:
    if on_line is None:
        return None
    line_sink = on_line

    def sink(stream: str, lines: list[str]) -> None:
        for line in lines:
            line_sink(stream, line)

    return sink


async def _pump(
    reader: asyncio.StreamReader,
    tail: _Tail,
    stream: str,
    sink: LinesSink | None,
    budget: OutputBudget,
    pace: Pace | None,
) -> None:
    """Read one stream to its end: into the tail, and the complete lines of each chunk
    into ``sink`` while the budget lasts.  ``pace`` is awaited after each chunk that
    produced lines, so a reporter with no room stops the reading (and the child blocks on
    its full pipe)."""
    pending = b""
    while True:
        chunk = await reader.read(READ_BYTES)
        if not chunk:
            break
        tail.write(chunk)
        if sink is None:
            continue
        if budget.spent:
            budget.drop(stream, pending + chunk)
            pending = b""
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        admitted = budget.admit(stream, lines, sink)
        if admitted < len(lines):
            budget.drop(stream, b"\n".join([*lines[admitted:], pending]))
            pending = b""
        elif len(pending) > MAX_LINE_CHARS:  # one overlong line: its start only
            if not budget.admit(stream, [pending], sink):
                budget.drop(stream, pending)
            pending = b""
        if pace is not None:
            await pace()
    if pending and sink is not None and (budget.spent or not budget.admit(stream, [pending], sink)):
        budget.drop(stream, pending)


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _preexec(cgroups: Sequence[str], confinement: Confinement | None) -> Callable[[], None] | None:
    """Join the tracking cgroups, then apply the confinement (system calls only)."""
    confine = confinement.preexec() if confinement is not None else None
    if not cgroups:
        return confine
    paths = list(cgroups)

    def apply() -> None:
        for path in paths:
            join_cgroup(path)
        if confine is not None:
            confine()

    return apply


def _move(cgroups: Sequence[str], pid: int) -> None:
    """Move the waiting child into the run's tracking cgroups (before it runs anything)."""
    for path in cgroups:
        move_to_cgroup(path, pid)


def _resolve(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str] | None
) -> None:
    """Raise the :class:`OSError` that ``exec`` would, now, for a program that cannot start
    (missing, not executable, a ``#!`` interpreter that is missing): behind the gate the
    error would only show as exit code 126 or 127."""
    program = argv[0] if argv else ""
    if "/" in program:
        path: str | None = os.path.join(cwd, program) if cwd is not None else program
    else:
        path = shutil.which(program, path=env.get("PATH", os.defpath))
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", program)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, "Permission denied", program)
    head = b""
    with contextlib.suppress(OSError), open(path, "rb") as file:
        head = file.read(256)
    words = head[2:].split(b"\n", 1)[0].split() if head.startswith(b"#!") else []
    if words and not os.path.exists(words[0]):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", program)


async def _spawn(
    argv: Sequence[str],
    run: TrackedRun,
    *,
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    confinement: Confinement | None,
) -> asyncio.subprocess.Process:
    """Start ``argv`` held at the gate, journal who it is, then let it run.

    The child is a new session and waits in :data:`GATE` for a line on its stdin, which it
    gets only once :meth:`TrackedRun.spawned` has committed its pid and start time and the
    agent has moved it into the run's tracking cgroup (both at once: the journal's commit
    and the kernel's cgroup move each take milliseconds).  If the agent dies before, the
    child reads end of file and exits without running anything.  The move is the agent's,
    not the child's: with no ``preexec_fn`` (unless the confinement needs one) Python
    starts the child with ``vfork``, not a copy of the agent's memory.

    With a spare child in the run (the tracker keeps one ready, already in its cgroup) the
    spare becomes the run instead, and neither a fork nor a cgroup move is on the path.
    """
    child_env = dict(env) if env is not None else dict(os.environ)
    child_env.update(run.env)
    spare, run.spare = run.spare, None
    try:
        _resolve(argv, child_env, cwd)
        block = launcher.script(argv, child_env, cwd) if spare and confinement is None else None
        if block is not None:
            launcher.check_cwd(cwd)
    except BaseException:
        if spare is not None:
            await spare.discard()
        raise
    if spare is not None and block is not None:
        return await _start_spare(spare.proc, run, block)
    if spare is not None:  # not for this run: its cgroup is the run's, the child goes there
        await spare.discard()
    proc = await asyncio.create_subprocess_exec(
        GATE_SHELL,
        "-c",
        GATE,
        "deploy-gate",
        *argv,
        cwd=cwd,
        env=child_env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_preexec((), confinement),
        limit=READ_BYTES,  # the reader takes a whole 1 MiB pipe before it pauses
    )
    assert proc.stdin is not None
    try:
        run.spawned(proc.pid)
        if run.cgroups:
            await asyncio.gather(run.saved(), off_loop(_move, run.cgroups, proc.pid))
        else:
            await run.saved()
    except BaseException:
        _kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    with contextlib.suppress(ConnectionError):
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    proc.stdin.close()
    return proc


async def _start_spare(
    proc: asyncio.subprocess.Process, run: TrackedRun, block: bytes
) -> asyncio.subprocess.Process:
    """Make a spare shell (:mod:`deploy_core.agent.launcher`), already in the run's cgroup,
    the run: hand it the block that becomes the program, its pid journaled meanwhile (its
    cgroup finds it until that commit, see the launcher)."""
    stdin = proc.stdin
    assert stdin is not None
    try:
        run.spawned(proc.pid, journal=False)
        with contextlib.suppress(ConnectionError):
            stdin.write(block)
            await stdin.drain()
    except BaseException:
        _kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    stdin.close()
    return proc


async def run_process(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineSink | None = None,
    on_lines: LinesSink | None = None,
    tail_bytes: int = DEFAULT_TAIL_BYTES,
    kill_grace: float = KILL_GRACE,
    confinement: Confinement | None = None,
    output_limit: int | None = None,
    output_budget: OutputBudget | None = None,
    pace: Pace | None = None,
    tracking: TrackedRun | None = None,
    step_timeout: float | None = None,
) -> ProcessResult:
    """Run ``argv`` in its own session, at most ``timeout`` seconds.

    On timeout every process of the run gets SIGTERM, then SIGKILL after ``kill_grace``
    seconds: its process group and session, and what left them (found through the run's
    cgroup, or as orphans re-parented to the agent; see :mod:`deploy_core.agent.tracking`).
    When it exits by itself, what it left running (a service) stays.  ``env`` replaces the
    environment entirely when given.  ``on_line(stream, line)`` is called for each
    stdout/stderr line, or ``on_lines(stream, lines)`` once for the complete lines of each
    chunk read (far cheaper for a script that prints a lot).

    :param confinement: the user, rlimits and cgroup the child runs under.
    :param output_limit: at most this many bytes of output go to ``on_line``; after them one
        ``[output truncated after N bytes]`` line, and the rest only reaches the tails.
    :param output_budget: instead of ``output_limit``, a budget that may keep a tail of what
        went past it for the end (see :class:`OutputBudget`).
    :param pace: awaited after each chunk of output turned into lines; while it waits, the
        child's pipes are not read (back-pressure from wherever the lines go).
    :param tracking: the run as the agent's :class:`~deploy_core.agent.tracking.ProcessTracker`
        prepared it (cgroup, journal record); ``None`` tracks it by session and /proc only.
    :param step_timeout: the step's own timeout when ``timeout`` is shorter because of the
        deployment's deadline (see :meth:`ProcessResult.timeout_text`).
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    run = tracking or ProcessTracker().start_run(None, "adhoc")
    started = time.monotonic()
    try:
        proc = await _spawn(argv, run, cwd=cwd, env=env, confinement=confinement)
    except BaseException:
        run.finished()
        raise
    assert proc.stdout is not None and proc.stderr is not None
    _widen_pipes(proc)
    out, err = _Tail(tail_bytes), _Tail(tail_bytes)
    budget = output_budget if output_budget is not None else OutputBudget(output_limit)
    sink = on_lines if on_lines is not None else _per_line(on_line)
    pumps = [
        asyncio.ensure_future(_pump(proc.stdout, out, "stdout", sink, budget, pace)),
        asyncio.ensure_future(_pump(proc.stderr, err, "stderr", sink, budget, pace)),
    ]
    timed_out = False
    try:
        try:
            async with asyncio.timeout(timeout):  # no task of its own: no extra loop turn
                await proc.wait()
        except TimeoutError:
            timed_out = True
            # Everything of the run, escaped or not, even what ignores SIGTERM.
            await run.terminate(kill_grace)
            _kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        await asyncio.wait(pumps, timeout=DRAIN_AFTER_EXIT)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if sink is not None:
            budget.finish(sink)
        if proc.returncode is None:  # cancelled from outside: leave nothing running
            run.kill_now()
            _kill_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), kill_grace)
        run.finished()
    return ProcessResult(
        exit_code=proc.returncode,
        stdout_tail=out.text(),
        stderr_tail=err.text(),
        duration=time.monotonic() - started,
        timed_out=timed_out,
        truncated=bool(out.dropped or err.dropped),
        timeout=timeout,
        step_timeout=step_timeout,
    )
