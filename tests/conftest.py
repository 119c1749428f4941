"""Fixtures shared by the core's tests: databases (SQLite and PostgreSQL) and missing parts.

A test that needs a part this machine lacks skips with the reason; with
``DEPLOY_CENTER_STRICT=1`` (set by CI) such a skip is a failure instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

PG_URL = os.environ.get(
    "DEPLOY_CENTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def missing_part(reason: str) -> None:
    """Skip, or fail under ``DEPLOY_CENTER_STRICT=1``, because a real part is missing."""
    if os.environ.get("DEPLOY_CENTER_STRICT") == "1":
        pytest.fail(f"required part missing (DEPLOY_CENTER_STRICT=1): {reason}")
    pytest.skip(reason)


def _postgres_schema_url() -> Iterator[str]:
    try:
        admin = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with admin.begin() as conn:
            schema = f"t_{uuid.uuid4().hex[:12]}"
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # no server, no driver, no database
        missing_part(f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}: {exc}")
        return
    try:
        sep = "&" if "?" in PG_URL else "?"
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: SQLite in tmp_path, and PostgreSQL in a schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
    else:
        yield from _postgres_schema_url()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema only."""
    yield from _postgres_schema_url()


@pytest.fixture
def proxy() -> Iterator[Any]:
    """A TCP proxy on loopback in front of the test PostgreSQL that a test can cut and
    restore (tests/pg_proxy.py); ``proxy.url(pg_url)`` routes a database URL through it."""
    from tests.pg_proxy import PgProxy

    p = PgProxy().start()
    try:
        yield p
    finally:
        p.close()
