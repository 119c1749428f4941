"""Fixtures: a real Docker engine (containers made with the docker SDK and removed
afterwards), and fresh databases (SQLite, and PostgreSQL when it answers)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import sqlalchemy as sa
from monitor_bed import IMAGE, RunContainer, engine_problem, missing_part

PG_URL = os.environ.get(
    "DEPLOY_CENTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MANAGED = {"deploy-center.managed": "1"}

_problem: list[str | None] = []


@pytest.fixture
def docker_client() -> Iterator[docker.DockerClient]:
    """A docker SDK client, once the engine and the test image are known to be there."""
    if not _problem:
        _problem.append(engine_problem())
    if _problem[0] is not None:
        missing_part(_problem[0])
    client = docker.from_env(timeout=30)
    yield client
    client.close()


@pytest.fixture
def run_container(docker_client: docker.DockerClient) -> Iterator[RunContainer]:
    """``run_container(managed=True, **kwargs)``: a running container of the test image,
    labelled as deploy-docker labels its own unless ``managed`` is false; removed after."""
    made: list[Any] = []

    def run(managed: bool = True, **kwargs: Any) -> Any:
        labels = {**(MANAGED if managed else {}), **kwargs.pop("labels", {})}
        container = docker_client.containers.run(
            IMAGE, detach=True, name=f"md-test-{uuid.uuid4().hex[:10]}", labels=labels, **kwargs
        )
        made.append(container)
        return container

    yield run
    for container in made:
        container.remove(force=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A fresh, empty database: SQLite in tmp_path, PostgreSQL in a schema of its own."""
    if request.param == "sqlite":
        eng = sa.create_engine(f"sqlite:///{tmp_path / 'monitor.db'}")
        yield eng
        eng.dispose()
        return
    try:
        admin = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        missing_part(f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}: {exc}")
        return
    eng = sa.create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    try:
        yield eng
    finally:
        eng.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
