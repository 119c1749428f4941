"""Targets and ownership in the records: which deployment is live on a target, which newer
ones a rollback would undo, and what an agent may name or fetch (issue 10 §3, §4).

Every test runs against a fresh SQLite database and a fresh PostgreSQL schema.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from deploy_core.models import DeployCallbackPayload, DeployStatus
from deploy_core.server.db import make_engine, upgrade
from deploy_core.server.records import RecordStore
from deploy_core.server.rows import DeploymentRow

SHELL = "deploy.shell"
TARGET = "deploy.shell:/srv/app"


@pytest.fixture
def store(db_url: str) -> Iterator[RecordStore]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield RecordStore(engine, server_id="s1")
    engine.dispose()


def finished(
    store: RecordStore,
    deploy_id: str,
    status: DeployStatus = DeployStatus.SUCCESS,
    *,
    target: str = TARGET,
    client_id: str = "web-1",
    rollback_of: str | None = None,
    artifacts: tuple[str, ...] = (),
) -> DeploymentRow:
    """A deployment created, sent, acknowledged and finished with ``status``."""
    store.create_deployment(
        deploy_id=deploy_id,
        client_id=client_id,
        command_type="deploy.rollback" if rollback_of else SHELL,
        request={"params": {}},
        deadline=time.time() + 600,
        rollback_of=rollback_of,
        target=target,
        artifacts=artifacts,
    )
    store.mark_dispatched(deploy_id)
    assert store.mark_acked(client_id, deploy_id)
    callback = DeployCallbackPayload(
        callback_id=deploy_id,
        command_type=SHELL,
        deploy_type="shell",
        status=status,
        success=status is DeployStatus.SUCCESS,
    )
    applied = store.finish(client_id, callback)
    assert applied.record is not None
    time.sleep(0.002)  # created_at orders them
    return applied.record


def ids(records: list[DeploymentRow]) -> list[str]:
    return [r.deploy_id for r in records]


def test_newer_deployments_in_place_are_named_newest_first(store: RecordStore) -> None:
    v3 = finished(store, "v3")
    v4 = finished(store, "v4")
    finished(store, "v5")
    finished(store, "other", target="deploy.shell:/srv/other")
    finished(store, "elsewhere", client_id="web-2")
    finished(store, "failed-undone", DeployStatus.ROLLED_BACK)

    assert ids(store.newer_in_place(v4)) == ["v5"]
    assert ids(store.newer_in_place(v3)) == ["v5", "v4"]
    assert [r.target for r in store.live_deployments("web-1")] == [
        TARGET,
        "deploy.shell:/srv/other",
    ]
    assert ids(store.live_deployments("web-1")) == ["v5", "other"]

    # v5 rolled back (its rollback ended rolled_back): v4 is live and nothing blocks it.
    finished(store, "undo-v5", DeployStatus.ROLLED_BACK, rollback_of="v5")
    assert store.newer_in_place(v4) == []
    assert ids(store.live_deployments("web-1")) == ["v4", "other"]
    assert ids(store.newer_in_place(v3)) == ["v4"]


def test_a_failed_rollback_leaves_the_newer_deployment_in_place(store: RecordStore) -> None:
    v1 = finished(store, "v1")
    finished(store, "v2")
    finished(store, "undo-v2", DeployStatus.ROLLBACK_FAILED, rollback_of="v2")
    assert ids(store.newer_in_place(v1)) == ["v2"]


def test_a_newer_failure_that_ran_blocks_but_is_not_live(store: RecordStore) -> None:
    v1 = finished(store, "v1")
    finished(store, "v2", DeployStatus.FAILED)  # ran, failed, nothing undid it
    assert ids(store.newer_in_place(v1)) == ["v2"]
    assert ids(store.live_deployments("web-1")) == ["v1"]


def test_ownership_of_deployments_and_artifacts(store: RecordStore) -> None:
    sha = "a" * 64
    finished(store, "mine", artifacts=(sha,))
    finished(store, "theirs", client_id="web-2")
    assert store.not_owned("web-1", ["mine", "theirs", "nothing"]) == ["theirs", "nothing"]
    assert store.not_owned("web-1", []) == []
    assert store.mark_acked("web-1", "theirs") is False
    assert store.may_fetch("web-1", sha)
    assert not store.may_fetch("web-2", sha)
    assert not store.may_fetch("web-1", "b" * 64)

    # Recorded but not yet sent: no right to the package yet.
    store.create_deployment(
        deploy_id="queued",
        client_id="web-3",
        command_type=SHELL,
        request={"params": {}},
        deadline=time.time() + 600,
        artifacts=(sha,),
    )
    assert not store.may_fetch("web-3", sha)
    store.mark_dispatched("queued")
    assert store.may_fetch("web-3", sha)
