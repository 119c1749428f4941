"""The server's retention and heartbeat loops (server/retention.py, server/heartbeats.py),
each on a real database: what one pass writes, and that a failing pass does not stop the
loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from deploy_core.server import db
from deploy_core.server.heartbeats import HeartbeatFlush
from deploy_core.server.records import RecordStore
from deploy_core.server.retention import DAY, Retention
from deploy_core.transport import AgentSession
from tests.server.test_retention import _finished


@pytest.fixture
def store(db_url: str) -> Iterator[RecordStore]:
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    yield RecordStore(engine, server_id="s1")
    engine.dispose()


def _age(store: RecordStore, deploy_id: str, days: float) -> None:
    """Make ``deploy_id`` look finished ``days`` ago."""
    with store.engine.begin() as conn:
        conn.execute(
            db.deployments.update()
            .where(db.deployments.c.deploy_id == deploy_id)
            .values(finished_at=time.time() - days * DAY)
        )


async def test_a_retention_pass_deletes_only_what_finished_before_the_period(
    store: RecordStore, caplog: pytest.LogCaptureFixture
) -> None:
    _finished(store, "old", "c1")
    _finished(store, "recent", "c2")
    _age(store, "old", 31)
    _age(store, "recent", 29)
    store.create_deployment(
        deploy_id="running",
        client_id="c3",
        command_type="deploy.shell",
        request={},
        deadline=time.time() - 40 * DAY,
    )
    retention = Retention(store, days=30)
    with caplog.at_level(logging.INFO, "deploy_core.server.retention"):
        assert await retention.prune() == 1
    assert store.get("old") is None
    assert store.get("recent") is not None and store.get("running") is not None
    assert "deleted 1 deployments finished more than 30 days ago" in caplog.text
    caplog.clear()
    assert await retention.prune() == 0
    assert "deleted" not in caplog.text  # nothing to say


class _FlakyStore:
    """A store whose first ``prune`` fails, then counts passes."""

    def __init__(self) -> None:
        self.calls = 0
        self.again = asyncio.Event()

    def prune(self, older_than: float) -> int:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("database gone for a moment")
        self.again.set()
        return 0


async def test_the_retention_loop_outlives_a_failed_pass(caplog: pytest.LogCaptureFixture) -> None:
    flaky = _FlakyStore()
    retention = Retention(flaky, days=1, interval=0.01)  # type: ignore[arg-type]
    task = asyncio.create_task(retention.run())
    try:
        await asyncio.wait_for(flaky.again.wait(), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert flaky.calls >= 2
    assert "retention pass failed" in caplog.text
    assert "database gone for a moment" in caplog.text


@dataclass
class _Session:
    last_seen: float


async def test_a_heartbeat_flush_writes_each_connected_agents_last_seen(
    store: RecordStore,
) -> None:
    for cid in ("web-1", "web-2", "away"):
        store.enroll(cid, public_key=cid.encode().hex())
    sessions: dict[str, AgentSession] = {
        "web-1": _Session(1000.5),  # type: ignore[dict-item]
        "web-2": _Session(2000.25),  # type: ignore[dict-item]
    }
    flush = HeartbeatFlush(store, sessions=sessions, interval=5)
    assert await flush.flush() == 2
    seen = {c.client_id: c.last_seen for c in store.list_clients()}
    assert seen == {"away": None, "web-1": 1000.5, "web-2": 2000.25}
    sessions.clear()  # the view is live: nobody connected, nothing written
    assert await flush.flush() == 0
    assert {c.client_id: c.last_seen for c in store.list_clients()} == seen


class _FlakyClients:
    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []
        self.again = asyncio.Event()

    def touch_clients(self, seen: dict[str, float]) -> None:
        self.seen.append(seen)
        if len(self.seen) == 1:
            raise RuntimeError("locked")
        self.again.set()


async def test_the_heartbeat_loop_outlives_a_failed_flush(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = _FlakyClients()
    sessions = {"web-1": _Session(7.0)}
    flush = HeartbeatFlush(flaky, sessions=sessions, interval=0.01)  # type: ignore[arg-type]
    task = asyncio.create_task(flush.run())
    try:
        await asyncio.wait_for(flaky.again.wait(), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert flaky.seen[:2] == [{"web-1": 7.0}, {"web-1": 7.0}]
    assert "could not record heartbeats" in caplog.text
