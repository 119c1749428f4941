"""The rollout store on SQLite and PostgreSQL: the driver's lease (one holder at a time,
taken over once expired) and status changes that never undo an operator's."""

from __future__ import annotations

import time

from deploy_core.server import db
from deploy_core.server.callbacks import Listeners
from deploy_core.server.rollouts import (
    ABORTED,
    PAUSED,
    PENDING,
    RUNNING,
    Rollouts,
    RolloutStore,
    resolve_strategy,
)
from deploy_core.server.secret_box import SecretBox


def make_store(db_url: str) -> RolloutStore:
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    return RolloutStore(engine, SecretBox())


def test_one_lease_holder_at_a_time(db_url: str) -> None:
    store = make_store(db_url)
    assert store.take_lease("a", seconds=30)
    assert not store.take_lease("b", seconds=30)
    assert store.take_lease("a", seconds=0.2)  # a renewal, shorter this time
    assert not store.take_lease("b")
    time.sleep(0.3)
    assert store.take_lease("b", seconds=30)  # expired: taken over
    assert not store.take_lease("a")
    store.release_lease("a")  # not a's to release
    assert not store.take_lease("a")
    store.release_lease("b")
    assert store.take_lease("a")


def test_status_changes_compare_and_set(db_url: str) -> None:
    store = make_store(db_url)
    strategy = resolve_strategy({"batch_size": 2}, 3)
    row = store.create(
        kind="shell",
        command_type="deploy.shell",
        request={"params": {"script": "true"}},
        deadline_seconds=60,
        secret_env={"TOKEN": "s3cret"},
        selector=None,
        strategy=strategy,
        strategy_asked={"batch_size": 2},
        client_ids=["a", "b", "c"],
        created_by="test",
    )
    rid = row["rollout_id"]
    assert row["status"] == PENDING and row["batch_count"] == 2
    assert "s3cret" not in str(row["secret_env"])  # sealed
    assert store.secret_env(row) == {"TOKEN": "s3cret"}
    assert store.transition(rid, (PENDING,), RUNNING, "started") is not None
    assert store.transition(rid, (RUNNING,), PAUSED, "paused by x") is not None
    # The driver, still believing it running, cannot move it on.
    assert store.transition(rid, (RUNNING,), "succeeded", "done") is None
    final = store.transition(rid, (PAUSED, RUNNING), ABORTED, "aborted by x")
    assert final is not None and final["finished_at"] and final["secret_env"] is None
    targets = store.targets([rid])[rid]
    assert [t.state for t in targets] == ["skipped"] * 3
    assert [h["status"] for h in store.history(rid)] == [PENDING, RUNNING, PAUSED, ABORTED]
    items, total = store.page(status=None, active=True, limit=10, offset=0)
    assert total == 0 and items == []


async def test_only_the_lease_holder_drives(db_url: str) -> None:
    store = make_store(db_url)
    row = store.create(
        kind="shell",
        command_type="deploy.shell",
        request={"params": {"script": "true"}},
        deadline_seconds=60,
        secret_env={},
        selector=None,
        strategy=resolve_strategy({}, 2),
        strategy_asked={},
        client_ids=["forgotten-1", "forgotten-2"],  # not enrolled (any more)
        created_by="test",
    )
    rid = row["rollout_id"]
    # Nothing here submits a deployment: the clients are gone, so no Deployments is needed.
    a = Rollouts(store, None, Listeners(), owner="a")  # type: ignore[arg-type]
    b = Rollouts(store, None, Listeners(), owner="b")  # type: ignore[arg-type]
    assert store.take_lease("a")
    await b.drive_once()
    assert store.get(rid)["status"] == PENDING and not b.holding  # type: ignore[index]
    await a.drive_once()
    await a.drive_once()
    done = store.get(rid)
    assert done is not None and done["status"] == "succeeded"
    targets = store.targets([rid])[rid]
    assert [(t.state, t.row["error"]) for t in targets] == [("skipped", "no longer enrolled")] * 2
