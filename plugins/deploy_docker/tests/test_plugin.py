"""The plugin as the core sees it: registration through the entry point, and deployments
through a real server and agent process."""

from __future__ import annotations

from itertools import pairwise

import docker
from docker_bed import http_get, managed, web

from deploy_core.plugins import load_plugins
from deploy_core.testing import DeployCenter, free_port
from deploy_docker.deploy import STAGES


def test_registered_through_the_entry_point() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_docker"})
    assert plugins.deploy_types.names() == ["deploy.docker"]
    assert plugins.rollback_strategies.names() == ["previous_container"]
    assert plugins.deploy_types.owners["deploy.docker"] == "deploy_docker"
    docker_type = plugins.deploy_types.entries["deploy.docker"]
    assert docker_type.default_rollback == "previous_container"
    assert [s.status for s in docker_type.stages] == [
        "executing",
        "pulling",
        "stopping",
        "starting",
    ]


def test_stages_cover_the_range_before_the_health_checks_in_order() -> None:
    assert STAGES[0].start == 0 and STAGES[-1].end == 90
    assert all(a.end == b.start for a, b in pairwise(STAGES))


def test_deploys_and_rolls_back_through_a_real_server_and_agent(
    deploy_center: DeployCenter, container_name: str, docker_client: docker.DockerClient
) -> None:
    deploy_center.start_agent("docker-host")
    port = free_port()
    first = deploy_center.api.deploy(
        "docker", {"client_id": "docker-host", "rollback": {}, **web(container_name, "v1", port)}
    )["deploy_id"]
    record = deploy_center.wait(first, timeout=90)
    assert record["status"] == "success", record["error"]
    assert "web v1" in http_get(port)
    # An image that cannot run: the agent rolls back to v1 by itself.
    second = deploy_center.api.deploy(
        "docker",
        {
            "client_id": "docker-host",
            "rollback": {},
            **web(container_name, "crash", port, restart_policy="no"),
        },
    )["deploy_id"]
    record = deploy_center.wait(second, timeout=90)
    assert record["status"] == "rolled_back", record["error"]
    assert "exited (code 3)" in record["error"]
    assert record["rollback"]["strategy"] == "previous_container"
    assert record["result"]["previous_container_id"] is not None
    [left] = managed(docker_client, container_name)
    assert left.id == record["result"]["previous_container_id"]
    assert "web v1" in http_get(port)
