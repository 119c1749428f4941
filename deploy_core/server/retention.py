"""Retention: finished deployments older than the configured period are deleted with their
history, logs and secrets, and finished rollouts with their targets and history
(``deployctl server --retention``), when the server starts and then once a day, by the
replica that holds the retention lease.  ``deployctl db prune`` does the same pass by hand."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from deploy_core.durations import human_duration
from deploy_core.server.db_health import OutageLog
from deploy_core.server.records import RecordStore
from deploy_core.server.rollouts import RolloutStore

log = logging.getLogger(__name__)

DAY = 86400.0
#: After a failed pass, or while another replica holds the duty, the next look comes this
#: soon (seconds) instead of a whole interval later.
RETRY = 10.0


class Retention:
    """Deletes deployments that finished more than ``days`` ago, once per pass or every
    ``interval`` seconds in :meth:`run`."""

    def __init__(
        self,
        records: RecordStore,
        *,
        days: float,
        interval: float = DAY,
        may_run: Callable[[], bool] = lambda: True,
        rollouts: RolloutStore | None = None,
        retry: float = RETRY,
    ) -> None:
        """:param may_run: whether this replica holds the retention lease (leases.py): a pass
        runs only then."""
        self.records = records
        self.days = days
        self.interval = interval
        self.retry = retry
        self.may_run = may_run
        self.rollouts = rollouts
        self.outage = OutageLog(log, "retention")

    async def run(self) -> None:
        """Pass after pass until cancelled, the first at once; a failed pass is logged (a
        database outage without its traceback) and tried again ``retry`` seconds later, and
        while this replica does not hold the duty it looks again as often (a pass waits a
        whole ``interval`` only after one that ran)."""
        while True:
            wait = min(self.interval, self.retry)
            try:
                if self.may_run():
                    await self.prune()
                    self.outage.ok()
                    wait = self.interval
            except Exception as exc:
                if not self.outage.failed(exc):
                    log.exception("retention pass failed")
            await asyncio.sleep(wait)

    async def prune(self) -> int:
        """One pass; returns how many deployments it deleted."""
        cutoff = time.time() - self.days * DAY
        deleted = await asyncio.to_thread(self.records.prune, cutoff)
        if deleted:
            log.info(
                "retention: deleted %d deployments finished more than %s ago",
                deleted,
                human_duration(self.days * DAY),
            )
        if self.rollouts is not None:
            gone = await asyncio.to_thread(self.rollouts.prune, cutoff)
            if gone:
                log.info(
                    "retention: deleted %d rollouts finished more than %s ago",
                    gone,
                    human_duration(self.days * DAY),
                )
        return deleted
