"""One ACK for many events (envelope.CAPABILITY_ACK_REFS): to an agent that announced it,
the events of one connection stored in one transaction are acknowledged by one ACK naming
them all, in order, still only after the commit; refusals keep their place between them;
an agent without it gets one ACK per event (tests/server/test_ingest_wire.py).

Agents are raw QUIC peers (tests/security/security_harness.py); the ingest's writer is held
by :class:`~ingest_gate.Gate` so that the reports queue into one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from ingest_gate import WAIT, Gate, queued
from security.security_harness import RawPeer, raw_peer

from deploy_core.models import EVENT_STATUS, DeployStatus, DeployStatusReport
from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.events import MAX_ACK_REFS, MAX_IN_FLIGHT
from deploy_core.transport import Envelope, Kind
from deploy_core.transport.envelope import CAPABILITY_ACK_REFS

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DeployServer]:
    config = ServerConfig(state_dir=tmp_path / "server", api_port=0, quic_port=0)
    server = DeployServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def status(deploy_id: str, seq: int) -> Envelope:
    report = DeployStatusReport(
        deploy_id=deploy_id,
        command_type="deploy.shell",
        status=DeployStatus.SCRIPT_RUNNING,
        progress=seq % 100,
        stage="script_running",
        message=f"report {seq}",
        seq=seq,
    )
    return Envelope(kind=Kind.EVENT, name=EVENT_STATUS, payload=report.model_dump(mode="json"))


@contextlib.asynccontextmanager
async def agent(server: DeployServer, *, ack_refs: bool) -> AsyncIterator[tuple[RawPeer, str]]:
    """A signed-in raw peer (announcing the capability or not) with a deployment sent to it,
    whose command it has acknowledged."""
    client_id, key = f"agent-{secrets.token_hex(3)}", secrets.token_bytes(32)
    await server.db(server.records.enroll, client_id, key.hex())
    record = await server.deployments.submit(
        client_id=client_id,
        command_type="deploy.shell",
        request={"params": {"script": "true"}, "health_checks": [], "rollback": None},
        deadline=time.time() + 600,
    )
    capabilities = {CAPABILITY_ACK_REFS: True} if ack_refs else {}
    async with raw_peer(
        server.transport.port, server.state.certs.ca_cert, timeout=WAIT, idle_timeout=60
    ) as peer:
        welcome = await peer.authenticate(client_id, key, capabilities=capabilities)
        assert welcome.kind is Kind.WELCOME
        command = await peer.recv(WAIT)
        assert command.kind is Kind.COMMAND
        yield peer, record.deploy_id


async def answers_for(peer: RawPeer, ids: list[str]) -> list[Envelope]:
    """The ACKs and ERRORs the server sends until every id in ``ids`` is answered."""
    got: list[Envelope] = []
    left = set(ids)
    while left:
        env = await peer.recv(WAIT)
        if env.kind in (Kind.ACK, Kind.ERROR):
            got.append(env)
            left -= set(env.payload.get("refs", [env.ref]) if env.kind is Kind.ACK else [env.ref])
    return got


def acknowledged(answers: list[Envelope]) -> list[tuple[str, list[str]]]:
    """Each answer as (kind, the ids it answers)."""
    return [
        (a.kind.value, list(a.payload["refs"]) if "refs" in a.payload else [str(a.ref)])
        for a in answers
    ]


async def held_then_sent(server: DeployServer, peer: RawPeer, events: list[Envelope]) -> Gate:
    """Send ``events`` while the ingest's writer is held by a transaction of the test's,
    wait until the stored ones are queued, and let the writer go."""
    gate = Gate(server.ingest)
    plug = asyncio.ensure_future(server.ingest.submit(lambda conn: None))
    await gate.wait_arrived()
    for env in events:
        peer.send_env(env)
    stored = sum(1 for e in events if e.payload.get("progress", 0) <= 100)
    await queued(server.ingest, min(stored, MAX_IN_FLIGHT))
    gate.open()
    await plug
    return gate


async def test_the_events_of_a_transaction_are_acknowledged_by_one_ack(
    server: DeployServer,
) -> None:
    async with agent(server, ack_refs=True) as (peer, deploy_id):
        events = [status(deploy_id, seq) for seq in range(20)]
        gate = await held_then_sent(server, peer, events)
        got = await answers_for(peer, [e.id for e in events])
        assert gate.batches[1] == len(events)  # one transaction after the plug
    assert acknowledged(got) == [("ack", [e.id for e in events])]
    (ack,) = got
    assert ack.ref == events[0].id and ack.name == EVENT_STATUS
    history = await server.db(server.records.history, deploy_id)
    assert [h.seq for h in history if h.seq is not None] == list(range(20))


async def test_refusals_keep_their_place_between_the_acknowledged_runs(
    server: DeployServer,
) -> None:
    async with agent(server, ack_refs=True) as (peer, deploy_id):
        malformed = status(deploy_id, 2)
        malformed.payload["progress"] = 500  # refused at once, before the commit
        events = [status(deploy_id, 0), status(deploy_id, 1), malformed, status(deploy_id, 3)]
        await held_then_sent(server, peer, events)
        got = await answers_for(peer, [e.id for e in events])
    assert acknowledged(got) == [
        ("ack", [events[0].id, events[1].id]),
        ("error", [malformed.id]),
        ("ack", [events[3].id]),
    ]
    assert got[2].payload == {}  # a run of one is a plain ACK


async def test_one_ack_names_at_most_max_ack_refs_events(server: DeployServer) -> None:
    count = MAX_ACK_REFS + 3
    async with agent(server, ack_refs=True) as (peer, deploy_id):
        events = [status(deploy_id, seq) for seq in range(count)]
        await held_then_sent(server, peer, events)
        got = await answers_for(peer, [e.id for e in events])
    named = [ref for _kind, refs in acknowledged(got) for ref in refs]
    assert named == [e.id for e in events]
    assert all(len(refs) <= MAX_ACK_REFS for _kind, refs in acknowledged(got))
    assert len(got) < count


async def test_an_agent_without_the_capability_gets_one_ack_per_event(
    server: DeployServer,
) -> None:
    async with agent(server, ack_refs=False) as (peer, deploy_id):
        events = [status(deploy_id, seq) for seq in range(10)]
        await held_then_sent(server, peer, events)
        got = await answers_for(peer, [e.id for e in events])
    assert acknowledged(got) == [("ack", [e.id]) for e in events]
    assert all(a.payload == {} for a in got)
