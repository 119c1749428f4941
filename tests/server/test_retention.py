"""Retention (``deployctl db prune``) and upgrading a database that already holds data."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from deploy_core.models import DeployCallbackPayload, DeployStatus, DeployStatusReport, LogLine
from deploy_core.server import db
from deploy_core.server.records import RecordStore


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
