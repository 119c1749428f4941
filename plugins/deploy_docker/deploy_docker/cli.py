"""``deployctl deploy docker``: deploy an image from the command line."""

from __future__ import annotations

from typing import Any

import click

from deploy_core.plugin.cli import (
    DeployClient,
    health_checks_field,
    health_options,
    no_rollback_option,
    parse_env,
    rollback_field,
    submit_and_follow,
    with_api,
)


@click.command("docker")
@click.option("--client", "client_id", required=True, help="target client id")
@click.option("--image", required=True, help="image reference, tag or digest")
@click.option("--name", "container_name", required=True, help="container name")
@click.option("--port", "ports", multiple=True, help="HOST_IP:HOST_PORT:CONTAINER_PORT, repeatable")
@click.option("--env", "env", multiple=True, help="KEY=VALUE, repeatable")
@health_options
@click.option("--start-first", is_flag=True, help="start the new container before stopping the old")
@no_rollback_option
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=600, show_default=True
)
@click.option("--wait", is_flag=True, help="follow the deployment until it ends")
@click.option("--wait-timeout", type=float, default=3600, show_default=True)
@with_api
def deploy_docker_command(
    api: DeployClient,
    client_id: str,
    image: str,
    container_name: str,
    ports: tuple[str, ...],
    env: tuple[str, ...],
    health: tuple[str, ...],
    health_retries: int | None,
    health_interval: float | None,
    start_first: bool,
    no_rollback: bool,
    timeout: float,
    wait: bool,
    wait_timeout: float,
) -> None:
    """Deploy a Docker image as a container on a client (rolls back to the previous
    container when it fails, unless --no-rollback)."""
    body: dict[str, Any] = {
        "client_id": client_id,
        "image": image,
        "container_name": container_name,
        "ports": list(ports),  # parsed like docker run -p by the params model
        "env": parse_env(env),
        "start_first": start_first,
        "timeout": timeout,
    }
    body.update(health_checks_field(health, health_retries, health_interval))
    body.update(rollback_field(no_rollback))
    submit_and_follow(api, "docker", body, wait, wait_timeout)
