"""The watchdog's lease moves when its holder is killed (issue 15 §3): two real ``deployctl
server`` processes on one PostgreSQL database; the first holds the watchdog and expires an
overdue deployment, SIGKILL leaves its lease behind, and the second takes the duty after the
lease period and expires the next one; ``deployctl cluster status --json`` on the survivor
shows the dead replica stale and the duty moved."""

from __future__ import annotations

import json
import signal
import time
import uuid
from typing import Any

from test_agent_failover_e2e import replicas

from deploy_core.server.db import make_engine
from deploy_core.server.records import RecordStore
from deploy_core.testing import DeployCenter

__all__ = ["replicas"]  # the two-replica fixture of the agent failover test

WAIT = 120.0  # lease (15 s) + a try (~4 s) + a slow shared machine


def status(center: DeployCenter) -> dict[str, Any]:
    done = center.deployctl("cluster", "status", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    view: dict[str, Any] = json.loads(done.stdout)
    return view


def until(check: Any, what: str) -> Any:
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_watchdog_lease_moves_when_its_holder_is_killed(
    replicas: tuple[DeployCenter, DeployCenter],
) -> None:
    a, b = replicas
    a.start_server()
    b.start_server()
    assert a.db_url is not None
    engine = make_engine(a.db_url)
    store = RecordStore(engine)
    try:

        def overdue() -> str:
            deploy_id = f"d-{uuid.uuid4().hex[:8]}"
            store.create_deployment(
                deploy_id=deploy_id,
                client_id=f"gone-{deploy_id}",
                command_type="shell",
                request={"params": {"script": "true"}},
                deadline=time.time() - 1,
            )
            return deploy_id

        def timed_out(deploy_id: str) -> bool:
            record = store.get(deploy_id)
            return record is not None and record.status == "timeout"

        view = status(b)
        ids = {r["server_id"]: r for r in view["replicas"]}
        assert view["live"] == 2 and len(ids) == 2
        (holder,) = [d["holder"] for d in view["duties"] if d["duty"] == "watchdog"]
        first_center, other = (
            (a, b) if ids[holder]["api_url"].endswith(f":{a.api_port}") else (b, a)
        )
        first = overdue()
        until(lambda: timed_out(first), f"{first} to time out")
        assert f"deployment {first} timed out" in first_center.log("server")
        assert first not in other.log("server")

        first_center.stop_server(signal.SIGKILL)  # its lease and heartbeat row stay behind
        second = overdue()
        until(lambda: timed_out(second), f"{second} to time out on the survivor")
        assert f"deployment {second} timed out" in other.log("server")

        def moved() -> dict[str, Any] | None:
            view = status(other)
            rows = {r["server_id"]: r for r in view["replicas"]}
            dead = rows.get(holder)
            return view if dead is not None and not dead["live"] else None

        view = until(moved, f"{holder} to be marked stale")
        rows = {r["server_id"]: r for r in view["replicas"]}
        (survivor,) = [sid for sid in rows if sid != holder]
        assert view["live"] == 1 and rows[survivor]["live"]
        assert "watchdog" in rows[survivor]["duties"] and rows[holder]["duties"] == []
        assert {d["duty"]: d["holder"] for d in view["duties"]}["watchdog"] == survivor
    finally:
        engine.dispose()
