"""Every process a deployment starts, found again: on a timeout, and after the agent restarts.

A script run is identified three ways, strongest first:

1. its **cgroup** (:mod:`deploy_core.agent.cgroup_tracking`), when the agent can make one:
   every process the run starts is a member, whatever it does with sessions;
2. its **process group and session**: the child is started as a session leader, so its pid
   is both ids, and the kernel does not give the number to another process while the group
   or session exists; the child's start time (``/proc/PID/stat`` field 22) tells a reused pid
   apart;
3. the **parent chain**: the agent is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so an
   orphan — the grandchild of a double fork — is re-parented to the agent instead of init,
   and stays findable while the agent lives; the agent reaps these orphans when they exit.

Before a child can run a line of the script, the journal holds its :class:`RunRecord`: the
cgroup (made before the fork), then the pid and start time (the child waits on a pipe until
they are written).  A restarted agent reads the records of the deployment it was running and
kills what is left (:meth:`ProcessTracker.kill_recorded`) before it reports or rolls back.

A marker variable (``DEPLOY_CENTER_RUN``) in the child's environment is only a last hint for
hosts without cgroups: a script can unset it for the programs it starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from deploy_core.agent import proctable
from deploy_core.agent.cgroup_tracking import (
    TrackingHierarchy,
    find_tracking_hierarchy,
    kill_all,
    members,
    off_loop,
)
from deploy_core.agent.launcher import READ_BYTES, Spare, clear_stale, journal_id, make_spare

log = logging.getLogger(__name__)

MARKER_ENV = "DEPLOY_CENTER_RUN"
RUNNING = "running"  # may have processes; killed on recovery
LEFT_RUNNING = "left_running"  # exited successfully and left processes behind (a service)
ENDED = "ended"  # nothing of it is left
POLL = 0.05
# SIGKILL rounds for a run without a cgroup whose processes keep forking.
KILL_ROUNDS = 100
_PR_SET_CHILD_SUBREAPER = 36
# Seconds a spare child waits for a run before it is dropped (see ProcessTracker.prime);
# ``None``: it waits until a run takes it or the agent stops.
SPARE_IDLE: float | None = None


@dataclass(frozen=True)
class RunRecord:
    """What identifies the processes of one script run; kept in the agent's journal.

    :param run: the run's name (unique within the deployment).
    :param token: the value of ``DEPLOY_CENTER_RUN`` in the child's environment.
    :param boot_id: the boot the pids below belong to.
    :param cgroup: the run's cgroup directory, when one was made.
    :param pid: the child's pid, which is also its process group and session id.
    :param start_ticks: the child's start time (``/proc/PID/stat`` field 22).
    :param state: ``running``, ``left_running`` or ``ended``.
    :param left: ``(pid, start_ticks)`` of each process it left running.
    """

    run: str
    token: str
    boot_id: str
    cgroup: str | None = None
    pid: int | None = None
    start_ticks: int | None = None
    state: str = RUNNING
    left: tuple[tuple[int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The record as the journal stores it."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """A record read back from the journal."""
        return cls(**{**data, "left": tuple((int(p), int(t)) for p, t in data.get("left", ()))})


class RunLedger(Protocol):
    """Where run records are kept durably (the agent's journal).  A ledger may also have
    ``submit_run(deploy_id, record, at_once=...)``: the same write, returning a
    :class:`concurrent.futures.Future` done once it is committed, without waiting."""

    def record_run(self, deploy_id: str, record: dict[str, Any]) -> None:
        """Add or replace (by ``run``) one record of ``deploy_id``, committed on return."""

    def run_cgroups(self) -> set[str]:
        """The cgroup of every run record kept (of any deployment)."""

    @property
    def path(self) -> Path:
        """The ledger's file: what names this agent's spare cgroups (launcher.journal_id)."""


def become_subreaper(on: bool = True) -> str | None:
    """Make this process the child subreaper of everything it starts (or no longer, with
    ``on`` false); ``None``, or why not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
            return f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}"
    except (OSError, AttributeError) as exc:
        return f"prctl is not available: {exc}"
    return None


class ProcessTracker:
    """The agent's view of every script run it started (one per agent).

    :param hierarchy: where run cgroups are made; ``None`` tracks by session, parent chain
        and marker only.
    :param ledger: the journal the records go to before a child runs; ``None`` keeps none
        (a run that outlives the agent is then found by nothing).
    """

    def __init__(
        self,
        hierarchy: TrackingHierarchy | None = None,
        ledger: RunLedger | None = None,
        *,
        reason: str = "",
    ) -> None:
        self.hierarchy = hierarchy
        self.ledger = ledger
        self.reason = reason
        self.subreaper = False
        # Children of the agent being waited for by run_process, by pid.
        self._active: dict[int, TrackedRun] = {}
        # (pid, start_ticks) of what finished runs left running: never another run's orphan.
        self._left: set[tuple[int, int]] = set()
        # The runs that left something running, until it has exited.
        self._left_runs: dict[tuple[str | None, str], RunRecord] = {}
        # A shell waiting in a cgroup of its own for the next run (see launcher), once
        # prime() was called; and the task making the next one.
        self._pooling = False
        self._spare: Spare | None = None
        self._refill: asyncio.Task[None] | None = None
        # Its spare cgroups' names carry it: only this journal's next agent kills in them.
        self._journal_id = journal_id(ledger.path) if ledger is not None else ""

    @classmethod
    def detect(cls, ledger: RunLedger | None, setting: str = "auto") -> ProcessTracker:
        """A tracker using the best cgroup hierarchy this host lets the agent write."""
        hierarchy, reason = find_tracking_hierarchy(setting)
        return cls(hierarchy, ledger, reason=reason)

    def describe(self) -> str:
        """What tracking does here, for the agent's log."""
        how = (
            f"cgroups ({self.hierarchy.describe()})"
            if self.hierarchy is not None
            else f"sessions and /proc only ({self.reason})"
        )
        reaper = "; orphans re-parent to the agent" if self.subreaper else ""
        return f"process tracking: {how}{reaper}"

    def enable_subreaper(self) -> None:
        """Become the child subreaper (call once, in the agent process)."""
        why = become_subreaper(True)
        self.subreaper = why is None
        if why:
            log.warning("orphans of scripts re-parent to init, not the agent: %s", why)

    def prime(self, *, now: bool = True) -> None:
        """Keep a spare child ready in its own tracking cgroup from now on, so a run starts
        without a cgroup move on its path (:mod:`deploy_core.agent.launcher`); call on the
        agent's event loop.  Nothing without a tracking hierarchy.

        :param now: make the first spare now; else the first run (which starts the classic
            way) makes it, so an agent that never deploys never holds one."""
        if self.hierarchy is None or self._pooling:
            return
        self._pooling = True
        # Before the journaled runs are recovered: a spare-started run whose record an
        # agent that died never committed is found by its spare's cgroup alone.
        recorded = self.ledger.run_cgroups() if self.ledger is not None else set()
        killed = clear_stale(self.hierarchy, self._journal_id, recorded)
        if killed:
            log.warning(
                "killed %d process(es) of run(s) an earlier agent started but had not "
                "journaled yet: %s",
                len(killed),
                ", ".join(map(str, killed)),
            )
        if now:
            self._fill()

    async def spare_ready(self) -> bool:
        """Wait until the spare being made is ready; whether one waits now."""
        refill = self._refill
        if refill is not None:
            await asyncio.shield(refill)
        return self._spare is not None and self._spare.usable()

    def close(self) -> None:
        """Stop keeping a spare; kill the one waiting."""
        self._pooling = False
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard_now()

    def _fill(self) -> None:
        if not self._pooling or self._spare is not None or self._refill is not None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: no spare
            self._refill = asyncio.get_running_loop().create_task(self._make_spare())

    async def _make_spare(self) -> None:
        try:
            assert self.hierarchy is not None
            spare = await make_spare(self.hierarchy, READ_BYTES, self._journal_id)
        except Exception as exc:
            log.warning("no spare child for the next run (it starts the classic way): %s", exc)
            return
        finally:
            self._refill = None
        if self._pooling and self._spare is None:
            self._spare = spare
            if SPARE_IDLE is not None:
                # Unused for a while, it goes; the next run starts the classic way and makes
                # another.
                spare.loop.call_later(SPARE_IDLE, self._expire, spare)
        else:
            await self._drop(spare)

    def _expire(self, spare: Spare) -> None:
        if self._spare is spare:
            self._spare = None
            spare.loop.create_task(self._drop(spare))

    @staticmethod
    async def _drop(spare: Spare) -> None:
        await spare.discard()
        with contextlib.suppress(OSError):
            spare.cgroup.rmdir()

    def _take_spare(self) -> Spare | None:
        spare, self._spare = self._spare, None
        if spare is not None and not spare.usable():
            spare.discard_now()
            spare = None
        self._fill()
        return spare

    def disable_subreaper(self) -> None:
        """Stop adopting orphans (the agent stops; its process may go on, as in tests)."""
        if self.subreaper:
            become_subreaper(False)
            self.subreaper = False
            self.reap_orphans()

    # ------------------------------------------------------------------ runs

    def start_run(
        self, deploy_id: str | None, name: str, *, limits_cgroup: str | None = None
    ) -> TrackedRun:
        """Prepare one run: its cgroup made and its record journaled, before the fork.

        :param deploy_id: the deployment it belongs to; ``None`` journals nothing.
        :param limits_cgroup: the cgroup v2 the constraints put the run in; on a v2 hierarchy
            a process is in one cgroup only, so that one also tracks it.
        """
        record = RunRecord(run=name, token=uuid.uuid4().hex, boot_id=proctable.boot_id())
        join: list[str] = []
        spare = None
        if self.hierarchy is not None and not (limits_cgroup and self.hierarchy.version == 2):
            spare = self._take_spare()
            try:
                path = spare.cgroup if spare else self.hierarchy.create(deploy_id or "adhoc", name)
                join.append(str(path))
                record = replace(record, cgroup=str(path))
            except OSError as exc:
                log.warning("run %s has no tracking cgroup: %s", name, exc)
        elif limits_cgroup:
            record = replace(record, cgroup=limits_cgroup)
        run = TrackedRun(self, deploy_id, record, tuple(join), spare=spare)
        # Not waited for: the child cannot run before its pid is journaled (the gate), and
        # that later record is committed with or after this one (it joins the next write).
        run.save(wait=False, at_once=False)
        return run

    def kill_recorded(self, records: Iterable[RunRecord], grace: float) -> list[str]:
        """Kill what is left of the recorded runs (after a restart): SIGTERM, at most
        ``grace`` seconds, then SIGKILL.  Returns ``"pid (name)"`` of each process found."""
        records = list(records)
        found = {pid: info for r in records for pid, info in _find(r).items()}
        if not found:
            self.forget(records)
            return []
        for pid in found:
            _signal(pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and any(_find(r) for r in records):
            time.sleep(POLL)
        for _round in range(KILL_ROUNDS):
            left = {pid: i for r in records for pid, i in _find(r).items()}
            for r in records:
                if r.cgroup and Path(r.cgroup).is_dir():
                    kill_all(Path(r.cgroup))
            if not left:
                break
            for pid in left:
                _signal(pid, signal.SIGKILL)
            time.sleep(POLL)
        self.forget(records)
        return [f"{pid} ({info.comm})" for pid, info in sorted(found.items())]

    def forget(self, records: Iterable[RunRecord]) -> None:
        """Remove the empty cgroups of finished runs (ones still holding a service stay)."""
        for r in records:
            if r.cgroup and self.hierarchy is not None and self.hierarchy.owns(Path(r.cgroup)):
                self.hierarchy.remove(Path(r.cgroup))

    def forget_soon(self, records: Iterable[RunRecord]) -> None:
        """:meth:`forget`, on a worker thread when called on an event loop: removing a
        cgroup waits for the kernel's ``cgroup_mutex`` (held for an RCU grace period by any
        move, such as the next spare's), which the run's end need not wait for."""
        records = list(records)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.forget(records)
            return
        off_loop(self.forget, records)

    def ended(self, record: RunRecord) -> bool:
        """Whether nothing of a finished run is left (its service, if any, has exited)."""
        return not _find(record)

    def note_left(self, deploy_id: str, record: RunRecord) -> None:
        """Watch a journaled run's left-running processes (found again after a restart)."""
        self._left_runs[(deploy_id, record.run)] = record
        self._left.update(record.left)

    def settle_left(self) -> int:
        """Forget the runs whose left-running processes have all exited since: their empty
        cgroups are removed and their journal records dropped.  Returns how many."""
        settled = 0
        for key, record in list(self._left_runs.items()):
            if not self.ended(record):
                continue
            del self._left_runs[key]
            self.forget([record])
            deploy_id = key[0]
            if self.ledger is not None and deploy_id is not None:
                self.ledger.record_run(deploy_id, {**record.to_json(), "state": ENDED})
            settled += 1
        return settled

    def reap_orphans(self) -> int:
        """Collect the exit status of orphans the agent adopted as subreaper (never of a
        child someone waits for); how many were reaped."""
        my_sid, reaped = os.getsid(0), 0
        # What finished runs left and has ended since (in place: runs add to it meanwhile).
        self._left -= {entry for entry in self._left if not proctable.is_same(*entry)}
        for info in proctable.own_children():
            if (
                info.zombie
                and info.pid not in self._active
                and info.sid != my_sid
                and (self._spare is None or info.pid != self._spare.proc.pid)
            ):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.pid, os.WNOHANG)
                    reaped += 1
        return reaped

    def _adopted(self, run: TrackedRun, table: list[proctable.ProcInfo]) -> set[int]:
        """Orphans the agent adopted that belong to ``run`` (a run without a cgroup): started
        after it, not left running by an earlier run, and carrying its marker — or any such
        when it is the only run going."""
        if not self.subreaper or (run.record.cgroup and Path(run.record.cgroup).is_dir()):
            return set()
        me, my_sid, since = os.getpid(), os.getsid(0), run.record.start_ticks or 0
        alone = len(self._active) <= 1
        return {
            i.pid
            for i in table
            if i.ppid == me
            and i.pid not in self._active
            and i.sid != my_sid
            and i.start_ticks >= since
            and (i.pid, i.start_ticks) not in self._left
            and (alone or proctable.has_env(i.pid, MARKER_ENV, run.record.token))
        }


@dataclass
class TrackedRun:
    """One script run while it goes: what :func:`~deploy_core.agent.process.run_process`
    asks to join, record, kill and forget."""

    tracker: ProcessTracker
    deploy_id: str | None
    record: RunRecord
    cgroups: tuple[str, ...] = ()
    #: A spare child already in the run's cgroup (``cgroups``), to start the run with.
    spare: Spare | None = field(default=None, repr=False)
    _done: bool = field(default=False, repr=False)
    _saved: concurrent.futures.Future[None] | None = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Variables the child's environment gets."""
        return {MARKER_ENV: self.record.token}

    def save(self, *, wait: bool = True, at_once: bool = True) -> None:
        """Journal the record as it is now: committed on return, or with ``wait`` false
        once :meth:`saved` returns (when the ledger can write without waiting; ``at_once``
        false lets the write join what the agent writes next, see
        :class:`~deploy_core.agent.journal.Journal`)."""
        ledger = self.tracker.ledger
        if ledger is None or self.deploy_id is None:
            return
        submit = getattr(ledger, "submit_run", None)
        if wait or submit is None:
            ledger.record_run(self.deploy_id, self.record.to_json())
            return
        # At once (the default): its disk time overlaps with starting the child.
        self._saved = submit(self.deploy_id, self.record.to_json(), at_once=at_once)
        self._saved.add_done_callback(_log_unsaved)

    async def saved(self) -> None:
        """Return once the record saved last is committed (raises if it could not be)."""
        if self._saved is not None:
            # Shielded: a wait cancelled (the deployment's) must not cancel the write.
            await asyncio.shield(asyncio.wrap_future(self._saved))

    def spawned(self, pid: int, *, journal: bool = True) -> None:
        """The child exists (and waits): note its pid and start time, and journal them.  A
        child started the classic way may run only once that is committed (:meth:`saved`).
        ``journal`` false: a spare-started run, which its spare's cgroup (journaled by
        :meth:`ProcessTracker.start_run`, and found by the next agent even before that,
        see the launcher) identifies: the pid goes to the journal with the run's end."""
        info = proctable.read(pid)
        self.record = replace(self.record, pid=pid, start_ticks=info.start_ticks if info else None)
        self.tracker._active[pid] = self
        if journal:
            self.save(wait=False)

    def processes(self) -> set[int]:
        """The live processes of this run now."""
        return set(self._live())

    def _live(self) -> dict[int, proctable.ProcInfo]:
        if self.record.cgroup and Path(self.record.cgroup).is_dir():
            return _find(self.record)  # the cgroup's members: no need to read every process
        table = proctable.processes()
        found = _find(self.record, table)
        by_pid = {i.pid: i for i in table if not i.zombie}
        adopted = proctable.descendants(self.tracker._adopted(self, table), table)
        found.update({p: by_pid[p] for p in adopted if p in by_pid})
        found.pop(os.getpid(), None)
        return found

    async def terminate(self, grace: float) -> set[int]:
        """SIGTERM every process of the run, SIGKILL what is left after ``grace`` seconds
        (a cgroup's members at once, race-free); returns the pids signalled."""
        seen = await asyncio.to_thread(self.processes)
        for pid in seen:
            _signal(pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and seen:
            await asyncio.sleep(POLL)
            if not await asyncio.to_thread(self.processes):
                return seen
        if self.record.pid is not None:
            # The leader's process group first, in one kernel call: killed one by one (a v1
            # pids cgroup has no freezer), a shell could see its child die and exit 0 first.
            # Safe from pid reuse: the caller has not reaped the leader yet.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.record.pid, signal.SIGKILL)
        for _round in range(KILL_ROUNDS):
            if self.record.cgroup:
                seen |= await asyncio.to_thread(kill_all, Path(self.record.cgroup))
            left = await asyncio.to_thread(self.processes)
            if not left:
                break
            seen |= left
            for pid in left:
                _signal(pid, signal.SIGKILL)
            await asyncio.sleep(POLL)
        return seen

    def kill_now(self) -> None:
        """SIGKILL every process of the run at once (the run was cancelled)."""
        if self.record.cgroup and Path(self.record.cgroup).is_dir():
            kill_all(Path(self.record.cgroup))
        for pid in self.processes():
            _signal(pid, signal.SIGKILL)

    def finished(self) -> list[proctable.ProcInfo]:
        """The run is over: note what it left running (a service stays) and forget the rest.
        Returns the processes left."""
        if self._done:
            return []
        self._done = True
        if self.record.pid is not None:
            self.tracker._active.pop(self.record.pid, None)
        live = self._live()
        left = [live[p] for p in sorted(live)]
        self.record = replace(
            self.record,
            state=LEFT_RUNNING if left else ENDED,
            left=tuple((i.pid, i.start_ticks) for i in left),
        )
        self.tracker._left.update(self.record.left)
        # Not waited for: whatever reports the end is committed after it (in one group).
        self.save(wait=False, at_once=False)
        if left:
            self.tracker._left_runs[(self.deploy_id, self.record.run)] = self.record
        else:
            self.tracker.forget_soon([self.record])
        return left


def _find(
    record: RunRecord, table: list[proctable.ProcInfo] | None = None
) -> dict[int, proctable.ProcInfo]:
    """The live processes of a recorded run: its cgroup's members when the cgroup exists
    (the kernel's word), else its session and process group, what it was noted to leave
    running, the carriers of its marker, and their descendants — all started no earlier
    than the run, in this boot."""
    if record.boot_id and record.boot_id != proctable.boot_id():
        return {}
    if record.cgroup and Path(record.cgroup).is_dir():
        infos = [proctable.read(pid) for pid in members(Path(record.cgroup))]
        return {i.pid: i for i in infos if i is not None and not i.zombie}
    table = proctable.processes() if table is None else table
    by_pid = {i.pid: i for i in table if not i.zombie}
    since = record.start_ticks
    roots: set[int] = set()
    leader = by_pid.get(record.pid) if record.pid is not None else None
    # A living process with the leader's pid but another start time: the pid was reused, and
    # the group and session of that number are someone else's.
    if record.pid is not None and (leader is None or leader.start_ticks == since):
        roots |= {i.pid for i in by_pid.values() if record.pid in (i.pgid, i.sid)}
    roots |= {p for p, t in record.left if p in by_pid and by_pid[p].start_ticks == t}
    # Only what started since the run can carry its marker: the environments of the rest
    # are not read.
    roots |= {
        p
        for p, i in by_pid.items()
        if (since is None or i.start_ticks >= since)
        and proctable.has_env(p, MARKER_ENV, record.token)
    }
    found = proctable.descendants(roots, list(by_pid.values()))
    return {
        p: by_pid[p]
        for p in found
        if p in by_pid and p != os.getpid() and (since is None or by_pid[p].start_ticks >= since)
    }


def _log_unsaved(done: concurrent.futures.Future[None]) -> None:
    error = done.exception()
    if error is not None:
        log.error("a run record was not journaled: %s", error)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
