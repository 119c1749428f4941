"""The plugin contract: the one place a Deploy Center plugin imports from.

Like ``pytest`` over ``_pytest``, this package is the stable surface over the core's
implementation, which is free to move.  Every member is listed in ``__all__`` and documented
in ``docs/plugins.md`` (a test checks both).  Importing it loads nothing of the server, the
agent, the command line or the transport, so an agent that loads a plugin loads only what
the plugin needs.

* hooks: :data:`hookimpl` marks a plugin's hook implementations (the hooks are in
  :mod:`deploy_core.hookspecs`);
* what plugins register: :class:`DeployType` (with its :class:`Stage` s and a
  :class:`DeployParams` model), :class:`HealthCheckType` (:class:`HealthCheckParams`),
  :class:`RollbackStrategy` (:class:`RollbackParams`, :class:`RollbackReport`),
  :class:`EventHandler`, :class:`RouteSet`, :class:`AgentService`;
* what plugins are handed, as protocols: :class:`DeployContext`,
  :class:`AgentServiceContext`, :class:`EventContext`, :class:`ServerServices`;
* what plugins raise: :class:`DeployFailed`, :class:`ApiError`, :class:`EventRejected`;
* the wire models plugins read and the base of their result models;
* safe file-system work as root (:mod:`deploy_core.plugin.safefs`) and bounded work
  (:class:`WorkBudget`);
* helpers for a plugin's ``deployctl`` commands live in :mod:`deploy_core.plugin.cli`.
"""

from __future__ import annotations

from deploy_core.hookspecs import hookimpl
from deploy_core.models import (
    ID_PATTERN,
    DeployCommand,
    DeployStatus,
    HealthCheckResult,
    RollbackTarget,
    WireModel,
)
from deploy_core.plugin import safefs
from deploy_core.plugin.bounded import WorkBudget, WorkStopped, run_bounded
from deploy_core.plugin.bounded import step as work_step
from deploy_core.plugin.contexts import (
    AgentServiceContext,
    DeployContext,
    EventContext,
    FetchedArtifact,
    PathAccess,
    ProcessResult,
    RunAsUser,
    ScriptConstraints,
    ServerServices,
    server_services,
)
from deploy_core.plugin.errors import ApiError, DeployFailed, EventRejected
from deploy_core.registry import (
    AgentService,
    DeployParams,
    DeployType,
    EventHandler,
    HealthCheckParams,
    HealthCheckType,
    RegistrationError,
    RollbackParams,
    RollbackReport,
    RollbackRequest,
    RollbackState,
    RollbackStrategy,
    RouteSet,
    Stage,
)

__all__ = [
    "ID_PATTERN",
    "AgentService",
    "AgentServiceContext",
    "ApiError",
    "DeployCommand",
    "DeployContext",
    "DeployFailed",
    "DeployParams",
    "DeployStatus",
    "DeployType",
    "EventContext",
    "EventHandler",
    "EventRejected",
    "FetchedArtifact",
    "HealthCheckParams",
    "HealthCheckResult",
    "HealthCheckType",
    "PathAccess",
    "ProcessResult",
    "RegistrationError",
    "RollbackParams",
    "RollbackReport",
    "RollbackRequest",
    "RollbackState",
    "RollbackStrategy",
    "RollbackTarget",
    "RouteSet",
    "RunAsUser",
    "ScriptConstraints",
    "ServerServices",
    "Stage",
    "WireModel",
    "WorkBudget",
    "WorkStopped",
    "hookimpl",
    "run_bounded",
    "safefs",
    "server_services",
    "work_step",
]
