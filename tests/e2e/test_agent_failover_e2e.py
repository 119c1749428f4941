"""Agents fail over between server replicas (issue 15 item 5): two real ``deployctl server``
processes on one PostgreSQL database, one real agent given both with ``--server A --server
B``, real QUIC on loopback.  A replica killed with SIGKILL mid-deployment: the agent moves to
the other, the deployment finishes and reports once, and new work reaches it there."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy_core.testing import DeployCenter

# What a replica keeps for itself and must not share: its id and what it announces.
OWN_FILES = {"server.id", "server.json"}


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str) -> Iterator[tuple[DeployCenter, DeployCenter]]:
    """Two replicas on one fresh PostgreSQL schema with one CA, tokens and secrets key
    (the second's state directory is a copy of the first's, without its server id);
    neither is running when the test starts."""
    a = DeployCenter(tmp_path / "a", db_url=pg_url)
    b = DeployCenter(tmp_path / "b", db_url=pg_url)
    try:
        a.start_server()
        a.stop_server()
        shutil.copytree(
            a.server_dir, b.server_dir, ignore=lambda _dir, names: OWN_FILES & set(names)
        )
        yield a, b
    finally:
        for center in (a, b):
            center.close()


def start_agent(center: DeployCenter, client_id: str, ports: list[int], *extra: str) -> None:
    """An agent given every port as a ``--server``, in that order, with ``center``'s CA and
    join token (and ``extra`` options); :meth:`DeployCenter.close` kills it."""
    args = ["agent", "--client-id", client_id, *extra]
    for port in ports:
        args += ["--server", f"127.0.0.1:{port}"]
    args += [
        "--state-dir",
        str(center.root / f"agent-{client_id}"),
        "--ca",
        str(center.server_dir / "ca.pem"),
        "--join-token-file",
        str(center.server_dir / "join.token"),
    ]
    center.agents[client_id] = center._spawn(args, f"agent-{client_id}.log")


def deployctl(*args: str) -> subprocess.CompletedProcess[str]:
    """``deployctl ARGS`` run as a process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "deploy_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_for(path: Path, seconds: float = 120.0) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return path.read_text()
        time.sleep(0.1)
    raise TimeoutError(f"{path} not written within {seconds}s")


def test_a_replica_killed_mid_deployment_leaves_the_agent_on_the_other(
    replicas: tuple[DeployCenter, DeployCenter], tmp_path: Path
) -> None:
    a, b = replicas
    work = tmp_path / "work"
    work.mkdir()
    a.start_server()
    # B is down: whichever the agent tries first, it ends up on A.
    start_agent(a, "web-1", [a.quic_port, b.quic_port])
    a.wait_connected("web-1", timeout=120)
    b.start_server()

    script = (
        f"echo run >> {work}/runs; "
        f"touch {work}/started; "
        f"while [ ! -f {work}/go ]; do sleep 0.1; done; "
        "echo finished"
    )
    deploy_id = a.deploy("shell", "web-1", script=script, timeout=300)
    wait_for(work / "started")
    a.stop_server(signal.SIGKILL)

    b.wait_connected("web-1", timeout=120)
    (work / "go").touch()
    record = b.wait(deploy_id, timeout=180)
    assert record["status"] == "success", record
    assert (work / "runs").read_text() == "run\n", "the script ran more than once"
    lines = [line["line"] for line in b.api.logs(deploy_id)["lines"]]
    assert lines.count("finished") == 1, lines
    history = b.api.history(deploy_id)
    statuses = [entry["status"] for entry in history]
    assert statuses.count("success") == 1, history
    assert len({(e["status"], e.get("progress"), e.get("stage")) for e in history}) == len(
        history
    ), history

    # New work submitted through B reaches the agent now connected to B.
    second = b.deploy("shell", "web-1", script=f"echo second >> {work}/second", timeout=120)
    assert b.wait(second, timeout=120)["status"] == "success"
    assert (work / "second").read_text() == "second\n"
    agent_log = a.log("agent-web-1")
    assert f"connected to 127.0.0.1:{a.quic_port} as web-1" in agent_log, agent_log[-3000:]
    assert f"connected to 127.0.0.1:{b.quic_port} as web-1" in agent_log, agent_log[-3000:]
    assert (work / "runs").read_text() == "run\n"


def test_the_agent_tries_every_server_until_one_answers(
    replicas: tuple[DeployCenter, DeployCenter],
) -> None:
    a, b = replicas
    # Both down: the agent keeps trying both, backing off, and exits for neither.
    start_agent(a, "web-2", [a.quic_port, b.quic_port])
    end = time.monotonic() + 120
    while time.monotonic() < end:
        agent_log = a.log("agent-web-2")
        if all(
            f"connection to 127.0.0.1:{p} failed" in agent_log for p in (a.quic_port, b.quic_port)
        ):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the agent did not try both servers: {a.log('agent-web-2')}")
    assert a.agents["web-2"].poll() is None

    # A is unreachable, B comes up: the agent connects to B.
    b.start_server()
    b.wait_connected("web-2", timeout=120)
    deploy_id = b.deploy("shell", "web-2", script="echo on-b", timeout=60)
    assert b.wait(deploy_id, timeout=120)["status"] == "success"

    # B dies, A comes back: the agent connects to A.
    b.stop_server(signal.SIGKILL)
    a.start_server()
    a.wait_connected("web-2", timeout=120)
    deploy_id = a.deploy("shell", "web-2", script="echo on-a", timeout=60)
    assert a.wait(deploy_id, timeout=120)["status"] == "success"


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        (["127.0.0.1:0"], "expected HOST:PORT, got '127.0.0.1:0'"),
        (["127.0.0.1:65536"], "expected HOST:PORT"),
        (["127.0.0.1:x"], "expected HOST:PORT"),
        ([""], "expected HOST:PORT, got ''"),
        (["a:8471", "b:8471", "a:8471"], "'a:8471' is given twice"),
        (["bad host:8471"], "a host name has no spaces"),
    ],
)
def test_bad_servers_are_refused_before_the_agent_starts(
    tmp_path: Path, servers: list[str], message: str
) -> None:
    (tmp_path / "ca.pem").write_text("")
    args = ["agent", "--client-id", "web-1", "--state-dir", str(tmp_path / "s")]
    args += ["--ca", str(tmp_path / "ca.pem")]
    for server in servers:
        args += ["--server", server]
    done = deployctl(*args)
    assert done.returncode == 2, done
    assert "Invalid value for --server" in done.stderr and message in done.stderr, done.stderr
    assert not (tmp_path / "s").exists()


def test_the_config_file_lists_the_servers_and_the_command_line_wins(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    config = tmp_path / "agent.toml"
    base = ["agent", "--client-id", "web-1", "--state-dir", str(tmp_path / "s")]
    base += ["--ca", str(tmp_path / "ca.pem"), "--config", str(config)]
    for text, message in [
        ('[agent]\nservers = "a:8471"\n', 'servers must be a list of "HOST:PORT" strings'),
        ('[agent]\nservers = ["a:8471", 8471]\n', 'servers must be a list of "HOST:PORT"'),
        ('[agent]\nservers = ["a:8471", "a"]\n', "[agent] servers: expected HOST:PORT, got 'a'"),
        ('[agent]\nservers = ["a:1", "a:1"]\n', "[agent] servers: 'a:1' is given twice"),
        ("[agent]\nservers = []\n", "Missing option '--server'"),
    ]:
        config.write_text(text)
        done = deployctl(*base)
        assert done.returncode == 2 and message in done.stderr, (text, done.stderr)
    assert "Missing option '--server'" in deployctl(*base[:-2]).stderr


def test_an_agent_with_a_config_file_listing_servers_connects(
    replicas: tuple[DeployCenter, DeployCenter],
) -> None:
    a, b = replicas
    b.start_server()
    down = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    down.bind(("127.0.0.1", 0))  # held open, never answered: a server that is down
    try:
        config = a.root / "agent-web-3.toml"
        config.write_text(
            f'[agent]\nservers = ["127.0.0.1:{down.getsockname()[1]}", "127.0.0.1:{b.quic_port}"]\n'
        )
        start_agent(a, "web-3", [], "--config", str(config))
        b.wait_connected("web-3", timeout=120)
    finally:
        down.close()
