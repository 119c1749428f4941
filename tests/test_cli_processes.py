"""``deployctl up`` and ``agent`` as people start them: relative paths, the ``Try:`` line,
and a misspelt ``[services.NAME]`` table."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy_core.cli.processes import warn_unknown_services
from deploy_core.plugins import get_plugins
from deploy_core.testing import DeployCenter, free_port

DEPLOYCTL = [sys.executable, "-m", "deploy_core.cli"]
# A variable that stops a child from finding any server by accident.
NO_SERVER_ENV = ("DEPLOY_CENTER_STATE", "DEPLOY_CENTER_URL", "DEPLOY_CENTER_TOKEN")


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NO_SERVER_ENV}
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


StartUp = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def up(tmp_path: Path) -> Iterator[StartUp]:
    """``up(*args, env=…)`` starts ``deployctl up`` on free ports; stopped at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [
                *DEPLOYCTL,
                "up",
                "--api-port",
                "0",
                "--quic-port",
                str(free_port(socket.SOCK_DGRAM)),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _try_line(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    """The ``Try:`` line ``up`` prints once its agent is connected."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Try:"):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines and lines[-1].startswith("Try:"), "".join(lines)
    assert "local agent:  connected" in "".join(lines)
    return lines[-1].removeprefix("Try:").strip()


def _run_suggestion(
    command: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    assert command.startswith("deployctl ")
    shell_line = " ".join(shlex.quote(w) for w in DEPLOYCTL) + command.removeprefix("deployctl")
    return subprocess.run(
        ["bash", "-c", shell_line], env=env, cwd=cwd, capture_output=True, text=True, timeout=90
    )


def test_the_try_line_reaches_a_server_in_another_state_dir(up: StartUp, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    proc = up("--state-dir", "dc state", env=_clean_env(home))
    command = _try_line(proc)
    assert f"--state-dir {shlex.quote(str(tmp_path / 'dc state'))}" in command
    # From a fresh terminal elsewhere: no variables, another directory, an empty home.
    other = tmp_path / "elsewhere"
    other.mkdir()
    done = _run_suggestion(command, _clean_env(home), other)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": success" in done.stdout and "hello" in done.stdout


def test_the_try_line_overrides_variables_that_point_elsewhere(up: StartUp, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    elsewhere = {
        "DEPLOY_CENTER_URL": f"http://127.0.0.1:{free_port()}",
        "DEPLOY_CENTER_TOKEN": "not-this-servers-token",
    }
    proc = up("--state-dir", str(tmp_path / "dc"), env=_clean_env(home, **elsewhere))
    command = _try_line(proc)
    assert "--url http://127.0.0.1:" in command and "--token" in command
    done = _run_suggestion(command, _clean_env(home, **elsewhere), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hello" in done.stdout


def test_an_agent_started_with_relative_paths_runs_scripts_elsewhere(tmp_path: Path) -> None:
    center = DeployCenter(tmp_path / "center")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (center.root / "agent.toml").parent.mkdir(parents=True, exist_ok=True)
    (center.root / "agent.toml").write_text("[services.docker_sampler]\ninterval = 5\n")
    agent = None
    try:
        center.start_server(timeout=90)  # generous: busy machines start slowly
        log = open(center.root / "agent-rel-1.log", "wb")  # noqa: SIM115 - closed below
        agent = subprocess.Popen(
            [
                *DEPLOYCTL,
                "agent",
                "--server",
                f"127.0.0.1:{center.quic_port}",
                "--client-id",
                "rel-1",
                "--state-dir",
                "ag",
                "--ca",
                "server/ca.pem",
                "--join-token-file",
                "server/join.token",
                "--config",
                "agent.toml",
            ],
            cwd=center.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        center.wait_connected("rel-1", timeout=90)
        deploy_id = center.deploy("shell", "rel-1", script="pwd; echo ran", workdir=str(workdir))
        record = center.wait(deploy_id)
        assert record["status"] == "success", (record["error"], center.log("agent-rel-1"))
        assert record["result"]["stdout_tail"].split() == [str(workdir), "ran"]
        assert (center.root / "ag" / "journal.db").exists()
        agent_log = center.log("agent-rel-1")
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait(10)
        center.close()
    known = sorted(get_plugins().agent_services.entries)
    expected = (
        f"{center.root / 'agent.toml'}: [services.docker_sampler] is ignored: no installed "
        f"agent service is called 'docker_sampler'; "
        + (f"the installed ones are {', '.join(known)}" if known else "none is installed")
    )
    assert expected in agent_log


def test_only_unknown_service_tables_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    plugins = get_plugins()
    known = sorted(plugins.agent_services.entries)
    services: dict[str, Any] = {name: {} for name in known} | {"docker_sampler": {"x": 1}}
    with caplog.at_level(logging.WARNING):
        warn_unknown_services(Path("agent.toml"), services, plugins)
    assert [r.getMessage() for r in caplog.records] == [
        "agent.toml: [services.docker_sampler] is ignored: no installed agent service is "
        "called 'docker_sampler'; "
        + (f"the installed ones are {', '.join(known)}" if known else "none is installed")
    ]
