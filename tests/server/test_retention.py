"""Retention (``deployctl db prune`` and the server's daily pass, server/retention.py) and
upgrading a database that already holds data."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from deploy_core.models import DeployCallbackPayload, DeployStatus, DeployStatusReport, LogLine
from deploy_core.server import db
from deploy_core.server.records import RecordStore
from deploy_core.server.retention import DAY, Retention


def _finished(store: RecordStore, deploy_id: str, client: str) -> None:
    store.create_deployment(
        deploy_id=deploy_id,
        client_id=client,
        command_type="deploy.shell",
        request={"params": {}},
        deadline=time.time() + 60,
        secret_env={"K": "secret"},
    )
    store.apply_report(
        client,
        DeployStatusReport(
            deploy_id=deploy_id,
            command_type="deploy.shell",
            status=DeployStatus.EXECUTING,
            progress=5,
            seq=0,
            logs=[LogLine(line="hello")],
        ),
    )
    store.finish(
        client,
        DeployCallbackPayload(
            callback_id=deploy_id,
            command_type="deploy.shell",
            deploy_type="shell",
            status=DeployStatus.SUCCESS,
            success=True,
        ),
    )


def test_prune_deletes_old_finished_deployments_only(db_url: str) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    store = RecordStore(engine)
    _finished(store, "old1", "c1")
    _finished(store, "old2", "c2")
    store.create_deployment(
        deploy_id="running",
        client_id="c3",
        command_type="deploy.shell",
        request={},
        deadline=time.time() - 10_000,
    )
    cutoff = time.time() + 1
    _finished(store, "new1", "c4")
    with engine.begin() as conn:  # make "new1" finish after the cutoff
        conn.execute(
            db.deployments.update()
            .where(db.deployments.c.deploy_id == "new1")
            .values(finished_at=cutoff + 100)
        )
    assert store.prune(cutoff, batch=1) == 2
    assert store.get("old1") is None and store.get("old2") is None
    assert store.get("running") is not None and store.get("new1") is not None
    assert store.history("old1") == [] and store.logs("old1") == []
    assert store.logs("new1") and store.history("new1")
    with engine.connect() as conn:
        left = conn.execute(sa.select(db.deploy_secrets.c.deploy_id)).scalars().all()
    assert "old1" not in left
    assert store.prune(cutoff) == 0
    engine.dispose()


def test_upgrade_from_the_previous_revision_keeps_the_data(db_url: str) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine, "0002")
    now = time.time()
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO deployments (deploy_id, client_id, command_type, status, stage,"
                " progress, last_seq, request, rollback_wanted, deadline, created_at, updated_at)"
                " VALUES ('d1', 'c1', 'deploy.shell', 'pending', 'pending', 0, -1, '{}', false,"
                " :t, :t, :t)"
            ),
            {"t": now},
        )
    db.upgrade(engine)
    assert (db.current_revision(engine) or "") >= "0003"  # 0003 or a later head
    record = RecordStore(engine).get("d1")
    assert record is not None
    assert record.log_bytes == 0 and record.log_truncated is False
    engine.dispose()


def test_cli_prune_and_upgrade(tmp_path: Path) -> None:
    state = tmp_path / "state"
    run = [sys.executable, "-m", "deploy_core.cli", "db"]
    out = subprocess.run(
        [*run, "upgrade", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "schema empty ->" in out
    engine = db.make_engine(db.sqlite_url(state / "deploy-center.db"))
    _finished(RecordStore(engine), "x1", "c1")
    with engine.begin() as conn:
        conn.execute(db.deployments.update().values(finished_at=time.time() - 40 * 86400))
    engine.dispose()
    dry = subprocess.run(
        [*run, "prune", "--older-than", "30d", "--dry-run", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "would delete 1" in dry.stdout
    done = subprocess.run(
        [*run, "prune", "--older-than", "30d", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "deleted 1" in done.stdout
    bad = subprocess.run(
        [*run, "prune", "--older-than", "soon", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "duration" in bad.stderr


# --------------------------------------------------------------------------- the server's loop


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


async def test_the_retention_loop_prunes_only_while_this_replica_holds_the_lease(
    store: RecordStore,
) -> None:
    _finished(store, "old", "c1")
    _age(store, "old", 31)
    held = False
    asked = asyncio.Event()

    def holds() -> bool:
        asked.set()
        return held

    # A day between passes, as a server runs it: a replica that gets the duty later, or a
    # pass that failed, does not wait that long.
    task = asyncio.create_task(Retention(store, days=30, may_run=holds, retry=0.01).run())
    try:
        await asyncio.wait_for(asked.wait(), 30)
        await asyncio.sleep(0.1)  # several passes without the lease
        assert store.get("old") is not None
        held = True
        end = time.monotonic() + 30
        while store.get("old") is not None and time.monotonic() < end:
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert store.get("old") is None


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
    retention = Retention(flaky, days=1, retry=0.01)  # type: ignore[arg-type]
    task = asyncio.create_task(retention.run())
    try:
        await asyncio.wait_for(flaky.again.wait(), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert flaky.calls >= 2
    assert "retention pass failed" in caplog.text
    assert "database gone for a moment" in caplog.text


# --------------------------------------------------------------------------- rollouts


def _rollout(engine: sa.engine.Engine, rollout_id: str, finished_at: float | None) -> None:
    """A rollout row with one target and one history line, finished at ``finished_at``."""
    now = time.time()
    with engine.begin() as conn:
        conn.execute(
            db.rollouts.insert().values(
                rollout_id=rollout_id,
                status="succeeded" if finished_at else "running",
                kind="shell",
                command_type="deploy.shell",
                request={},
                deadline_seconds=60,
                strategy={},
                strategy_asked={},
                total=1,
                batch_count=1,
                current_batch=0,
                created_by="admin",
                created_at=now - 90 * DAY,
                updated_at=now,
                finished_at=finished_at,
            )
        )
        conn.execute(
            db.rollout_targets.insert().values(
                rollout_id=rollout_id, position=0, client_id="c1", batch=0, state="done"
            )
        )
        conn.execute(
            db.rollout_history.insert().values(
                rollout_id=rollout_id, status="created", message="made", ts=now
            )
        )


def _rows(engine: sa.engine.Engine, table: sa.Table) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(table.c.rollout_id)).scalars())


async def test_a_retention_pass_deletes_old_finished_rollouts_with_their_rows(
    store: RecordStore, caplog: pytest.LogCaptureFixture
) -> None:
    from deploy_core.server.rollouts import RolloutStore
    from deploy_core.server.secret_box import SecretBox

    engine = store.engine
    _rollout(engine, "old", time.time() - 31 * DAY)
    _rollout(engine, "recent", time.time() - 29 * DAY)
    _rollout(engine, "running", None)
    retention = Retention(store, days=30, rollouts=RolloutStore(engine, SecretBox()))
    with caplog.at_level(logging.INFO, "deploy_core.server.retention"):
        await retention.prune()
    for table in (db.rollouts, db.rollout_targets, db.rollout_history):
        assert _rows(engine, table) == {"recent", "running"}, table.name
    assert "deleted 1 rollouts finished more than 30 days ago" in caplog.text


def test_cli_prune_counts_rollouts_too(tmp_path: Path) -> None:
    state = tmp_path / "state"
    run = [sys.executable, "-m", "deploy_core.cli", "db"]
    subprocess.run([*run, "upgrade", "--state-dir", str(state)], check=True, timeout=60)
    engine = db.make_engine(db.sqlite_url(state / "deploy-center.db"))
    _rollout(engine, "old", time.time() - 40 * DAY)
    dry = subprocess.run(
        [*run, "prune", "--older-than", "30d", "--dry-run", "--state-dir", str(state)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "would delete 0 deployments and 1 rollouts" in dry.stdout
    assert _rows(engine, db.rollouts) == {"old"}
    done = subprocess.run(
        [*run, "prune", "--older-than", "30d", "--state-dir", str(state)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "deleted 0 deployments and 1 rollouts" in done.stdout
    assert _rows(engine, db.rollouts) == set() == _rows(engine, db.rollout_history)
    engine.dispose()
