"""An agent acts only on its own deployments (issue 10 §4).

Every message that names a deployment (an acknowledgement, a status report with logs, a
callback, any plugin event carrying a ``deploy_id``) is checked against the deployments sent
to the authenticated agent; an artifact is served only to agents that were sent a deployment
referencing it.  Real :class:`~deploy_core.server.app.DeployServer` (QUIC, SQLite), real
agent connections (:class:`~deploy_core.transport.client.AgentConnector`) and the agent's
own artifact fetcher.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import missing_part

from deploy_core.agent.artifacts import ArtifactError, ArtifactFetcher
from deploy_core.hookspecs import hookimpl
from deploy_core.models import (
    EVENT_CALLBACK,
    EVENT_STATUS,
    DeployCallbackPayload,
    DeployStatus,
    DeployStatusReport,
    LogLine,
)
from deploy_core.plugins import load_plugins
from deploy_core.registry import EventHandler
from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.events import EventContext
from deploy_core.testing import MemoryCredentials
from deploy_core.transport import AgentConnector, Envelope, Kind

pytestmark = pytest.mark.asyncio

#: The fields of a record that an agent's messages move.
STATE = ("status", "stage", "progress", "last_seq", "result", "error", "health", "rollback",
         "agent_status", "updated_at", "finished_at", "rollback_state", "acked_at",
         "log_bytes")  # fmt: skip
PROBE = "test.probe"


class ProbePlugin:
    """A plugin with an event handler of its own, registered through the hook."""

    def __init__(self) -> None:
        self.probed: list[tuple[str, dict[str, Any]]] = []

    async def probe(self, ctx: EventContext) -> None:
        self.probed.append((ctx.client_id, dict(ctx.payload)))

    @hookimpl
    def deploy_register_event_handlers(self, register: Callable[[EventHandler], None]) -> None:
        register(EventHandler(PROBE, self.probe))


@dataclass
class Agent:
    """A connected agent: its connection and the messages the server sent it."""

    client_id: str
    connector: AgentConnector
    inbox: asyncio.Queue[Envelope] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None

    async def answer(self, env: Envelope) -> Envelope:
        """Send ``env``; the server's ACK or ERROR for it (commands meanwhile are kept)."""
        assert self.connector.send(env), f"{self.client_id} is not connected"
        deadline = time.monotonic() + 10
        while True:
            got = await asyncio.wait_for(self.inbox.get(), max(0.1, deadline - time.monotonic()))
            if got.ref == env.id and got.kind in (Kind.ACK, Kind.ERROR):
                return got


@dataclass
class Center:
    server: DeployServer
    agents: dict[str, Agent]
    deploy_id: str
    sha_alpha: str
    package: bytes
    probed: list[tuple[str, dict[str, Any]]]
    tmp: Path

    async def state(self) -> tuple[Any, ...]:
        """What an intruder must not change: the record, its history and its logs."""
        records = self.server.records
        record = await self.server.db(records.get, self.deploy_id)
        assert record is not None
        history = await self.server.db(records.history, self.deploy_id)
        logs = await self.server.db(records.logs, self.deploy_id)
        return {k: getattr(record, k) for k in STATE}, history, logs


async def _store(server: DeployServer, data: bytes) -> str:
    async def body() -> AsyncIterator[bytes]:
        yield data

    info, _ = await server.artifacts.receive(body())
    return info.sha256


async def _connect(server: DeployServer, client_id: str, key: bytes) -> Agent:
    agent: Agent

    async def on_message(env: Envelope) -> None:
        agent.inbox.put_nowait(env)

    connector = AgentConnector(
        host="127.0.0.1",
        port=server.transport.port,
        ca_file=server.state.certs.ca_cert,
        client_id=client_id,
        credentials=MemoryCredentials(key=key),
        capabilities=dict,
        on_message=on_message,
        heartbeat_interval=1.0,
        backoff_initial=0.05,
        backoff_max=0.2,
        connect_timeout=5.0,
    )
    agent = Agent(client_id, connector)
    agent.task = asyncio.create_task(connector.run())
    assert await connector.wait_connected(15), connector.last_error
    return agent


@pytest_asyncio.fixture
async def center(tmp_path: Path) -> AsyncIterator[Center]:
    probe = ProbePlugin()
    plugins = load_plugins(extra=[("test_probe", probe)])
    if plugins.deploy_types.get("deploy.tar") is None:
        missing_part("the deploy_tar plugin is not installed")
    config = ServerConfig(state_dir=tmp_path / "server", api_port=0, quic_port=0)
    server = DeployServer(config, plugins)
    probed = probe.probed
    await server.start()
    agents: dict[str, Agent] = {}
    try:
        keys = {cid: secrets.token_bytes(32) for cid in ("alpha", "beta")}
        for cid, key in keys.items():
            await server.db(server.records.enroll, cid, key.hex())
        package = os.urandom(300_000)
        sha = await _store(server, package)
        record = await server.deployments.submit(
            client_id="alpha",
            command_type="deploy.tar",
            request={
                "params": {"artifact": sha, "target_dir": str(tmp_path / "app")},
                "health_checks": [],
                "rollback": None,
            },
            deadline=time.time() + 600,
        )
        for cid, key in keys.items():
            agents[cid] = await _connect(server, cid, key)
        # alpha is sent its deployment when it connects.
        command = await asyncio.wait_for(agents["alpha"].inbox.get(), 10)
        assert command.kind is Kind.COMMAND and command.callback_id == record.deploy_id
        yield Center(server, agents, record.deploy_id, sha, package, probed, tmp_path)
    finally:
        for agent in agents.values():
            await asyncio.wait_for(agent.connector.stop(), 10)
            if agent.task is not None:
                await asyncio.wait_for(agent.task, 10)
        await server.stop()


def messages_naming(deploy_id: str, event_names: list[str]) -> list[Envelope]:
    """One message of every kind that names ``deploy_id``."""
    report = DeployStatusReport(
        deploy_id=deploy_id,
        command_type="deploy.tar",
        status=DeployStatus.EXECUTING,
        progress=50,
        seq=7,
        logs=[LogLine(line="intruder was here")],
    )
    callback = DeployCallbackPayload(
        callback_id=deploy_id,
        command_type="deploy.tar",
        deploy_type="tar",
        status=DeployStatus.FAILED,
        success=False,
        error="intruder",
    )
    envs = [
        Envelope(kind=Kind.ACK, payload={"deploy_id": deploy_id}),
        Envelope(kind=Kind.EVENT, name=EVENT_STATUS, payload=report.model_dump(mode="json")),
        Envelope(kind=Kind.EVENT, name=EVENT_CALLBACK, payload=callback.model_dump(mode="json")),
    ]
    for name in event_names:
        if name not in (EVENT_STATUS, EVENT_CALLBACK):
            envs.append(Envelope(kind=Kind.EVENT, name=name, payload={"deploy_id": deploy_id}))
    return envs


async def test_a_second_agent_naming_anothers_deployment_is_refused_in_every_message_kind(
    center: Center,
) -> None:
    names = center.server.plugins.event_handlers.names()
    assert PROBE in names and EVENT_STATUS in names and EVENT_CALLBACK in names
    before = await center.state()
    assert before[0]["acked_at"] is None
    beta = center.agents["beta"]
    unknown = "f" * 32
    for deploy_id in (center.deploy_id, unknown):
        for env in messages_naming(deploy_id, names):
            label = f"{env.kind.value} {env.name}"
            answer = await beta.answer(env)
            assert answer.kind is Kind.ERROR, label
            # The same words for another client's deployment and for none at all.
            assert f"no deployment {deploy_id} for client beta" in answer.payload["reason"], label
    # Not a string: refused as well, not stored.
    answer = await beta.answer(Envelope(kind=Kind.EVENT, name=PROBE, payload={"deploy_id": 5}))
    assert answer.kind is Kind.ERROR and "for client beta" in answer.payload["reason"]

    await asyncio.sleep(0.3)  # nothing lands late
    assert await center.state() == before
    assert center.probed == []  # the plugin's handler never saw them
    assert not beta.connector.last_error  # refusals do not cost beta its connection

    # The owner's messages are taken: the refusals were about ownership.
    alpha = center.agents["alpha"]
    ack = Envelope(kind=Kind.ACK, payload={"deploy_id": center.deploy_id})
    assert alpha.connector.send(ack)  # an accepted ACK gets no answer
    probe = await alpha.answer(
        Envelope(kind=Kind.EVENT, name=PROBE, payload={"deploy_id": center.deploy_id})
    )
    # One connection's messages are handled in order: the ACK was handled before the probe.
    assert probe.kind is Kind.ACK
    assert center.probed == [("alpha", {"deploy_id": center.deploy_id})]
    refused = [e for e in list(alpha.inbox._queue) if e.kind is Kind.ERROR]  # type: ignore[attr-defined]
    assert refused == []
    record = await center.server.db(center.server.records.get, center.deploy_id)
    assert record is not None and record.acked_at is not None


async def test_an_artifact_is_served_only_to_the_agent_sent_a_deployment_using_it(
    center: Center,
) -> None:
    beta = center.agents["beta"]
    alpha = center.agents["alpha"]
    beta_fetcher = ArtifactFetcher(beta.connector, center.tmp / "beta-cache", stall_timeout=10)
    with pytest.raises(ArtifactError, match="not part of any deployment sent to client beta"):
        await beta_fetcher.fetch(center.sha_alpha)
    assert not (center.tmp / "beta-cache" / center.sha_alpha).exists()
    partial = center.tmp / "beta-cache" / f"{center.sha_alpha}.partial"
    assert not partial.exists() or partial.stat().st_size == 0

    # A stored package no deployment uses is no one's to fetch, the owner's neither.
    stray = await _store(center.server, os.urandom(70_000))
    alpha_fetcher = ArtifactFetcher(alpha.connector, center.tmp / "alpha-cache", stall_timeout=10)
    with pytest.raises(ArtifactError, match="not part of any deployment sent to client alpha"):
        await alpha_fetcher.fetch(stray)

    # The agent the deployment was sent to gets the bytes.
    fetched = await alpha_fetcher.fetch(center.sha_alpha)
    assert fetched.path.read_bytes() == center.package
