"""The plugin object Deploy Center loads through the ``deploy_core`` entry-point group."""

from __future__ import annotations

from collections.abc import Callable

from deploy_core.plugin import DeployType, RollbackStrategy, hookimpl
from deploy_docker.deploy import STAGES, STRATEGY, deploy_container
from deploy_docker.params import DockerParams, PreviousContainerParams
from deploy_docker.result import DeployDockerResult
from deploy_docker.rollback import discard_previous, prepare_previous, rollback_previous

DEPLOY_TYPE = DeployType(
    name="deploy.docker",
    params=DockerParams,
    executor=deploy_container,
    stages=STAGES,
    default_rollback=STRATEGY,
    description="pull an image and replace a container with one running it",
    target=lambda params: params.container_name,
    result=DeployDockerResult,
)

PREVIOUS_CONTAINER = RollbackStrategy(
    name=STRATEGY,
    params=PreviousContainerParams,
    rollback=rollback_previous,
    prepare=prepare_previous,
    discard=discard_previous,
    needs_state=True,
    description="remove the new container and start the one it replaced again",
)


@hookimpl
def deploy_register_deploy_types(register: Callable[[DeployType], None]) -> None:
    """Register ``deploy.docker``."""
    register(DEPLOY_TYPE)


@hookimpl
def deploy_register_rollback_strategies(register: Callable[[RollbackStrategy], None]) -> None:
    """Register ``previous_container``."""
    register(PREVIOUS_CONTAINER)


@hookimpl
def deploy_register_cli_commands(register: Callable[..., None]) -> None:
    """CLI: ``deployctl deploy docker``."""
    from deploy_docker.cli import deploy_docker_command

    register(deploy_docker_command, group="deploy")
