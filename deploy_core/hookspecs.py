"""Every hook Deploy Center calls, in one place.

Hooks are called with keyword arguments only, so a hook can gain arguments later without
breaking existing plugins.  Registration hooks hand the plugin a ``register`` callable owned
by the core: the core checks what is registered and refuses duplicates at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from sqlalchemy import MetaData

    from deploy_core.registry import (
        AgentService,
        DeployType,
        EventHandler,
        HealthCheckType,
        RollbackStrategy,
        RouteSet,
    )

PROJECT_NAME = "deploy_core"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = [
    "PROJECT_NAME",
    "deploy_agent_services",
    "deploy_finished",
    "deploy_register_cli_commands",
    "deploy_register_deploy_types",
    "deploy_register_event_handlers",
    "deploy_register_health_checks",
    "deploy_register_rollback_strategies",
    "deploy_register_routes",
    "deploy_register_tables",
    "deploy_status_changed",
    "hookimpl",
    "hookspec",
]

# -------------------------------------------------------------------------------------------
# Registration hooks (called once, when plugins load, on the server and on the agent)
# -------------------------------------------------------------------------------------------


@hookspec
def deploy_register_deploy_types(register: Callable[[DeployType], None]) -> None:
    """Register deploy types (``deploy.shell``, ``deploy.tar`` …).

    :param register: call it once per :class:`~deploy_core.plugin.DeployType`.  A name
        another plugin already registered stops start-up with an error naming both plugins.

    The return value is ignored.

    .. versionadded:: 0.1
    """


@hookspec
def deploy_register_health_checks(register: Callable[[HealthCheckType], None]) -> None:
    """Register health check kinds (``http``, ``tcp``, ``script`` …).

    :param register: call it once per :class:`~deploy_core.plugin.HealthCheckType`.

    The return value is ignored.

    .. versionadded:: 0.1
    """


@hookspec
def deploy_register_rollback_strategies(register: Callable[[RollbackStrategy], None]) -> None:
    """Register rollback strategies (``inline``, ``script``, ``snapshot`` …).

    :param register: call it once per :class:`~deploy_core.plugin.RollbackStrategy`.

    The return value is ignored.

    .. versionadded:: 0.1
    """


@hookspec
def deploy_register_event_handlers(register: Callable[[EventHandler], None]) -> None:
    """Server side: register handlers for agent events by name.

    The core's own ``deploy.status`` and ``command.callback`` handlers are registered through
    this hook too.  An event whose name has no handler is refused with an error message to
    the agent.

    :param register: call it once per :class:`~deploy_core.plugin.EventHandler`.

    The return value is ignored.

    .. versionadded:: 0.1
    """


@hookspec
def deploy_register_routes(register: Callable[[RouteSet], None]) -> None:
    """Server side: add Starlette routes under ``/api`` (token required, like every route).

    :param register: call it with a :class:`~deploy_core.plugin.RouteSet`.  The handlers
        reach the server through :func:`deploy_core.plugin.server_services`.

    The return value is ignored.

    .. versionadded:: 0.1
    """


@hookspec
def deploy_register_tables(metadata: MetaData) -> None:
    """Server side: define the plugin's own tables on ``metadata``.

    Plugin tables are created when the server starts if they are missing; the core's own
    tables are managed by migrations (``deployctl db upgrade``).

    :param metadata: a :class:`sqlalchemy.MetaData` owned by the core for plugin tables.

    The return value is ignored.

    .. versionadded:: 0.1
    """


@hookspec
def deploy_agent_services(register: Callable[[AgentService], None]) -> None:
    """Agent side: register long-running tasks started with the agent (e.g. a sampler).

    :param register: call it once per :class:`~deploy_core.plugin.AgentService`.

    The return value is ignored.

    .. versionadded:: 0.1
    """


@hookspec
def deploy_register_cli_commands(register: Callable[..., None]) -> None:
    """Add commands to ``deployctl`` (e.g. ``deployctl docker ps``, ``deployctl deploy tar``).

    :param register: call it with a :class:`click.Command` or :class:`click.Group`, and
        ``group="deploy"`` to place it under ``deployctl deploy``; its name must not clash
        with a core command or another plugin's.  Commands that call the API use the helpers
        of :mod:`deploy_core.plugin.cli` (``with_api``, ``submit_and_follow``, and the options
        every ``deployctl deploy`` command shares: ``health_options``, ``no_rollback_option``).
        A command under ``deploy`` that takes ``--client`` as ``client_id`` and ends with
        ``submit_and_follow`` also becomes ``deployctl rollout NAME`` (docs/plugins.md).

    The return value is ignored.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Lifecycle notifications (server side).  Called implementation by implementation: one that
# raises is logged with its plugin's name and neither stops the others nor the deployment.
# -------------------------------------------------------------------------------------------


@hookspec
def deploy_status_changed(record: dict[str, Any], previous: str | None) -> None:
    """A deployment's status changed on the server.

    :param record: the deployment record as the API shows it (a copy; changes are ignored).
    :param previous: the status before, or ``None`` for a new deployment.

    The return value is ignored.

    .. versionadded:: 0.1
    """


@hookspec
def deploy_finished(record: dict[str, Any]) -> None:
    """A deployment reached its terminal status on the server and its lock was released.

    :param record: the final deployment record as the API shows it (a copy).

    The return value is ignored.

    .. versionadded:: 0.1
    """
