"""Sending recorded deployments to their agents: when they are submitted, and again
(redelivery) when an agent connects with deployments it has not acknowledged.

A command is marked dispatched before it leaves, so a server that dies right after sending
never later claims the agent did not get it.  With several replicas, a deployment whose agent
is connected to another replica is announced on the cluster bus (server/cluster_bus.py); the
replica holding the agent claims and sends it (:meth:`Dispatcher.deliver_announced`).

The dispatcher also counts the commands it sent that their agents have not acknowledged yet
(:meth:`Dispatcher.room`): a rollout starts its next chunk of targets only once most of the
last one was acknowledged, so a thousand starts do not outrun what this server can take in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deploy_core.models import CAPABILITY_LOG_BUDGET, DeployCommand, RollbackTarget
from deploy_core.server.records import RecordStore
from deploy_core.server.rows import DeploymentRow
from deploy_core.transport import AgentSession, Envelope, Kind, QuicServer

if TYPE_CHECKING:
    from deploy_core.server.cluster_bus import ClusterBus

#: A command sent from here counts as awaiting its ACK at most this long (seconds): an agent
#: that went away never acknowledges; redelivery and the deadline take care of its command.
UNACKED_MEMORY = 30.0


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
        # Deployment id -> when its command was sent from here, oldest first, until the
        # agent's ACK is stored (acknowledged) or UNACKED_MEMORY has passed.
        self._unacked: dict[str, float] = {}
        self._acked = asyncio.Event()

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
        self.sent(record.deploy_id)

    def sent(self, deploy_id: str) -> None:
        """``deploy_id``'s command left now: it awaits its ACK (newest last). Commands
        past UNACKED_MEMORY are dropped here too, so that the count stays small when no
        rollout asks for it."""
        self._unacked.pop(deploy_id, None)
        self._unacked[deploy_id] = time.monotonic()
        self.awaiting_ack()

    def acknowledged(self, deploy_id: str) -> None:
        """The agent's ACK of ``deploy_id``'s command is stored."""
        if self._unacked.pop(deploy_id, None) is not None:
            self._acked.set()

    def awaiting_ack(self) -> int:
        """How many commands sent from here in the last UNACKED_MEMORY seconds their agents
        have not acknowledged."""
        unacked, oldest = self._unacked, time.monotonic() - UNACKED_MEMORY
        while unacked:
            deploy_id, sent = next(iter(unacked.items()))
            if sent > oldest:
                break
            del unacked[deploy_id]
        return len(unacked)

    async def room(self, limit: int, timeout: float) -> bool:
        """Wait until at most ``limit`` commands await their ACK (:meth:`awaiting_ack`);
        ``False`` if that took longer than ``timeout`` seconds (the caller goes on anyway).

        This is how a large rollout keeps pace with the server: a command's ACK comes back
        once the agent journaled it and this server read and stored the ACK, so while the
        server is behind (its socket full, its loop busy with answers) the next starts
        wait, instead of adding thousands of agents' messages, and their retransmissions,
        to a queue that already holds seconds of work."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.awaiting_ack() > limit:
            left = deadline - loop.time()
            if left <= 0:
                return False
            # Woken by an ACK, or when the oldest command stops counting.
            oldest = next(iter(self._unacked.values()))
            expires = oldest + UNACKED_MEMORY - time.monotonic()
            self._acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), max(0.0, min(left, expires)) + 0.001)
        return True

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
