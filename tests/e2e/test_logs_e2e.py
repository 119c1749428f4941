"""Deployment logs end to end: streamed as they happen, in order, bounded, secrets masked."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy_core.testing import DeployCenter

SECRET = "s3cr3t-Value-42"


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("logs"))
    c.server_args = ["--max-log-bytes", "20000"]
    try:
        c.start_server()
        c.start_agent("l1")
        yield c
    finally:
        c.close()


def test_follow_streams_lines_while_the_script_runs(center: DeployCenter) -> None:
    script = "for i in 1 2 3 4 5; do echo line-$i; sleep 0.4; done; echo err-line >&2"
    deploy_id = center.deploy("shell", "l1", script=script)
    seen: list[tuple[float, dict[str, Any]]] = []
    for item in center.api.follow_logs(deploy_id):
        seen.append((time.monotonic(), item))
    lines = [item["line"] for _, item in seen if "line" in item]
    assert lines == ["line-1", "line-2", "line-3", "line-4", "line-5", "err-line"]
    assert seen[-1][1] == {"end": True, "status": "success"}
    # Streamed as they happened, not all at the end: the first arrived well before the last.
    first = next(t for t, item in seen if item.get("line") == "line-1")
    last = next(t for t, item in seen if item.get("line") == "line-5")
    assert last - first > 1.0
    streams = {item["line"]: item["stream"] for _, item in seen if "line" in item}
    assert streams["err-line"] == "stderr" and streams["line-1"] == "stdout"


def test_follow_from_another_thread_sees_the_same_as_a_later_read(center: DeployCenter) -> None:
    deploy_id = center.deploy("shell", "l1", script="seq 1 300")
    followed: list[str] = []
    thread = threading.Thread(
        target=lambda: followed.extend(
            i["line"] for i in center.api.follow_logs(deploy_id) if "line" in i
        )
    )
    thread.start()
    thread.join(30)
    assert followed == [str(n) for n in range(1, 301)]
    stored = [line["line"] for line in center.api.logs(deploy_id)["lines"]]
    assert stored == followed


def test_output_past_the_limit_keeps_head_and_tail_with_a_marker(center: DeployCenter) -> None:
    deploy_id = center.deploy("shell", "l1", script="seq 1 20000")  # ~109 KB of output, limit 20 KB
    record = center.wait(deploy_id)
    assert record["status"] == "success"
    everything = []
    after = 0
    while True:
        page = center.api.logs(deploy_id, after=after)
        if not page["lines"]:
            break
        everything.extend(page["lines"])
        after = page["next_after"]
    lines = [entry["line"] for entry in everything]
    # The agent streamed the head, then at the end one line saying what it left out, then
    # the tail: the server's own truncation never had to act.
    (marker,) = [entry for entry in everything if entry["stream"] == "agent"]
    assert marker["line"].startswith("[output truncated: ")
    at = everything.index(marker)
    head, tail = lines[:at], lines[at + 1 :]
    assert head == [str(n) for n in range(1, len(head) + 1)]
    assert tail == [str(n) for n in range(20001 - len(tail), 20001)]
    left_out = sum(len(str(n)) + 1 for n in range(len(head) + 1, 20001 - len(tail)))
    assert f"{left_out} bytes left out" in marker["line"]
    assert not any(entry["stream"] == "server" for entry in everything)
    assert 15000 < sum(len(line) for line in lines) <= 20000


def test_secret_values_are_masked_in_logs_results_and_records(
    center: DeployCenter, tmp_path: Path
) -> None:
    used = tmp_path / "used"
    script = (
        f'echo "token is $API_TOKEN"; echo "$API_TOKEN" > {used}; echo "$API_TOKEN" >&2; exit 1'
    )
    deploy_id = center.deploy("shell", "l1", script=script, secret_env={"API_TOKEN": SECRET})
    record = center.wait(deploy_id)
    assert used.read_text().strip() == SECRET  # the script got the real value
    assert record["status"] == "failed"
    assert SECRET not in str(record)
    assert "token is ***" in record["result"]["stdout_tail"]
    assert record["request"]["secret_env_names"] == ["API_TOKEN"]
    lines = [line["line"] for line in center.api.logs(deploy_id)["lines"]]
    assert "token is ***" in lines and SECRET not in str(lines)
    assert SECRET not in str(center.api.history(deploy_id))
    assert SECRET not in center.log("server") and SECRET not in center.log("agent-l1")
