"""The server's database: engine set-up and the core's Alembic migrations (SPEC deploy-33).

Every test that takes ``db_url`` runs against SQLite and against PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory

from deploy_core.server import db
from deploy_core.server.db import (
    clients,
    current_revision,
    deployments,
    make_engine,
    metadata,
    migrations_config,
    normalise_url,
    sqlite_url,
    status_history,
    upgrade,
)

# The tables the first migration creates; later ones add more.
INITIAL_TABLES = {"deployments", "status_history", "deploy_logs", "clients", "client_locks"}


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def _head(engine: sa.Engine) -> str:
    heads = ScriptDirectory.from_config(migrations_config(engine)).get_heads()
    assert len(heads) == 1, f"migrations must form one line, found heads {heads}"
    return heads[0]


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def test_upgrade_from_empty_creates_every_table_and_records_revision(engine: sa.Engine) -> None:
    assert current_revision(engine) is None
    assert not _tables(engine) & set(metadata.tables)

    upgrade(engine)

    assert current_revision(engine) == _head(engine)
    assert _tables(engine) == set(metadata.tables) | {"alembic_version"}
    # The migrations and the table definitions the code uses describe the same columns.
    inspector = sa.inspect(engine)
    for name, table in metadata.tables.items():
        migrated = {c["name"] for c in inspector.get_columns(name)}
        assert migrated == set(table.c.keys()), name


def test_first_revision_is_0001_with_the_initial_tables(engine: sa.Engine) -> None:
    upgrade(engine, "0001")

    assert current_revision(engine) == "0001"
    assert _tables(engine) == INITIAL_TABLES | {"alembic_version"}

    upgrade(engine)

    assert current_revision(engine) == _head(engine)


def test_migrated_schema_accepts_rows_and_cascades_history_on_delete(engine: sa.Engine) -> None:
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(
            deployments.insert().values(
                deploy_id="d1",
                client_id="web-1",
                command_type="deploy.shell",
                status="pending",
                stage="pending",
                progress=0,
                last_seq=-1,
                request={"params": {"script": "true"}},
                rollback_wanted=False,
                deadline=1.0,
                created_at=1.0,
                updated_at=1.0,
            )
        )
        conn.execute(
            status_history.insert().values(
                deploy_id="d1",
                status="pending",
                stage="pending",
                progress=0,
                message="",
                source="server",
                ts=1.0,
            )
        )
    with engine.begin() as conn:
        conn.execute(deployments.delete().where(deployments.c.deploy_id == "d1"))
    with engine.connect() as conn:
        left = conn.execute(sa.select(sa.func.count()).select_from(status_history)).scalar()
    assert left == 0


def test_history_row_for_unknown_deployment_is_refused(engine: sa.Engine) -> None:
    upgrade(engine)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(
            status_history.insert().values(
                deploy_id="nope",
                status="pending",
                stage="",
                progress=0,
                message="",
                source="server",
                ts=1.0,
            )
        )


def test_upgrade_twice_is_a_no_op(engine: sa.Engine) -> None:
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(
            clients.insert().values(
                client_id="web-1", agent_key="k", enrolled_at=1.0, connected=False
            )
        )

    upgrade(engine)

    assert current_revision(engine) == _head(engine)
    with engine.connect() as conn:
        kept = conn.execute(sa.select(clients.c.client_id)).scalars().all()
    assert kept == ["web-1"]


def test_downgrade_to_base_drops_tables_and_upgrade_again_restores_them(
    engine: sa.Engine,
) -> None:
    upgrade(engine)
    command.downgrade(migrations_config(engine), "base")

    assert current_revision(engine) is None
    assert not _tables(engine) & set(metadata.tables)

    upgrade(engine)

    assert current_revision(engine) == _head(engine)
    assert _tables(engine) >= set(metadata.tables)


def test_sqlite_engine_uses_wal_and_enforces_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "wal.db"))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        engine.dispose()
    # WAL is a property of the file: a plain connection opened later sees it too.
    raw = sqlite3.connect(tmp_path / "wal.db")
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


def test_sqlite_threads_take_turns_to_write_and_reads_wait_for_no_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """engine.begin() transactions of one process wait for each other's end (a lock of the
    process, handed over at once) instead of SQLite's sleeping busy handler; an
    engine.connect() read begins beside a writer and sees the last commit."""
    engine = make_engine(sqlite_url(tmp_path / "turns.db"))
    upgrade(engine)
    holding, release = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with engine.begin() as conn:
            conn.execute(clients.insert().values(client_id="a", enrolled_at=1.0))
            order.append("first wrote")
            holding.set()
            assert release.wait(30)
            order.append("first ends")

    def second() -> None:
        assert holding.wait(30)
        with engine.begin() as conn:
            order.append("second began")
            conn.execute(clients.insert().values(client_id="b", enrolled_at=2.0))

    try:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        assert holding.wait(30)
        # A read while the first holds the write lock: not blocked, the last commit's view.
        with engine.connect() as conn:
            seen = conn.execute(sa.select(clients.c.client_id)).scalars().all()
        assert seen == [] and order == ["first wrote"]
        release.set()
        for thread in threads:
            thread.join(30)
        assert order == ["first wrote", "first ends", "second began"]
        with engine.connect() as conn:
            rows = conn.execute(sa.select(clients.c.client_id).order_by("client_id")).scalars()
            assert rows.all() == ["a", "b"]
        # A failed transaction gives its turn back too.
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(clients.insert().values(client_id="a", enrolled_at=3.0))
        monkeypatch.setattr(db, "WRITER_WAIT", 120.0)
        began = threading.Event()

        def third() -> None:
            with engine.begin():
                began.set()

        thread = threading.Thread(target=third)
        thread.start()
        assert began.wait(30), "the failed transaction kept the turn"
        thread.join(30)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db:5432/deploy", "postgresql+psycopg://u:p@db:5432/deploy"),
        (
            "postgresql://u@db/deploy?sslmode=require",
            "postgresql+psycopg://u@db/deploy?sslmode=require",
        ),
        ("postgresql+psycopg://u@db/deploy", "postgresql+psycopg://u@db/deploy"),
        ("sqlite:////var/lib/deploy/center.db", "sqlite:////var/lib/deploy/center.db"),
    ],
)
def test_normalise_url_uses_psycopg_for_postgres_urls(given: str, expected: str) -> None:
    assert normalise_url(given) == expected


def test_make_engine_on_postgres_url_picks_the_psycopg_driver() -> None:
    engine = make_engine("postgres://u@127.0.0.1:1/none")
    try:
        assert engine.dialect.name == "postgresql"
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()
