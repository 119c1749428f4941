"""Secret variables: into the container, never into what goes to the server, and back when a
replaced container has to be created again."""

from __future__ import annotations

import json

import docker
import pytest
from docker_bed import Factory, aim_rollback, managed, web
from pydantic import ValidationError

from deploy_core.agent.context import DeployFailed
from deploy_core.testing import free_port
from deploy_docker.deploy import deploy_container
from deploy_docker.params import DockerParams, RegistryAuth
from deploy_docker.rollback import discard_previous, prepare_previous, rollback_previous
from deploy_docker.spec import SECRETS_LABEL

SECRETS = {"API_KEY": "k-very-secret-1", "REGISTRY_PASSWORD": "p-very-secret-2"}
AUTH = {"username": "ci", "password_secret": "REGISTRY_PASSWORD"}


def env_of(container: docker.models.containers.Container) -> dict[str, str]:
    return dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])


async def test_secrets_reach_the_container_but_not_the_rollback_state(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    first = DockerParams.model_validate(web(container_name, "v1", port, registry_auth=AUTH))
    ctx, _ = docker_context(first.model_dump(mode="json"), secret_env=SECRETS)
    result = await deploy_container(ctx, first)
    container = docker_client.containers.get(result.container_id)
    assert env_of(container)["API_KEY"] == "k-very-secret-1"
    assert "REGISTRY_PASSWORD" not in env_of(container)  # the pull's, not the app's
    assert container.labels[SECRETS_LABEL] == "API_KEY"

    second = DockerParams.model_validate(web(container_name, "v2", port))
    ctx, _ = docker_context(second.model_dump(mode="json"))
    state = await prepare_previous(ctx, aim_rollback(ctx))
    sent = json.dumps(state)
    assert "k-very-secret-1" not in sent
    assert state["previous"]["spec"]["secret_names"] == ["API_KEY"]


async def test_a_recreated_previous_container_gets_its_secrets_back(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    first = DockerParams.model_validate(web(container_name, "v1", port))
    ctx, _ = docker_context(first.model_dump(mode="json"), secret_env={"API_KEY": "k-1-secret"})
    await deploy_container(ctx, first)

    second = DockerParams.model_validate(web(container_name, "v2", port))
    ctx, _ = docker_context(second.model_dump(mode="json"))
    state = await prepare_previous(ctx, aim_rollback(ctx))
    await deploy_container(ctx, second)
    await discard_previous(ctx, aim_rollback(ctx, state))  # the v1 container is gone now

    await rollback_previous(ctx, aim_rollback(ctx, state, "test"))
    [again] = managed(docker_client, container_name)
    assert env_of(again)["API_KEY"] == "k-1-secret"


async def test_a_password_secret_missing_from_the_request_fails_the_pull(
    docker_context: Factory, container_name: str, engine_ready: None
) -> None:
    params = DockerParams.model_validate(web(container_name, "v1", free_port(), registry_auth=AUTH))
    ctx, _ = docker_context(params.model_dump(mode="json"))
    with pytest.raises(DeployFailed, match="names REGISTRY_PASSWORD, which the request's"):
        await deploy_container(ctx, params)


@pytest.mark.parametrize(
    "fields",
    [
        {"username": "ci"},
        {"username": "ci", "password": "x", "password_secret": "X"},
        {"username": "ci", "password_secret": "not a name"},
    ],
)
def test_registry_auth_takes_exactly_one_password(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        RegistryAuth.model_validate(fields)
