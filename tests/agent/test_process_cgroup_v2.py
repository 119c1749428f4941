"""The cgroup v2 path, on a real cgroup2 hierarchy: a run joins the cgroup made for it under a
delegated parent, the run's processes are found (and killed) through it, and with the
``memory`` and ``pids`` controllers the limits are written to it.

The hierarchy is the host's own cgroup2 mount (``/sys/fs/cgroup`` on a v2 host,
``/sys/fs/cgroup/unified`` on a hybrid one), or, as root, one mounted here for the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import missing_part

from deploy_core.agent import cgroups, proctable
from deploy_core.agent.cgroup_tracking import TrackingHierarchy, members
from deploy_core.agent.constraints import ConstraintPolicy, Constraints
from deploy_core.agent.context import DeployContext
from deploy_core.agent.process import Confinement, run_process
from deploy_core.agent.tracking import ProcessTracker
from deploy_core.models import DeployCommand
from deploy_core.testing import RecordingReporter


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _sep, tail = line.partition(" - ")
        if tail.split()[:1] == ["cgroup2"]:
            return Path(fields.split()[4])
    return None


@pytest.fixture
def cgroup2(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``(mount, directory)``: a fresh, empty directory in the host's cgroup2 hierarchy."""
    mount, mounted = _cgroup2_mount(), False
    if mount is None:
        mount = tmp_path / "cg2"
        mount.mkdir()
        done = subprocess.run(
            ["mount", "-t", "cgroup2", "none", str(mount)], capture_output=True, text=True
        )
        if done.returncode != 0:
            missing_part(f"no cgroup2 hierarchy, and mounting one failed: {done.stderr.strip()}")
        mounted = True
    directory = mount / f"deploy-test-{uuid.uuid4().hex[:12]}"
    try:
        directory.mkdir()
    except OSError as exc:
        missing_part(f"cannot create a cgroup in {mount}: {exc}")
    try:
        yield mount, directory
    finally:
        for sub in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir():
                for pid in members(sub):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    _rmdir_when_empty(sub)
        with contextlib.suppress(OSError):
            _rmdir_when_empty(directory)
        if mounted:
            subprocess.run(["umount", str(mount)], check=False)


def _rmdir_when_empty(path: Path) -> None:
    end = time.monotonic() + 10
    while members(path) and time.monotonic() < end:
        time.sleep(0.02)
    path.rmdir()


def own_cgroup_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("0::"))


async def test_a_run_joins_the_cgroup_made_for_it_under_the_given_parent(
    cgroup2: tuple[Path, Path],
) -> None:
    mount, parent_dir = cgroup2
    parent = cgroups.CgroupParent(parent_dir)
    run = parent.create("run-1", memory_max=None, pids_max=None)
    result = await run_process(
        ["/bin/sh", "-c", "cat /proc/self/cgroup"],
        timeout=30,
        confinement=Confinement(cgroup=str(run)),
    )
    assert result.exit_code == 0, result.stderr_tail
    assert own_cgroup_line(result.stdout_tail) == f"0::/{run.relative_to(mount)}"


async def test_the_limits_cgroup_also_tracks_the_run_and_its_escapee_dies(
    cgroup2: tuple[Path, Path], tmp_path: Path
) -> None:
    # On v2 a process is in one cgroup only: the limits cgroup is the run's tracking cgroup.
    mount, parent_dir = cgroup2
    run_cgroup = cgroups.CgroupParent(parent_dir).create("limited", memory_max=None, pids_max=None)
    tracker = ProcessTracker(TrackingHierarchy(parent_dir / "tracking", 2))
    run = tracker.start_run("d-v2", "limited", limits_cgroup=str(run_cgroup))
    assert run.record.cgroup == str(run_cgroup) and run.cgroups == ()
    script = textwrap.dedent(
        f"""
        unset DEPLOY_CENTER_RUN
        (setsid sh -c 'trap "" TERM; cat /proc/self/cgroup > {tmp_path}/escaped.cg;
                       echo $$ > {tmp_path}/escaped.pid; exec sleep 60' &)
        sleep 60
        """
    )
    result = await run_process(
        ["/bin/sh", "-c", script],
        timeout=1.5,
        kill_grace=0.3,
        confinement=Confinement(cgroup=str(run_cgroup)),
        tracking=run,
    )
    escaped = int((tmp_path / "escaped.pid").read_text())
    assert result.timed_out
    assert own_cgroup_line((tmp_path / "escaped.cg").read_text()) == (
        f"0::/{run_cgroup.relative_to(mount)}"
    )
    info = proctable.read(escaped)
    assert info is None or info.zombie
    assert members(run_cgroup) == set()


def _bound_to_v1(controllers: tuple[str, ...]) -> list[str]:
    """Which of ``controllers`` a cgroup v1 hierarchy holds (/proc/cgroups' hierarchy id)."""
    bound = []
    for line in Path("/proc/cgroups").read_text().splitlines()[1:]:
        name, hierarchy, *_ = line.split()
        if name in controllers and hierarchy != "0":
            bound.append(name)
    return bound


async def test_a_delegated_parent_with_controllers_puts_the_limits_on_the_run(
    cgroup2: tuple[Path, Path], tmp_path: Path
) -> None:
    mount, parent_dir = cgroup2
    parent, reason = cgroups.find_cgroup_parent(str(parent_dir))
    if parent is None:
        bound = _bound_to_v1(("memory", "pids"))
        if bound:
            # Not a part CI can install: a controller lives in one hierarchy at a time, and
            # this kernel (a hybrid set-up, with dockerd using v1) holds these in v1.
            pytest.skip(f"cgroup v2 limits cannot apply here: {', '.join(bound)} bound to v1")
        missing_part(f"this host's cgroup2 cannot limit a run: {reason}")
    policy = ConstraintPolicy(
        Constraints.model_validate(
            {"limits": {"memory_bytes": "256MiB", "processes": 64, "cgroup": str(parent_dir)}}
        )
    )
    command = DeployCommand(
        deploy_id=f"v2-{uuid.uuid4().hex[:8]}",
        command_type="deploy.test",
        params={},
        expires_at=time.time() + 120,
    )
    reporter = RecordingReporter()
    ctx = DeployContext(
        command=command, reporter=reporter, data_dir=tmp_path / "data", constraints=policy
    )
    script = (
        f'dir="{mount}$(sed -n "s/^0:://p" /proc/self/cgroup)"\n'
        'echo "$dir"; cat "$dir/memory.max" "$dir/pids.max"\n'
    )
    result = await ctx.run_script(script, timeout=30)
    assert result.exit_code == 0, result.stderr_tail
    where, memory_max, pids_max = result.stdout_tail.split()
    assert Path(where).parent == parent_dir
    assert (memory_max, pids_max) == (str(256 * 1024 * 1024), "64")
    assert any("cgroup v2" in line and "used" in line for line in reporter.lines("agent"))
