"""What plugins register: deploy types, health checks, rollback strategies, server event
handlers, routes and agent services.

Each ``register_*`` hook receives a ``register`` callable and passes it one of the frozen
dataclasses below.  The constructors check what they are given and fail with a message that
names the bad value, so a broken plugin is caught when it loads, not when it first runs.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from deploy_core.plugin.contexts import (
        AgentServiceContext,
        DeployContext,
        EventContext,
        ServerServices,
    )

COMMAND_NAME = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")
SIMPLE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class RegistrationError(ValueError):
    """A plugin registered something malformed or a name that is already taken."""


# --------------------------------------------------------------------------- deploy types


@dataclass(frozen=True)
class Stage:
    """One stage of a deploy type: the status reported and the progress range it covers."""

    status: str
    start: int
    end: int
    label: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end <= 100:
            raise RegistrationError(
                f"stage {self.status!r}: progress range {self.start}-{self.end} is not within 0-100"
            )

    def at(self, fraction: float) -> int:
        """Overall progress for ``fraction`` (0.0-1.0) of the way through this stage."""
        fraction = min(max(fraction, 0.0), 1.0)
        return int(self.start + (self.end - self.start) * fraction)


# The core's own stage after every deploy type's: the health checks, at 90-100 %.
HEALTH_STAGE = Stage("health_check", 90, 100, "health checks")


def find_stage(stages: Iterable[Stage], status: str) -> Stage:
    """The stage of ``stages`` registered for ``status``; the core's :data:`HEALTH_STAGE` for
    ``health_check``; else a stage over the full range (0-100)."""
    for stage in stages:
        if stage.status == status:
            return stage
    return HEALTH_STAGE if status == HEALTH_STAGE.status else Stage(status, 0, 100)


class DeployParams(BaseModel):
    """Base for a deploy type's parameter model.  ``timeout`` bounds the type's own work."""

    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(300.0, gt=0, le=86400, description="seconds the deployment may take")


Executor = Callable[["DeployContext", Any], Awaitable[BaseModel]]


@dataclass(frozen=True)
class DeployType:
    """A kind of deployment, e.g. ``deploy.shell``.

    :param name: the command name, ``<family>.<kind>``; the API route is
        ``POST /api/deploy/<kind>``.
    :param params: pydantic model (a :class:`DeployParams`) the API validates requests with.
    :param executor: agent side, ``async (ctx, params) -> result model``.  Raise
        :class:`deploy_core.plugin.DeployFailed` to fail with a result attached.
    :param stages: the type's own stages in order, with their progress ranges.
    :param default_rollback: the rollback strategy a failed deployment of this type gets
        when neither the request nor the server's ``[defaults.rollback]`` names one (issue 10
        §2: a type that knows how to undo itself rolls back by default); ``None`` when the
        type cannot undo on its own (``deploy.shell``).
    :param default_rollback_params: options of that strategy (``strategy`` left out); they
        are validated against the strategy's model when the plugins are collected.
    :param server_check: server side, ``async (services, params) -> None`` (``services``: a
        :class:`~deploy_core.plugin.ServerServices`), run when a request
        is accepted: raise :class:`LookupError` for something that does not exist (404) or
        :class:`ValueError` for something wrong (422), with a message that says what.  E.g. a
        package that was never uploaded, refused at once instead of failing on the agent.
    :param target: ``(params) -> str | None``: what a deployment changes on its host (a
        directory, a container name), so the server knows which deployment is live there and
        refuses a rollback that would undo a newer one.  ``None`` (or no function): one
        target per deploy type and client.
    :param artifacts: ``(params) -> SHA-256s``: the stored artifacts a deployment fetches; an
        agent may fetch only the artifacts of deployments sent to it.
    :param result: the model the executor returns (a :class:`~deploy_core.plugin.WireModel`),
        e.g. ``DeployShellResult``: ``/api/schemas`` and ``/openapi.json`` publish its JSON
        Schema, so clients know the ``result`` of this type's records.  ``None``: the type
        does not describe its result.
    """

    name: str
    params: type[DeployParams]
    executor: Executor
    stages: Sequence[Stage] = ()
    default_rollback: str | None = None
    # Not part of the identity: deploy types are dictionary keys (request models are cached).
    default_rollback_params: Mapping[str, Any] = field(
        default_factory=dict, hash=False, compare=False
    )
    description: str = ""
    server_check: Callable[[ServerServices, Any], Awaitable[None]] | None = None
    target: Callable[[Any], str | None] | None = None
    artifacts: Callable[[Any], Sequence[str]] | None = None
    result: type[BaseModel] | None = None

    def __post_init__(self) -> None:
        if not COMMAND_NAME.fullmatch(self.name):
            raise RegistrationError(
                f"deploy type name {self.name!r} must look like 'deploy.kind' (lower case)"
            )
        if not (isinstance(self.params, type) and issubclass(self.params, DeployParams)):
            raise RegistrationError(f"deploy type {self.name}: params must subclass DeployParams")
        if not callable(self.executor):
            raise RegistrationError(f"deploy type {self.name}: executor is not callable")
        if self.result is not None and not (
            isinstance(self.result, type) and issubclass(self.result, BaseModel)
        ):
            raise RegistrationError(
                f"deploy type {self.name}: result must be a pydantic model class (a WireModel "
                f"subclass), not {self.result!r}"
            )
        if self.default_rollback is not None and not SIMPLE_NAME.fullmatch(self.default_rollback):
            raise RegistrationError(
                f"deploy type {self.name}: default_rollback {self.default_rollback!r} is not a "
                "rollback strategy name (a lower-case word)"
            )
        if self.default_rollback_params and self.default_rollback is None:
            raise RegistrationError(
                f"deploy type {self.name}: default_rollback_params without a default_rollback"
            )
        if "strategy" in self.default_rollback_params:
            raise RegistrationError(
                f"deploy type {self.name}: name the strategy in default_rollback, not in "
                "default_rollback_params"
            )

    @property
    def kind(self) -> str:
        """The short name used in the API path: ``shell`` for ``deploy.shell``."""
        return self.name.split(".", 1)[1]

    def target_key(self, params: Any) -> str:
        """The target a deployment with ``params`` changes, prefixed with the type's name:
        ``deploy.tar:/srv/app``; just ``deploy.tar`` when the type names none."""
        name = self.target(params) if self.target is not None else None
        return f"{self.name}:{name}" if name else self.name

    def artifact_ids(self, params: Any) -> list[str]:
        """The SHA-256s of the stored artifacts a deployment with ``params`` fetches."""
        return sorted(set(self.artifacts(params))) if self.artifacts is not None else []

    def stage(self, status: str) -> Stage:
        """The stage registered for ``status`` (:func:`find_stage`)."""
        return find_stage(self.stages, status)


# --------------------------------------------------------------------------- health checks


class HealthCheckParams(BaseModel):
    """Options every health check has (SPEC deploy-16 defaults)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    retries: int = Field(3, ge=0, le=100, description="attempts after the first failure")
    interval: float = Field(10.0, ge=0, le=3600, description="seconds between attempts")
    initial_delay: float = Field(0.0, ge=0, le=3600)
    timeout: float = Field(60.0, gt=0, le=3600, description="overall seconds for this check")
    attempt_timeout: float = Field(5.0, gt=0, le=600, description="seconds for one attempt")


Probe = Callable[[Any, "DeployContext"], Awaitable[str | None]]
Shorthand = Callable[[str], Mapping[str, Any]]


@dataclass(frozen=True)
class HealthCheckType:
    """A health check kind (``http``, ``tcp``, ``script`` …).

    :param probe: ``async (params, ctx) -> None`` when healthy, or a short error string.
        One attempt only: the core owns retries, intervals and the overall timeout.
    :param shorthand: ``(text) -> options``: parses what follows ``NAME:`` in a ``deployctl
        deploy … --health NAME:TEXT`` option (``8080/healthz`` of ``http:8080/healthz``) into
        the check's options, ``type`` left out; raise :class:`ValueError` with what was
        expected.  ``None``: the check has no command-line shorthand (a request body still
        names it).
    :param shorthand_usage: how ``TEXT`` looks, for help and errors, e.g. ``PORT[/PATH]``;
        required with ``shorthand``.
    """

    name: str
    params: type[HealthCheckParams]
    probe: Probe
    description: str = ""
    shorthand: Shorthand | None = None
    shorthand_usage: str = ""

    def __post_init__(self) -> None:
        if not SIMPLE_NAME.fullmatch(self.name):
            raise RegistrationError(f"health check name {self.name!r} must be a lower-case word")
        if not (isinstance(self.params, type) and issubclass(self.params, HealthCheckParams)):
            raise RegistrationError(
                f"health check {self.name}: params must subclass HealthCheckParams"
            )
        if self.shorthand is not None and not (callable(self.shorthand) and self.shorthand_usage):
            raise RegistrationError(
                f"health check {self.name}: a shorthand must be callable and come with a "
                "shorthand_usage such as 'PORT[/PATH]'"
            )

    def parse_shorthand(self, text: str) -> dict[str, Any]:
        """The options of ``--health NAME:TEXT``: ``{"type": NAME, ...}``.

        :raises ValueError: the check has no shorthand, or ``text`` does not fit it; the
            message says what was expected.
        """
        if self.shorthand is None:
            raise ValueError(f"the {self.name} check has no --health shorthand")
        try:
            options = dict(self.shorthand(text))
        except ValueError as exc:
            raise ValueError(
                f"expected {self.name}:{self.shorthand_usage}, got {self.name}:{text} ({exc})"
            ) from None
        return {"type": self.name, **options}


# --------------------------------------------------------------------------- rollback


class RollbackParams(BaseModel):
    """Base for a rollback strategy's parameter model."""

    model_config = ConfigDict(extra="forbid")

    strategy: str
    timeout: float = Field(300.0, gt=0, le=86400)


RollbackState = dict[str, Any]


@dataclass(frozen=True)
class RollbackReport:
    """What a strategy's ``rollback`` may return to say more than "rolled back".

    :param message: one line for the record, e.g. ``"nothing to roll back to: first release"``.
    :param nothing_to_undo: nothing was restored because there was nothing before the
        deployment (a first release, no previous container).  The rollback counts as done and
        the health checks are not run again: they would only test that nothing runs.
    :param details: JSON-able facts for the record's ``rollback.details`` (e.g. the processes
        a snapshot restore stopped and the services it started again).
    """

    message: str = ""
    nothing_to_undo: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)


ParamsT = TypeVar("ParamsT", bound=DeployParams)
OptionsT = TypeVar("OptionsT", bound=RollbackParams)


@dataclass(frozen=True)
class RollbackRequest(Generic[ParamsT, OptionsT]):
    """What a rollback strategy's ``prepare``, ``rollback`` and ``discard`` are handed: the
    deployment they serve, validated once by the core.

    Annotate it with your types, e.g. ``RollbackRequest[TarParams, ReleaseParams]``.

    :param deploy_id: the deployment prepared for, undone, or cleaned up after.
    :param command_type: its deploy type, e.g. ``deploy.tar``.
    :param params: its parameters, an instance of its deploy type's model (``TarParams`` …).
    :param options: the strategy's options, an instance of the strategy's own model.
    :param state: what ``prepare`` returned for the deployment; ``None`` in ``prepare``
        itself and when it saved nothing.
    :param reason: in ``rollback``, why it is undone (the failure, or ``"manual rollback"``);
        ``None`` in ``prepare`` and ``discard``.
    """

    deploy_id: str
    command_type: str
    params: ParamsT
    options: OptionsT
    state: RollbackState | None = None
    reason: str | None = None


PrepareFn = Callable[["DeployContext", RollbackRequest[Any, Any]], Awaitable[RollbackState | None]]
RollbackFn = Callable[
    ["DeployContext", RollbackRequest[Any, Any]], Awaitable[RollbackReport | None]
]
DiscardFn = Callable[["DeployContext", RollbackRequest[Any, Any]], Awaitable[None]]


async def _nothing_to_discard(ctx: DeployContext, request: RollbackRequest[Any, Any]) -> None:
    return None


@dataclass(frozen=True)
class RollbackStrategy:
    """A way to undo a deployment.  Each function is ``async (ctx, request)``, ``request`` a
    :class:`RollbackRequest` (the deployment's validated parameters, the strategy's options,
    the saved state, the reason).

    :param prepare: before the deployment; returns JSON-able state (e.g. a snapshot path)
        kept with the deployment, or ``None``.
    :param rollback: undo; raise to report the rollback failed.  May return a
        :class:`RollbackReport` (``None`` means plainly "rolled back").
    :param discard: after success (retention: prune old snapshots).
    :param needs_state: a manual rollback is refused unless ``prepare`` returned state.
    :param restorable: server side, ``(record, later) -> str | None``: why a rollback of
        deployment ``record`` can no longer work, judged from the deployments of the same
        client made after it (``later``, oldest first, finished ones), e.g. its snapshot was
        pruned by a later success; ``None`` when it still can.  The API refuses such a
        rollback with ``409`` and the reason instead of sending it to fail on the agent.
        ``record`` and each of ``later`` are ``{column: value}`` dicts of the stored
        deployments (copies).
    """

    name: str
    params: type[RollbackParams]
    rollback: RollbackFn
    prepare: PrepareFn | None = None
    discard: DiscardFn = _nothing_to_discard
    needs_state: bool = False
    description: str = ""
    restorable: Callable[[dict[str, Any], list[dict[str, Any]]], str | None] | None = None

    def __post_init__(self) -> None:
        if not SIMPLE_NAME.fullmatch(self.name):
            raise RegistrationError(
                f"rollback strategy name {self.name!r} must be a lower-case word"
            )
        if self.name == "none":  # {"strategy": "none"} is how a request opts out
            raise RegistrationError(
                "rollback strategy name 'none' is reserved: it means no rollback"
            )
        if not (isinstance(self.params, type) and issubclass(self.params, RollbackParams)):
            raise RegistrationError(
                f"rollback strategy {self.name}: params must subclass RollbackParams"
            )
        for role, fn in (("rollback", self.rollback), ("discard", self.discard)):
            if _positional_count(fn) == 3:
                raise RegistrationError(
                    f"rollback strategy {self.name}: {role} takes (ctx, params, state), the "
                    f"signature before 0.2; it is now {role}(ctx, request) with a "
                    "RollbackRequest: request.options (your params), request.state, "
                    "request.params (the deployment's), request.reason"
                )


def _positional_count(fn: Callable[..., Any]) -> int | None:
    """How many positional parameters ``fn`` takes; ``None`` when it cannot be told."""
    import inspect

    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in parameters if p.kind in kinds)


# --------------------------------------------------------------------------- server / agent


EventHandlerFn = Callable[["EventContext"], Awaitable[None]]


@dataclass(frozen=True)
class EventHandler:
    """Server side: handles agent events named ``name`` (e.g. ``docker.monitor``)."""

    name: str
    handler: EventHandlerFn

    def __post_init__(self) -> None:
        if not COMMAND_NAME.fullmatch(self.name):
            raise RegistrationError(f"event name {self.name!r} must look like 'family.name'")


@dataclass(frozen=True)
class RouteSet:
    """Server side: extra Starlette routes, mounted under ``/api``; every one needs a token."""

    name: str
    routes: Sequence[BaseRoute] = field(default_factory=tuple)


@dataclass(frozen=True)
class AgentService:
    """Agent side: a long-running task started with the agent (e.g. the Docker sampler)."""

    name: str
    run: Callable[[AgentServiceContext], Awaitable[None]]

    def __post_init__(self) -> None:
        if not SIMPLE_NAME.fullmatch(self.name):
            raise RegistrationError(f"agent service name {self.name!r} must be a lower-case word")
