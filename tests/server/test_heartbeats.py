"""The server's heartbeat loop (server/heartbeats.py) on a real database: what one flush
writes, and that a failing flush does not stop the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from deploy_core.server import db
from deploy_core.server.heartbeats import HeartbeatFlush
from deploy_core.server.records import RecordStore
from deploy_core.transport import AgentSession


@pytest.fixture
def store(db_url: str) -> Iterator[RecordStore]:
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    yield RecordStore(engine, server_id="s1")
    engine.dispose()


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
    beats: list[int] = []

    async def beat() -> None:  # the replica's own heartbeat, after the agents'
        beats.append(len(store.list_clients()))

    flush = HeartbeatFlush(store, sessions=sessions, interval=5, then=beat)
    assert await flush.flush() == 2
    assert beats == [3]
    seen = {c.client_id: c.last_seen for c in store.list_clients()}
    assert seen == {"away": None, "web-1": 1000.5, "web-2": 2000.25}
    sessions.clear()  # the view is live: nobody connected, nothing written
    assert await flush.flush() == 0
    assert {c.client_id: c.last_seen for c in store.list_clients()} == seen


async def test_a_flush_writes_only_the_agents_heard_from_since_the_last(
    store: RecordStore,
) -> None:
    for cid in ("web-1", "web-2", "web-3"):
        store.enroll(cid, public_key=cid.encode().hex())
    quiet, busy = _Session(10.0), _Session(20.0)
    sessions: dict[str, AgentSession] = {"web-1": quiet, "web-2": busy}  # type: ignore[dict-item]
    flush = HeartbeatFlush(store, sessions=sessions, interval=5)
    assert await flush.flush() == 2
    busy.last_seen = 25.5  # a ping from web-2 only
    sessions["web-3"] = _Session(30.0)  # type: ignore[assignment]
    assert await flush.flush() == 2
    seen = {c.client_id: c.last_seen for c in store.list_clients()}
    assert seen == {"web-1": 10.0, "web-2": 25.5, "web-3": 30.0}
    assert await flush.flush() == 0  # nobody heard from: nothing written
    # web-1 leaves and comes back: its new session's time is written again.
    del sessions["web-1"]
    assert await flush.flush() == 0
    sessions["web-1"] = _Session(10.0)  # type: ignore[assignment]
    store.set_disconnected("web-1", last_seen=5.0)
    assert await flush.flush() == 1
    assert store.get_client("web-1").last_seen == 10.0  # type: ignore[union-attr]


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
