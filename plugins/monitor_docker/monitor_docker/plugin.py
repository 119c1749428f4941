"""The plugin object Deploy Center loads through the ``deploy_core`` entry-point group.

An agent calls only :func:`deploy_agent_services`; the server-side modules (store, events,
routes, cli) are imported inside their hooks, so an agent never loads SQLAlchemy or Starlette.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from deploy_core.plugin import AgentService, EventHandler, RouteSet, hookimpl
from monitor_docker.models import EVENT
from monitor_docker.sampler import run_monitor

if TYPE_CHECKING:
    import click
    import sqlalchemy as sa

SERVICE = "docker_monitor"


@hookimpl
def deploy_agent_services(register: Callable[[AgentService], None]) -> None:
    """Agent side: the sampler (SPEC deploy-26)."""
    register(AgentService(SERVICE, run_monitor))


@hookimpl
def deploy_register_event_handlers(register: Callable[[EventHandler], None]) -> None:
    """Server side: store ``docker.monitor`` batches (SPEC deploy-27)."""
    from monitor_docker.events import handle_monitor

    register(EventHandler(EVENT, handle_monitor))


@hookimpl
def deploy_register_tables(metadata: sa.MetaData) -> None:
    """Server side: samples, current state, last report per client."""
    from monitor_docker.store import define_tables

    define_tables(metadata)


@hookimpl
def deploy_register_routes(register: Callable[[RouteSet], None]) -> None:
    """Server side: ``GET /api/docker/monitor/{client_id}`` (SPEC deploy-28)."""
    from monitor_docker.routes import ROUTES

    register(RouteSet("docker_monitor", ROUTES))


@hookimpl(optionalhook=True)  # optional: a core without the hook still loads the plugin
def deploy_register_cli_commands(register: Callable[[click.Command], None]) -> None:
    """CLI: ``deployctl docker ps``."""
    from monitor_docker.cli import docker

    register(docker)
