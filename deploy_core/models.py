"""Wire models shared by the server, the agent and plugins (SPEC deploy-01 … deploy-07).

Every model here travels on the wire or through the API, so each carries a schema version
(``v``) and refuses unknown fields where the sender is untrusted.  JSON Schema for all of
them comes from :func:`wire_schemas` (served at ``/api/schemas``), beside the result model
each deploy type registers (``DeployType.result``; they live in their plugins).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

WIRE_VERSION: Final = 1

# Event and command names the core itself owns.  Deploy command types (``deploy.shell`` …)
# are not listed here: they come from plugins (SPEC deploy-01).
EVENT_STATUS = "deploy.status"
EVENT_CALLBACK = "command.callback"
COMMAND_ROLLBACK = "deploy.rollback"

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

# An agent's capability: it takes DeployCommand.log_budget_bytes and sends LogBlocks.  The
# server sends the budget only to agents that announce it.
CAPABILITY_LOG_BUDGET = "log_budget"


class DeployStatus(str, enum.Enum):
    """Every status a deployment can be in (SPEC deploy-02).

    Plugins add *stage* names freely; the statuses, and which of them are terminal, are the
    core's.
    """

    PENDING = "pending"
    EXECUTING = "executing"
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    # shell
    SCRIPT_RUNNING = "script_running"
    HEALTH_CHECK = "health_check"
    # tar.gz
    UPLOADING = "uploading"
    EXTRACTING = "extracting"
    INSTALLING = "installing"
    # docker
    PULLING = "pulling"
    STOPPING = "stopping"
    STARTING = "starting"
    # rollback
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"

    @property
    def terminal(self) -> bool:
        """True for the statuses a finished deployment can end in."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: frozenset[DeployStatus] = frozenset(
    {
        DeployStatus.SUCCESS,
        DeployStatus.FAILED,
        DeployStatus.TIMEOUT,
        DeployStatus.ROLLED_BACK,
        DeployStatus.ROLLBACK_FAILED,
    }
)


# A deployment that ended in one of these was undone, or its undoing failed: it is not live
# anymore and is not rolled back again.  Values, as records and the journal store them.
UNDONE_STATUSES: frozenset[str] = frozenset(
    {DeployStatus.ROLLED_BACK.value, DeployStatus.ROLLBACK_FAILED.value}
)


def now() -> float:
    """Wall-clock time as sent on the wire: seconds since the epoch."""
    return time.time()


class WireModel(BaseModel):
    """Base of every wire model: versioned, strict about unknown fields."""

    # NaN and infinities are not JSON and would poison records (a NaN timestamp).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    v: Literal[1] = WIRE_VERSION


# --------------------------------------------------------------------------- results


class HealthCheckResult(WireModel):
    """Outcome of one configured health check (SPEC deploy-06)."""

    success: bool
    check_type: str
    response_time: float = Field(0.0, ge=0, description="seconds taken by the last attempt")
    retry_count: int = Field(0, ge=0, description="attempts made after the first one")
    attempts: int = Field(1, ge=0)
    error: str | None = None
    detail: str = Field("", description="e.g. the HTTP status or the script's output tail")


class RollbackResult(WireModel):
    """Outcome of a rollback (SPEC deploy-07)."""

    success: bool
    strategy: str | None
    duration: float = 0.0
    error: str | None = None
    message: str = ""
    health: list[HealthCheckResult] = Field(default_factory=list)
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="what the strategy reports beside its message, e.g. the processes a "
        "snapshot restore stopped and the services it started again",
    )


# --------------------------------------------------------------------------- wire events


class LogLine(WireModel):
    """One line of output gathered during a deployment (SPEC deploy-32)."""

    ts: float = Field(default_factory=now)
    stream: str = Field("stdout", max_length=32)
    stage: str = Field("", max_length=64)
    line: str = Field(max_length=8192)


class LogBlock(WireModel):
    """Consecutive lines of one stream and stage, joined by newlines: how an agent sends a
    lot of output cheaply (a server splits it back into lines).  Sent only to a server that
    announced a log budget (``DeployCommand.log_budget_bytes``), which knows this model."""

    ts: float = Field(default_factory=now)
    stream: str = Field("stdout", max_length=32)
    stage: str = Field("", max_length=64)
    text: str = Field(max_length=256 * 1024, description="lines of at most 8192 characters")


class DeployStatusReport(WireModel):
    """A ``deploy.status`` event: one stage transition or progress step (SPEC deploy-04).

    ``seq`` increases by one per report of a deployment; the server applies a report only
    if its ``seq`` is newer than the last one it applied, so late or duplicate reports never
    move a record backwards.
    """

    deploy_id: str = Field(pattern=ID_PATTERN)
    command_type: str = Field(max_length=64)
    status: DeployStatus
    progress: int = Field(ge=0, le=100)
    stage: str = Field("", max_length=64)
    message: str = Field("", max_length=4096)
    logs: list[LogLine] = Field(default_factory=list, max_length=1000)
    log_blocks: list[LogBlock] = Field(
        default_factory=list,
        max_length=256,
        description="more lines, in blocks, after those in logs (newer agents)",
    )
    timestamp: float = Field(default_factory=now)
    seq: int = Field(ge=0)


class DeployCallbackPayload(WireModel):
    """The single ``command.callback`` event that ends a deployment (SPEC deploy-03)."""

    callback_id: str = Field(pattern=ID_PATTERN)
    command_type: str = Field(max_length=64)
    deploy_type: str = Field(max_length=64)
    status: DeployStatus
    success: bool
    result: dict[str, Any] | None = None
    error: str | None = Field(None, max_length=16384)
    duration: float = Field(0.0, ge=0)
    timestamp: float = Field(default_factory=now)
    health: list[HealthCheckResult] = Field(default_factory=list)
    rollback: RollbackResult | None = None
    rollback_state: dict[str, Any] | None = Field(
        None, description="what the rollback strategy prepared, for a later manual rollback"
    )


class DeployCommand(WireModel):
    """Payload of a deploy command sent to an agent.

    ``callback_id`` equals ``deploy_id`` (SPEC §10.1).  ``expires_at`` is the server-side
    deadline: an agent never starts a command past it.
    """

    deploy_id: str = Field(pattern=ID_PATTERN)
    command_type: str = Field(max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    health_checks: list[dict[str, Any]] = Field(default_factory=list, max_length=16)
    rollback: dict[str, Any] | None = None
    no_rollback_reason: str | None = Field(
        None,
        max_length=1024,
        description="when rollback is None: why (the request opted out, or nothing names a "
        "strategy for this deploy type); the agent puts it in the record of a failure",
    )
    secret_env: dict[str, str] = Field(
        default_factory=dict,
        description="environment values the agent gives scripts but masks in all it reports",
    )
    issued_at: float = Field(default_factory=now)
    expires_at: float
    rollback_of: RollbackTarget | None = None
    log_budget_bytes: int | None = Field(
        None,
        ge=0,
        description="bytes of output lines the server keeps for this deployment "
        "(--max-log-bytes): the agent streams no more, keeping the tail of the rest for the "
        "end; absent (an older server): no limit",
    )


class RollbackTarget(WireModel):
    """For ``deploy.rollback``: the deployment to undo and what its strategy prepared."""

    deploy_id: str = Field(pattern=ID_PATTERN)
    command_type: str
    params: dict[str, Any] = Field(default_factory=dict)
    health_checks: list[dict[str, Any]] = Field(default_factory=list)
    rollback: dict[str, Any]
    rollback_state: dict[str, Any] | None = None
    only_if_ran: bool = Field(
        False,
        description="the server does not know whether the agent ever ran the deployment: an "
        "agent that never did has nothing to undo",
    )


DeployCommand.model_rebuild()


WIRE_MODELS: tuple[type[BaseModel], ...] = (
    DeployStatusReport,
    DeployCallbackPayload,
    DeployCommand,
    HealthCheckResult,
    RollbackResult,
)


def wire_schemas(results: Iterable[type[BaseModel]] = ()) -> dict[str, Any]:
    """JSON Schema of every wire model of the core and of the deploy types' ``results``
    (their registered result models, e.g. ``DeployShellResult``), keyed by model name."""
    models = (*WIRE_MODELS, *sorted(set(results), key=lambda m: m.__name__))
    return {model.__name__: model.model_json_schema() for model in models}
