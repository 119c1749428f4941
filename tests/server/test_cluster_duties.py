"""Replicas on one database (issue 15 §3, §1, §7): the watchdog runs on the holder of its lease
only, a replica that dies (no release) or stops hands its duties over, ``GET /api/cluster`` on
either replica lists both with their duties and agents, a stale replica is marked, and
``deployctl cluster status --json`` prints it — two real DeployServers on SQLite (one file)
and on PostgreSQL (one schema)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa

from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.db import clients, status_history
from deploy_core.server.http.cluster import ClusterView
from deploy_core.server.leases import RETENTION, WATCHDOG
from deploy_core.server.records import Applied
from tests.waits import eventually

LEASE = 2.0
BEAT = 0.2
WAIT = 60.0  # the longest any condition is waited for (a slow shared machine)


class Cluster:
    """Replicas started on one database; each one's watchdog expiries are recorded."""

    def __init__(self, root: Path, db_url: str) -> None:
        self.root = root
        self.db_url = db_url
        self.servers: dict[str, DeployServer] = {}
        self.expired: list[tuple[str, str]] = []  # (server_id, deploy_id)

    async def start(self, name: str, retention_days: float | None = 3650) -> DeployServer:
        server = DeployServer(
            ServerConfig(
                state_dir=self.root / name,
                api_port=0,
                quic_port=0,
                db_url=self.db_url,
                server_id=name,
                watchdog_interval=0.05,
                heartbeat_flush_interval=BEAT,
                lease_seconds=LEASE,
                retention_days=retention_days,
            )
        )
        await server.start()
        self.servers[name] = server
        told = server.watchdog.expired

        async def record(applied: Applied, name: str = name) -> None:
            assert applied.record is not None
            self.expired.append((name, applied.record.deploy_id))
            await told(applied)

        server.watchdog.expired = record
        return server

    async def kill(self, name: str) -> None:
        """Stop ``name`` as a crash would leave the database: its lease and its heartbeat
        row stay behind."""
        server = self.servers.pop(name)
        server.leases.release_all = lambda: None  # type: ignore[method-assign]
        server.replicas.remove = lambda: None  # type: ignore[method-assign]
        await server.stop()

    async def stop(self, name: str) -> None:
        await self.servers.pop(name).stop()

    async def overdue(self, via: DeployServer) -> str:
        """A deployment already past its deadline (its agent never connected)."""
        deploy_id = f"d-{uuid.uuid4().hex[:8]}"
        await via.db(
            via.records.create_deployment,
            deploy_id=deploy_id,
            client_id=f"web-{deploy_id}",
            command_type="shell",
            request={"params": {"script": "true"}},
            deadline=time.time() - 1,
        )
        return deploy_id

    async def timed_out(self, via: DeployServer, deploy_id: str) -> None:
        async def check() -> bool:
            record = await via.db(via.records.get, deploy_id)
            return record is not None and record.status == "timeout"

        await eventually(check, f"{deploy_id} to time out")

    def timeouts(self, via: DeployServer, deploy_id: str) -> int:
        with via.engine.connect() as conn:
            return len(
                conn.execute(
                    sa.select(status_history.c.id).where(
                        status_history.c.deploy_id == deploy_id,
                        status_history.c.status == "timeout",
                    )
                ).fetchall()
            )


@pytest_asyncio.fixture
async def cluster(tmp_path: Path, db_url: str) -> AsyncIterator[Cluster]:
    group = Cluster(tmp_path, db_url)
    try:
        yield group
    finally:
        for name in list(group.servers):
            await group.stop(name)


async def cluster_view(server: DeployServer) -> dict[str, Any]:
    async with httpx.AsyncClient(
        base_url=server.api_url,
        headers={"Authorization": f"Bearer {server.state.admin_token}"},
        timeout=30,
    ) as http:
        answer = await http.get("/api/cluster")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    ClusterView.model_validate(body)  # as the OpenAPI document says
    return body


def by_id(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["server_id"]: r for r in view["replicas"]}


async def test_one_replica_runs_the_watchdog_and_a_dead_ones_duty_moves(
    cluster: Cluster,
) -> None:
    a = await cluster.start("replica-a")
    b = await cluster.start("replica-b")
    assert a.leases.held() == [WATCHDOG, RETENTION]
    assert b.leases.held() == []

    first = await cluster.overdue(b)  # made through B: whoever holds the lease expires it
    await cluster.timed_out(b, first)
    await asyncio.sleep(20 * 0.05)  # many more passes of both watchdogs
    assert cluster.expired == [("replica-a", first)]
    assert cluster.timeouts(a, first) == 1

    # Both replicas, seen from either: live, A with the duties.
    for via in (a, b):
        view = await cluster_view(via)
        rows = by_id(view)
        assert set(rows) == {"replica-a", "replica-b"} and view["live"] == 2
        assert rows["replica-a"]["duties"] == [RETENTION, WATCHDOG]
        assert rows["replica-b"]["duties"] == []
        assert rows[via.config.server_id or ""]["this"] is True
        assert {d["duty"]: d["holder"] for d in view["duties"]} == {
            WATCHDOG: "replica-a",
            RETENTION: "replica-a",
        }
        assert rows["replica-a"]["api_url"] == a.api_url
        assert rows["replica-b"]["quic_address"].endswith(f":{b.transport.port}")

    # A dies without a word: its lease runs out, then B takes the duty and expires the next.
    await cluster.kill("replica-a")
    second = await cluster.overdue(b)
    await cluster.timed_out(b, second)
    assert cluster.expired == [("replica-a", first), ("replica-b", second)]
    assert cluster.timeouts(b, second) == 1
    assert b.leases.held() == [WATCHDOG, RETENTION]

    async def a_is_stale() -> dict[str, Any] | None:
        # B beats every BEAT s and is stale after 3 missed beats: on a loaded machine one view
        # can catch B late too, so wait for a view with A stale while B is live.
        view = await cluster_view(b)
        rows = by_id(view)
        return view if not rows["replica-a"]["live"] and rows["replica-b"]["live"] else None

    view = await eventually(a_is_stale, "replica-a to be marked stale while replica-b is live")
    rows = by_id(view)
    assert rows["replica-b"]["live"] and view["live"] == 1
    assert rows["replica-a"]["duties"] == [] and rows["replica-b"]["duties"] == [
        RETENTION,
        WATCHDOG,
    ]
    assert rows["replica-a"]["seconds_since_seen"] > 3 * BEAT


async def test_a_replica_that_stops_hands_its_duties_over_and_leaves_the_list(
    cluster: Cluster,
) -> None:
    b = await cluster.start("replica-b")
    c = await cluster.start("replica-c")
    assert b.leases.held() == [WATCHDOG, RETENTION] and c.leases.held() == []
    await cluster.stop("replica-b")  # releases: C takes on its next try, not after expiry
    await eventually(
        lambda: asyncio.sleep(0, c.leases.held() == [WATCHDOG, RETENTION]), "C to take over"
    )
    overdue = await cluster.overdue(c)
    await cluster.timed_out(c, overdue)
    assert cluster.expired == [("replica-c", overdue)]
    view = await cluster_view(c)
    assert list(by_id(view)) == ["replica-c"]  # B's row went with it


async def test_agents_held_per_replica_from_the_clients_rows(cluster: Cluster) -> None:
    a = await cluster.start("replica-a")
    b = await cluster.start("replica-b")
    with a.engine.begin() as conn:
        for n, (server_id, connected) in enumerate(
            [("replica-a", True), ("replica-a", True), ("replica-b", True), ("replica-b", False)]
        ):
            conn.execute(
                clients.insert().values(
                    client_id=f"host-{n}",
                    enrolled_at=time.time(),
                    connected=connected,
                    server_id=server_id,
                )
            )
    rows = by_id(await cluster_view(b))
    assert rows["replica-a"]["agents_held"] == 2
    assert rows["replica-b"]["agents_held"] == 1
    assert rows["replica-a"]["agents_connected"] == 0  # no QUIC session on either


async def test_deployctl_cluster_status(cluster: Cluster) -> None:
    a = await cluster.start("replica-a")
    await cluster.start("replica-b")

    async def deployctl(*args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOY_CENTER_")}
        env["DEPLOY_CENTER_URL"] = a.api_url
        env["DEPLOY_CENTER_TOKEN"] = a.state.admin_token
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "deploy_core.cli",
            "cluster",
            "status",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    view = json.loads(await deployctl("--json"))
    ClusterView.model_validate(view)
    assert view["server_id"] == "replica-a" and view["live"] == 2
    assert by_id(view)["replica-a"]["duties"] == [RETENTION, WATCHDOG]
    text = await deployctl()
    assert text.startswith("2 live of 2 replicas (answered by replica-a)")
    assert "replica-a *  live" in text and "duties: retention, watchdog" in text
    assert "replica-b  live" in text


@pytest.mark.parametrize("scope", ["metrics"])
async def test_cluster_needs_read_scope(cluster: Cluster, scope: str) -> None:
    a = await cluster.start("replica-a")
    async with httpx.AsyncClient(base_url=a.api_url, timeout=30) as http:
        assert (await http.get("/api/cluster")).status_code == 401
        made = await http.post(
            "/api/tokens",
            json={"name": "m", "scope": scope},
            headers={"Authorization": f"Bearer {a.state.admin_token}"},
        )
        assert made.status_code == 201, made.text
        answer = await http.get(
            "/api/cluster", headers={"Authorization": f"Bearer {made.json()['token']}"}
        )
        assert answer.status_code == 403


async def test_a_replica_without_retention_never_holds_its_lease(cluster: Cluster) -> None:
    """Retention off on the first replica, on on the second: the second prunes."""
    a = await cluster.start("replica-a", retention_days=None)
    b = await cluster.start("replica-b")
    assert a.leases.held() == [WATCHDOG]
    assert b.leases.held() == [RETENTION]
    rows = by_id(await cluster_view(a))
    assert rows["replica-a"]["duties"] == [WATCHDOG]
    assert rows["replica-b"]["duties"] == [RETENTION]
