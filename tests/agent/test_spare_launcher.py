"""A run started from the spare child the tracker keeps ready in its own cgroup
(deploy_core.agent.launcher): the program gets exactly what a classic start gives it, is in
its run's cgroup and journaled before it runs a line, and is killed with everything it
started on a timeout or after the agent was killed.  Real processes, real cgroups (as this
host has them), a real journal; the "agent" that is killed is a real process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import missing_part

from deploy_core.agent import proctable
from deploy_core.agent import tracking as tracking_module
from deploy_core.agent.cgroup_tracking import find_tracking_hierarchy, members
from deploy_core.agent.journal import Journal
from deploy_core.agent.launcher import POOL_PREFIX, clear_stale, make_spare
from deploy_core.agent.process import READ_BYTES, run_process
from deploy_core.agent.tracking import ENDED, ProcessTracker, RunRecord
from deploy_core.models import DeployCommand

MODES = ["v2", "freezer", "pids"]
WAIT = 30.0
# What the program reports about itself: its cgroups, directory, environment, arguments,
# and whether its stdin is at its end (/dev/null).
SELF_REPORT = (
    "cat /proc/self/cgroup; echo; pwd; echo; env | sort; echo; "
    'printf "%s|" "$0" "$@"; echo; if read -r _; then echo stdin-open; else echo stdin-eof; fi'
)
ENV = {"PATH": "/usr/bin:/bin", "QUOTED": 'it\'s "x" $HOME `id`\nline two', "EMPTY": ""}
ARGS = ["a 'b", "c\nd", "", "$(touch /tmp/never-run)"]


def command(deploy_id: str) -> DeployCommand:
    return DeployCommand(
        deploy_id=deploy_id, command_type="deploy.test", params={}, expires_at=time.time() + 60
    )


@pytest.fixture(params=MODES)
async def primed(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ProcessTracker]:
    hierarchy, reason = find_tracking_hierarchy(request.param)
    if hierarchy is None:
        missing_part(f"cgroup hierarchy {request.param} not usable here: {reason}")
    journal = Journal(tmp_path / "journal.db")
    journal.accept(command("d1"))
    tracker = ProcessTracker(hierarchy, journal)
    tracker.prime()
    assert await asyncio.wait_for(tracker.spare_ready(), WAIT)
    yield tracker
    tracker.close()
    tracker.kill_recorded([RunRecord.from_json(r) for r in journal.runs("d1")], grace=0)
    journal.close()


def alive(pid: int) -> bool:
    info = proctable.read(pid)
    return info is not None and not info.zombie


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def wait_for_file(path: Path, seconds: float = WAIT) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} was never written")


async def report_of(tracker: ProcessTracker, name: str, cwd: Path) -> tuple[RunRecord, list[str]]:
    run = tracker.start_run("d1", name)
    result = await run_process(
        ["/bin/sh", "-c", SELF_REPORT, *ARGS], timeout=WAIT, tracking=run, env=ENV, cwd=cwd
    )
    assert result.exit_code == 0, result.stderr_tail
    marker = f"DEPLOY_CENTER_RUN={run.record.token}"
    parts = result.stdout_tail.replace(marker, "DEPLOY_CENTER_RUN=token").split("\n\n")
    return run.record, parts


async def test_a_spare_started_run_gets_what_a_classic_start_gives(
    primed: ProcessTracker, tmp_path: Path
) -> None:
    assert primed.hierarchy is not None
    spare = await report_of(primed, "spare", tmp_path)
    classic = await report_of(ProcessTracker(primed.hierarchy, primed.ledger), "classic", tmp_path)
    (spare_record, (spare_cgroups, *spare_rest)) = spare
    (classic_record, (_cgroups, *classic_rest)) = classic
    assert spare_rest == classic_rest  # directory, environment, arguments, stdin
    assert "stdin-eof" in spare_rest[-1]
    assert not Path("/tmp/never-run").exists()
    # In its run's cgroup (a pool one), found there by the kernel's word.
    assert spare_record.cgroup is not None and Path(spare_record.cgroup).name.startswith(
        POOL_PREFIX
    )
    assert f"/deploy-center/{Path(spare_record.cgroup).name}\n" in spare_cgroups + "\n"
    assert classic_record.cgroup is not None and "/d1/classic" in classic_record.cgroup
    await asyncio.wrap_future(primed.ledger.barrier())  # type: ignore[union-attr]
    assert primed.ledger.runs("d1") == []  # type: ignore[union-attr]  # both ended, forgotten
    end = time.monotonic() + WAIT  # removed on a worker thread, soon after the run
    while Path(spare_record.cgroup).exists() and time.monotonic() < end:
        await asyncio.sleep(0.02)
    assert not Path(spare_record.cgroup).exists()
    # The next spare is being made, for the next run.
    assert await asyncio.wait_for(primed.spare_ready(), WAIT)


async def test_a_spare_started_run_is_journaled_while_it_runs(
    primed: ProcessTracker, tmp_path: Path
) -> None:
    """The run's record (its spare's cgroup) reaches the journal while the program runs, not
    before it may start (a dead agent's unjournaled run is found by its cgroup: see
    test_a_killed_agent_leaves_nothing_of_a_run_it_had_not_journaled)."""
    program = textwrap.dedent(
        f"""
        import json, os, sqlite3, time
        db = sqlite3.connect({str(tmp_path / "journal.db")!r})
        end = time.monotonic() + {WAIT}
        while time.monotonic() < end:
            (runs,) = db.execute(
                "SELECT processes FROM deployments WHERE deploy_id = 'd1'"
            ).fetchone()
            if json.loads(runs):
                break
            time.sleep(0.01)
        print(json.dumps({{"pid": os.getpid(), "sid": os.getsid(0), "runs": json.loads(runs)}}))
        """
    )
    run = primed.start_run("d1", "first")
    result = await run_process(
        [sys.executable, "-c", program],
        timeout=60,
        tracking=run,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": os.getcwd()},
    )
    assert result.exit_code == 0, result.stderr_tail
    seen = json.loads(result.stdout_tail)
    (record,) = seen["runs"]
    assert seen["pid"] == seen["sid"] == run.record.pid  # the spare became the program
    assert record["cgroup"] == run.record.cgroup and POOL_PREFIX in record["cgroup"]


async def test_a_timeout_kills_a_spare_started_run_and_its_escapee(
    primed: ProcessTracker, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        unset DEPLOY_CENTER_RUN
        (setsid sh -c 'trap "" TERM; echo $$ > {tmp_path}/escaped.pid; exec sleep 60' &)
        sleep 60
        """
    )
    run = primed.start_run("d1", "escape")
    result = await run_process(
        ["/bin/sh", "-c", script],
        timeout=1.5,
        kill_grace=0.3,
        tracking=run,
        env={"PATH": "/usr/bin:/bin"},
    )
    escaped = int(wait_for_file(tmp_path / "escaped.pid"))
    try:
        assert result.timed_out
        assert run.record.cgroup is not None and POOL_PREFIX in run.record.cgroup
        assert not alive(escaped)
        assert run.record.state == ENDED
    finally:
        kill(escaped)


async def test_a_run_the_spare_cannot_start_starts_the_classic_way_in_its_cgroup(
    primed: ProcessTracker, tmp_path: Path
) -> None:
    run = primed.start_run("d1", "odd-env")
    spare = run.spare
    assert spare is not None
    # No PATH to look programs up with as Python would: the spare is killed, a gate child
    # goes into its cgroup.
    result = await run_process(
        ["/bin/sh", "-c", "cat /proc/self/cgroup; echo only=$ONLY"],
        timeout=WAIT,
        tracking=run,
        env={"ONLY": "1"},
    )
    assert result.exit_code == 0, result.stderr_tail
    assert "only=1" in result.stdout_tail
    assert run.record.cgroup is not None
    assert Path(run.record.cgroup).name in result.stdout_tail
    assert run.record.pid != spare.proc.pid and spare.proc.returncode is not None
    # A working directory that does not exist fails as a classic start does.
    run = primed.start_run("d1", "no-dir")
    with pytest.raises(FileNotFoundError):
        await run_process(
            ["/bin/sh", "-c", "true"],
            timeout=WAIT,
            tracking=run,
            env={"PATH": "/usr/bin:/bin"},
            cwd=tmp_path / "missing",
        )


async def test_a_spare_runs_nothing_of_a_block_it_did_not_get_whole(tmp_path: Path) -> None:
    hierarchy, reason = find_tracking_hierarchy("auto")
    if hierarchy is None:
        missing_part(f"no cgroup hierarchy usable here: {reason}")
    spare = await make_spare(hierarchy, READ_BYTES)
    try:
        assert members(spare.cgroup) == {spare.proc.pid}
        assert spare.proc.stdin is not None
        # The agent died in the middle of the block: the shell gets end of file.
        spare.proc.stdin.write(f"{{\ntouch {tmp_path}/ran\nexec sleep 60\n".encode())
        await spare.proc.stdin.drain()
        spare.proc.stdin.close()
        code = await asyncio.wait_for(spare.proc.wait(), WAIT)
        assert code != 0
        assert not (tmp_path / "ran").exists()
    finally:
        await spare.discard()
        with contextlib.suppress(OSError):
            spare.cgroup.rmdir()
    assert not spare.cgroup.exists()


async def test_an_unused_spare_goes_and_the_next_run_makes_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hierarchy, reason = find_tracking_hierarchy("auto")
    if hierarchy is None:
        missing_part(f"no cgroup hierarchy usable here: {reason}")
    monkeypatch.setattr(tracking_module, "SPARE_IDLE", 0.2)
    journal = Journal(tmp_path / "journal.db")
    journal.accept(command("d1"))
    tracker = ProcessTracker(hierarchy, journal)
    try:
        tracker.prime()
        assert await asyncio.wait_for(tracker.spare_ready(), WAIT)
        first = tracker._spare
        assert first is not None
        end = time.monotonic() + WAIT
        while (first.cgroup.exists() or first.proc.returncode is None) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        assert first.proc.returncode is not None and not first.cgroup.exists()
        assert not await tracker.spare_ready()
        # The next run starts the classic way (in a cgroup of its deployment) ...
        run = tracker.start_run("d1", "after-idle")
        assert run.spare is None and run.record.cgroup is not None
        assert "/d1/after-idle" in run.record.cgroup
        result = await run_process(["/bin/sh", "-c", "true"], timeout=WAIT, tracking=run)
        assert result.exit_code == 0
        # ... and makes a spare for the one after.
        assert await asyncio.wait_for(tracker.spare_ready(), WAIT)
    finally:
        tracker.close()
        journal.close()


AGENT = textwrap.dedent(
    """
    import asyncio, concurrent.futures, sys, time
    from pathlib import Path
    from deploy_core.agent.journal import Journal
    from deploy_core.agent.process import run_process
    from deploy_core.agent.tracking import ProcessTracker
    from deploy_core.models import DeployCommand

    class Unjournaled(Journal):
        # Run records never committed: the agent dies before that commit.

        def submit_run(self, deploy_id, record, *, at_once=False):
            return concurrent.futures.Future()

    async def main():
        tmp = Path(sys.argv[1])
        journal = (Unjournaled if sys.argv[2] == "unjournaled" else Journal)(tmp / "journal.db")
        journal.accept(DeployCommand(deploy_id="d1", command_type="deploy.test", params={},
                                     expires_at=time.time() + 600))
        tracker = ProcessTracker.detect(journal)
        tracker.prime()
        assert await tracker.spare_ready()
        run = tracker.start_run("d1", "script")
        print(run.record.cgroup, flush=True)

        async def next_spare():
            assert await tracker.spare_ready()
            print(tracker._spare.cgroup, flush=True)

        asyncio.get_running_loop().create_task(next_spare())
        script = (f"(setsid sh -c 'echo $$ > {tmp}/escaped.pid; exec sleep 60' &); "
                  f"echo $$ > {tmp}/main.pid; exec sleep 60")
        await run_process(["/bin/sh", "-c", script], timeout=120, tracking=run,
                          env={"PATH": "/usr/bin:/bin"})

    asyncio.run(main())
    """
)


def start_agent(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], str, Path, list[int]]:
    """The AGENT above, with its run going: the run's cgroup, the spare it keeps for the next
    run, and the pids of the run's program and of its escapee (in a new session)."""
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(tmp_path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert agent.stdout is not None
    cgroup = agent.stdout.readline().decode().strip()
    next_spare = Path(agent.stdout.readline().decode().strip())
    pids = [int(wait_for_file(tmp_path / n)) for n in ("main.pid", "escaped.pid")]
    assert POOL_PREFIX in next_spare.name and members(next_spare)
    assert POOL_PREFIX in cgroup and set(pids) <= members(Path(cgroup))
    return agent, cgroup, next_spare, pids


def journaled_runs(tmp_path: Path) -> list[RunRecord]:
    journal = Journal(tmp_path / "journal.db")
    try:
        return [RunRecord.from_json(r) for r in journal.runs("d1")]
    finally:
        journal.close()


def test_a_killed_agent_leaves_nothing_of_a_spare_started_run(tmp_path: Path) -> None:
    """The agent (a real process, with a spare) is killed with SIGKILL while its run and an
    escapee in a new session run; the next agent leaves the journaled run's cgroup to its
    recovery, which, from the journal alone, kills both, and leaves no spare cgroup behind."""
    hierarchy, reason = find_tracking_hierarchy("auto")
    if hierarchy is None:
        missing_part(f"no cgroup hierarchy usable here: {reason}")
    agent, cgroup, next_spare, pids = start_agent(tmp_path, "journaled")
    try:
        end = time.monotonic() + WAIT
        while not journaled_runs(tmp_path) and time.monotonic() < end:
            time.sleep(0.02)  # the record is committed while the run goes
        agent.kill()
        agent.wait(WAIT)
        assert all(alive(p) for p in pids)  # the agent's death alone kills nothing
        journal = Journal(tmp_path / "journal.db")
        try:
            records = [RunRecord.from_json(r) for r in journal.runs("d1")]
            assert [r.cgroup for r in records] == [cgroup]
            tracker = ProcessTracker(hierarchy, journal)
            # The next agent's start clears the dead one's spare cgroups, but not one a
            # journaled run names: that run's recovery decides.
            tracker.prime(now=False)
            assert all(alive(p) for p in pids)
            killed = tracker.kill_recorded(records, grace=0.5)
            tracker.close()
        finally:
            journal.close()
        assert len(killed) == 2
        assert not any(alive(p) for p in pids)
        assert not Path(cgroup).exists()
        # The spare the dead agent kept for its next run is gone with its cgroup.
        end = time.monotonic() + WAIT
        while next_spare.exists() and time.monotonic() < end:
            clear_stale(hierarchy)
            time.sleep(0.05)
        assert not next_spare.exists()
    finally:
        agent.kill()
        agent.communicate(timeout=WAIT)
        for pid in pids:
            kill(pid)


def test_a_killed_agent_leaves_nothing_of_a_run_it_had_not_journaled(tmp_path: Path) -> None:
    """A spare takes its run's block before the run's record is committed: an agent killed
    in between has journaled nothing of the run; the next agent of its journal finds the run
    by its spare's cgroup at its start, kills it and its escapee, and removes the cgroup
    (another agent of the host, with another journal, does not)."""
    hierarchy, reason = find_tracking_hierarchy("auto")
    if hierarchy is None:
        missing_part(f"no cgroup hierarchy usable here: {reason}")
    agent, cgroup, next_spare, pids = start_agent(tmp_path, "unjournaled")
    try:
        agent.kill()
        agent.wait(WAIT)
        assert all(alive(p) for p in pids)
        # Another agent of the host (another journal) starting meanwhile leaves it alone:
        # what that dead agent left is for its own next start to judge.
        other = Journal(tmp_path / "other" / "journal.db")
        try:
            bystander = ProcessTracker(hierarchy, other)
            bystander.prime(now=False)
            bystander.close()
        finally:
            other.close()
        assert all(alive(p) for p in pids) and Path(cgroup).exists()
        journal = Journal(tmp_path / "journal.db")
        try:
            assert journal.runs("d1") == [] and journal.run_cgroups() == set()
            tracker = ProcessTracker(hierarchy, journal)
            tracker.prime(now=False)
            tracker.close()
        finally:
            journal.close()
        end = time.monotonic() + WAIT
        while any(alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.02)  # SIGKILLed: only the kernel's reaping is left
        assert not any(alive(p) for p in pids)
        assert not Path(cgroup).exists() and not next_spare.exists()
    finally:
        agent.kill()
        agent.communicate(timeout=WAIT)
        for pid in pids:
            kill(pid)


def test_a_nul_byte_is_never_handed_to_a_spare() -> None:
    from deploy_core.agent import launcher

    env = {"PATH": "/usr/bin:/bin"}
    assert launcher.script(["/bin/true"], env, None) is not None
    # A shell reading the block would drop or stop at the NUL and run something else than
    # asked; the classic start refuses such a value with an error instead.
    assert launcher.script(["/bin/true"], {**env, "X": "a\0b"}, None) is None
    assert launcher.script(["/bin/echo", "a\0b"], env, None) is None
    assert launcher.script(["/bin/true"], env, "/tmp/\0x") is None


def test_stale_spare_cgroups_are_removed_but_not_a_live_agents(tmp_path: Path) -> None:
    """Two agents on one host share the tracking hierarchy: the one starting must not remove
    the other's spare cgroup, empty for a moment between mkdir and the move."""
    import subprocess
    import types

    from deploy_core.agent import launcher

    dead = subprocess.Popen(["true"])
    dead.wait()
    init = proctable.read(1)
    assert init is not None
    names = {
        "live-other": f"{launcher.POOL_PREFIX}1-0123456789abcdef",  # pid 1 is alive
        "live-other-now": f"{launcher.POOL_PREFIX}1-{init.start_ticks}-0123456789abcdef",
        "reused": f"{launcher.POOL_PREFIX}1-{init.start_ticks + 1}-0123456789abcdef",
        "dead": f"{launcher.POOL_PREFIX}{dead.pid}-0123456789abcdef",
        "dead-now": f"{launcher.POOL_PREFIX}{dead.pid}-{init.start_ticks}-0123456789abcdef",
        "mine": f"{launcher.POOL_PREFIX}{os.getpid()}-0123456789abcdef",
        "mine-now": f"{launcher.POOL_PREFIX}{launcher._owner()}-0123456789abcdef",
        "old-style": f"{launcher.POOL_PREFIX}0123456789abcdef",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / names["dead"].replace("0123", "4567")).mkdir()
    (tmp_path / names["dead"].replace("0123", "4567") / "cgroup.procs").write_text("")
    launcher.clear_stale(types.SimpleNamespace(base=tmp_path))  # type: ignore[arg-type]
    left = {p.name for p in tmp_path.iterdir()}
    assert {names["live-other"], names["live-other-now"], names["mine-now"]} <= left
    # An agent named with its start time is dead when its pid now has another start.
    assert names["reused"] not in left
    assert names["dead"] not in left and names["dead-now"] not in left
    assert names["mine"] not in left  # an earlier agent's with this pid
    assert names["old-style"] not in left
    assert "busy" in left  # not a spare's
    assert names["dead"].replace("0123", "4567") in left  # not empty: a run may be in it
