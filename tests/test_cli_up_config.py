"""``deployctl up --config``: the server configuration file ``deployctl server`` reads
(``[defaults.rollback]``, ``[http]``, ``[plugins.NAME]``) applies to ``up`` too, read by the
same function, and a bad one stops ``up`` before anything starts.

``deployctl up`` runs as a process on loopback; its deployments run real shell scripts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy_core.client import DeployClient
from deploy_core.plugins import get_plugins
from deploy_core.testing import free_port
from tests.conftest import missing_part

DEPLOYCTL = [sys.executable, "-m", "deploy_core.cli"]
CONFIG = """\
[plugins.some_plugin]
colour = "blue"

[defaults.rollback."deploy.shell"]
strategy = "inline"

[http]
header_timeout = 1
"""


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOY_CENTER_")}
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1"}


def _up_command(state_dir: Path, config: Path) -> list[str]:
    return [
        *DEPLOYCTL,
        "up",
        "--state-dir",
        str(state_dir),
        "--api-port",
        "0",
        "--quic-port",
        str(free_port(socket.SOCK_DGRAM)),
        "--config",
        str(config),
    ]


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Callable[[Path], DeployClient]]:
    """``up(config)`` starts ``deployctl up --config config``, waits for its local agent and
    returns a client of its API; stopped at the end."""
    plugins = get_plugins()
    if "deploy.shell" not in plugins.deploy_types or "inline" not in plugins.rollback_strategies:
        missing_part("deploy_shell and rollback_basic must be installed")
    procs: list[subprocess.Popen[str]] = []
    clients: list[DeployClient] = []

    def start(config: Path) -> DeployClient:
        state_dir = tmp_path / "state"
        proc = subprocess.Popen(
            _up_command(state_dir, config),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(tmp_path),
            start_new_session=True,
        )
        procs.append(proc)
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if line.strip().startswith("local agent:"):
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(120)
        banner = "".join(lines)
        assert "local agent:  connected" in banner, banner
        (url,) = [ln.split()[-1] for ln in lines if ln.strip().startswith("API:")]
        client = DeployClient(url, (state_dir / "admin.token").read_text().strip(), timeout=60)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.close()
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_up_applies_the_rollback_defaults_and_http_limits_of_its_config(
    up: Callable[[Path], DeployClient], tmp_path: Path
) -> None:
    config = tmp_path / "server.toml"
    config.write_text(CONFIG)
    api = up(config)

    # [defaults.rollback]: a failing shell deployment that names no rollback is undone inline.
    info = api.request("GET", "/api/info")
    assert info["rollback_defaults"]["deploy.shell"]["source"] == "server defaults"
    workdir = tmp_path / "app"
    workdir.mkdir()
    accepted = api.deploy(
        "shell",
        {
            "client_id": "local",
            "workdir": str(workdir),
            "script": 'if [ "$DEPLOY_ACTION" = rollback ]; then echo undone > undone.txt; '
            "exit 0; fi; echo broken > state.txt; exit 3",
        },
    )
    record = api.wait(accepted["deploy_id"], timeout=120)
    assert record["request"]["rollback_plan"]["source"] == "server defaults"
    assert record["status"] == "rolled_back", (record["error"], record["rollback"])
    assert (workdir / "undone.txt").read_text() == "undone\n"

    # [http]: a request whose headers never end is closed after header_timeout = 1.
    port = int(api.url.rsplit(":", 1)[1].rstrip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.settimeout(60)
        sock.sendall(b"GET /api/clients HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"headers did not arrive within 1 s" in answer


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[http]\nheader_timeout = 0\n", "[http]: HTTP header_timeout must be a positive number"),
        ('[defaults.rollback."deploy.shell"]\nstrategy = "magic"\n', "unknown rollback strategy"),
        ("[nonsense]\nx = 1\n", "unknown section(s) nonsense"),
    ],
)
def test_a_bad_config_stops_up_before_anything_starts(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "server.toml"
    config.write_text(text)
    state_dir = tmp_path / "state"
    done = subprocess.run(
        _up_command(state_dir, config),
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=120,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert str(config) in done.stderr and message in done.stderr, done.stderr
    assert not (state_dir / "server.json").exists()
    assert not (state_dir / "agent-local").exists()
