"""``deployctl`` never prints a script's control sequences raw: logs, status, list and
``--wait`` show them escaped (``\\x1b]52;…``), against a real server and agent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from deploy_core.cli import main, terminal_safe
from deploy_core.testing import DeployCenter

# OSC 52 (write the clipboard), clear screen, carriage return, bell, and a C1 CSI.
HOSTILE = r"printf 'clip \033]52;c;Zm9v\007 clear \033[2J back \r over \302\233q end\n'"
ESCAPED = r"clip \x1b]52;c;Zm9v\x07 clear \x1b[2J back \x0d over \x9bq end"
RAW = ("\x1b", "\x07", "\r", "\x9b")


def test_controls_are_escaped_but_newline_and_tab_kept() -> None:
    assert terminal_safe("a\x1b]52;c;Zm9v\x07b") == r"a\x1b]52;c;Zm9v\x07b"
    assert terminal_safe("x\r\x00\x7f\x9b\x85y") == r"x\x0d\x00\x7f\x9b\x85y"
    assert terminal_safe("line\n\tindented é ✓") == "line\n\tindented é ✓"
    assert terminal_safe(3) == "3"


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("terminal"))
    try:
        c.start_server()
        c.start_agent("tty-1")
        yield c
    finally:
        c.close()


def _run(center: DeployCenter, *args: str) -> str:
    api_args = ["--url", f"http://127.0.0.1:{center.api_port}", "--token"]
    token = (center.server_dir / "admin.token").read_text().strip()
    result = CliRunner().invoke(main, [*args, *api_args, token])
    output = result.output  # stdout and stderr
    assert not any(c in output for c in RAW), repr(output)
    return output


@pytest.fixture(scope="module")
def hostile_deploy(center: DeployCenter) -> str:
    deploy_id = center.deploy("shell", "tty-1", script=HOSTILE + "; exit 3")
    assert center.wait(deploy_id)["status"] == "failed"
    return deploy_id


def test_logs_print_control_sequences_escaped(center: DeployCenter, hostile_deploy: str) -> None:
    out = _run(center, "logs", hostile_deploy)
    assert f"[stdout] {ESCAPED}" in out
    followed = _run(center, "logs", "-f", hostile_deploy)
    assert f"[stdout] {ESCAPED}" in followed


def test_status_prints_the_output_tail_escaped(center: DeployCenter, hostile_deploy: str) -> None:
    out = _run(center, "status", "--history", hostile_deploy)
    assert ESCAPED in out
    assert "failed" in out


def test_list_escapes_what_it_prints(center: DeployCenter, hostile_deploy: str) -> None:
    out = _run(center, "list", "--client", "tty-1")
    assert hostile_deploy in out


def test_wait_prints_the_outcome_escaped(center: DeployCenter) -> None:
    out = _run(center, "deploy", "shell", "--client", "tty-1", "--script", HOSTILE, "--wait")
    assert ESCAPED in out
    assert ": success" in out
