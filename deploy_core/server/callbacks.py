"""Listeners for deployment changes: ``--wait`` long-polls and live subscribers.

In-process only: each server replica notifies the listeners connected to it, and a listener
that reconnects to another replica reads the record again.
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
        self._queues: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self._queue_size = queue_size
        self._observers: list[Callable[[dict[str, Any]], None]] = []

    def observe(self, observer: Callable[[dict[str, Any]], None]) -> None:
        """Call ``observer`` with every changed record, synchronously and losing none (the
        server's metrics); it must be quick and must not raise."""
        self._observers.append(observer)

    def publish(self, record: dict[str, Any]) -> None:
        """Hand a changed record to everyone listening for it; a full queue drops its oldest
        entry, since listeners care about the newest state."""
        for observer in self._observers:
            observer(record)
        for key in (record["deploy_id"], "*"):
            for queue in list(self._queues.get(key, ())):
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(record)

    @asynccontextmanager
    async def subscribe(self, deploy_id: str = "*") -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of changed records of ``deploy_id`` while the context lasts."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self._queue_size)
        self._queues[deploy_id].add(queue)
        try:
            yield queue
        finally:
            self._queues[deploy_id].discard(queue)
            if not self._queues[deploy_id]:
                del self._queues[deploy_id]

    def count(self) -> int:
        """How many subscriptions are open."""
        return sum(len(q) for q in self._queues.values())
