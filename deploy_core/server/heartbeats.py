"""Heartbeats: agents' last-seen times, held by the transport as they arrive, are written to
the clients' records every few seconds in one transaction (not one write per heartbeat), and
then the replica's own heartbeat.  Each pass also tells the replica's
:class:`~deploy_core.server.db_health.DbHealth` whether the database answered, and has it
check whether the replica is fenced (the pass is its clock)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from deploy_core.server.db_health import DbHealth
from deploy_core.server.records import RecordStore
from deploy_core.transport import AgentSession

log = logging.getLogger(__name__)


class HeartbeatFlush:
    """Records the last-seen time of every agent connected here, once per pass or every
    ``interval`` seconds in :meth:`run`."""

    def __init__(
        self,
        records: RecordStore,
        *,
        sessions: Mapping[str, AgentSession],
        interval: float,
        then: Callable[[], Awaitable[None]] | None = None,
        health: DbHealth | None = None,
    ) -> None:
        """:param sessions: the sessions connected to this replica, by client id (a live
        view, such as ``QuicServer.sessions``).
        :param then: run after each flush (the replica's own row in ``replicas``).
        :param health: told after each pass whether it reached the database."""
        self.records = records
        self.sessions = sessions
        self.interval = interval
        self.then = then
        self.health = health
        # The last-seen time last written, by client id.
        self._written: dict[str, float] = {}

    async def run(self) -> None:
        """Flush after flush until cancelled, the first after one interval; a failed flush
        is logged and the next one runs."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception as exc:
                # An outage is logged by the health (once per few seconds, not per pass).
                if self.health is None or not self.health.failed(exc):
                    log.exception("could not record heartbeats")
            else:
                if self.health is not None:
                    self.health.reached()
            if self.health is not None:
                self.health.check()

    async def flush(self) -> int:
        """One pass; returns how many agents' times it wrote: those heard from since the
        last pass that wrote theirs (an agent that sent nothing is not written again)."""
        written = self._written
        seen = {
            cid: s.last_seen for cid, s in self.sessions.items() if written.get(cid) != s.last_seen
        }
        if seen:
            await asyncio.to_thread(self.records.touch_clients, seen)
        # Those no longer connected here are forgotten: a new connection's time is written.
        self._written = {cid: written[cid] for cid in self.sessions if cid in written} | seen
        if self.then is not None:
            await self.then()
        return len(seen)
