"""The rollout routes (docs/rollouts.md): ``POST /api/rollouts``, ``GET /api/rollouts``,
``GET /api/rollouts/{rollout_id}`` and its ``pause``/``resume``/``promote``/``abort``.

The body's deploy request is checked by the same code as ``POST /api/deploy/{kind}``
(:func:`~deploy_core.server.http.deploying.prepare_deploy`), once for every target; the
targets are resolved here, once, and the rollout is handed to the server's
:class:`~deploy_core.server.rollouts.Rollouts`, which drives it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from deploy_core.labels import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_LABELS, matches
from deploy_core.models import ID_PATTERN
from deploy_core.server.db_health import refuse_if_fenced
from deploy_core.server.http.deploying import prepare_deploy
from deploy_core.server.http.web import (
    ApiError,
    flag_param,
    int_param,
    json_body,
    parse_model,
    services,
)
from deploy_core.server.rollouts import (
    MAX_TARGETS,
    STATUSES,
    RolloutConflict,
    resolve_strategy,
)

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer
    from deploy_core.server.rows import ClientRow

# --------------------------------------------------------------------------- the body

PERCENT = r"^(100(\.0+)?|[0-9]{1,2}(\.[0-9]+)?)%$"
DURATION = r"^[0-9]{1,9}(\.[0-9]+)?[smh]?$"
MAX_SECONDS = 7 * 86400
_UNITS = {"s": 1, "m": 60, "h": 3600}

Percent = Annotated[str, Field(pattern=PERCENT, description='a percent of the targets, "25%"')]
Duration = Annotated[
    StrictInt | StrictFloat | Annotated[str, Field(pattern=DURATION)],
    Field(description='seconds, or "90s", "10m", "1h"'),
]
ClientId = Annotated[str, Field(pattern=ID_PATTERN)]
LabelKey = Annotated[str, Field(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN)]


def seconds_of(value: int | float | str | None) -> float | None:
    """A :data:`Duration` in seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        unit = value[-1] if value[-1] in _UNITS else "s"
        value = float(value.rstrip("smh")) * _UNITS[unit]
    seconds = float(value)
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"must be between 0 and {MAX_SECONDS} seconds (7 days)")
    return seconds


class RolloutStrategy(BaseModel):
    """How a rollout goes through its targets (docs/rollouts.md#strategies-side-by-side)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: Annotated[StrictInt, Field(ge=1, le=MAX_TARGETS)] | Percent | None = Field(
        None, description="targets per batch: a count or a percent (rounded up); default all"
    )
    max_parallel: Annotated[StrictInt, Field(ge=1, le=MAX_TARGETS)] | Percent | None = Field(
        None,
        description="targets of a batch running at once; default the batch size, or 1 when "
        "neither is given",
    )
    canary: Annotated[StrictInt, Field(ge=0, le=MAX_TARGETS)] | Percent = Field(
        0, description="the first targets, as batch 0, before the others"
    )
    canary_action: Literal["pause", "continue"] = Field(
        "pause", description="after the canary batch: wait for promote, or go on"
    )
    max_failures: Annotated[StrictInt, Field(ge=0, le=MAX_TARGETS)] | Percent = Field(
        0, description="failed targets tolerated (a percent is rounded down)"
    )
    on_failure: Literal["stop", "rollback"] = Field(
        "stop", description="past max_failures: stop, or also roll back what succeeded"
    )
    progress_deadline: Duration | None = Field(None, description="how long a batch may take")
    busy: Literal["wait", "skip"] = Field("wait", description="a busy target: wait or skip")
    busy_timeout: Duration = Field(600, description="how long a busy target is waited for")
    offline_timeout: Duration = Field(300, description="how long an offline target is waited for")

    @field_validator("batch_size", "max_parallel")
    @classmethod
    def _positive_percent(cls, value: Any) -> Any:
        if isinstance(value, str) and float(value.rstrip("%")) == 0:
            raise ValueError("must be more than 0%")
        return value

    @field_validator("progress_deadline", "busy_timeout", "offline_timeout")
    @classmethod
    def _seconds(cls, value: Any) -> float | None:
        return seconds_of(value)


class RolloutTargets(BaseModel):
    """Which clients a rollout goes to: ids and/or a label selector."""

    model_config = ConfigDict(extra="forbid")

    clients: list[ClientId] = Field(
        default_factory=list, max_length=MAX_TARGETS, description="client ids, in this order"
    )
    selector: dict[LabelKey, LabelValue] | None = Field(
        None,
        max_length=MAX_LABELS,
        description="every non-revoked client with all these labels, by client id",
    )


class NewRollout(BaseModel):
    """The body of ``POST /api/rollouts``."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(pattern=r"^[a-z0-9_]{1,64}$", description="a deploy type's kind: shell")
    request: dict[str, Any] = Field(
        description="the deploy request as for POST /api/deploy/{kind}, without client_id"
    )
    targets: RolloutTargets
    strategy: RolloutStrategy = Field(default_factory=RolloutStrategy)


# --------------------------------------------------------------------------- the answers


class RolloutAccepted(BaseModel):
    """The rollout was recorded; the server drives it from now on."""

    rollout_id: str
    status: str
    targets: int
    batches: int
    url: str


class RolloutSummary(BaseModel):
    """A rollout without its batches and history."""

    rollout_id: str
    status: str
    paused_for: str | None
    reason: str | None
    type: str
    command_type: str
    created_by: str
    created_at: str
    updated_at: str
    finished_at: str | None
    selector: dict[str, str] | None
    strategy: dict[str, Any]
    strategy_asked: dict[str, Any]
    total: int
    failures: int
    max_failures: int
    batch_count: int
    current_batch: int
    counts: dict[str, int]


class RolloutTarget(BaseModel):
    """One target: its client, its deployment and the rollback the rollout asked for."""

    client_id: str
    deploy_id: str | None
    state: str
    status: str | None
    error: str | None
    started_at: str | None
    finished_at: str | None
    rollback_id: str | None
    rollback_status: str | None
    rollback_error: str | None


class RolloutBatch(BaseModel):
    """One batch of targets."""

    index: int
    canary: bool
    state: str
    started_at: str | None
    finished_at: str | None
    targets: list[RolloutTarget]


class RolloutHistoryEntry(BaseModel):
    """One change of a rollout."""

    status: str
    message: str
    ts: str


class RolloutView(RolloutSummary):
    """A rollout with its batches, targets, history and the deploy request."""

    batches: list[RolloutBatch]
    history: list[RolloutHistoryEntry]
    request: dict[str, Any]


class RolloutPage(BaseModel):
    """Rollouts, newest first."""

    total: int
    limit: int
    offset: int
    items: list[RolloutSummary]


# --------------------------------------------------------------------------- handlers


async def _targets(
    server: DeployServer, targets: RolloutTargets
) -> tuple[list[str], list[ClientRow]]:
    """The target client ids, in order, and their rows."""
    if not targets.clients and targets.selector is None:
        raise ApiError(422, "the rollout has no targets: give targets.clients or .selector")
    rows = {r.client_id: r for r in await server.db(server.records.list_clients)}
    wanted = list(dict.fromkeys(targets.clients))
    unknown = [c for c in wanted if c not in rows]
    if unknown:
        raise ApiError(
            422,
            f"unknown client{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:20])}"
            + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
            + ": no agent enrolled with that id",
            {"unknown": unknown},
        )
    revoked = [c for c in wanted if rows[c].revoked_at is not None]
    if revoked:
        raise ApiError(422, f"revoked client(s) {', '.join(revoked[:20])}", {"revoked": revoked})
    if targets.selector is not None:
        chosen = set(wanted)
        for cid, row in rows.items():
            if (
                cid not in chosen
                and row.revoked_at is None
                and matches(row.labels, targets.selector)
            ):
                wanted.append(cid)
    if not wanted:
        shown = ", ".join(f"{k}={v}" for k, v in (targets.selector or {}).items()) or "{}"
        raise ApiError(
            422,
            f"the rollout has no targets: no listed client and no non-revoked client matches "
            f"the selector {shown}",
        )
    if len(wanted) > MAX_TARGETS:
        raise ApiError(422, f"{len(wanted)} targets, at most {MAX_TARGETS}")
    return wanted, [rows[c] for c in wanted]


async def create_rollout(request: Request) -> Response:
    """``POST /api/rollouts`` → ``202 {"rollout_id": …}``: one deployment to many clients.

    See docs/rollouts.md for the strategy's exact semantics."""
    server = services(request)
    refuse_if_fenced(server.db_health)
    body = await json_body(request)
    new = parse_model(NewRollout, body)
    if "client_id" in new.request:
        raise ApiError(
            422,
            "request.client_id: a rollout's request names no client; give targets instead",
            [{"loc": ["request", "client_id"], "msg": "not allowed in a rollout"}],
        )
    prepared = await prepare_deploy(
        server, new.type, {**new.request, "client_id": "rollout"}, loc=("request",)
    )
    client_ids, clients = await _targets(server, new.targets)
    for client in clients:
        prepared.check_capabilities(client)
    asked = new.strategy.model_dump(exclude_unset=True)
    try:
        strategy = resolve_strategy(new.strategy.model_dump(), len(client_ids))
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    caller = request.scope.get("state", {}).get("caller")
    row = await server.db(
        server.rollouts.store.create,
        kind=new.type,
        command_type=prepared.deploy_type.name,
        request=prepared.request,
        deadline_seconds=prepared.seconds,
        secret_env=prepared.common.secret_env,
        selector=new.targets.selector,
        strategy=strategy,
        strategy_asked=asked,
        client_ids=client_ids,
        created_by=caller.name if caller else "?",
    )
    server.rollouts.wake()
    await server.rollouts.publish(row["rollout_id"])
    return JSONResponse(
        {
            "rollout_id": row["rollout_id"],
            "status": row["status"],
            "targets": row["total"],
            "batches": row["batch_count"],
            "url": f"/api/rollouts/{row['rollout_id']}",
        },
        status_code=202,
    )


async def get_rollout(request: Request) -> Response:
    """``GET /api/rollouts/{rollout_id}`` — status, counts, batches with their targets,
    history."""
    server = services(request)
    view = await server.rollouts.view(request.path_params["rollout_id"])
    if view is None:
        raise ApiError(404, f"no rollout {request.path_params['rollout_id']!r}")
    return JSONResponse(view)


async def list_rollouts(request: Request) -> Response:
    """``GET /api/rollouts?status=&active=1&client_id=&limit=&offset=`` — rollouts, newest
    first."""
    server = services(request)
    status = request.query_params.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(422, f"unknown status {status!r} (one of: {', '.join(STATUSES)})")
    client_id = request.query_params.get("client_id")
    if client_id is not None and not re.fullmatch(ID_PATTERN, client_id):
        raise ApiError(422, f"invalid client_id {client_id[:80]!r}")
    limit = int_param(request, "limit", 50, 1, 500)
    offset = int_param(request, "offset", 0, 0, 10**9)
    rows, total = await server.db(
        server.rollouts.store.page,
        client_id=client_id,
        status=status,
        active=flag_param(request, "active"),
        limit=limit,
        offset=offset,
    )
    return JSONResponse(
        {
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": await server.rollouts.summaries(rows),
        }
    )


async def _control(request: Request, action: str) -> Response:
    server = services(request)
    has_body = (
        request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
    )
    if has_body and await json_body(request) != {}:
        raise ApiError(422, f"{action} takes no body (or {{}})")
    rollout_id = request.path_params["rollout_id"]
    if not re.fullmatch(ID_PATTERN, rollout_id):
        raise ApiError(404, f"no rollout {rollout_id[:80]!r}")
    caller = request.scope.get("state", {}).get("caller")
    try:
        view = await server.rollouts.control(rollout_id, action, caller.name if caller else "?")
    except LookupError:
        raise ApiError(404, f"no rollout {rollout_id!r}") from None
    except RolloutConflict as exc:
        raise ApiError(409, str(exc)) from None
    return JSONResponse(view)


async def pause_rollout(request: Request) -> Response:
    """``POST /api/rollouts/{rollout_id}/pause`` — start no new target until resumed."""
    return await _control(request, "pause")


async def resume_rollout(request: Request) -> Response:
    """``POST /api/rollouts/{rollout_id}/resume`` — go on after a pause."""
    return await _control(request, "resume")


async def promote_rollout(request: Request) -> Response:
    """``POST /api/rollouts/{rollout_id}/promote`` — go on past a canary batch."""
    return await _control(request, "promote")


async def abort_rollout(request: Request) -> Response:
    """``POST /api/rollouts/{rollout_id}/abort`` — start nothing more; the rollout ends
    ``aborted``."""
    return await _control(request, "abort")


def rollout_routes() -> list[BaseRoute]:
    """The rollout routes (under ``/api``)."""
    return [
        Route("/rollouts", create_rollout, methods=["POST"]),
        Route("/rollouts", list_rollouts, methods=["GET"]),
        Route("/rollouts/{rollout_id:str}", get_rollout, methods=["GET"]),
        Route("/rollouts/{rollout_id:str}/pause", pause_rollout, methods=["POST"]),
        Route("/rollouts/{rollout_id:str}/resume", resume_rollout, methods=["POST"]),
        Route("/rollouts/{rollout_id:str}/promote", promote_rollout, methods=["POST"]),
        Route("/rollouts/{rollout_id:str}/abort", abort_rollout, methods=["POST"]),
    ]
