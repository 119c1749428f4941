"""An agent killed with SIGKILL mid-deployment leaves nothing running once it is back (issue 10
§1): the restarted agent kills every process of the interrupted deployment — the script and
what escaped its session — before it rolls back and reports.  Real server, real agent
processes, real QUIC on loopback, real cgroups where the host has them."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from conftest import missing_part

from deploy_core.agent import proctable
from deploy_core.agent.cgroup_tracking import find_tracking_hierarchy
from deploy_core.testing import DeployCenter

# The script and its escapee write their "late" files only once the test creates this file,
# after the restarted agent has settled the deployment: a late write proves a survivor, however
# slow the machine (a fixed sleep could run out while a loaded machine restarts the agent).
GO = "go"


def alive(pid: int) -> bool:
    info = proctable.read(pid)
    return info is not None and not info.zombie


def carriers(name: str, value: str) -> list[int]:
    """Processes started with ``name=value`` in their environment."""
    return [p.pid for p in proctable.processes() if proctable.has_env(p.pid, name, value)]


def wait_for(path: Path, seconds: float = 60.0) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def scripts(stage: str, work: Path, unmarked: bool) -> tuple[str, list[dict[str, object]]]:
    """The deployment's script and health checks for an agent killed during ``stage``: the
    step running then records its pid, starts an escapee (new session, parent gone) and
    sleeps; the rollback's run notes which of the two still run, then says it is done."""
    drop = "unset DEPLOY_ID DEPLOY_CENTER_RUN; " if unmarked else ""
    payload = f"""
echo $$ > {work}/main.pid
( {drop}setsid sh -c 'echo $$ > {work}/escaped.pid
  until [ -e {work}/{GO} ]; do sleep 0.2; done; echo X > {work}/late.txt' \\
    </dev/null >/dev/null 2>&1 & )
until [ -e {work}/{GO} ]; do sleep 0.2; done
echo X > {work}/late-main.txt
"""
    check = f"""
for f in main escaped; do  # running, not a zombie waiting for init to collect it
  state=$(sed 's/.*) //' "/proc/$(cat {work}/$f.pid)/stat" 2>/dev/null | cut -c1)
  case "$state" in ""|Z|X) ;; *) echo "$f" >> {work}/alive-at-rollback ;; esac
done
echo done > {work}/rolled-back
"""
    once = f"[ -e {work}/first ] || {{ touch {work}/first; {payload}\n}}"
    if stage == "script":
        return f'if [ "$DEPLOY_ACTION" = rollback ]; then {check}\nexit 0; fi\n{payload}', []
    if stage == "rollback":  # the deployment fails; its first rollback run is interrupted
        script = f'if [ "$DEPLOY_ACTION" = rollback ]; then\n{once}\n{check}\nexit 0; fi\nexit 1\n'
        return script, []
    health = {
        "type": "script",
        "script": once,
        "retries": 0,
        "timeout": 300,
        "attempt_timeout": 120,
    }
    return f'if [ "$DEPLOY_ACTION" = rollback ]; then {check}\nexit 0; fi\nexit 0\n', [health]


@pytest.mark.parametrize(
    ("stage", "tracking", "unmarked"),
    [
        # cgroups: the escapee also drops every variable that names the deployment
        ("script", "auto", True),
        # the cgroup v1 freezer hierarchy, explicitly
        ("script", "freezer", True),
        # no cgroups: found by session, then by the marker it kept
        ("script", "off", False),
        # killed while the health check or the rollback's own run was going
        ("health", "auto", True),
        ("rollback", "auto", True),
    ],
)
def test_a_restarted_agent_kills_the_interrupted_deployment_before_rolling_back(
    tmp_path: Path, stage: str, tracking: str, unmarked: bool
) -> None:
    if tracking != "off" and find_tracking_hierarchy(tracking)[0] is None:
        missing_part(f"no writable cgroup hierarchy: {find_tracking_hierarchy(tracking)[1]}")
    work = tmp_path / "work"
    work.mkdir()
    mark = uuid.uuid4().hex  # the test's own: the agent knows nothing of it
    script, health_checks = scripts(stage, work, unmarked)
    center = DeployCenter(tmp_path / "center", env={"DEPLOY_CENTER_PROCESS_TRACKING": tracking})
    try:
        center.start_server()
        center.start_agent("web-1")
        deploy_id = center.deploy(
            "shell",
            "web-1",
            script=script,
            env={"E2E_MARK": mark},
            workdir=str(work),
            timeout=120,
            rollback={"strategy": "inline"},
            health_checks=health_checks,
        )
        main = int(wait_for(work / "main.pid"))
        escaped = int(wait_for(work / "escaped.pid"))
        center.stop_agent("web-1", signal.SIGKILL)
        # The crash itself kills nothing: the script and its escapee live on.
        assert alive(main) and alive(escaped)

        center.start_agent("web-1")
        record = center.wait(deploy_id, timeout=120)

        assert record["status"] in ("rolled_back", "failed"), record
        assert record["status"] == "rolled_back", record
        assert "agent restarted" in (record["error"] or "")
        assert not alive(main) and not alive(escaped)
        assert carriers("E2E_MARK", mark) == [], "a process of the deployment is still running"
        assert wait_for(work / "rolled-back") == "done"
        # Killed before the rollback ran, not after.
        assert not (work / "alive-at-rollback").exists()
        lines = [line["line"] for line in center.api.logs(deploy_id)["lines"]]
        assert any(line.startswith("killed ") and str(escaped) in line for line in lines), lines
        # Told to write now, nothing is left to do it.
        (work / GO).touch()
        time.sleep(2)
        assert not (work / "late.txt").exists()
        assert not (work / "late-main.txt").exists()
    finally:
        center.close()
        for pid in carriers("E2E_MARK", mark):
            os.kill(pid, signal.SIGKILL)
