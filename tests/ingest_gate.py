"""Holding the server's ingest writer (server/ingest.py) in tests, so that what is queued
meanwhile goes into one transaction, without waiting for a time."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from deploy_core.server.ingest import Ingest

WAIT = 30.0  # a bound on every wait; none is expected to come near it


class Gate:
    """Holds the ingest's writer before each transaction until :meth:`open` (and counts the
    pieces of each batch it let through)."""

    def __init__(self, ingest: Ingest) -> None:
        self.arrived = threading.Event()
        self._open = threading.Event()
        self.batches: list[int] = []
        commit = ingest._commit

        def held(batch: list[Any]) -> list[tuple[bool, Any]]:
            self.arrived.set()
            if not self._open.wait(WAIT):
                raise AssertionError(f"the test did not open the gate within {WAIT} s")
            self.batches.append(len(batch))
            return commit(batch)

        ingest._commit = held  # type: ignore[method-assign]

    def open(self) -> None:
        self._open.set()

    async def wait_arrived(self) -> None:
        assert await asyncio.to_thread(self.arrived.wait, WAIT), "the writer never began"


async def queued(ingest: Ingest, count: int) -> None:
    """Wait (bounded) until ``count`` pieces wait in the queue."""
    for _ in range(int(WAIT / 0.01)):
        if ingest.queued >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{ingest.queued} pieces queued, expected {count}")
