"""The watchdog: deployments past their deadline are finished as ``timeout`` by the server
(SPEC deploy-31), with a reason that says no more than the server knows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from deploy_core.server.db_health import OutageLog
from deploy_core.server.records import Applied, RecordStore
from deploy_core.server.rows import DeploymentRow

log = logging.getLogger(__name__)


class Watchdog:
    """Expires overdue deployments, once per pass or every ``interval`` seconds in
    :meth:`run`."""

    def __init__(
        self,
        records: RecordStore,
        *,
        expired: Callable[[Applied], Awaitable[None]],
        interval: float,
        may_run: Callable[[], bool] = lambda: True,
    ) -> None:
        """:param expired: called with each deployment a pass finished (the record after,
        the status before), to tell listeners and plugins and to roll back.
        :param may_run: whether this replica holds the watchdog's lease (leases.py): a pass
        runs only then, so replicas on one database expire a deployment once."""
        self.records = records
        self.may_run = may_run
        self.expired = expired
        self.interval = interval
        self.outage = OutageLog(log, "watchdog")

    async def run(self) -> None:
        """Pass after pass until cancelled; a failed pass is logged (a database outage in a
        few lines, :class:`~deploy_core.server.db_health.OutageLog`) and the next one runs."""
        while True:
            try:
                if self.may_run():
                    await self.expire_overdue()
                    self.outage.ok()
            except Exception as exc:
                if not self.outage.failed(exc):
                    log.exception("watchdog pass failed")
            await asyncio.sleep(self.interval)

    async def expire_overdue(self) -> int:
        """One pass; returns how many deployments it expired."""
        expired = 0
        for record in await asyncio.to_thread(self.records.overdue):
            reason = await self.timeout_reason(record)
            applied = await asyncio.to_thread(self.records.expire, record.deploy_id, reason)
            if applied.applied and applied.record is not None:
                expired += 1
                log.warning(
                    "deployment %s timed out: %s",
                    record.deploy_id,
                    reason,
                    extra={"deploy_id": record.deploy_id, "client_id": record.client_id},
                )
                await self.expired(applied)
        return expired

    async def timeout_reason(self, record: DeploymentRow) -> str:
        """Why ``record`` timed out, from what the server saw of it and of its agent."""
        client = await asyncio.to_thread(self.records.get_client, record.client_id)
        away = client is not None and not client.connected
        if record.dispatched_at is None:
            where = (
                f"while agent {record.client_id} was disconnected"
                if away
                else ("before it could be sent to the agent")
            )
            return f"deadline passed {where}; the deployment never started"
        if record.acked_at is None and record.last_seq < 0:
            # Sent, but neither acknowledged nor reported: it may have run all the same (an
            # acknowledgement can be lost), so say no more than we know.
            return (
                "deadline passed without the agent acknowledging or reporting the deployment"
                + (f" (agent {record.client_id} is disconnected)" if away else "")
                + "; it may not have started"
            )
        if away:
            return (
                f"deadline passed while agent {record.client_id} was disconnected "
                f"(last report: {record.status} at progress {record.progress})"
            )
        return (
            f"deadline passed with no final report from the agent "
            f"(last report: {record.status} at progress {record.progress})"
        )
