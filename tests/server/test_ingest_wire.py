"""Group commit through a real server (issue 13 §3): many agents' reports, callbacks and
acknowledgements over QUIC land in order and once, in shared transactions, each
acknowledged only after its transaction committed; on SQLite and PostgreSQL.

Agents are raw QUIC peers with keys enrolled by hand (tests/security/security_harness.py);
the ingest's writer is held by :class:`~ingest_gate.Gate` where a test needs work queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from ingest_gate import WAIT, Gate, queued
from security.security_harness import RawPeer, raw_peer

from deploy_core.models import (
    EVENT_CALLBACK,
    EVENT_STATUS,
    DeployCallbackPayload,
    DeployStatus,
    DeployStatusReport,
)
from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.rows import HistoryRow
from deploy_core.transport import Envelope, Kind

pytestmark = pytest.mark.asyncio

AGENTS = 24
REPORTS = 15


@pytest_asyncio.fixture
async def server(tmp_path: Path, db_url: str) -> AsyncIterator[DeployServer]:
    config = ServerConfig(state_dir=tmp_path / "server", api_port=0, quic_port=0, db_url=db_url)
    server = DeployServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def enrolled(server: DeployServer, count: int) -> dict[str, tuple[bytes, str]]:
    """``count`` clients enrolled with a key each, and a deployment of each not yet sent:
    client id → (key, deploy id)."""
    made = {}
    for n in range(count):
        client_id, key = f"agent-{n:03d}", secrets.token_bytes(32)
        await server.db(server.records.enroll, client_id, key.hex())
        record = await server.deployments.submit(
            client_id=client_id,
            command_type="deploy.shell",
            request={"params": {"script": "true"}, "health_checks": [], "rollback": None},
            deadline=time.time() + 600,
        )
        made[client_id] = (key, record.deploy_id)
    return made


def status(deploy_id: str, seq: int) -> Envelope:
    report = DeployStatusReport(
        deploy_id=deploy_id,
        command_type="deploy.shell",
        status=DeployStatus.SCRIPT_RUNNING,
        progress=seq,
        stage="script_running",
        message=f"report {seq}",
        seq=seq,
    )
    return Envelope(kind=Kind.EVENT, name=EVENT_STATUS, payload=report.model_dump(mode="json"))


def callback(deploy_id: str) -> Envelope:
    payload = DeployCallbackPayload(
        callback_id=deploy_id,
        command_type="deploy.shell",
        deploy_type="shell",
        status=DeployStatus.SUCCESS,
        success=True,
        result={"exit_code": 0},
    )
    return Envelope(kind=Kind.EVENT, name=EVENT_CALLBACK, payload=payload.model_dump(mode="json"))


async def answers(peer: RawPeer, wanted: int) -> list[Envelope]:
    """The next ``wanted`` ACKs and ERRORs the server sends (commands are skipped)."""
    got: list[Envelope] = []
    while len(got) < wanted:
        env = await peer.recv(WAIT)
        if env.kind in (Kind.ACK, Kind.ERROR):
            got.append(env)
    return got


async def connected(
    server: DeployServer, stack: contextlib.AsyncExitStack, client_id: str, key: bytes
) -> tuple[RawPeer, Envelope]:
    """A signed-in peer and the command the server sent it on connecting."""
    peer = await stack.enter_async_context(
        raw_peer(server.transport.port, server.state.certs.ca_cert, timeout=WAIT, idle_timeout=60)
    )
    assert (await peer.authenticate(client_id, key)).kind is Kind.WELCOME
    command = await peer.recv(WAIT)
    assert command.kind is Kind.COMMAND, command
    return peer, command


def agent_lines(history: list[HistoryRow]) -> list[tuple[int, str]]:
    return [(h.seq, h.message) for h in history if h.seq is not None]


async def test_many_agents_reports_land_in_order_once_and_in_shared_transactions(
    server: DeployServer,
) -> None:
    agents = await enrolled(server, AGENTS)
    async with contextlib.AsyncExitStack() as stack:
        peers = await asyncio.gather(
            *(connected(server, stack, cid, key) for cid, (key, _d) in agents.items())
        )
        gate = Gate(server.ingest)
        plug = asyncio.ensure_future(server.ingest.submit(lambda conn: None))
        await gate.wait_arrived()  # the writer holds a transaction of its own first

        async def run(peer: RawPeer, command: Envelope, deploy_id: str) -> list[Envelope]:
            # The command's ACK, the reports, the callback, then two resends: all in one go,
            # as an agent's outbox sends them.
            peer.send_env(Envelope(kind=Kind.ACK, ref=command.id, payload={"deploy_id": deploy_id}))
            events = [status(deploy_id, seq) for seq in range(REPORTS)] + [callback(deploy_id)]
            for env in [*events, events[3], events[-1]]:
                peer.send_env(env)
            got = await answers(peer, len(events) + 2)
            assert [a.kind for a in got] == [Kind.ACK] * len(got), [a.payload for a in got]
            assert [a.ref for a in got] == [e.id for e in [*events, events[3], events[-1]]]
            return got

        running = [
            asyncio.ensure_future(run(peer, command, agents[cid][1]))
            for (peer, command), cid in zip(peers, agents, strict=True)
        ]
        await queued(server.ingest, AGENTS)  # every command ACK waits behind the plug
        gate.open()
        await asyncio.wait_for(asyncio.gather(*running), WAIT * 4)
        await plug
        batches = list(gate.batches)  # before the peers leave (disconnects are stored too)

    records = server.records
    for _cid, (_key, deploy_id) in agents.items():
        record = await server.db(records.get, deploy_id)
        assert record is not None
        assert record.status == "success" and record.finished_at is not None
        assert record.acked_at is not None and record.last_seq == REPORTS - 1
        history = await server.db(records.history, deploy_id)
        assert agent_lines(history) == [(seq, f"report {seq}") for seq in range(REPORTS)]
        assert [h.status for h in history].count("success") == 1
    assert await server.db(records.locks) == []
    stats = server.ingest.stats
    messages = AGENTS * (1 + REPORTS + 1 + 2) + 1
    assert sum(batches) == messages and stats.failed == 0
    # Everything queued behind the plug (at least every agent's command ACK; with one
    # connection's messages pipelined, often more) went in one transaction.
    assert batches[0] == 1 and batches[1] >= AGENTS
    assert len(batches) < messages


async def test_no_acknowledgement_before_the_commit(server: DeployServer) -> None:
    ((client_id, (key, deploy_id)),) = (await enrolled(server, 1)).items()
    async with contextlib.AsyncExitStack() as stack:
        peer, _command = await connected(server, stack, client_id, key)
        gate = Gate(server.ingest)
        report = status(deploy_id, 0)
        peer.send_env(report)
        await gate.wait_arrived()  # stored by a transaction the test holds
        await peer.round_trip(WAIT)  # the server answers meanwhile, but not the report
        assert [e.kind for e in peer.received._queue if e.ref == report.id] == []  # type: ignore[attr-defined]
        assert agent_lines(await server.db(server.records.history, deploy_id)) == []
        gate.open()
        (answer,) = await answers(peer, 1)
        assert answer.kind is Kind.ACK and answer.ref == report.id
    assert agent_lines(await server.db(server.records.history, deploy_id)) == [(0, "report 0")]


async def test_a_report_failing_in_a_batch_is_not_acknowledged_and_the_others_are(
    server: DeployServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents = await enrolled(server, 4)
    (_k0, plug_deploy), (_k1, bad_deploy) = agents["agent-000"], agents["agent-001"]
    records = server.records
    apply_reports_in = records.apply_reports_in
    broken = True

    def failing(conn: Any, reports: list[tuple[str, DeployStatusReport]]) -> Any:
        applied = apply_reports_in(conn, reports)
        if broken and any(report.deploy_id == bad_deploy for _c, report in reports):
            raise RuntimeError("the disk is gone")  # after its writes: they must not stay
        return applied

    monkeypatch.setattr(records, "apply_reports_in", failing)
    async with contextlib.AsyncExitStack() as stack:
        peers = {
            cid: (await connected(server, stack, cid, key))[0] for cid, (key, _d) in agents.items()
        }
        gate = Gate(server.ingest)
        sent = {cid: status(deploy_id, 0) for cid, (_key, deploy_id) in agents.items()}
        peers["agent-000"].send_env(sent["agent-000"])
        await gate.wait_arrived()  # the plug is held; the other three queue behind it
        for cid in ("agent-001", "agent-002", "agent-003"):
            peers[cid].send_env(sent[cid])
        await queued(server.ingest, 3)
        gate.open()
        for cid in ("agent-000", "agent-002", "agent-003"):
            (answer,) = await answers(peers[cid], 1)
            assert answer.kind is Kind.ACK and answer.ref == sent[cid].id, cid
        for _ in range(int(WAIT / 0.01)):
            if server.ingest.stats.failed:
                break
            await asyncio.sleep(0.01)
        assert server.ingest.stats.failed == 1 and server.ingest.stats.fallbacks == 1
        assert gate.batches[:2] == [1, 3]
        bad = peers["agent-001"]
        await bad.round_trip(WAIT)
        assert [e.ref for e in bad.received._queue] == []  # type: ignore[attr-defined]
        assert agent_lines(await server.db(records.history, bad_deploy)) == []

        broken = False  # the agent sends it again, as its outbox does, and it is taken
        bad.send_env(sent["agent-001"])
        (answer,) = await answers(bad, 1)
        assert answer.kind is Kind.ACK and answer.ref == sent["agent-001"].id
    assert agent_lines(await server.db(records.history, bad_deploy)) == [(0, "report 0")]
    assert agent_lines(await server.db(records.history, plug_deploy)) == [(0, "report 0")]


async def test_refused_reports_are_answered_in_their_place_among_the_stored_ones(
    server: DeployServer,
) -> None:
    """A malformed report (refused at once) and one naming another agent's deployment
    (refused in the storing transaction) between good ones: each is answered in arrival
    order, only the good ones are stored."""
    agents = await enrolled(server, 2)
    (key, deploy_id), (_other_key, others) = agents["agent-000"], agents["agent-001"]
    async with contextlib.AsyncExitStack() as stack:
        peer, _command = await connected(server, stack, "agent-000", key)
        gate = Gate(server.ingest)
        malformed = status(deploy_id, 1)
        malformed.payload["progress"] = 500
        sent = [status(deploy_id, 0), malformed, status(deploy_id, 2), status(others, 3)]
        sent.append(status(deploy_id, 4))
        peer.send_env(sent[0])
        await gate.wait_arrived()  # the first is held: the refusal at once must wait for it
        for env in sent[1:]:
            peer.send_env(env)
        await queued(server.ingest, 3)
        gate.open()
        got = await answers(peer, len(sent))
    assert [(a.kind, a.ref) for a in got] == [
        (Kind.ACK, sent[0].id),
        (Kind.ERROR, sent[1].id),
        (Kind.ACK, sent[2].id),
        (Kind.ERROR, sent[3].id),
        (Kind.ACK, sent[4].id),
    ]
    assert got[1].payload["reason"].startswith("malformed deploy.status: ")
    assert "progress" in got[1].payload["reason"]
    assert f"no deployment {others} for client agent-000" in got[3].payload["reason"]
    history = await server.db(server.records.history, deploy_id)
    assert agent_lines(history) == [(0, "report 0"), (2, "report 2"), (4, "report 4")]
    assert agent_lines(await server.db(server.records.history, others)) == []


async def test_other_messages_wait_until_what_came_before_is_stored(server: DeployServer) -> None:
    ((client_id, (key, deploy_id)),) = (await enrolled(server, 1)).items()
    async with contextlib.AsyncExitStack() as stack:
        peer, _command = await connected(server, stack, client_id, key)
        gate = Gate(server.ingest)
        report = status(deploy_id, 0)
        other = Envelope(kind=Kind.EVENT, name="no.such.event", payload={})
        peer.send_env(report)
        peer.send_env(other)
        await gate.wait_arrived()
        await peer.round_trip(WAIT)
        # The event no handler takes would be refused at once; it waits for the report.
        assert [e.ref for e in peer.received._queue] == []  # type: ignore[attr-defined]
        gate.open()
        first, second = await answers(peer, 2)
    assert (first.kind, first.ref) == (Kind.ACK, report.id)
    assert (second.kind, second.ref) == (Kind.ERROR, other.id)


async def test_a_stopping_server_waits_a_bounded_time_for_messages_being_stored(
    server: DeployServer,
) -> None:
    ((client_id, (key, deploy_id)),) = (await enrolled(server, 1)).items()
    async with contextlib.AsyncExitStack() as stack:
        peer, _command = await connected(server, stack, client_id, key)
        gate = Gate(server.ingest)
        report = status(deploy_id, 0)
        peer.send_env(report)
        await gate.wait_arrived()  # its transaction held: the database does not answer
        await asyncio.wait_for(server.events.drain(timeout=0.2), WAIT)  # gives up, bounded
        gate.open()
        await peer.round_trip(WAIT)
        # Given up on: not answered, though stored once the database answered (the agent
        # sends it again; the repeat changes nothing).
        assert [e.ref for e in peer.received._queue] == []  # type: ignore[attr-defined]
        peer.send_env(report)
        (answer,) = await answers(peer, 1)
        assert (answer.kind, answer.ref) == (Kind.ACK, report.id)
    assert agent_lines(await server.db(server.records.history, deploy_id)) == [(0, "report 0")]
