"""The previous_container strategy against a real engine: prepare → deploy → rollback or
discard, as the agent's executor runs them."""

from __future__ import annotations

import docker
from docker_bed import IMAGE, Factory, aim_rollback, http_get, managed, web

from deploy_core.agent.context import DeployContext, DeployFailed
from deploy_core.testing import free_port
from deploy_docker.deploy import deploy_container
from deploy_docker.params import DockerParams
from deploy_docker.result import DeployDockerResult
from deploy_docker.rollback import discard_previous, prepare_previous, rollback_previous


async def deploy(
    docker_context: Factory, params: dict[str, object]
) -> tuple[DeployDockerResult, DeployContext]:
    """prepare + executor + discard of one successful deployment; (result, ctx)."""
    ctx, _ = docker_context(DockerParams.model_validate(params).model_dump(mode="json"))
    state = await prepare_previous(ctx, aim_rollback(ctx))
    result = await deploy_container(ctx, DockerParams.model_validate(params))
    await discard_previous(ctx, aim_rollback(ctx, state))
    return result, ctx


async def test_rollback_puts_the_previous_container_back(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    v1, _ = await deploy(docker_context, web(container_name, "v1", port))

    params = DockerParams.model_validate(web(container_name, "v2", port))
    ctx, reporter = docker_context(params.model_dump(mode="json"))
    state = await prepare_previous(ctx, aim_rollback(ctx))
    assert state["previous"]["id"] == v1.container_id
    v2 = await deploy_container(ctx, params)
    assert "web v2" in http_get(port)
    # The old one waits, stopped and renamed, while the new one is checked.
    names = {c.name: c.status for c in managed(docker_client, container_name)}
    assert names == {
        container_name: "running",
        f"{container_name}.prev-{ctx.deploy_id[:8]}": "exited",
    }

    await rollback_previous(ctx, aim_rollback(ctx, state, "test"))

    [left] = managed(docker_client, container_name)
    assert left.id == v1.container_id
    assert left.name == container_name and left.status == "running"
    assert "web v1" in http_get(port)
    assert v2.container_id not in [c.id for c in docker_client.containers.list(all=True)]
    assert any("failed deployment" in line for line in reporter.lines("agent"))


async def test_discard_after_success_removes_the_previous_container(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    await deploy(docker_context, web(container_name, "v1", port))
    v2, _ = await deploy(docker_context, web(container_name, "healthcheck", port))
    assert [c.id for c in managed(docker_client, container_name)] == [v2.container_id]


async def test_rollback_with_nothing_before_removes_the_new_container(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    params = DockerParams.model_validate(web(container_name, "v2", free_port()))
    ctx, reporter = docker_context(params.model_dump(mode="json"))
    state = await prepare_previous(ctx, aim_rollback(ctx))
    assert state == {"container_name": container_name, "previous": None}
    await deploy_container(ctx, params)
    await rollback_previous(ctx, aim_rollback(ctx, state, "test"))
    assert managed(docker_client, container_name) == []
    assert any("nothing to restore" in line for line in reporter.lines("agent"))


async def test_failed_pull_leaves_the_running_container_alone(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    v1, _ = await deploy(docker_context, web(container_name, "v1", port))
    params = DockerParams.model_validate(web(container_name, "missing", port))
    ctx, _ = docker_context(params.model_dump(mode="json"))
    state = await prepare_previous(ctx, aim_rollback(ctx))
    try:
        await deploy_container(ctx, params)
    except DeployFailed as exc:
        assert "manifest unknown" in str(exc)
    else:
        raise AssertionError("a missing image deployed")
    await rollback_previous(ctx, aim_rollback(ctx, state, "test"))
    [left] = managed(docker_client, container_name)
    assert left.id == v1.container_id and left.status == "running"
    assert "web v1" in http_get(port)


async def test_manual_rollback_after_discard_creates_the_previous_container_again(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    v1, _ = await deploy(docker_context, web(container_name, "v1", port, env={"FLAVOUR": "one"}))
    params = web(container_name, "v2", port)
    ctx, _ = docker_context(DockerParams.model_validate(params).model_dump(mode="json"))
    state = await prepare_previous(ctx, aim_rollback(ctx))
    await deploy_container(ctx, DockerParams.model_validate(params))
    await discard_previous(ctx, aim_rollback(ctx, state))
    assert v1.container_id not in [c.id for c in docker_client.containers.list(all=True)]

    # Later, an operator asks to undo the v2 deployment.
    later, reporter = docker_context(DockerParams.model_validate(params).model_dump(mode="json"))
    await rollback_previous(later, aim_rollback(ctx, state, "test"))

    [again] = managed(docker_client, container_name)
    assert again.image.id == v1.image_id
    assert "FLAVOUR=one" in again.attrs["Config"]["Env"]
    assert "web v1" in http_get(port)
    assert any("creating it again" in line for line in reporter.lines("agent"))


async def test_start_first_keeps_the_old_container_running_until_discard(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    old_port, new_port = free_port(), free_port()
    v1, _ = await deploy(docker_context, web(container_name, "v1", old_port))
    params = DockerParams.model_validate(
        web(container_name, "healthcheck", new_port, start_first=True)
    )
    ctx, reporter = docker_context(params.model_dump(mode="json"))
    state = await prepare_previous(ctx, aim_rollback(ctx))
    await deploy_container(ctx, params)

    # Both answer: the old one is still serving while the new one is checked.
    assert "web v1" in http_get(old_port) and "web v1" in http_get(new_port)
    old = docker_client.containers.get(v1.container_id)
    assert old.status == "running" and old.name.startswith(f"{container_name}.prev-")
    assert not any("stopping the old container" in r[3] for r in reporter.reports)

    await discard_previous(ctx, aim_rollback(ctx, state))
    assert [c.name for c in managed(docker_client, container_name)] == [container_name]


async def test_start_first_with_clashing_ports_stops_the_old_one_first(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    await deploy(docker_context, web(container_name, "v1", port))
    params = DockerParams.model_validate(web(container_name, "v2", port, start_first=True))
    ctx, reporter = docker_context(params.model_dump(mode="json"))
    await deploy_container(ctx, params)
    assert any("both publish" in line for line in reporter.lines("agent"))
    assert "web v2" in http_get(port)
    assert f"{IMAGE}:v2" in [
        c.attrs["Config"]["Image"] for c in managed(docker_client, container_name)
    ]
