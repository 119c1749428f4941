"""PostgreSQL cut mid-deployment (issue 15 item 6): a real ``deployctl server`` process on a
real PostgreSQL schema reached through a TCP proxy on loopback (tests/pg_proxy.py), a real
agent running a shell script.  While the database is cut: the script keeps running, the
agent keeps its events in its outbox, ``/healthz`` says 503 and then fenced, new work is
refused with 503, and a new agent's handshake is refused cleanly (the agent retries, the
server stays up).  When the database is back: the deployment ends ``success`` with its whole
status history, each report and log line stored once, and the new agent connects and
deploys."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from deploy_core.testing import DeployCenter
from tests.pg_proxy import PgProxy

T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, seconds: float = 120.0) -> T:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@pytest.fixture
def center(tmp_path: Path, pg_url: str) -> Iterator[tuple[DeployCenter, PgProxy]]:
    proxy = PgProxy().start()
    c = DeployCenter(tmp_path / "center", db_url=proxy.url(pg_url))
    try:
        yield c, proxy
    finally:
        proxy.restore()
        c.close()
        proxy.close()


def outbox(center: DeployCenter, client_id: str) -> list[str]:
    """The names of the events the agent still holds (its journal, read-only)."""
    path = center.root / f"agent-{client_id}" / "journal.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        return [name for (name,) in db.execute("SELECT name FROM outbox ORDER BY seq")]


def test_a_deployment_outlives_a_database_outage_and_reports_once(
    center: tuple[DeployCenter, PgProxy], tmp_path: Path
) -> None:
    c, proxy = center
    work = tmp_path / "work"
    work.mkdir()
    c.start_server(timeout=60)
    c.start_agent("web-1", timeout=60)
    health_url = f"http://127.0.0.1:{c.api_port}/healthz"
    http = httpx.Client(timeout=30)
    assert http.get(health_url).status_code == 200

    script = (
        f"touch {work}/started; i=0; "
        f"while [ ! -f {work}/go ] && [ $i -lt 900 ]; do "
        f"i=$((i+1)); echo tick $i; echo $i >> {work}/ticks; sleep 0.2; done; "
        "echo finished"
    )
    deploy_id = c.deploy("shell", "web-1", script=script, timeout=600)
    wait_until(lambda: (work / "started").exists(), "the script to start")
    wait_until(
        lambda: "script_running" in [e["status"] for e in c.api.history(deploy_id)],
        "the server to store 'script_running'",
    )
    wait_until(
        lambda: "tick 3" in [line["line"] for line in c.api.logs(deploy_id)["lines"]],
        "the server to store some of the script's output",
    )

    def ticks() -> int:
        return len((work / "ticks").read_text().split())

    proxy.cut()
    cut_at = ticks()

    # The API says why; after a lease period without its database the replica is fenced.
    def fenced() -> dict[str, Any] | None:
        answer = http.get(health_url)
        body = answer.json()
        if answer.status_code == 200:  # its last probe, up to a second old
            return None
        assert answer.status_code == 503, (answer.status_code, body)
        return body if body["detail"]["fenced"] else None

    body = wait_until(fenced, "the replica to be fenced", 90)
    assert body["ok"] is False and "database" in body["error"], body
    refused = http.post(
        f"http://127.0.0.1:{c.api_port}/api/deploy/shell",
        json={"client_id": "web-1", "script": "true"},
        headers={"Authorization": f"Bearer {(c.server_dir / 'admin.token').read_text().strip()}"},
    )
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5", refused.text
    assert "this replica has not reached its database" in refused.json()["error"]

    # A new agent cannot enrol without the database: refused cleanly, it keeps trying.
    c.start_agent("web-2", wait=False)
    wait_until(
        lambda: "refused web-2" in c.log("agent-web-2"), "the new agent's handshake refused", 90
    )
    assert c.server_proc.poll() is None, c.log("server")[-3000:]
    assert c.agents["web-2"].poll() is None, c.log("agent-web-2")[-3000:]

    # The script kept running all along; it ends while the database is still cut, and the
    # agent holds its final report.
    assert ticks() > cut_at, "the script stopped while the database was cut"
    (work / "go").touch()
    wait_until(lambda: "command.callback" in outbox(c, "web-1"), "the final report in the outbox")
    held = outbox(c, "web-1")
    print(f"ticks at the cut: {cut_at}, at the end: {ticks()}; events held: {len(held)}")

    proxy.restore()
    wait_until(lambda: http.get(health_url).status_code == 200, "the replica to be healthy")
    record = c.wait(deploy_id, timeout=180)
    assert record["status"] == "success", record
    wait_until(lambda: not outbox(c, "web-1"), "the agent's outbox to empty", 120)

    history = c.api.history(deploy_id)
    statuses = [e["status"] for e in history]
    assert statuses[0] == "pending" and statuses[-1] == "success", statuses
    assert statuses.count("script_running") >= 1 and statuses.count("success") == 1, statuses
    seqs = [e["seq"] for e in history if e["seq"] is not None]
    assert len(seqs) == len(set(seqs)), f"a report stored twice: {history}"
    lines = [line["line"] for line in c.api.logs(deploy_id)["lines"]]
    total = ticks()
    counted = Counter(lines)
    assert all(counted[f"tick {i}"] == 1 for i in range(1, total + 1)), counted
    assert counted["finished"] == 1, lines[-5:]

    # The new agent connects now, and takes work.
    c.wait_connected("web-2", timeout=120)
    second = c.deploy("shell", "web-2", script=f"echo second > {work}/second", timeout=120)
    assert c.wait(second, timeout=120)["status"] == "success"
    assert (work / "second").read_text() == "second\n"
    assert "is fenced" in c.log("server") and "is no longer fenced" in c.log("server")
    http.close()
