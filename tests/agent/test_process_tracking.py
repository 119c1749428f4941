"""Every process a script run starts dies with it on a timeout, escaped or not; what it leaves
on success stays; who it is is journaled before it runs.  Real processes, real cgroups
(v2 and v1, as this host has them), a real journal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import missing_part

from deploy_core.agent import proctable
from deploy_core.agent.cgroup_tracking import find_tracking_hierarchy, members
from deploy_core.agent.journal import Journal
from deploy_core.agent.process import GATE, GATE_SHELL, run_process
from deploy_core.agent.tracking import (
    ENDED,
    LEFT_RUNNING,
    MARKER_ENV,
    RUNNING,
    ProcessTracker,
    RunRecord,
)
from deploy_core.models import DeployCommand

MODES = ["v2", "freezer", "pids", "off"]


@pytest.fixture(params=MODES)
def tracker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessTracker]:
    """A tracker on one cgroup hierarchy (or none: sessions and /proc only), journaling."""
    hierarchy, reason = find_tracking_hierarchy(request.param)
    if request.param != "off" and hierarchy is None:
        missing_part(f"cgroup hierarchy {request.param} not usable here: {reason}")
    journal = Journal(tmp_path / "journal.db")
    journal.accept(command("d1"))
    tracker = ProcessTracker(hierarchy, journal, reason=reason)
    yield tracker
    # Whatever a test left (a service, a cgroup) goes, as on an agent's recovery.
    tracker.kill_recorded([RunRecord.from_json(r) for r in journal.runs("d1")], grace=0)
    journal.close()


async def committed(tracker: ProcessTracker) -> None:
    """Wait until what the tracker submitted to its journal is committed."""
    if isinstance(tracker.ledger, Journal):
        await asyncio.wrap_future(tracker.ledger.barrier())


def command(deploy_id: str) -> DeployCommand:
    return DeployCommand(
        deploy_id=deploy_id, command_type="deploy.test", params={}, expires_at=time.time() + 60
    )


def alive(pid: int) -> bool:
    info = proctable.read(pid)
    return info is not None and not info.zombie


def wait_for_file(path: Path, seconds: float = 30.0) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} was never written")


def removed(path: Path, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while path.exists() and time.monotonic() < end:
        time.sleep(0.02)
    assert not path.exists(), f"{path} was never removed"


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def test_a_child_ignoring_sigterm_dies_on_timeout(
    tracker: ProcessTracker, tmp_path: Path
) -> None:
    script = (
        f"trap '' TERM; echo $$ > {tmp_path}/main.pid; "
        f"sleep 60 & echo $! > {tmp_path}/child.pid; wait"
    )
    run = tracker.start_run("d1", "stubborn")
    result = await run_process(["/bin/sh", "-c", script], timeout=1.0, kill_grace=0.3, tracking=run)
    assert result.timed_out and result.exit_code == -signal.SIGKILL
    for name in ("main.pid", "child.pid"):
        pid = int((tmp_path / name).read_text())
        assert not alive(pid), f"{name} {pid} survived the timeout"
    assert run.record.state == ENDED


async def test_an_escapee_with_its_own_session_dies_on_timeout(
    tracker: ProcessTracker, tmp_path: Path
) -> None:
    # setsid + double fork: a new session and process group, its parent gone before the
    # timeout.  It keeps the marker variable here; the cgroup modes do not need it (below).
    script = textwrap.dedent(
        f"""
        (setsid sh -c 'trap "" TERM; echo $$ > {tmp_path}/escaped.pid; exec sleep 60' &)
        sleep 60
        """
    )
    run = tracker.start_run("d1", "escape")
    result = await run_process(["/bin/sh", "-c", script], timeout=1.5, kill_grace=0.3, tracking=run)
    assert result.timed_out
    escaped = int(wait_for_file(tmp_path / "escaped.pid"))
    try:
        assert proctable.read(escaped) is None or not alive(escaped)
    finally:
        kill(escaped)


@pytest.mark.parametrize("mode", ["v2", "freezer", "pids"])
async def test_a_cgroup_finds_an_escapee_that_also_dropped_the_marker(
    mode: str, tmp_path: Path
) -> None:
    hierarchy, reason = find_tracking_hierarchy(mode)
    if hierarchy is None:
        missing_part(f"cgroup hierarchy {mode} not usable here: {reason}")
    script = textwrap.dedent(
        f"""
        unset {MARKER_ENV}
        (setsid sh -c 'trap "" TERM; echo $$ > {tmp_path}/escaped.pid; exec sleep 60' &)
        sleep 60
        """
    )
    run = ProcessTracker(hierarchy).start_run("d-cg", "escape")
    assert run.record.cgroup is not None
    result = await run_process(["/bin/sh", "-c", script], timeout=1.5, kill_grace=0.3, tracking=run)
    escaped = int(wait_for_file(tmp_path / "escaped.pid"))
    try:
        assert result.timed_out
        assert not alive(escaped)
        removed(Path(run.record.cgroup))  # empty, so removed (soon after the run)
    finally:
        kill(escaped)


def test_as_subreaper_the_agent_finds_an_unmarked_escapee_without_cgroups(tmp_path: Path) -> None:
    # Its own process, as the agent is: PR_SET_CHILD_SUBREAPER holds for the whole process.
    program = textwrap.dedent(
        f"""
        import asyncio, json
        from deploy_core.agent.process import run_process
        from deploy_core.agent.tracking import ProcessTracker
        tracker = ProcessTracker(None)
        tracker.enable_subreaper()
        script = '''unset {MARKER_ENV}
        (setsid sh -c 'trap "" TERM; echo $$ > {tmp_path}/escaped.pid; exec sleep 60' &)
        sleep 60'''
        result = asyncio.run(run_process(["/bin/sh", "-c", script], timeout=1.5,
                                         kill_grace=0.3, tracking=tracker.start_run(None, "r")))
        print(json.dumps({{"subreaper": tracker.subreaper, "timed_out": result.timed_out}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    escaped = int(wait_for_file(tmp_path / "escaped.pid"))
    try:
        assert json.loads(done.stdout) == {"subreaper": True, "timed_out": True}
        assert not alive(escaped)
    finally:
        kill(escaped)


async def test_a_service_left_on_success_survives_and_is_noted(
    tracker: ProcessTracker, tmp_path: Path
) -> None:
    script = (
        f"setsid sh -c 'echo $$ > {tmp_path}/svc.pid; exec sleep 60' "
        "</dev/null >/dev/null 2>&1 &\n"
        f"while [ ! -s {tmp_path}/svc.pid ]; do sleep 0.02; done\nexit 0\n"
    )
    run = tracker.start_run("d1", "service")
    result = await run_process(["/bin/sh", "-c", script], timeout=30, tracking=run)
    service = int((tmp_path / "svc.pid").read_text())
    try:
        assert result.exit_code == 0 and not result.timed_out
        assert alive(service)
        time.sleep(0.3)
        assert alive(service)  # nobody killed it after the run either
        assert run.record.state == LEFT_RUNNING
        assert service in [pid for pid, _ticks in run.record.left]
        if run.record.cgroup:
            assert service in members(Path(run.record.cgroup))
        await committed(tracker)
        journaled = [RunRecord.from_json(r) for r in tracker.ledger.runs("d1")]  # type: ignore[union-attr]
        assert [r.state for r in journaled] == [LEFT_RUNNING]
    finally:
        kill(service)


async def test_the_identity_is_journaled_before_the_child_runs(
    tracker: ProcessTracker, tmp_path: Path
) -> None:
    # The child's first act: read the journal from outside and say what it finds.
    program = textwrap.dedent(
        f"""
        import json, os, sqlite3
        db = sqlite3.connect({str(tmp_path / "journal.db")!r})
        (runs,) = db.execute("SELECT processes FROM deployments WHERE deploy_id = 'd1'").fetchone()
        print(json.dumps({{"pid": os.getpid(), "sid": os.getsid(0), "runs": json.loads(runs)}}))
        """
    )
    run = tracker.start_run("d1", "first")
    result = await run_process([sys.executable, "-c", program], timeout=60, tracking=run)
    assert result.exit_code == 0, result.stderr_tail
    seen = json.loads(result.stdout_tail)
    (record,) = seen["runs"]
    assert record["run"] == "first" and record["state"] == RUNNING
    assert record["pid"] == seen["pid"] == seen["sid"]  # its own session, journaled
    assert record["start_ticks"] == run.record.start_ticks
    assert record["token"] == run.record.token
    assert record["cgroup"] == (str(run.record.cgroup) if tracker.hierarchy else None)
    await committed(tracker)  # the end record goes with the next write waited for
    assert tracker.ledger.runs("d1") == []  # type: ignore[union-attr]  # ended: forgotten


def test_a_child_whose_agent_died_at_the_gate_never_runs(tmp_path: Path) -> None:
    # The gate's stdin closes without the go line (the agent died before journaling).
    marker = tmp_path / "ran"
    done = subprocess.run(
        [GATE_SHELL, "-c", GATE, "deploy-gate", "touch", str(marker)],
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    assert done.returncode == 125
    assert not marker.exists()


def test_recovery_kills_a_recorded_session_but_not_a_reused_pid(tmp_path: Path) -> None:
    ours = subprocess.Popen(["sleep", "60"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        mine = proctable.read(ours.pid)
        theirs = proctable.read(stranger.pid)
        assert mine is not None and theirs is not None
        boot = proctable.boot_id()
        records = [
            RunRecord("r1", "t1", boot, pid=ours.pid, start_ticks=mine.start_ticks),
            # The stranger holds the recorded pid, but started at another time: not ours.
            RunRecord("r2", "t2", boot, pid=stranger.pid, start_ticks=theirs.start_ticks - 1),
        ]
        killed = ProcessTracker().kill_recorded(records, grace=0.5)
        assert killed == [f"{ours.pid} (sleep)"]
        assert ours.wait(10) == -signal.SIGTERM
        assert stranger.poll() is None
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait()


def test_an_old_journal_gains_the_processes_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE deployments (deploy_id TEXT PRIMARY KEY, command_type TEXT NOT NULL,
            command TEXT NOT NULL, state TEXT NOT NULL, stage TEXT NOT NULL DEFAULT '',
            report_seq INTEGER NOT NULL DEFAULT -1, rollback_state TEXT, final_status TEXT,
            accepted_at REAL NOT NULL, started_at REAL, finished_at REAL);
        """
    )
    db.execute(
        "INSERT INTO deployments (deploy_id, command_type, command, state, accepted_at)"
        " VALUES ('old', 'deploy.test', ?, 'started', 0)",
        (command("old").model_dump_json(),),
    )
    db.commit()
    db.close()
    journal = Journal(path)
    try:
        assert journal.runs("old") == []
        record = RunRecord("r", "t", "b", pid=1, start_ticks=2)
        journal.record_run("old", record.to_json())
        assert [RunRecord.from_json(r) for r in journal.runs("old")] == [record]
    finally:
        journal.close()


@pytest.mark.parametrize("mode", ["v2", "freezer", "pids"])
async def test_the_child_runs_in_its_run_cgroup(mode: str) -> None:
    hierarchy, reason = find_tracking_hierarchy(mode)
    if hierarchy is None:
        missing_part(f"cgroup hierarchy {mode} not usable here: {reason}")
    run = ProcessTracker(hierarchy).start_run("d-in", "inside")
    result = await run_process(["/bin/sh", "-c", "cat /proc/self/cgroup"], timeout=30, tracking=run)
    assert result.exit_code == 0, result.stderr_tail
    want = ("0", "") if mode == "v2" else (None, mode)
    lines = [line.split(":", 2) for line in result.stdout_tail.splitlines()]
    (path,) = [
        p
        for number, controllers, p in lines
        if (want[0] is None or number == want[0])
        and (controllers.split(",") == [""] if mode == "v2" else mode in controllers.split(","))
    ]
    assert path.endswith("/deploy-center/d-in/inside")


async def test_a_left_service_is_noted_until_it_exits(
    tracker: ProcessTracker, tmp_path: Path
) -> None:
    script = (
        f"setsid sh -c 'echo $$ > {tmp_path}/svc.pid; exec sleep 60' "
        "</dev/null >/dev/null 2>&1 &\n"
        f"while [ ! -s {tmp_path}/svc.pid ]; do sleep 0.02; done\n"
    )
    run = tracker.start_run("d1", "service")
    await run_process(["/bin/sh", "-c", script], timeout=30, tracking=run)
    service = int((tmp_path / "svc.pid").read_text())
    journal = tracker.ledger
    assert isinstance(journal, Journal)
    await committed(tracker)
    try:
        assert journal.with_runs() == ["d1"]
        assert not tracker.ended(run.record)
    finally:
        kill(service)
    end = time.monotonic() + 30
    while alive(service) and time.monotonic() < end:
        time.sleep(0.02)
    assert tracker.ended(run.record)
    assert tracker.settle_left() == 1
    assert journal.with_runs() == []
    if run.record.cgroup:
        assert not Path(run.record.cgroup).exists()


def test_the_subreaper_collects_the_orphans_it_adopted(tmp_path: Path) -> None:
    # Its own process, as the agent is: a run leaves a short-lived escapee, which the
    # process adopts and, once it exits, reaps; nothing stays a zombie.
    program = textwrap.dedent(
        f"""
        import asyncio, json, os, time
        from deploy_core.agent import proctable
        from deploy_core.agent.process import run_process
        from deploy_core.agent.tracking import ProcessTracker
        tracker = ProcessTracker(None)
        tracker.enable_subreaper()
        script = ("setsid sh -c 'echo $$ > {tmp_path}/orphan.pid; sleep 0.3' "
                  "</dev/null >/dev/null 2>&1 &")
        asyncio.run(run_process(["/bin/sh", "-c", script], timeout=30))
        while not os.path.exists("{tmp_path}/orphan.pid"):
            time.sleep(0.01)
        time.sleep(0.05)
        orphan = int(open("{tmp_path}/orphan.pid").read())
        adopted = proctable.read(orphan).ppid == os.getpid()
        end = time.monotonic() + 30
        while not proctable.read(orphan).zombie and time.monotonic() < end:
            time.sleep(0.02)
        reaped = tracker.reap_orphans()
        print(json.dumps({{"adopted": adopted, "reaped": reaped,
                           "gone": proctable.read(orphan) is None}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"adopted": True, "reaped": 1, "gone": True}


async def test_a_job_in_its_own_process_group_dies_on_timeout(
    tracker: ProcessTracker, tmp_path: Path
) -> None:
    # set -m: every background job gets a process group of its own (same session).
    script = (
        f"set -m\nsh -c 'trap \"\" TERM; echo $$ > {tmp_path}/job.pid; exec sleep 60' &\nsleep 60\n"
    )
    run = tracker.start_run("d1", "jobs")
    result = await run_process(["/bin/sh", "-c", script], timeout=1.5, kill_grace=0.3, tracking=run)
    job = int(wait_for_file(tmp_path / "job.pid"))
    try:
        assert result.timed_out
        assert not alive(job)
    finally:
        kill(job)
