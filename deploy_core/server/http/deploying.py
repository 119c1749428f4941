"""A deploy request checked and turned into what a deployment records: the deploy type's own
parameters, health checks and rollback validated against the server's plugins, the deadline
worked out, and the target agent's capabilities checked.  ``POST /api/deploy/{kind}`` uses it
for one client, ``POST /api/rollouts`` once for all of its targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from deploy_core.registry import DeployType
from deploy_core.server.http.requests import (
    COMMON_FIELDS,
    DeployRequestCommon,
    request_model,
)
from deploy_core.server.http.web import ApiError, validation_detail
from deploy_core.server.rollback_plan import (
    SOURCE_REQUEST,
    RollbackPlan,
    RollbackPlanError,
    plan_rollback,
)
from deploy_core.server.rows import ClientRow
from deploy_core.server.services import PluginServices

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer


@dataclass(frozen=True)
class PreparedDeploy:
    """A validated deploy request: its type, common fields, the request a deployment
    records, and its deadline in seconds."""

    deploy_type: DeployType
    common: DeployRequestCommon
    request: dict[str, Any]
    seconds: float
    checks: list[dict[str, Any]]
    plan: RollbackPlan

    def check_capabilities(self, client: ClientRow) -> None:
        """Refuse (409) when the client's agent said it cannot do this."""
        check_capabilities(client, self.deploy_type.name, self.checks, self.plan)


def deploy_type_of(server: DeployServer, kind: str) -> DeployType:
    """The deploy type called ``kind`` (``shell``), or ``404`` naming those there are."""
    types = server.plugins.deploy_types.entries.values()
    deploy_type = next((t for t in types if t.kind == kind), None)
    if deploy_type is None:
        known = ", ".join(t.kind for t in types)
        raise ApiError(404, f"unknown deploy type {kind!r} (this server has: {known or 'none'})")
    return deploy_type


async def prepare_deploy(
    server: DeployServer, kind: str, body: Any, *, loc: tuple[Any, ...] = ()
) -> PreparedDeploy:
    """Validate a deploy request of type ``kind`` (errors located under ``loc``)."""
    deploy_type = deploy_type_of(server, kind)
    try:
        validated = request_model(deploy_type).model_validate(body)
    except ValidationError as exc:
        raise ApiError(422, "invalid deploy request", validation_detail(exc, loc)) from None
    common = DeployRequestCommon.model_validate(
        {k: v for k, v in validated.model_dump().items() if k in COMMON_FIELDS}
    )
    params = deploy_type.params.model_validate(
        {k: v for k, v in validated.model_dump().items() if k not in COMMON_FIELDS}
    )
    if deploy_type.server_check is not None:
        try:
            await deploy_type.server_check(PluginServices(server), params)
        except LookupError as exc:
            raise ApiError(404, str(exc).strip("'\"")) from None
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
    checks, plan, extra = validate_options(server, deploy_type, common, params)
    seconds = common.deadline or (params.timeout + extra + server.config.deadline_margin)
    request = {
        "params": params.model_dump(mode="json"),
        "health_checks": checks,
        "rollback": plan.spec,
        "rollback_plan": plan.record(),
        "deadline_seconds": seconds,
        "secret_env_names": sorted(common.secret_env),
    }
    return PreparedDeploy(deploy_type, common, request, seconds, checks, plan)


def validate_options(
    server: DeployServer,
    deploy_type: DeployType,
    common: DeployRequestCommon,
    deploy_params: BaseModel,
) -> tuple[list[dict[str, Any]], RollbackPlan, float]:
    """Validate health checks against the server's plugins and resolve the rollback
    (:func:`plan_rollback`); return the checks as sent to the agent, the rollback plan, and
    the seconds they add to the deadline."""
    checks: list[dict[str, Any]] = []
    extra = 0.0
    for i, spec in enumerate(common.health_checks):
        try:
            _check, params = server.plugins.parse_health_check(spec)
        except LookupError as exc:
            raise ApiError(422, str(exc), [{"loc": ["health_checks", i, "type"]}]) from None
        except ValidationError as exc:
            raise ApiError(
                422, "invalid health check", validation_detail(exc, ("health_checks", i))
            ) from None
        checks.append(params.model_dump(mode="json"))
        extra += params.initial_delay + params.timeout
    try:
        plan = plan_rollback(
            server.plugins, server.rollback_defaults, deploy_type, common.rollback, deploy_params
        )
    except RollbackPlanError as exc:
        raise ApiError(422, str(exc), exc.detail) from None
    if plan.spec is not None:
        # After a rollback the checks run again: their time counts twice.
        extra = 2 * extra + float(plan.spec.get("timeout", 0))
    return checks, plan, extra


def check_capabilities(
    client: ClientRow,
    command_type: str,
    checks: list[dict[str, Any]],
    plan: RollbackPlan,
) -> None:
    """Refuse (409) what the target agent said it cannot do."""
    caps = client.capabilities
    if not caps:
        return  # never connected yet: it will refuse by callback if it cannot
    cid = client.client_id
    if command_type not in caps.get("deploy_types", []):
        raise ApiError(
            409,
            f"client {cid} cannot run {command_type}: its agent has no plugin for it "
            f"(it has: {', '.join(caps.get('deploy_types', [])) or 'none'})",
        )
    for check in checks:
        if check["type"] not in caps.get("health_checks", []):
            raise ApiError(409, f"client {cid} has no {check['type']!r} health check plugin")
    rollback = plan.spec
    if rollback and rollback["strategy"] not in caps.get("rollback_strategies", []):
        hint = (
            ""
            if plan.source == SOURCE_REQUEST
            else (
                f" (the rollback is {plan.note}; name another strategy, or opt out with "
                '"rollback": false)'
            )
        )
        raise ApiError(
            409, f"client {cid} has no {rollback['strategy']!r} rollback strategy plugin{hint}"
        )
