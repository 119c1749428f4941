"""Health checks and rollback end to end: each trigger, failing rollbacks, snapshots, manual
and server-initiated rollbacks — real server, real agent, real HTTP and TCP servers."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy_core.client import ApiError
from deploy_core.testing import DeployCenter, free_port

FAST = {"retries": 1, "interval": 0.1, "attempt_timeout": 1, "timeout": 10}


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("rollback"))
    try:
        c.start_server()
        c.start_agent("r1")
        yield c
    finally:
        c.close()


def rollback_script(flag: Path, code: int = 0) -> dict[str, Any]:
    return {"strategy": "script", "script": f"echo rolled back >> {flag}; exit {code}"}


def test_nonzero_exit_rolls_back_inline_and_rechecks(center: DeployCenter, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    script = (
        f'if [ "$DEPLOY_ACTION" = rollback ]; then echo "undo $DEPLOY_ROLLBACK_OF" >> {marks};'
        f" exit 0; fi; echo do >> {marks}; exit 3"
    )
    check = {"type": "script", "script": f"grep -q undo {marks}", **FAST}
    deploy_id = center.deploy(
        "shell", "r1", script=script, health_checks=[check], rollback={"strategy": "inline"}
    )
    record = center.wait(deploy_id)
    assert record["status"] == "rolled_back"
    assert marks.read_text().split("\n")[:2] == ["do", f"undo {deploy_id}"]
    assert record["rollback"]["strategy"] == "inline" and record["rollback"]["success"]
    assert [h["check_type"] for h in record["rollback"]["health"]] == ["script"]
    assert record["rollback"]["health"][0]["success"]
    history = [r["status"] for r in center.api.history(deploy_id)]
    assert history.index("failed") < history.index("rolling_back") < history.index("rolled_back")


def test_timeout_rolls_back(center: DeployCenter, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    deploy_id = center.deploy(
        "shell", "r1", script="sleep 30", timeout=1, rollback=rollback_script(flag)
    )
    record = center.wait(deploy_id)
    assert record["status"] == "rolled_back"
    assert "timed out" in record["error"]
    assert flag.read_text() == "rolled back\n"
    assert "timeout" in [r["status"] for r in center.api.history(deploy_id)]


class _FlagHandler(http.server.BaseHTTPRequestHandler):
    flag: Path
    hits: list[int]

    def do_GET(self) -> None:
        healthy = self.flag.exists()
        self.hits.append(200 if healthy else 503)
        self.send_response(200 if healthy else 503)
        self.end_headers()
        self.wfile.write(b"ok" if healthy else b"down")

    def log_message(self, *args: Any) -> None:
        pass


def test_failed_http_check_rolls_back_and_the_service_answers(
    center: DeployCenter, tmp_path: Path
) -> None:
    flag = tmp_path / "flag"
    handler = type("H", (_FlagHandler,), {"flag": flag, "hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check = {"type": "http", "port": server.server_address[1], "path": "/health", **FAST}
        deploy_id = center.deploy(
            "shell",
            "r1",
            script="echo deployed",
            health_checks=[check],
            rollback=rollback_script(flag),
        )
        record = center.wait(deploy_id)
    finally:
        server.shutdown()
        server.server_close()
    assert record["status"] == "rolled_back"
    assert record["health"][0]["success"] is False
    assert record["health"][0]["attempts"] == 2  # retries=1: counted attempts
    assert "HTTP 503" in record["health"][0]["error"]
    assert record["rollback"]["health"][0]["success"] is True
    assert handler.hits[:2] == [503, 503] and handler.hits[-1] == 200


def test_failed_tcp_check_rolls_back_and_rechecks(center: DeployCenter, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    port = free_port()
    listening = threading.Event()

    def listen_after_rollback() -> None:
        end = time.monotonic() + 30
        while not flag.exists() and time.monotonic() < end:
            time.sleep(0.02)
        with socket.create_server(("127.0.0.1", port)) as sock:
            listening.set()
            sock.settimeout(10)
            with contextlib.suppress(TimeoutError):
                sock.accept()[0].close()

    thread = threading.Thread(target=listen_after_rollback, daemon=True)
    thread.start()
    # Nothing listens until the rollback script has run: the deploy-time attempts all fail,
    # the re-check after the rollback finds the port open.
    check = {"type": "tcp", "port": port, **FAST, "retries": 3, "interval": 0.2}
    deploy_id = center.deploy(
        "shell", "r1", script="true", health_checks=[check], rollback=rollback_script(flag)
    )
    record = center.wait(deploy_id)
    thread.join(15)
    assert listening.is_set()
    assert record["health"][0]["success"] is False
    assert record["health"][0]["attempts"] == 4
    assert "refused" in record["health"][0]["error"]
    assert record["status"] == "rolled_back"
    assert record["rollback"]["health"][0]["check_type"] == "tcp"
    assert record["rollback"]["health"][0]["success"] is True


def test_failed_script_check_rolls_back(center: DeployCenter, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    check = {"type": "script", "script": f"test -f {flag}", **FAST}
    deploy_id = center.deploy(
        "shell", "r1", script="true", health_checks=[check], rollback=rollback_script(flag)
    )
    record = center.wait(deploy_id)
    assert record["status"] == "rolled_back"
    assert record["health"][0]["success"] is False and record["health"][0]["attempts"] == 2
    assert record["rollback"]["health"][0]["success"] is True


def test_a_failing_rollback_ends_rollback_failed(center: DeployCenter, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    deploy_id = center.deploy(
        "shell", "r1", script="exit 1", rollback=rollback_script(flag, code=4)
    )
    record = center.wait(deploy_id)
    assert record["status"] == "rollback_failed"
    assert record["rollback"]["success"] is False
    assert "code 4" in record["rollback"]["error"]
    assert flag.exists()


def tree_digest(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root``: kind, mode and content hash or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), digest)
    return out


def make_app_dir(root: Path) -> Path:
    app = root / "app"
    (app / "conf").mkdir(parents=True)
    (app / "bin.sh").write_text("#!/bin/sh\necho v1\n")
    (app / "bin.sh").chmod(0o755)
    (app / "conf" / "app.ini").write_text("version=1\n")
    (app / "data.txt").write_text("keep me\n")
    (app / "current").symlink_to("conf/app.ini")
    return app


CHANGE_EVERYTHING = (
    "echo v2 > bin.sh; chmod 600 bin.sh; echo added > new.txt; rm data.txt; "
    "rm current; ln -s bin.sh current; mkdir -p extra/deep; echo x > extra/deep/f"
)


def test_snapshot_restores_the_directory_exactly(center: DeployCenter, tmp_path: Path) -> None:
    app = make_app_dir(tmp_path)
    before = tree_digest(app)
    deploy_id = center.deploy(
        "shell",
        "r1",
        script=CHANGE_EVERYTHING + "; exit 1",
        workdir=str(app),
        rollback={"strategy": "snapshot", "path": str(app)},
    )
    record = center.wait(deploy_id)
    assert record["status"] == "rolled_back", record["error"]
    assert tree_digest(app) == before


def test_manual_rollback_of_a_success_restores_the_earlier_state(
    center: DeployCenter, tmp_path: Path
) -> None:
    app = make_app_dir(tmp_path)
    before = tree_digest(app)
    deployed = center.deploy(
        "shell",
        "r1",
        script=CHANGE_EVERYTHING,
        workdir=str(app),
        rollback={"strategy": "snapshot", "path": str(app)},
    )
    assert center.wait(deployed)["status"] == "success"
    assert tree_digest(app) != before
    accepted = center.api.rollback(deployed)
    assert accepted["rollback_of"] == deployed
    record = center.wait(accepted["deploy_id"])
    assert record["status"] == "rolled_back"
    assert record["command_type"] == "deploy.rollback"
    assert record["rollback_of"] == deployed
    assert center.api.get(deployed)["rolled_back_by"] == accepted["deploy_id"]
    assert tree_digest(app) == before
    with pytest.raises(ApiError) as err:
        center.api.rollback(deployed)
    assert err.value.status == 409 and "already rolled back" in str(err.value)
    with pytest.raises(ApiError) as err:
        center.api.rollback(accepted["deploy_id"])
    assert err.value.status == 409 and "itself a rollback" in str(err.value)


def test_manual_rollback_without_restorable_state_is_409(center: DeployCenter) -> None:
    plain = center.deploy("shell", "r1", script="true")
    center.wait(plain)
    with pytest.raises(ApiError) as err:
        center.api.rollback(plain)
    assert err.value.status == 409 and "no restorable state" in str(err.value)
    running = center.deploy("shell", "r1", script="sleep 1", rollback={"strategy": "inline"})
    with pytest.raises(ApiError) as err:
        center.api.rollback(running)
    assert err.value.status == 409 and "wait for it to finish" in str(err.value)
    center.wait(running)
    with pytest.raises(ApiError) as err:
        center.api.rollback("f" * 32)
    assert err.value.status == 404


def test_server_rolls_back_what_its_agent_did_not(tmp_path: Path) -> None:
    """The agent dies mid-deployment and stays away past the deadline: the watchdog gives the
    deployment up and asks for a rollback, which reaches the agent when it returns; the agent,
    which rolled the interrupted deployment back itself on restart, does not do it twice."""
    c = DeployCenter(tmp_path / "c")
    try:
        c.start_server()
        c.start_agent("r2")
        flag = tmp_path / "flag"
        started = tmp_path / "started"
        deploy_id = c.deploy(
            "shell",
            "r2",
            script=f"touch {started}; sleep 30",
            deadline=3,
            timeout=30,
            rollback=rollback_script(flag),
        )
        end = time.monotonic() + 20
        while not started.exists() and time.monotonic() < end:
            time.sleep(0.05)
        c.stop_agent("r2", signal.SIGKILL)
        record = c.api.get(deploy_id)
        while not record["rolled_back_by"] and time.monotonic() < end:
            time.sleep(0.1)
            record = c.api.get(deploy_id)
        assert record["status"] == "timeout"
        assert record["rolled_back_by"], "the server did not ask for a rollback"
        assert c.api.get(record["rolled_back_by"])["status"] == "pending"
        c.start_agent("r2")
        rollback = c.wait(record["rolled_back_by"])
        assert rollback["status"] == "rolled_back"
        # The agent's own account arrived late and is kept beside the server's verdict.
        final = c.wait(deploy_id)
        assert final["agent_status"] == "rolled_back"
        assert flag.read_text() == "rolled back\n"  # rolled back once, not twice
    finally:
        c.close()
