"""``deployctl rollback`` of a superseded deployment, as an operator types it (issue 10 §3).

Deploy v1, v2 and v3 of an app directory (shell deployments with a snapshot rollback), then
``deployctl rollback v2``: it exits 1 with one message naming the target, v3 and when v3 was
deployed, and nothing changes. ``deployctl rollback v2 --cascade --wait`` rolls v3 back, then
v2, following both to the end: the directory is v1's again.

Real server and agent processes on loopback, ``deployctl`` run as a process, real files.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy_core.plugins import get_plugins
from deploy_core.testing import DeployCenter

CLIENT = "app-1"


@pytest.fixture
def center(tmp_path: Path) -> Iterator[DeployCenter]:
    plugins = get_plugins()
    if plugins.deploy_types.get("deploy.shell") is None:
        from conftest import missing_part

        missing_part("the deploy.shell plugin is not installed")
    if plugins.rollback_strategies.get("snapshot") is None:
        from conftest import missing_part

        missing_part("the rollback_basic plugin (snapshot strategy) is not installed")
    c = DeployCenter(tmp_path / "center")
    try:
        c.start_server()
        c.start_agent(CLIENT)
        yield c
    finally:
        c.close()


def deployctl(center: DeployCenter, *args: str) -> subprocess.CompletedProcess[str]:
    """``deployctl ARGS`` pointed at the test's server, as a separate process."""
    done: subprocess.CompletedProcess[str] = center.deployctl(*args)
    return done


def deploy_version(center: DeployCenter, app: Path, version: str) -> str:
    deploy_id = center.deploy(
        "shell",
        CLIENT,
        script=f"echo {version} > version; echo {version} > {version}.txt",
        workdir=str(app),
        rollback={"strategy": "snapshot", "path": str(app), "keep": 3},
    )
    record = center.wait(deploy_id)
    assert record["status"] == "success", record["error"]
    return deploy_id


def test_cli_says_who_superseded_a_deployment_and_cascade_rolls_back_newest_first(
    center: DeployCenter, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    v1 = deploy_version(center, app, "v1")
    v2 = deploy_version(center, app, "v2")
    v3 = deploy_version(center, app, "v3")
    v3_record = center.api.get(v3)

    refused = deployctl(center, "rollback", v2)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    message = refused.stderr
    assert (
        f"deployment {v2} was superseded on target deploy.shell:{app} by {v3} "
        f"(deployed {v3_record['created_at']}, success); roll back {v3} first, "
        "or use --cascade" in " ".join(message.split())
    ), message
    assert "HTTP 409" not in message and "{" not in message  # a sentence, not the raw answer
    # Nothing moved.
    assert (app / "version").read_text() == "v3\n"
    for deploy_id in (v2, v3):
        assert center.api.get(deploy_id)["rolled_back_by"] is None

    cascaded = deployctl(center, "rollback", v2, "--cascade", "--wait", "--wait-timeout", "240")
    assert cascaded.returncode == 0, cascaded.stdout + cascaded.stderr
    assert f"cascade: rolling back {v3}, then {v2}" in cascaded.stderr
    undo3 = center.api.get(v3)["rolled_back_by"]
    undo2 = center.api.get(v2)["rolled_back_by"]
    assert undo3 and undo2 and undo3 != undo2
    # Both rollbacks were followed to their end, newest first.
    out = cascaded.stdout
    assert f"deployment {undo3}: rolled_back" in out and f"deployment {undo2}: rolled_back" in out
    assert out.index(undo3) < out.index(undo2)
    for rollback_id, undone in ((undo3, v3), (undo2, v2)):
        record = center.api.get(rollback_id)
        assert record["status"] == "rolled_back" and record["rollback_of"] == undone
    # The directory is v1's again, file for file; v1 stays as it was.
    assert (app / "version").read_text() == "v1\n"
    assert sorted(p.name for p in app.iterdir()) == ["v1.txt", "version"]
    assert center.api.get(v1)["rolled_back_by"] is None


def test_cli_rollback_of_the_live_deployment_needs_no_cascade(
    center: DeployCenter, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    deploy_version(center, app, "v1")
    v2 = deploy_version(center, app, "v2")

    done = deployctl(center, "rollback", v2, "--wait", "--wait-timeout", "240")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cascade" not in done.stderr
    assert (app / "version").read_text() == "v1\n"
    assert sorted(p.name for p in app.iterdir()) == ["v1.txt", "version"]

    again = deployctl(center, "rollback", v2)
    assert again.returncode == 1
    assert "already rolled back" in again.stderr


def test_cli_cascade_stops_where_a_rollback_fails_and_says_what_is_left(
    center: DeployCenter, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    ids = []
    for version, undo in (("v1", "exit 0"), ("v2", "exit 7")):  # v2's rollback fails
        deploy_id = center.deploy(
            "shell",
            CLIENT,
            script=f'if [ "$DEPLOY_ACTION" = rollback ]; then echo undo {version} >> log; '
            f"{undo}; fi; echo {version} > version",
            workdir=str(app),
            rollback={"strategy": "inline"},
        )
        assert center.wait(deploy_id)["status"] == "success"
        ids.append(deploy_id)
    v1, v2 = ids

    done = deployctl(center, "rollback", v1, "--cascade", "--wait", "--wait-timeout", "240")
    assert done.returncode == 1, done.stdout + done.stderr
    undo2 = center.api.get(v2)["rolled_back_by"]
    assert undo2 and center.api.get(undo2)["status"] == "rollback_failed"
    assert f"deployment {undo2}: rollback_failed" in done.stdout
    assert (
        f"cascade stopped: rollback {undo2} ended rollback_failed; not rolled back: {v1}"
        in done.stderr
    )
    # v1 was not touched.
    assert center.api.get(v1)["rolled_back_by"] is None
    assert (app / "log").read_text() == "undo v2\n"
