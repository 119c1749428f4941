"""Docker deployments roll back to the previous container by default (issue 10 §2): requests
without a ``rollback`` field, a real engine and the test bed's registry (``bash
scripts/docker-testbed.sh``; without them the tests skip through ``missing_part``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import docker
import pytest

# The test bed, its images and the helpers that look at containers are test_docker_e2e's.
from test_docker_e2e import AGENT, FAST, IMAGE, answer, client, managed, name, testbed

from deploy_core.testing import DeployCenter, free_port

__all__ = ["client", "name", "testbed"]  # fixtures used here


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("docker-default"))
    try:
        c.start_server()
        c.start_agent(AGENT)
        yield c
    finally:
        c.close()


def deploy(center: DeployCenter, name: str, tag: str, port: int) -> dict[str, Any]:
    """``web:<tag>`` as ``name`` with an HTTP check and no ``rollback`` field at all."""
    body = {
        "client_id": AGENT,
        "image": f"{IMAGE}:{tag}",
        "container_name": name,
        "ports": [f"127.0.0.1:{port}:8080"],
        "min_uptime": 0.5,
        "stop_timeout": 5,
        "health_checks": [{"type": "http", "port": port, "path": "/healthz", **FAST}],
    }
    record: dict[str, Any] = center.wait(center.api.deploy("docker", body)["deploy_id"], 120)
    return record


def test_failed_container_is_replaced_by_the_previous_one_without_asking(
    center: DeployCenter, name: str, client: docker.DockerClient
) -> None:
    port = free_port()
    first = deploy(center, name, "v1", port)
    assert first["status"] == "success", first["error"]
    assert first["request"]["rollback_plan"]["source"] == "deploy type default"

    record = deploy(center, name, "v2", port)  # v2 answers 404 on /healthz

    assert record["status"] == "rolled_back", record["error"]
    assert record["rollback"]["strategy"] == "previous_container"
    assert record["rollback"]["success"] is True
    assert record["rollback"]["message"].startswith(f"{name} is the previous container again")
    [left] = managed(client, name)
    assert left.id == first["result"]["container_id"]
    assert left.status == "running"
    assert "web v1" in (answer(port) or "")


def test_first_container_failure_has_nothing_to_roll_back_to(
    center: DeployCenter, name: str, client: docker.DockerClient
) -> None:
    record = deploy(center, name, "v2", free_port())

    assert record["status"] == "rolled_back", record["error"]
    rollback = record["rollback"]
    assert rollback["success"] is True
    assert rollback["message"] == (
        f"nothing to roll back to: no previous container {name} (the new one was removed)"
    )
    assert rollback["health"] == []
    assert managed(client, name) == []
