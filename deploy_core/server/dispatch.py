"""Sending recorded deployments to their agents: when they are submitted, and again
(redelivery) when an agent connects with deployments it has not acknowledged.

A command is marked dispatched before it leaves, so a server that dies right after sending
never later claims the agent did not get it.  With several replicas, a deployment whose agent
is connected to another replica is announced on the cluster bus (server/cluster_bus.py); the
replica holding the agent claims and sends it (:meth:`Dispatcher.deliver_announced`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deploy_core.models import CAPABILITY_LOG_BUDGET, DeployCommand, RollbackTarget
from deploy_core.server.records import RecordStore
from deploy_core.server.rows import DeploymentRow
from deploy_core.transport import AgentSession, Envelope, Kind, QuicServer

if TYPE_CHECKING:
    from deploy_core.server.cluster_bus import ClusterBus


class Dispatcher:
    """Builds the command envelope of a deployment record and hands it to the agent's
    session on this replica."""

    def __init__(self, records: RecordStore, transport: QuicServer, *, max_log_bytes: int) -> None:
        """:param max_log_bytes: the log budget told to agents that know the field."""
        self.records = records
        self.transport = transport
        self.max_log_bytes = max_log_bytes
        #: The cluster bus of a replica on PostgreSQL (None: this server is alone).
        self.bus: ClusterBus | None = None

    async def command_for(
        self, record: DeploymentRow, capabilities: Mapping[str, Any] | None = None
    ) -> Envelope:
        """The command envelope that carries ``record`` to its agent.

        :param capabilities: what the agent announced; the log budget goes only to an agent
            that knows the field (an older one refuses a command with an unknown field)."""
        req = record.request
        knows_budget = bool((capabilities or {}).get(CAPABILITY_LOG_BUDGET))
        target = req.get("rollback_of")
        command = DeployCommand(
            deploy_id=record.deploy_id,
            command_type=record.command_type,
            params=req.get("params", {}),
            health_checks=req.get("health_checks", []),
            rollback=req.get("rollback"),
            no_rollback_reason=(req.get("rollback_plan") or {}).get("note", "")[:1024] or None
            if not req.get("rollback")
            else None,
            secret_env=await asyncio.to_thread(self.records.secret_env, record.deploy_id)
            if req.get("secret_env_names")
            else {},
            issued_at=record.created_at,
            expires_at=record.deadline,
            rollback_of=RollbackTarget.model_validate(target) if target else None,
            log_budget_bytes=self.max_log_bytes if knows_budget else None,
        )
        return Envelope(
            id=f"cmd-{record.deploy_id}",
            kind=Kind.COMMAND,
            name=record.command_type,
            wait_ack=True,
            need_callback=True,
            callback_id=record.deploy_id,
            payload=command.model_dump(
                mode="json", exclude=None if knows_budget else {"log_budget_bytes"}
            ),
        )

    async def send(
        self, session: AgentSession, record: DeploymentRow, *, marked: bool = False
    ) -> None:
        """Mark ``record`` dispatched (unless ``marked`` already), then send its command on
        ``session``."""
        envelope = await self.command_for(record, session.capabilities)
        if not marked:
            await asyncio.to_thread(self.records.mark_dispatched, record.deploy_id)
        session.send(envelope)

    def session_for(self, client_id: str) -> AgentSession | None:
        """The open session of ``client_id`` on this replica, if any."""
        session = self.transport.session(client_id)
        return None if session is None or session.closed else session

    async def dispatch(self, record: DeploymentRow, *, marked: bool = False) -> bool:
        """Send a recorded deployment to its agent, if that agent is connected here;
        ``False`` when it is not: then it is announced to the other replicas (the one
        holding the agent sends it), and sent in any case when the agent connects.
        ``marked``: the record was marked dispatched when it was stored."""
        session = self.session_for(record.client_id)
        if session is None or (not marked and not await self._claim(record.deploy_id)):
            if session is None and self.bus is not None:
                self.bus.dispatch(record.deploy_id, record.client_id)
            return False
        await self.send(session, record, marked=True)
        return True

    async def _claim(self, deploy_id: str) -> bool:
        return await asyncio.to_thread(self.records.claim_dispatch, deploy_id)

    async def deliver_announced(self, pairs: list[tuple[str, str]]) -> int:
        """Send those announced deployments whose agent is connected here and that nobody
        sent yet (each claimed first, so a repeated announcement sends nothing); how many
        were sent."""
        held = [deploy_id for deploy_id, client_id in pairs if self.session_for(client_id)]
        if not held:
            return 0
        return await self._send_unsent(await asyncio.to_thread(self.records.get_many, held))

    async def resync(self) -> int:
        """Send every unsent deployment of the agents connected here (a notification may
        have been missed); how many were sent."""
        return await self._send_unsent(await asyncio.to_thread(self.records.unsent_for_server))

    async def _send_unsent(self, records: list[DeploymentRow]) -> int:
        sent = 0
        for record in sorted(records, key=lambda r: r.created_at):
            session = self.session_for(record.client_id)
            if session is None or record.finished_at is not None or record.acked_at is not None:
                continue
            if record.deadline <= time.time() or not await self._claim(record.deploy_id):
                continue
            await self.send(session, record, marked=True)
            sent += 1
        return sent

    async def redeliver(self, session: AgentSession) -> int:
        """Send the agent that just connected on ``session`` its unacknowledged
        deployments whose deadline has not passed, oldest first; returns how many."""
        sent = 0
        for record in await asyncio.to_thread(self.records.undelivered, session.client_id):
            if record.deadline > time.time():
                await self.send(session, record)
                sent += 1
        return sent
