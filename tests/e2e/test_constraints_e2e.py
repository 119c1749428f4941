"""The agent's constraints end to end: an agent started with a ``[constraints]`` config file
refuses what they forbid — the deployment fails with the rule, nothing runs — and runs the
rest (real server, real agent process, real QUIC)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy_core.testing import DeployCenter


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    base = tmp_path_factory.getbasetemp()
    config = f"""
[constraints]
workdir_roots = ["{base}"]
deny_extra = [{{ name = "no-telnet", pattern = '\\btelnet\\b' }}]

[constraints.limits]
output_bytes = "4KiB"
"""
    c = DeployCenter(tmp_path_factory.mktemp("constraints"))
    try:
        c.start_server()
        c.start_agent("guarded", config=config)
        yield c
    finally:
        c.close()


def log_lines(center: DeployCenter, deploy_id: str) -> list[str]:
    return [line["line"] for line in center.api.logs(deploy_id)["lines"]]


def test_dangerous_script_fails_with_the_rule_and_never_runs(
    center: DeployCenter, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    deploy_id = center.deploy("shell", "guarded", script=f"touch {marker}\nrm -rf /\n", timeout=30)
    record = center.wait(deploy_id, timeout=30)
    assert record["status"] == "failed"
    assert record["error"].startswith('refused by constraint deny:rm-root: "rm -rf /" (line 2)')
    assert not marker.exists()
    assert any(
        "refused by constraint deny:rm-root" in line for line in log_lines(center, deploy_id)
    )


def test_benign_near_miss_runs(center: DeployCenter, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = f"mkdir -p build && touch build/app.o\nrm -rf ./build\ntouch {marker}\n"
    deploy_id = center.deploy("shell", "guarded", script=script, workdir=str(tmp_path), timeout=30)
    record = center.wait(deploy_id, timeout=30)
    assert record["status"] == "success", record["error"]
    assert marker.exists() and not (tmp_path / "build").exists()


def test_rules_and_limits_come_from_the_agents_config(center: DeployCenter, tmp_path: Path) -> None:
    refused = center.wait(
        center.deploy("shell", "guarded", script="telnet db.internal 5432"), timeout=30
    )
    assert refused["status"] == "failed"
    assert refused["error"].startswith("refused by constraint deny:no-telnet")

    outside = center.wait(
        center.deploy("shell", "guarded", script="pwd", workdir="/etc"), timeout=30
    )
    assert outside["status"] == "failed"
    assert "refused by constraint workdir_roots: working directory /etc" in outside["error"]

    script = "seq -f 'line %g of a long and chatty deploy script' 1 1000"
    chatty = center.deploy("shell", "guarded", script=script, workdir=str(tmp_path))
    record = center.wait(chatty, timeout=30)
    assert record["status"] == "success"
    lines = log_lines(center, chatty)
    assert lines[-1] == "[output truncated after 4096 bytes]"
    assert 80 < len(lines) < 120
    assert record["result"]["stdout_tail"].endswith(
        "line 1000 of a long and chatty deploy script\n"
    )


def test_a_refused_rollback_script_fails_the_rollback(center: DeployCenter) -> None:
    deploy_id = center.deploy(
        "shell",
        "guarded",
        script="exit 3",
        rollback={"strategy": "script", "script": "echo undo\nreboot\n"},
    )
    record = center.wait(deploy_id, timeout=30)
    assert record["status"] == "rollback_failed"
    assert "exited with code 3" in record["error"]
    assert record["rollback"]["success"] is False
    assert record["rollback"]["error"].startswith('refused by constraint deny:shutdown: "reboot"')


def test_an_agent_whose_constraints_cannot_hold_refuses_to_start(center: DeployCenter) -> None:
    for client_id, config, complaint in [
        ("misconfigured", '[constraints]\nrun_as = "no-such-user-here"\n', "no such user"),
        ("typo", "[constraints]\nmax_script_size = 10\n", "constraints.max_script_size"),
    ]:
        proc = center.start_agent(client_id, config=config, wait=False)
        end = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        assert proc.returncode not in (None, 0)
        assert complaint in center.log(f"agent-{client_id}")
