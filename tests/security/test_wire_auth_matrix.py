"""Every wire message the server handles, sent by someone who has not finished the
handshake, is refused; an authenticated agent cannot touch another client's deployment.

Runs a real :class:`~deploy_core.server.app.DeployServer` (QUIC, records in SQLite) in the
test's event loop; agents are raw QUIC peers with keys enrolled by hand.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from security_harness import RawPeer, mac_for, raw_peer

from deploy_core.models import (
    EVENT_CALLBACK,
    EVENT_STATUS,
    DeployCallbackPayload,
    DeployStatus,
    DeployStatusReport,
    LogLine,
)
from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.transport import Envelope, Kind, encode

pytestmark = pytest.mark.asyncio
#: The fields of a record that an agent's events move.
STATE = ("status", "stage", "progress", "last_seq", "result", "error", "health", "rollback",
         "agent_status", "updated_at", "finished_at", "rollback_state")  # fmt: skip


@dataclass
class Center:
    """A started server, two enrolled agents' keys and a pending deployment of ``alpha``."""

    server: DeployServer
    keys: dict[str, bytes]
    deploy_id: str

    @property
    def port(self) -> int:
        return self.server.transport.port

    @property
    def ca(self) -> Path:
        return self.server.state.certs.ca_cert

    async def snapshot(self) -> tuple[Any, ...]:
        """What an intruder must not change: the record's state, its history and its logs
        (not when the command was sent: the owner connecting sends it)."""
        records = self.server.records
        record = await self.server.db(records.get, self.deploy_id)
        history = await self.server.db(records.history, self.deploy_id)
        logs = await self.server.db(records.logs, self.deploy_id)
        assert record is not None
        state = {key: getattr(record, key) for key in STATE}
        return state, history, logs

    async def refused(self, moves: Callable[[RawPeer], Awaitable[None]]) -> str:
        """Make ``moves`` on a fresh connection; the reason the server closed it with."""
        async with raw_peer(self.port, self.ca) as peer:
            await moves(peer)
            return await peer.refused()


@pytest_asyncio.fixture
async def center(tmp_path: Path) -> AsyncIterator[Center]:
    server = DeployServer(ServerConfig(state_dir=tmp_path / "server", api_port=0, quic_port=0))
    await server.start()
    try:
        keys = {cid: secrets.token_bytes(32) for cid in ("alpha", "beta")}
        for cid, key in keys.items():
            await server.db(server.records.enroll, cid, key.hex())
        record = await server.deployments.submit(
            client_id="alpha",
            command_type="deploy.shell",
            request={"params": {"script": "true"}, "health_checks": [], "rollback": None},
            deadline=time.time() + 600,
        )
        yield Center(server, keys, record.deploy_id)
    finally:
        await server.stop()


def payload_for(name: str, deploy_id: str) -> dict[str, Any]:
    """A well-formed payload of event ``name`` about ``deploy_id`` (``{}`` for a plugin's)."""
    if name == EVENT_STATUS:
        return DeployStatusReport(
            deploy_id=deploy_id,
            command_type="deploy.shell",
            status=DeployStatus.SUCCESS,
            progress=100,
            seq=99,
            logs=[LogLine(line="intruder was here")],
        ).model_dump(mode="json")
    if name == EVENT_CALLBACK:
        return DeployCallbackPayload(
            callback_id=deploy_id,
            command_type="deploy.shell",
            deploy_type="shell",
            status=DeployStatus.SUCCESS,
            success=True,
            result={"exit_code": 0},
        ).model_dump(mode="json")
    return {}


def message(kind: Kind, name: str = "", payload: dict[str, Any] | None = None) -> Envelope:
    return Envelope(kind=kind, name=name, wait_ack=True, payload=payload or {})


async def answer_to(peer: RawPeer, env: Envelope) -> Envelope:
    """The server's ACK or ERROR for ``env`` (commands sent meanwhile are skipped)."""
    while True:
        got = await peer.recv(5)
        if got.ref == env.id and got.kind in (Kind.ACK, Kind.ERROR):
            return got


async def test_every_event_name_and_kind_is_refused_before_authentication(
    center: Center,
) -> None:
    names = center.server.plugins.event_handlers.names()
    assert {EVENT_STATUS, EVENT_CALLBACK} <= set(names)
    before = await center.snapshot()
    alpha = "alpha"

    messages = [message(Kind.EVENT, n, payload_for(n, center.deploy_id)) for n in names]
    messages += [message(k, "deploy.status") for k in Kind if k is not Kind.EVENT]
    for env in messages:
        label = f"{env.kind.value} {env.name}"

        async def first(peer: RawPeer, env: Envelope = env) -> None:
            peer.send_env(env)

        reason = await center.refused(first)
        if env.kind is Kind.HELLO:  # the one kind allowed first, and this one says nothing
            assert "client_id must match" in reason, label
        else:
            assert f"expected hello as the first message, got {env.kind.value}" in reason, label

        async def instead_of_auth(peer: RawPeer, env: Envelope = env) -> None:
            await peer.hello(alpha)
            peer.send_env(env)

        if env.kind is not Kind.AUTH:
            reason = await center.refused(instead_of_auth)
            assert f"expected auth after challenge, got {env.kind.value}" in reason, label

        async def before_welcome(peer: RawPeer, env: Envelope = env) -> None:
            # The right key, but the message rides in the same write as AUTH.
            nonce = await peer.hello(alpha)
            auth = Envelope(
                kind=Kind.AUTH,
                payload={"method": "key", "mac": mac_for(center.keys[alpha], nonce, alpha)},
            )
            peer.send_raw(encode(auth) + encode(env))

        reason = await center.refused(before_welcome)
        assert "sent before WELCOME" in reason, label

    assert await center.snapshot() == before
    assert dict(center.server.transport.sessions) == {}
    client = await center.server.db(center.server.records.get_client, alpha)
    assert client is not None and not client.connected


async def test_an_agent_cannot_report_on_another_clients_deployment(center: Center) -> None:
    before = await center.snapshot()
    async with raw_peer(center.port, center.ca) as beta:
        assert (await beta.authenticate("beta", center.keys["beta"])).kind is Kind.WELCOME
        for name in (EVENT_STATUS, EVENT_CALLBACK):
            env = message(Kind.EVENT, name, payload_for(name, center.deploy_id))
            beta.send_env(env)
            answer = await answer_to(beta, env)
            assert answer.kind is Kind.ERROR, name
            reason = answer.payload["reason"]
            assert f"no deployment {center.deploy_id} for client beta" in reason
        for kind in (Kind.HELLO, Kind.AUTH, Kind.COMMAND, Kind.WELCOME, Kind.CHALLENGE):
            env = message(kind)
            beta.send_env(env)  # handshake kinds again, or a command to the server: refused
            assert (await answer_to(beta, env)).kind is Kind.ERROR, kind
        await beta.round_trip()  # refused messages do not cost the agent its connection
    assert await center.snapshot() == before

    # The owner's own report is taken: the refusals were about ownership.
    async with raw_peer(center.port, center.ca) as alpha:
        assert (await alpha.authenticate("alpha", center.keys["alpha"])).kind is Kind.WELCOME
        report = DeployStatusReport(
            deploy_id=center.deploy_id,
            command_type="deploy.shell",
            status=DeployStatus.EXECUTING,
            progress=5,
            seq=0,
        )
        env = message(Kind.EVENT, EVENT_STATUS, report.model_dump(mode="json"))
        alpha.send_env(env)
        assert (await answer_to(alpha, env)).kind is Kind.ACK
    record, history, _logs = await center.snapshot()
    assert record["status"] == "executing" and len(history) == len(before[1]) + 1


async def test_a_report_with_nan_closes_the_connection_and_leaves_the_record(
    center: Center,
) -> None:
    before = await center.snapshot()
    async with raw_peer(center.port, center.ca) as alpha:
        assert (await alpha.authenticate("alpha", center.keys["alpha"])).kind is Kind.WELCOME
        report = payload_for(EVENT_STATUS, center.deploy_id) | {"seq": 0, "status": "executing"}
        body = encode(message(Kind.EVENT, EVENT_STATUS, report))[4:]
        body = re.sub(rb'"timestamp":[0-9.eE+-]+', b'"timestamp":NaN', body)
        alpha.send_raw(len(body).to_bytes(4, "big") + body)
        assert "NaN and Infinity are not JSON numbers" in await alpha.refused()
    await asyncio.sleep(0.2)  # nothing arrives late
    assert await center.snapshot() == before
