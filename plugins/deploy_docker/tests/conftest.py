"""Fixtures: a real Docker engine with the test bed's registry, unique container names that
are cleaned up, and deployment contexts set up the way the agent sets them up.

Tests that need the engine skip with the reason when it is missing (``bash
scripts/docker-testbed.sh`` brings it up); ``DEPLOY_CENTER_STRICT=1`` turns the skip into a
failure, as in the core's suite.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker_bed import Factory, missing_part, testbed_problem

from deploy_core.agent.context import DeployContext
from deploy_core.models import DeployCommand
from deploy_core.testing import RecordingReporter
from deploy_docker.plugin import DEPLOY_TYPE
from deploy_docker.spec import NAME_LABEL

_problem: list[str | None] = []


@pytest.fixture
def engine_ready() -> None:
    """The engine and the test bed's images are there (checked once), else skip."""
    if not _problem:
        _problem.append(testbed_problem())
    if _problem[0] is not None:
        missing_part(_problem[0])


@pytest.fixture
def docker_client(engine_ready: None) -> Iterator[docker.DockerClient]:
    """A docker SDK client for checking what the plugin did."""
    client = docker.from_env(timeout=30)
    yield client
    client.close()


@pytest.fixture
def container_name(docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh container name; every container carrying it (or its ``.prev-`` names) is
    removed afterwards."""
    name = f"dd-test-{uuid.uuid4().hex[:10]}"
    yield name
    for container in docker_client.containers.list(all=True):
        labelled = container.labels.get(NAME_LABEL) == name
        if labelled or container.name.startswith(name):
            container.remove(force=True)


@pytest.fixture
def docker_context(tmp_path: Path) -> Factory:
    """``ctx, reporter = docker_context(params, rollback=True, secret_env={})``: a
    ``deploy.docker`` deployment's context, with the ``previous_container`` rollback unless
    told otherwise."""

    def factory(
        params: dict[str, Any],
        *,
        rollback: bool = True,
        deploy_id: str | None = None,
        secret_env: dict[str, str] | None = None,
    ) -> tuple[DeployContext, RecordingReporter]:
        reporter = RecordingReporter()
        command = DeployCommand(
            deploy_id=deploy_id or uuid.uuid4().hex,
            command_type="deploy.docker",
            params=params,
            secret_env=secret_env or {},
            rollback={"strategy": "previous_container", "timeout": 120.0} if rollback else None,
            expires_at=time.time() + 600,
        )
        ctx = DeployContext(
            command=command,
            reporter=reporter,
            data_dir=tmp_path / "agent-data",
            stage_of=DEPLOY_TYPE.stage,
        )
        return ctx, reporter

    return factory
