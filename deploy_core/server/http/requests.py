"""What the HTTP API accepts in a request body: the deploy request of each deploy type (the
common fields plus the type's own parameters) and the rollback options.  The handlers validate
with these, and :mod:`deploy_core.server.http.openapi` and ``GET /api/schemas`` describe them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, create_model

from deploy_core.models import ID_PATTERN
from deploy_core.registry import DeployType

# As pydantic patterns, so that the OpenAPI document states them too; "$" there ends the
# text (with re.match it also matched before a trailing newline: "A\n" was a valid name).
SecretName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
SecretValue = Annotated[str, Field(max_length=32768, pattern=r"^[^\x00]*$")]


class DeployRequestCommon(BaseModel):
    """Fields every deploy request has, beside its deploy type's own parameters."""

    model_config = ConfigDict(extra="forbid")

    client_id: str = Field(pattern=ID_PATTERN, description="the target agent")
    health_checks: list[dict[str, Any]] = Field(
        default_factory=list, max_length=16, description="checks run after the deployment"
    )
    rollback: dict[str, Any] | StrictBool | None = Field(
        None,
        description='how a failure is undone: {"strategy": NAME, …options}; false or '
        '{"strategy": "none"} opts out; true, or options without a strategy, ask for the '
        "default.  Absent: the server config's [defaults.rollback] for the deploy type, else "
        "the type's own default (tar: release, Docker: previous_container), else none",
    )
    deadline: float | None = Field(
        None,
        gt=0,
        le=7 * 86400,
        description="seconds from now after which the server gives the deployment up",
    )
    secret_env: dict[SecretName, SecretValue] = Field(
        default_factory=dict,
        max_length=64,
        json_schema_extra={"additionalProperties": False},  # names outside the pattern
        description="environment variables whose values are masked in logs, results and "
        "records (only their names are stored with the deployment); at most 64, each value "
        "at most 32 KiB without NUL bytes",
    )


# The names of the common fields, to split a validated request into them and the params.
COMMON_FIELDS = set(DeployRequestCommon.model_fields)
_request_models: dict[DeployType, type[BaseModel]] = {}


def request_model(deploy_type: DeployType) -> type[BaseModel]:
    """The API request model of a deploy type: common fields + the type's parameters."""
    model = _request_models.get(deploy_type)
    if model is None:
        name = "".join(p.capitalize() for p in deploy_type.kind.split("_")) + "DeployRequest"
        model = create_model(name, __base__=(DeployRequestCommon, deploy_type.params))
        _request_models[deploy_type] = model
    return model


class RollbackOptions(BaseModel):
    """The optional body of ``POST /api/deploy/{deploy_id}/rollback``."""

    model_config = ConfigDict(extra="forbid")

    cascade: StrictBool = Field(
        False,
        description="when newer deployments of the same target are still in place, roll them "
        "back first, newest first, then this one (each its own linked rollback)",
    )
