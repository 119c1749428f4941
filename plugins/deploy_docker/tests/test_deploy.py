"""The deploy.docker executor against a real engine and the test bed's registry."""

from __future__ import annotations

import asyncio
import time

import docker
import pytest
from docker_bed import IMAGE, Factory, http_get, managed, web

from deploy_core.agent.context import DeployFailed
from deploy_core.models import DeployStatus
from deploy_core.testing import free_port
from deploy_docker.deploy import deploy_container, image_digest
from deploy_docker.engine import Engine, EngineTimeout
from deploy_docker.params import DockerParams
from deploy_docker.spec import DEPLOY_LABEL, MANAGED_LABEL, NAME_LABEL


async def test_v1_runs_answers_and_is_labelled(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    params = DockerParams.model_validate(web(container_name, "v1", port))
    ctx, reporter = docker_context(params.model_dump(mode="json"), rollback=False)
    result = await deploy_container(ctx, params)

    assert "web v1" in http_get(port)
    container = docker_client.containers.get(container_name)
    assert container.id == result.container_id
    assert container.status == "running"
    assert container.labels[MANAGED_LABEL] == "1"
    assert container.labels[NAME_LABEL] == container_name
    assert container.labels[DEPLOY_LABEL] == ctx.deploy_id
    assert result.image_id == container.image.id
    assert result.image_digest is not None and result.image_digest.startswith("sha256:")
    assert result.previous_container_id is None
    statuses = reporter.statuses
    assert statuses.index("executing") < statuses.index("pulling") < statuses.index("starting")
    assert statuses[-1] == "health_check"
    progress = [r[1] for r in reporter.reports]
    assert progress == sorted(progress)
    pulling = [r[1] for r in reporter.reports if r[0] is DeployStatus.PULLING]
    assert pulling[0] >= 5 and pulling[-1] == 60


async def test_replacing_without_rollback_removes_the_old_container(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    first = DockerParams.model_validate(web(container_name, "v1", port))
    ctx, _ = docker_context(first.model_dump(mode="json"), rollback=False)
    old = await deploy_container(ctx, first)

    second = DockerParams.model_validate(web(container_name, "v2", port))
    ctx, reporter = docker_context(second.model_dump(mode="json"), rollback=False)
    new = await deploy_container(ctx, second)

    assert new.previous_container_id == old.container_id
    assert new.previous_image == f"{IMAGE}:v1"
    assert [c.id for c in managed(docker_client, container_name)] == [new.container_id]
    assert "web v2" in http_get(port)
    assert "stopping" in reporter.statuses


async def test_crashing_container_fails_with_its_exit_code_and_output(
    docker_context: Factory, container_name: str
) -> None:
    params = DockerParams.model_validate(
        web(container_name, "crash", free_port(), restart_policy="no")
    )
    ctx, reporter = docker_context(params.model_dump(mode="json"))
    with pytest.raises(DeployFailed) as err:
        await deploy_container(ctx, params)
    assert "exited (code 3)" in str(err.value)
    assert "crashing on purpose" in str(err.value)
    assert err.value.result is not None
    assert err.value.result.model_dump()["container_id"]
    assert "crashing on purpose" in reporter.lines("container")


async def test_restarting_container_fails_fast(
    docker_context: Factory, container_name: str
) -> None:
    params = DockerParams.model_validate(web(container_name, "crash", free_port()))
    assert params.restart_policy == "unless-stopped"
    ctx, _ = docker_context(params.model_dump(mode="json"))
    started = time.monotonic()
    with pytest.raises(DeployFailed, match=r"restarting|exited"):
        await deploy_container(ctx, params)
    assert time.monotonic() - started < 15


async def test_image_healthcheck_is_waited_for(
    docker_context: Factory, container_name: str
) -> None:
    port = free_port()
    params = DockerParams.model_validate(web(container_name, "healthcheck", port))
    ctx, reporter = docker_context(params.model_dump(mode="json"))
    await deploy_container(ctx, params)
    messages = [r[3] for r in reporter.reports]
    assert any("health: starting" in m for m in messages)
    assert messages[-1].endswith("running, health: healthy")


async def test_unhealthy_by_docker_healthcheck_fails(
    docker_context: Factory, container_name: str
) -> None:
    params = DockerParams.model_validate(web(container_name, "unhealthy", free_port()))
    ctx, _ = docker_context(params.model_dump(mode="json"))
    with pytest.raises(DeployFailed, match="unhealthy by its Docker health check"):
        await deploy_container(ctx, params)


async def test_missing_image_fails_with_the_engines_reason(
    docker_context: Factory, container_name: str, docker_client: docker.DockerClient
) -> None:
    params = DockerParams.model_validate(web(container_name, "no-such-tag", free_port()))
    ctx, _ = docker_context(params.model_dump(mode="json"))
    with pytest.raises(DeployFailed) as err:
        await deploy_container(ctx, params)
    assert err.value.status is DeployStatus.FAILED
    with pytest.raises(docker.errors.NotFound) as engine_said:
        docker_client.images.pull(f"{IMAGE}:no-such-tag")
    assert engine_said.value.explanation in str(err.value)
    assert "manifest unknown" in str(err.value)


async def test_pull_policy_never_refuses_an_absent_image(
    docker_context: Factory, container_name: str
) -> None:
    params = DockerParams.model_validate(
        web(container_name, "not-pulled", free_port(), pull_policy="never")
    )
    ctx, _ = docker_context(params.model_dump(mode="json"))
    with pytest.raises(DeployFailed, match="not on this host and pull_policy is 'never'"):
        await deploy_container(ctx, params)


async def test_unreachable_engine_fails_fast_with_a_clear_message(
    docker_context: Factory, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    params = DockerParams.model_validate(web("unreachable", "v1", free_port()))
    ctx, _ = docker_context(params.model_dump(mode="json"))
    started = time.monotonic()
    with pytest.raises(DeployFailed) as err:
        await deploy_container(ctx, params)
    assert time.monotonic() - started < 5
    assert "Docker engine at unix:///nonexistent/docker.sock is not reachable" in str(err.value)
    assert "is dockerd running" in str(err.value)


async def test_an_engine_call_past_its_timeout_stops_waiting(engine_ready: None) -> None:
    engine = await Engine.connect(timeout=5)
    try:
        started = time.monotonic()
        with pytest.raises(EngineTimeout, match=r"within 0\.2s"):
            await engine.call("sleeping", time.sleep, 3, timeout=0.2)
        # Gave up before the 3 s call returned (a wide margin over 0.2 s for busy machines).
        assert time.monotonic() - started < 3
        # The loop stayed free while the call blocked its thread.
        assert await asyncio.wait_for(asyncio.sleep(0, "free"), 1) == "free"
    finally:
        engine.close()


def test_image_digest_is_the_one_of_the_pulled_repo() -> None:
    image = {"RepoDigests": ["other/repo@sha256:aaa", "127.0.0.1:5000/web@sha256:bbb"]}
    assert image_digest(image, "127.0.0.1:5000/web:v1") == "sha256:bbb"
    assert image_digest(image, "127.0.0.1:5000/web") == "sha256:bbb"
    assert image_digest({"RepoDigests": []}, "web:v1") is None
    assert image_digest({}, "web@sha256:" + "c" * 64) == "sha256:" + "c" * 64
