"""Listeners for deployment changes: ``--wait`` long-polls and live subscribers.

Each replica publishes its own changes here; with several replicas on PostgreSQL the cluster
bus (server/cluster_bus.py) tells the others, which read the record and publish it to their
subscribers as a *remote* change.  Observers (metrics) and subscribers that act once per
change (webhooks, ``remote=False``) see only the changes made on their own replica.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any


class Listeners:
    """Fan-out of record changes by deployment id (``"*"`` receives every deployment)."""

    def __init__(self, *, queue_size: int = 1000) -> None:
        # Each queue with whether it also wants other replicas' changes.
        self._queues: dict[str, dict[asyncio.Queue[dict[str, Any]], bool]] = defaultdict(dict)
        self._queue_size = queue_size
        self._observers: list[Callable[[dict[str, Any]], None]] = []
        #: Called with the deployment id of every change made on this replica (the cluster
        #: bus announces it to the other replicas).
        self.on_local: Callable[[str], None] | None = None

    def observe(self, observer: Callable[[dict[str, Any]], None]) -> None:
        """Call ``observer`` with every changed record, synchronously and losing none (the
        server's metrics); it must be quick and must not raise."""
        self._observers.append(observer)

    def publish(self, record: dict[str, Any], *, remote: bool = False) -> None:
        """Hand a changed record to everyone listening for it; a full queue drops its oldest
        entry, since listeners care about the newest state.  ``remote``: the change was made
        on another replica (only subscribers that asked for those get it)."""
        if not remote:
            for observer in self._observers:
                observer(record)
            if self.on_local is not None:
                self.on_local(record["deploy_id"])
        for key in (record["deploy_id"], "*"):
            for queue, wants_remote in list(self._queues.get(key, {}).items()):
                if remote and not wants_remote:
                    continue
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(record)

    def wants_remote(self, deploy_id: str) -> bool:
        """Whether anyone here listens for other replicas' changes of ``deploy_id``."""
        return any(any(self._queues.get(key, {}).values()) for key in (deploy_id, "*"))

    @asynccontextmanager
    async def subscribe(
        self, deploy_id: str = "*", *, remote: bool = True
    ) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of changed records of ``deploy_id`` while the context lasts; with
        ``remote=False`` only the changes made on this replica."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self._queue_size)
        self._queues[deploy_id][queue] = remote
        try:
            yield queue
        finally:
            self._queues[deploy_id].pop(queue, None)
            if not self._queues[deploy_id]:
                del self._queues[deploy_id]

    def count(self) -> int:
        """How many subscriptions are open."""
        return sum(len(q) for q in self._queues.values())
