"""Two real ``deployctl server`` replicas on the machine's PostgreSQL, real agents, real QUIC
on loopback (issue 15, "Outgrow one server"):

- a deployment POSTed to replica B reaches an agent connected to replica A (the cluster bus
  routes it), and its script's effect is checked on disk;
- B's live feed (``WS /api/live``), a long-poll and a followed log on B see a deployment made
  on A while it runs and when it ends in ``success``;
- ``kill -9`` of replica A while several of its agents are mid-deployment: they move to B,
  every deployment ends, each script ran exactly once, no report is lost, and the watchdog
  lease moves to B.

Each test runs twice: the replicas sharing one identity by a copy of the first one's state
directory (``copied``), and by the database under a cluster key, B started with
``--join-cluster`` on an empty state directory (``joined``).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from chaos_harness import read_journal
from test_agent_failover_e2e import OWN_FILES, deployctl, start_agent, wait_for

from deploy_core.testing import DeployCenter

T = TypeVar("T")

WAIT = 120.0  # bound on every wait for an effect on a slow, shared 2-core machine
# The watchdog lease (15 s, not configurable from the command line) + one try (~4 s) + a
# generous margin for a loaded machine.
LEASE_MOVE_BOUND = 15.0 + 4.0 + 70.0


@pytest.fixture(params=["copied", "joined"])
def replicas(
    request: pytest.FixtureRequest, tmp_path: Path, pg_url: str
) -> Iterator[tuple[DeployCenter, DeployCenter]]:
    """Two replicas on one fresh PostgreSQL schema with one identity, neither running; A must
    start first (a joining B takes the identity A published)."""
    a = DeployCenter(tmp_path / "a", db_url=pg_url)
    b = DeployCenter(tmp_path / "b", db_url=pg_url)
    try:
        if request.param == "copied":
            a.start_server()
            a.stop_server()
            shutil.copytree(
                a.server_dir, b.server_dir, ignore=lambda _dir, names: OWN_FILES & set(names)
            )
        else:
            key = tmp_path / "cluster.key"
            made = deployctl("cluster", "key", "--out", str(key))
            assert made.returncode == 0, made.stderr
            a.server_args = ["--cluster-key-file", str(key)]
            b.server_args = ["--cluster-key-file", str(key), "--join-cluster"]
        yield a, b
    finally:
        for center in (a, b):
            center.close()


def until(check: Callable[[], T | None], what: str, seconds: float = WAIT) -> T:
    """``check()``'s first truthy answer, polled; AssertionError after ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")


def cluster(center: DeployCenter) -> dict[str, Any]:
    """``GET /api/cluster`` on ``center``."""
    view: dict[str, Any] = center.api.request("GET", "/api/cluster")
    return view


def server_id(center: DeployCenter) -> str:
    return str(cluster(center)["server_id"])


def watchdog_holder(center: DeployCenter) -> str | None:
    for duty in cluster(center)["duties"]:
        if duty["duty"] == "watchdog":
            return str(duty["holder"])
    return None


def start_both(a: DeployCenter, b: DeployCenter) -> None:
    a.start_server()
    b.start_server()
    until(lambda: cluster(b)["live"] == 2, "both replicas to be live")


def agent_on(center: DeployCenter, client_id: str) -> None:
    """An agent given only ``center``'s QUIC port (so ``center`` holds it), connected."""
    start_agent(center, client_id, [center.quic_port])
    center.wait_connected(client_id, timeout=WAIT)


def held_by(observer: DeployCenter, holder: str) -> int:
    """How many agents ``observer``'s ``GET /api/cluster`` says replica ``holder`` holds."""
    for row in cluster(observer)["replicas"]:
        if row["server_id"] == holder:
            return int(row["agents_held"])
    raise AssertionError(f"{holder} not listed by {observer.api_port}: {cluster(observer)}")


def complete_history(center: DeployCenter, deploy_id: str, report_seq: int) -> list[str]:
    """What is missing from a deployment's status history: every agent report 0..report_seq
    (the agent journal's last sequence number) and exactly one agent callback."""
    history = center.api.history(deploy_id)
    problems = []
    seqs = sorted(h["seq"] for h in history if h["source"] == "agent" and h["seq"] is not None)
    if seqs != list(range(report_seq + 1)):
        problems.append(f"{deploy_id}: reports 0..{report_seq} sent, history has {seqs}")
    callbacks = [h for h in history if h["source"] == "agent" and h["seq"] is None]
    if [h["status"] for h in callbacks] != ["success"]:
        problems.append(f"{deploy_id}: callbacks {callbacks}")
    return problems


# --------------------------------------------------------------------------- routing


def test_a_deployment_posted_to_b_runs_on_an_agent_held_by_a(
    replicas: tuple[DeployCenter, DeployCenter], tmp_path: Path
) -> None:
    a, b = replicas
    start_both(a, b)
    agent_on(a, "web-a")  # given A only (with both, its client id picks where it starts)
    a_id = server_id(a)
    until(lambda: held_by(b, a_id) == 1, "B to list web-a as held by A")
    (row,) = [c for c in b.api.clients() if c["client_id"] == "web-a"]
    assert row["connected"] and not row["connected_here"], row

    out = tmp_path / "written-via-b"
    deploy_id = b.deploy(
        "shell", "web-a", script=f'echo "$DEPLOY_ID via B" > {out}; echo done', timeout=60
    )
    record = b.wait(deploy_id, timeout=WAIT)
    assert record["status"] == "success", record
    assert out.read_text() == f"{deploy_id} via B\n"
    # The agent never reconnected: the command went through its one connection, to A.
    assert a.log("agent-web-a").count("connected to 127.0.0.1") == 1, a.log("agent-web-a")
    assert held_by(b, a_id) == 1
    assert a.api.get(deploy_id)["status"] == "success"
    assert [line["line"] for line in b.api.logs(deploy_id)["lines"]] == ["done"]

    # And a second one through B: the route is not a one-off.
    again = b.deploy("shell", "web-a", script=f"echo again >> {out}", timeout=60)
    assert b.wait(again, timeout=WAIT)["status"] == "success"
    assert out.read_text() == f"{deploy_id} via B\nagain\n"


# --------------------------------------------------------------------------- what B sees


class LiveDeployments:
    """The ``deployment`` events of ``WS /api/live`` on one replica, collected in a thread."""

    def __init__(self, center: DeployCenter) -> None:
        from websockets.sync.client import connect

        token = (center.server_dir / "admin.token").read_text().strip()
        self._connection = connect(
            f"ws://127.0.0.1:{center.api_port}/api/live",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=30,
        )
        self.socket = self._connection.__enter__()
        hello = json.loads(self.socket.recv(timeout=30))
        assert hello["type"] == "hello", hello
        self.server_id = hello["server_id"]
        self.events: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                message = json.loads(self.socket.recv())
                if message["type"] == "deployment":
                    self.events.append(message["record"])
        except Exception:
            return

    def statuses(self, deploy_id: str) -> list[str]:
        seen = [e["status"] for e in list(self.events) if e["deploy_id"] == deploy_id]
        return [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]

    def close(self) -> None:
        self._connection.__exit__(None, None, None)
        self.thread.join(10)


def test_b_sees_a_deployment_made_on_a_live(
    replicas: tuple[DeployCenter, DeployCenter], tmp_path: Path
) -> None:
    a, b = replicas
    start_both(a, b)
    agent_on(a, "web-a")
    go = tmp_path / "go"
    live = LiveDeployments(b)
    try:
        assert live.server_id == server_id(b) != server_id(a)
        deploy_id = a.deploy(
            "shell",
            "web-a",
            script=f"echo first; while [ ! -f {go} ]; do sleep 0.1; done; echo second",
            timeout=WAIT,
        )
        # A long-poll on B for the end, and B's followed log, both opened mid-deployment.
        polled: dict[str, Any] = {}

        def long_poll() -> None:
            started = time.monotonic()
            polled["record"] = b.api.get(deploy_id, wait=60)
            polled["took"] = time.monotonic() - started

        lines: list[dict[str, Any]] = []

        def follow() -> None:
            for item in b.api.follow_logs(deploy_id, max_wait=WAIT):
                lines.append(item)

        threads = [threading.Thread(target=f, daemon=True) for f in (long_poll, follow)]
        for thread in threads:
            thread.start()
        # The script waits for `go` until B's follower has shown its first line: the line
        # reached B while the deployment was still running on A.
        until(lambda: any(i.get("line") == "first" for i in lines), "'first' in B's log follow")
        # B's feed shows it running before it ends (it carries the record as B reads it on
        # A's notice, so a state as short as `pending` may be passed over).
        running = until(
            lambda: [e for e in list(live.events) if e["deploy_id"] == deploy_id],
            "B's live feed to show the deployment while it runs",
        )
        assert not any(e["finished"] for e in running), running
        assert "record" not in polled, polled  # the long-poll is still waiting for the end
        go.touch()
        for thread in threads:
            thread.join(WAIT)
            assert not thread.is_alive(), "a long-poll or log follow on B never returned"

        record = polled["record"]
        assert record["finished"] and record["status"] == "success", record
        # It woke on the change made through A, not at the end of its 60 s.
        assert polled["took"] < 55, f"B's long-poll returned only at its timeout: {polled}"
        assert [i.get("line") for i in lines if "line" in i] == ["first", "second"], lines
        assert lines[-1] == {"end": True, "status": "success"}, lines

        def ended() -> list[str] | None:
            seen = live.statuses(deploy_id)
            return seen if seen and seen[-1] == "success" else None

        statuses = until(ended, "B's live feed to show the deployment succeed")
        assert statuses[0] in ("pending", "executing", "script_running"), statuses
        assert statuses.count("success") == 1, statuses
        # The feed carries the records as B's API shows them.
        last = [e for e in live.events if e["deploy_id"] == deploy_id][-1]
        assert last["finished"] and last["client_id"] == "web-a", last
    finally:
        live.close()


# --------------------------------------------------------------------------- kill -9


def test_replica_a_killed_mid_deployments_its_agents_finish_on_b(
    replicas: tuple[DeployCenter, DeployCenter], tmp_path: Path
) -> None:
    a, b = replicas
    a.start_server()
    agents = [f"web-{i}" for i in range(1, 4)]
    # B is down: every agent, though given both, lands on A; A takes the watchdog lease.
    for client_id in agents:
        start_agent(a, client_id, [a.quic_port, b.quic_port])
    for client_id in agents:
        a.wait_connected(client_id, timeout=WAIT)
    a_id = server_id(a)
    until(lambda: watchdog_holder(a) == a_id, "A to hold the watchdog lease")
    b.start_server()
    b_id = server_id(b)
    until(lambda: held_by(b, a_id) == len(agents), "B to list the agents as held by A")
    assert watchdog_holder(b) == a_id

    work = tmp_path / "work"
    work.mkdir()
    ids: dict[str, str] = {}
    for client_id in agents:
        script = (
            f"echo $DEPLOY_ID >> {work}/runs-{client_id}; "
            f"touch {work}/started-{client_id}; "
            "sleep 4; "
            f"echo $DEPLOY_ID > {work}/done-{client_id}; echo finished"
        )
        # The last one through B: routed to A, then moved with its agent.
        through = b if client_id == agents[-1] else a
        ids[client_id] = through.deploy("shell", client_id, script=script, timeout=WAIT)
    for client_id in agents:
        wait_for(work / f"started-{client_id}", WAIT)
    killed_at = time.monotonic()
    a.stop_server(signal.SIGKILL)

    for client_id in agents:
        b.wait_connected(client_id, timeout=WAIT)
    records = {c: b.wait(d, timeout=WAIT) for c, d in ids.items()}
    for client_id, record in records.items():
        assert record["status"] == "success", record
        assert record["finished"], record
        # Ran once, to its end.
        assert (work / f"runs-{client_id}").read_text() == f"{ids[client_id]}\n"
        assert (work / f"done-{client_id}").read_text() == f"{ids[client_id]}\n"
        lines = [line["line"] for line in b.api.logs(ids[client_id])["lines"]]
        assert lines == ["finished"], lines

    # No report lost: the outboxes drain into B, and B's history has every report.
    journals = {c: a.root / f"agent-{c}" / "journal.db" for c in agents}
    until(lambda: all(read_journal(j)[1] == 0 for j in journals.values()), "outboxes to drain")
    problems = []
    for client_id, journal in journals.items():
        rows = {row.deploy_id: row for row in read_journal(journal)[0]}
        row = rows[ids[client_id]]
        assert row.state == "finished" and row.final_status == "success", row
        problems += complete_history(b, ids[client_id], row.report_seq)
    assert not problems, problems
    until(lambda: held_by(b, b_id) == len(agents), "B to list the agents as held by B")

    # The watchdog lease moves to B within a lease period (+ a try and a margin).
    until(
        lambda: watchdog_holder(b) == b_id,
        "B to take the watchdog lease",
        seconds=max(1.0, LEASE_MOVE_BOUND - (time.monotonic() - killed_at)),
    )
    rows = {r["server_id"]: r for r in cluster(b)["replicas"]}
    assert "watchdog" in rows[b_id]["duties"], rows
    assert not rows[a_id]["duties"], rows

    # New work through B reaches the agents now held by B.
    again = b.deploy("shell", "web-1", script=f"echo again > {work}/again", timeout=60)
    assert b.wait(again, timeout=WAIT)["status"] == "success"
    assert (work / "again").read_text() == "again\n"
