"""Failure rolls back by default (issue 10 §2), end to end: a real server started with a
``[defaults.rollback]`` config, a real agent, real packages and directories on disk.

- tar without a ``rollback`` field goes back to the previous release; a first release has
  nothing to roll back to and says so;
- ``"rollback": false`` / ``{"strategy": "none"}`` / ``--no-rollback`` opt out;
- the server's ``[defaults.rollback."deploy.shell"]`` snapshots a shell deployment's workdir;
- a shell deployment with nothing that applies says plainly why it was not rolled back;
- a bad rollback is refused at the API with a 422 that says what is wrong.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy_core.client import ApiError
from deploy_core.testing import DeployCenter, free_port

AGENT = "rd-1"
INSTALL = 'echo "$(cat version) $DEPLOY_ACTION" >> "$TARGET_DIR/events.log"\n[ ! -f fail ]\n'
FAILING_CHECK = {"type": "script", "script": "exit 1", "retries": 0, "timeout": 10}
SERVER_CONFIG = """\
[defaults.rollback."deploy.shell"]
strategy = "snapshot"
path = "{workdir}"
keep = 2
"""


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    root = tmp_path_factory.mktemp("rollback-defaults")
    config = root / "server.toml"
    config.write_text(SERVER_CONFIG)
    c = DeployCenter(root)
    c.server_args = ["--config", str(config)]
    try:
        c.start_server()
        c.start_agent(AGENT)
        yield c
    finally:
        c.close()


def package(center: DeployCenter, path: Path, version: str, *, fail: bool = False) -> str:
    """Upload a tar.gz holding ``version`` and install.sh (which fails when ``fail``)."""
    files = {"version": version, "install.sh": INSTALL, **({"fail": ""} if fail else {})}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    sha: str = center.api.upload_artifact(path)["sha256"]
    return sha


def deploy(center: DeployCenter, kind: str, **body: Any) -> dict[str, Any]:
    record: dict[str, Any] = center.wait(
        center.api.deploy(kind, {"client_id": AGENT, **body})["deploy_id"], 90
    )
    return record


def cli_env(center: DeployCenter) -> dict[str, str]:
    """The environment that points ``deployctl`` at ``center``."""
    env = {**os.environ, "DEPLOY_CENTER_URL": f"http://127.0.0.1:{center.api_port}"}
    env["DEPLOY_CENTER_TOKEN"] = (center.server_dir / "admin.token").read_text().strip()
    return env


def current(target: Path) -> str:
    return os.readlink(target / "current").rsplit("/", 1)[-1]


# --------------------------------------------------------------------------- tar


def test_tar_failure_without_rollback_field_goes_back_to_the_previous_release(
    center: DeployCenter, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    v1 = deploy(
        center, "tar", artifact=package(center, tmp_path / "1.tgz", "1"), target_dir=str(target)
    )
    assert v1["status"] == "success", v1["error"]
    assert v1["request"]["rollback"]["strategy"] == "release"
    assert v1["request"]["rollback_plan"] == {
        "strategy": "release",
        "source": "deploy type default",
        "note": "release, the default of deploy.tar",
    }
    shown = subprocess.run(
        [sys.executable, "-m", "deploy_core.cli", "status", v1["deploy_id"]],
        env=cli_env(center),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "  on failure: release, the default of deploy.tar\n" in shown.stdout, shown.stderr

    # v2 installs and goes live, then fails its check (healthy means version 1): back to
    # v1, on disk, and the check passes again.
    healthy_is_v1 = {**FAILING_CHECK, "script": f'[ "$(cat {target}/current/version)" = 1 ]'}
    v2 = deploy(
        center,
        "tar",
        artifact=package(center, tmp_path / "2.tgz", "2"),
        target_dir=str(target),
        health_checks=[healthy_is_v1],
    )

    assert v2["status"] == "rolled_back", v2["error"]
    assert v2["error"].startswith("health check failed: script")
    assert v2["rollback"]["strategy"] == "release" and v2["rollback"]["success"]
    assert v2["rollback"]["message"] == (
        f"back to release {v1['deploy_id']} (release {v2['deploy_id']} marked bad)"
    )
    assert [h["success"] for h in v2["rollback"]["health"]] == [True]
    assert current(target) == v1["deploy_id"]
    assert (target / "current" / "version").read_text() == "1"
    assert (target / "releases" / v2["deploy_id"] / ".deploy-tar-bad").is_file()
    assert (target / "events.log").read_text().split("\n") == [
        "1 install",
        "2 install",
        "1 rollback",
        "",
    ]


def test_first_tar_release_failure_has_nothing_to_roll_back_to(
    center: DeployCenter, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    record = deploy(
        center,
        "tar",
        artifact=package(center, tmp_path / "1.tgz", "1"),
        target_dir=str(target),
        health_checks=[FAILING_CHECK],
    )

    assert record["status"] == "rolled_back", record["error"]
    rollback = record["rollback"]
    assert rollback["success"] is True and rollback["error"] is None
    assert rollback["message"].startswith("nothing to roll back to: first release"), rollback
    assert rollback["health"] == []  # nothing runs: no point checking it again
    assert not os.path.lexists(target / "current")


@pytest.mark.parametrize(
    ("opt_out", "note"),
    [
        (False, "rollback disabled by the request"),
        ({"strategy": "none"}, "rollback disabled by the request"),
    ],
)
def test_rollback_false_opts_out(
    center: DeployCenter, tmp_path: Path, opt_out: Any, note: str
) -> None:
    target = tmp_path / "site"
    v1 = deploy(
        center, "tar", artifact=package(center, tmp_path / "1.tgz", "1"), target_dir=str(target)
    )
    v2 = deploy(
        center,
        "tar",
        artifact=package(center, tmp_path / "2.tgz", "2"),
        target_dir=str(target),
        health_checks=[FAILING_CHECK],
        rollback=opt_out,
    )

    assert v1["status"] == "success"
    assert v2["status"] == "failed"
    assert v2["request"]["rollback"] is None
    assert v2["request"]["rollback_plan"]["source"] == "opted out"
    assert v2["error"].endswith(f"; not rolled back: {note}")
    assert v2["rollback"] is None
    assert current(target) == v2["deploy_id"]  # left as it was: v2 is live
    assert (target / "current" / "version").read_text() == "2"


# --------------------------------------------------------------------------- shell


def test_server_default_snapshots_the_shell_workdir(center: DeployCenter, tmp_path: Path) -> None:
    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "config.txt").write_text("old\n")

    record = deploy(
        center,
        "shell",
        script="echo new > config.txt; touch leftover; exit 4",
        workdir=str(workdir),
    )

    assert record["status"] == "rolled_back", record["error"]
    assert record["request"]["rollback"]["strategy"] == "snapshot"
    assert record["request"]["rollback"]["path"] == str(workdir)
    assert record["request"]["rollback"]["keep"] == 2
    assert record["request"]["rollback_plan"]["source"] == "server defaults"
    assert record["rollback"]["strategy"] == "snapshot" and record["rollback"]["success"]
    assert (workdir / "config.txt").read_text() == "old\n"
    assert not (workdir / "leftover").exists()


def test_snapshot_rollback_stops_what_the_release_started_and_lists_it(
    center: DeployCenter, tmp_path: Path
) -> None:
    workdir = tmp_path / "app"
    workdir.mkdir()
    port = free_port()
    service = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pidfile = tmp_path / "new.pid"
    try:
        wait_listening(port)
        record = deploy(
            center,
            "shell",
            # `$!` is setsid's pid until it execs sleep: wait (bounded) for the exec, so the
            # rollback's scan sees the command line the assertion names, not a half-started one.
            script=(
                f"setsid sleep 300 </dev/null >/dev/null 2>&1 & p=$!; echo $p > {pidfile}; "
                "for i in $(seq 500); do "
                "[ \"$(tr -d '\\000' < /proc/$p/cmdline)\" = sleep300 ] && break; sleep 0.01; "
                "done; exit 5"
            ),
            workdir=str(workdir),
        )
        new_pid = int(pidfile.read_text())

        assert record["status"] == "rolled_back", record["error"]
        details = record["rollback"]["details"]
        assert [(p["pid"], p["cmdline"]) for p in details["stopped"]] == [(new_pid, "sleep 300")]
        [kept] = details["still_running"]
        assert (kept["pid"], kept["ports"]) == (service.pid, [f"127.0.0.1:{port}"])
        assert "stopped 1 process(es) the deployment started there" in record["rollback"]["message"]
        assert not alive(new_pid)
        assert service.poll() is None
    finally:
        service.kill()
        service.wait(10)


def wait_listening(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be collected does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_shell_with_nothing_that_applies_says_plainly_why(
    center: DeployCenter, tmp_path: Path
) -> None:
    flag = tmp_path / "ran"
    record = deploy(center, "shell", script=f"echo once >> {flag}; exit 3")

    assert record["status"] == "failed"
    assert record["request"]["rollback"] is None
    assert record["error"] == (
        "script exited with code 3; not rolled back: deploy.shell has no default rollback; "
        "the server's default (snapshot) takes workdir, which the request does not set and "
        'the request named none (add "rollback": {"strategy": ...} to the request, or set '
        '[defaults.rollback."deploy.shell"] in the server config)'
    )
    assert flag.read_text() == "once\n"  # not re-run blindly


@pytest.mark.parametrize(
    ("rollback", "status", "message"),
    [
        ({"strategy": "teleport"}, 422, "unknown rollback strategy 'teleport'"),
        ({"strategy": "inline", "keep": 3}, 422, "keep: Extra inputs are not permitted"),
        ({"strategy": "snapshot", "path": "relative"}, 422, "is not an absolute path"),
        ({"strategy": "none", "timeout": 5}, 422, 'rollback {"strategy": "none"} takes no'),
        (True, 422, "deploy.shell has no default rollback strategy"),
        ("yes", 422, "invalid deploy request"),
    ],
)
def test_bad_rollback_is_refused_at_the_api(
    center: DeployCenter, rollback: Any, status: int, message: str
) -> None:
    with pytest.raises(ApiError) as refused:
        center.api.deploy("shell", {"client_id": AGENT, "script": "true", "rollback": rollback})
    assert refused.value.status == status
    assert message in str(refused.value)


def test_cli_no_rollback_opts_out(center: DeployCenter, tmp_path: Path) -> None:
    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "config.txt").write_text("old\n")
    cli = [sys.executable, "-m", "deploy_core.cli", "deploy", "shell", "--client", AGENT]
    wait_flags = ["--no-rollback", "--wait", "--wait-timeout", "60"]
    env = cli_env(center)

    done = subprocess.run(
        [*cli, "--workdir", str(workdir), "--script", "echo new > config.txt; exit 1", *wait_flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    both = subprocess.run(
        [*cli, "--script", "true", "--snapshot", str(workdir), "--no-rollback"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 1, done.stderr
    assert "not rolled back: rollback disabled by the request" in done.stdout
    assert (workdir / "config.txt").read_text() == "new\n"  # the server default did not apply
    assert both.returncode == 2
    assert "--no-rollback and a snapshot rollback option contradict each other" in both.stderr
