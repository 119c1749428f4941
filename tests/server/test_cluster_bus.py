"""Routing through PostgreSQL (issue 15 §2): two real DeployServers on one PostgreSQL schema
and a real agent connected to replica A only.  A deployment submitted through replica B
reaches the agent through A's connection (LISTEN/NOTIFY), a long-poll on B sees A's changes,
an announcement repeated or lost still sends the command exactly once, a revocation through
B cuts the agent's connection on A, and a malformed notification is ignored.  The payload
codec is checked on its own too."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa

from deploy_core.agent.runtime import Agent
from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.cluster_bus import (
    DISPATCH,
    MAX_PAYLOAD,
    RECORD,
    channel_name,
    decode,
    encode,
)
from deploy_core.server.db import deployments, status_history
from deploy_core.testing import agent_for
from tests.waits import eventually

WAIT = 60.0


# --------------------------------------------------------------------------- the codec


def test_payloads_round_trip_and_stay_under_the_limit() -> None:
    ids = [f"deploy-{i:06d}-{'x' * 40}" for i in range(2000)]
    payloads = encode("replica-a", RECORD, ids)
    assert len(payloads) > 1
    assert all(len(p.encode()) < MAX_PAYLOAD for p in payloads)
    back: list[str] = []
    for payload in payloads:
        origin, kind, got = decode(payload)
        assert (origin, kind) == ("replica-a", RECORD)
        back += got
    assert back == ids
    [pairs] = encode("b", DISPATCH, [("d1", "web-1"), ("d2", "web-2")])
    assert decode(pairs) == ("b", DISPATCH, [("d1", "web-1"), ("d2", "web-2")])


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[]",
        json.dumps({"o": "a", "k": "record"}),
        json.dumps({"o": "a", "k": "drop-tables", "ids": []}),
        json.dumps({"o": "", "k": "record", "ids": []}),
        json.dumps({"o": "a", "k": "record", "ids": [1]}),
        json.dumps({"o": "a", "k": "record", "ids": ["x" * 129]}),
        json.dumps({"o": "a", "k": "dispatch", "ids": ["d1"]}),
        json.dumps({"o": "a", "k": "dispatch", "ids": [["d1", None]]}),
        json.dumps({"o": "a", "k": "record", "ids": [], "extra": 1}),
    ],
)
def test_malformed_payloads_are_refused(payload: str) -> None:
    with pytest.raises(ValueError):
        decode(payload)


def test_channel_depends_on_database_and_schema() -> None:
    one = channel_name("test", "t_1")
    assert one == channel_name("test", "t_1")
    assert one != channel_name("test", "t_2") != channel_name("other", "t_1")
    assert len(one) < 63  # PostgreSQL's identifier limit


# --------------------------------------------------------------------------- two replicas


class Pair:
    """Replicas A and B on one schema; an agent held by A; an API client for each."""

    def __init__(self, a: DeployServer, b: DeployServer, agent: Agent, root: Path) -> None:
        self.a, self.b, self.agent, self.root = a, b, agent, root
        self.http = {
            name: httpx.AsyncClient(
                base_url=s.api_url,
                headers={"Authorization": f"Bearer {s.state.admin_token}"},
                timeout=WAIT + 30,
            )
            for name, s in (("a", a), ("b", b))
        }

    async def deploy(self, via: str, script: str, client_id: str = "web-1") -> dict[str, Any]:
        r = await self.http[via].post(
            "/api/deploy/shell", json={"client_id": client_id, "script": script}
        )
        assert r.status_code == 202, r.text
        return r.json()

    async def wait(self, via: str, deploy_id: str) -> dict[str, Any]:
        r = await self.http[via].get(f"/api/deploy/{deploy_id}", params={"wait": WAIT})
        assert r.status_code == 200, r.text
        return r.json()

    def statuses(self, deploy_id: str) -> list[str]:
        with self.a.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(status_history.c.status)
                    .where(status_history.c.deploy_id == deploy_id)
                    .order_by(status_history.c.id)
                ).scalars()
            )


def _config(root: Path, name: str, db_url: str) -> ServerConfig:
    return ServerConfig(
        state_dir=root / name,
        api_port=0,
        quic_port=0,
        db_url=db_url,
        server_id=f"replica-{name}",
        heartbeat_flush_interval=0.5,
        # B announces a name of its own: what replicas tell each other, not what they bind.
        advertise_host="replica-b.test" if name == "b" else None,
    )


@pytest_asyncio.fixture
async def pair(tmp_path: Path, pg_url: str) -> AsyncIterator[Pair]:
    a = DeployServer(_config(tmp_path, "a", pg_url))
    await a.start()
    b = DeployServer(_config(tmp_path, "b", pg_url))
    await b.start()
    agent = agent_for(a, "web-1", tmp_path / "agent")
    task = asyncio.create_task(agent.run())
    pair = Pair(a, b, agent, tmp_path)
    try:
        assert await agent.connector.wait_connected(30), agent.connector.last_error
        assert a.bus is not None and b.bus is not None
        assert a.bus.listening.is_set() and b.bus.listening.is_set()

        async def known_on_b() -> bool:
            r = await pair.http["b"].get("/api/clients/web-1")
            return r.status_code == 200 and r.json()["connected"]

        await eventually(known_on_b, "web-1 recorded as connected")
        yield pair
    finally:
        for client in pair.http.values():
            await client.aclose()
        await agent.stop()
        await asyncio.wait_for(task, 30)
        await b.stop()
        await a.stop()


async def test_deploy_through_b_runs_on_the_agent_held_by_a(pair: Pair) -> None:
    marker = pair.root / "through-b.txt"
    answer = await pair.deploy("b", f"echo routed > {marker}; echo done")
    assert answer["client_connected"] is True  # connected, to the other replica
    assert not pair.b.is_connected("web-1") and pair.a.is_connected("web-1")
    # The long-poll on B wakes on changes A records (the bus's record notifications).
    record = await pair.wait("b", answer["deploy_id"])
    assert record["status"] == "success", record
    assert marker.read_text() == "routed\n"
    statuses = pair.statuses(answer["deploy_id"])
    assert statuses[0] == "pending" and statuses[-1] == "success"
    assert statuses.count("success") == 1
    logs = (await pair.http["b"].get(f"/api/deploy/{answer['deploy_id']}/logs")).json()
    assert [line["line"] for line in logs["lines"] if line["stream"] == "stdout"] == ["done"]


async def test_live_subscribers_on_b_see_every_change_made_on_a(pair: Pair) -> None:
    seen: list[str] = []
    async with pair.b.listeners.subscribe("*") as queue:
        answer = await pair.deploy("a", "sleep 0.2; echo hi")
        deploy_id = answer["deploy_id"]
        end = time.monotonic() + WAIT
        while "success" not in seen and time.monotonic() < end:
            view = await asyncio.wait_for(queue.get(), end - time.monotonic())
            if view["deploy_id"] == deploy_id:
                seen.append(view["status"])
    # B reads the row when told of a change, so it may skip states made in between; the
    # newest state is what a live view needs.
    assert seen[-1] == "success", seen


async def test_follow_logs_on_b_streams_lines_reported_to_a(pair: Pair) -> None:
    answer = await pair.deploy("a", "echo one; sleep 0.5; echo two")
    lines: list[dict[str, Any]] = []
    async with pair.http["b"].stream(
        "GET", f"/api/deploy/{answer['deploy_id']}/logs", params={"follow": 1, "max_wait": WAIT}
    ) as r:
        async for raw in r.aiter_lines():
            if raw.strip():
                lines.append(json.loads(raw))
    assert [x["line"] for x in lines if x.get("stream") == "stdout"] == ["one", "two"]
    assert lines[-1] == {"end": True, "status": "success"}


async def test_a_repeated_announcement_sends_the_command_once(pair: Pair) -> None:
    # Recorded without any announcement, as if the replica that took it died before its
    # NOTIFY: the holder's re-scan finds it; announcing it again afterwards sends nothing.
    record = await pair.b.db(
        pair.b.records.create_deployment,
        deploy_id="silent-1",
        client_id="web-1",
        command_type="deploy.shell",
        request={"params": {"script": f"echo x >> {pair.root / 'count.txt'}"}},
        deadline=time.time() + 120,
    )
    assert record.dispatched_at is None
    await pair.a.dispatcher.resync()  # (or A's own periodic re-scan was first)
    assert await pair.a.dispatcher.deliver_announced([("silent-1", "web-1")]) == 0
    assert await pair.a.dispatcher.resync() == 0
    done = await pair.wait("a", "silent-1")
    assert done["status"] == "success", done["error"]
    assert (pair.root / "count.txt").read_text() == "x\n"  # ran once


async def test_a_replica_ignores_announcements_for_agents_it_does_not_hold(pair: Pair) -> None:
    record = await pair.a.db(
        pair.a.records.create_deployment,
        deploy_id="held-by-a",
        client_id="web-1",
        command_type="deploy.shell",
        request={"params": {"script": "true"}},
        deadline=time.time() + 120,
    )
    assert await pair.b.dispatcher.deliver_announced([(record.deploy_id, "web-1")]) == 0
    assert await pair.b.dispatcher.resync() == 0
    with pair.b.engine.connect() as conn:
        sent = conn.execute(
            sa.select(deployments.c.dispatched_at).where(deployments.c.deploy_id == "held-by-a")
        ).scalar_one()
    assert sent is None  # B never claimed it
    await pair.a.dispatcher.resync()  # (unless A's own periodic re-scan was first)
    assert (await pair.wait("a", "held-by-a"))["status"] == "success"


async def test_revoking_through_b_cuts_the_connection_on_a(pair: Pair) -> None:
    r = await pair.http["b"].post("/api/clients/web-1/revoke")
    assert r.status_code in (200, 204), r.text

    async def cut() -> bool:
        return not pair.a.is_connected("web-1")

    await eventually(cut, "A to cut web-1's connection")


async def test_malformed_notifications_are_ignored(pair: Pair) -> None:
    assert pair.a.bus is not None
    before = pair.a.bus.malformed
    with pair.a.engine.begin() as conn:
        for junk in ("garbage", json.dumps({"o": "x", "k": "record", "ids": [7]})):
            conn.execute(sa.select(sa.func.pg_notify(pair.a.bus.channel, junk)))

    async def counted() -> bool:
        assert pair.a.bus is not None
        return pair.a.bus.malformed >= before + 2

    await eventually(counted, "the junk to be read and refused")
    marker = pair.root / "after-junk.txt"
    answer = await pair.deploy("b", f"touch {marker}")
    assert (await pair.wait("b", answer["deploy_id"]))["status"] == "success"
    assert marker.exists()


async def test_cluster_view_and_metrics_show_the_bus(pair: Pair) -> None:
    answer = await pair.deploy("b", "true")
    assert (await pair.wait("b", answer["deploy_id"]))["status"] == "success"
    view = (await pair.http["b"].get("/api/cluster")).json()
    assert view["bus"]["listening"] is True
    assert view["bus"]["sent"] >= 1 and view["bus"]["received"] >= 1
    assert view["bus"]["malformed"] == 0
    metrics = (await pair.http["a"].get("/metrics")).text
    assert "deploy_center_cluster_bus_listening 1.0" in metrics
    assert 'deploy_center_cluster_bus_notifications_total{outcome="received"}' in metrics


async def test_replicas_announce_their_advertised_address(pair: Pair) -> None:
    view = (await pair.http["a"].get("/api/cluster")).json()
    rows = {r["server_id"]: r for r in view["replicas"]}
    assert rows["replica-b"]["api_url"] == f"http://replica-b.test:{pair.b.api_port}"
    assert rows["replica-b"]["quic_address"] == f"replica-b.test:{pair.b.transport.port}"
    assert rows["replica-a"]["api_url"] == pair.a.api_url  # the listening address
    assert pair.b.api_url.startswith("http://127.0.0.1:")  # local clients still use it
