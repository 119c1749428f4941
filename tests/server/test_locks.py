"""Client locks (deploy_core.server.locks) on one connection, inside the caller's transaction."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from deploy_core.server import locks
from deploy_core.server.db import make_engine, upgrade


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def take(engine: Engine, client_id: str, deploy_id: str, *, deadline: float | None = None) -> None:
    now = time.time()
    with engine.begin() as conn:
        locks.acquire(
            conn,
            client_id=client_id,
            deploy_id=deploy_id,
            owner="s1",
            now=now,
            deadline=now + 600 if deadline is None else deadline,
        )


def test_acquire_on_a_held_client_raises_client_busy_and_keeps_the_holder(engine: Engine) -> None:
    take(engine, "web-1", "first")
    with pytest.raises(locks.ClientBusy, match="busy with deployment first"):
        take(engine, "web-1", "second")
    with engine.connect() as conn:
        holder = locks.holder(conn, "web-1")
    assert holder is not None and holder.deploy_id == "first"


def test_a_lock_rolled_back_with_its_transaction_is_not_held(engine: Engine) -> None:
    with pytest.raises(RuntimeError, match="insert failed"), engine.begin() as conn:
        now = time.time()
        locks.acquire(
            conn, client_id="web-1", deploy_id="d1", owner="s1", now=now, deadline=now + 60
        )
        raise RuntimeError("insert failed")
    with engine.connect() as conn:
        assert locks.holder(conn, "web-1") is None
    take(engine, "web-1", "d2")


def test_release_frees_only_the_lock_of_the_deployment_it_names(engine: Engine) -> None:
    take(engine, "web-1", "first")
    with engine.begin() as conn:
        locks.release(conn, "web-1", "other")
    with engine.connect() as conn:
        assert [h.deploy_id for h in locks.held(conn)] == ["first"]
    with engine.begin() as conn:
        locks.release(conn, "web-1", "first")
    with engine.connect() as conn:
        assert locks.held(conn) == []


def test_an_expired_lock_is_cleared_and_taken(engine: Engine) -> None:
    take(engine, "web-1", "old", deadline=time.time() - locks.LOCK_GRACE - 5)
    take(engine, "web-1", "new")
    with engine.connect() as conn:
        holder = locks.holder(conn, "web-1")
    assert holder is not None and holder.deploy_id == "new"
