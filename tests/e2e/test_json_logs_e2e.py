"""``--log-format json`` (issue 16 §3): every line a real server or agent process writes is
one JSON object with time, level, logger and message, and the deployment and client it is
about where the process knows them."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy_core.logs import JsonFormatter, bind
from deploy_core.testing import DeployCenter, free_port

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def parse_lines(text: str) -> list[dict[str, Any]]:
    """Every line as JSON (failing on the first that is not), each with the four fields."""
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        assert line.strip(), f"line {number} is empty"
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}")
        assert isinstance(entry, dict)
        assert RFC3339_UTC.match(entry["time"]), entry
        assert entry["level"] in ("debug", "info", "warning", "error", "critical"), entry
        assert isinstance(entry["logger"], str) and entry["logger"], entry
        assert isinstance(entry["message"], str), entry
        lines.append(entry)
    return lines


def test_server_writes_only_json_lines(tmp_path: Path) -> None:
    api_port = free_port()
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "deploy_core.cli", "server", "--log-format", "json"),
            *("--state-dir", str(state), "--api-port", str(api_port), "--quic-port", "0"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{api_port}"
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                # Refused (no token): the server logs a warning for it.
                if httpx.get(f"{url}/api/info", timeout=5).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "server did not answer"
            time.sleep(0.1)
        token = (state / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        # An unknown deploy type: answered 404/422 and maybe logged; either way JSON.
        httpx.post(f"{url}/api/deploy/nope", json={}, headers=headers, timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _out, err = proc.communicate(timeout=30)
    lines = parse_lines(err.decode())
    assert any(e["logger"] == "deploy_core.server.app" for e in lines), lines
    refusals = [e for e in lines if "refused GET /api/info" in e["message"]]
    assert refusals and refusals[0]["level"] == "warning", lines


@pytest.fixture
def center(tmp_path: Path) -> Any:
    c = DeployCenter(tmp_path / "center", env={"DEPLOY_CENTER_LOG_FORMAT": "json"})
    try:
        c.start_server()
        c.start_agent("web-1")
        yield c
    finally:
        c.close()


def test_a_deployment_s_lines_carry_its_id(center: DeployCenter) -> None:
    deploy_id = center.deploy("shell", "web-1", script="echo hi")
    assert center.wait(deploy_id)["status"] == "success"
    center.stop_agent("web-1")
    center.wait_connected("web-1", connected=False)
    # The watchdog's lines name the deployment it expired.
    expired = center.deploy("shell", "web-1", script="echo never", deadline=1)
    assert center.wait(expired)["status"] == "timeout"
    agent = parse_lines(center.log("agent-web-1"))
    # The harness writes the server's stdout (its banner) to the same file: only stderr is
    # JSON, and test_server_writes_only_json_lines reads it on its own.
    server = parse_lines("\n".join(x for x in center.log("server").splitlines() if x[:1] == "{"))
    about = [e for e in agent if e.get("deploy_id") == deploy_id]
    assert about, agent
    # The agent names itself on every line.
    assert all(e.get("client_id") == "web-1" for e in agent), agent
    # The server knows which agent a connection's lines are about.
    connected = [e for e in server if "agent web-1 connected" in e["message"]]
    assert connected and connected[0]["client_id"] == "web-1", server
    timed_out = [e for e in server if "timed out" in e["message"]]
    assert timed_out and timed_out[0]["deploy_id"] == expired, server
    assert timed_out[0]["level"] == "warning" and timed_out[0]["client_id"] == "web-1"


def test_the_formatter_keeps_one_line_and_carries_exceptions() -> None:
    formatter = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "x.y", logging.ERROR, __file__, 1, "two\nlines %s", ("here",), sys.exc_info()
        )
    record.thing = object()  # an extra= field JSON cannot carry: written as text
    record.count = 3
    bind(deploy_id="d" * 32)
    try:
        text = formatter.format(record)
    finally:
        bind(deploy_id=None)
    assert "\n" not in text
    entry = json.loads(text)
    assert entry["message"] == "two\nlines here"
    assert entry["level"] == "error" and entry["logger"] == "x.y"
    assert entry["deploy_id"] == "d" * 32
    assert "ValueError: boom" in entry["exc_info"] and "Traceback" in entry["exc_info"]
    assert entry["count"] == 3 and entry["thing"].startswith("<object")
    # extra= wins over the context
    record.deploy_id = "e" * 32
    assert json.loads(formatter.format(record))["deploy_id"] == "e" * 32
