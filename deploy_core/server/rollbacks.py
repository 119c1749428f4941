"""Rollbacks the server asks for: by an operator (SPEC deploy-25) or by itself when a
deployment failed and its agent did not roll back (SPEC deploy-20, deploy-31).

Either way the rollback is a deployment of its own, of command type ``deploy.rollback``,
that takes the client's lock like any other and links to the deployment it undoes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from deploy_core.models import COMMAND_ROLLBACK, DeployStatus

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer

log = logging.getLogger(__name__)

# What a rollback deployment may take beyond its strategy's own timeout and the checks.
ROLLBACK_MARGIN = 60.0
UNDONE = {DeployStatus.ROLLED_BACK.value, DeployStatus.ROLLBACK_FAILED.value}


class RollbackRefused(Exception):
    """The deployment cannot be rolled back; the message says why."""


def rollback_request(server: DeployServer, record: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The request of a ``deploy.rollback`` undoing ``record`` and its deadline in seconds.

    :raises RollbackRefused: nothing to roll back to, or it was rolled back already.
    """
    deploy_id = record["deploy_id"]
    if record["command_type"] == COMMAND_ROLLBACK:
        raise RollbackRefused(f"deployment {deploy_id} is itself a rollback")
    if record["finished_at"] is None:
        raise RollbackRefused(
            f"deployment {deploy_id} is still {record['status']}; wait for it to finish"
        )
    if record["rolled_back_by"]:
        raise RollbackRefused(
            f"deployment {deploy_id} was already rolled back by {record['rolled_back_by']}"
        )
    if record["status"] in UNDONE:
        raise RollbackRefused(f"deployment {deploy_id} already ended {record['status']}")
    request = record["request"]
    rollback = request.get("rollback")
    if not rollback:
        raise RollbackRefused(
            f"deployment {deploy_id} has no restorable state: it was made without a rollback "
            "strategy"
        )
    strategy = server.plugins.rollback_strategies.get(rollback["strategy"])
    if strategy is None:
        raise RollbackRefused(f"this server has no {rollback['strategy']!r} rollback strategy")
    # Without a callback (watchdog timeout) the agent's journal may still hold the state.
    unknown = record["acked_at"] is not None and record["agent_status"] is None
    if strategy.needs_state and record["rollback_state"] is None and not unknown:
        raise RollbackRefused(
            f"deployment {deploy_id} has no restorable state: strategy {strategy.name} saved none"
        )
    checks = request.get("health_checks", [])
    seconds = (
        float(rollback.get("timeout", 300))
        + sum(c.get("initial_delay", 0) + c.get("timeout", 60) for c in checks)
        + ROLLBACK_MARGIN
    )
    target = {
        "deploy_id": deploy_id,
        "command_type": record["command_type"],
        "params": request.get("params", {}),
        "health_checks": checks,
        "rollback": rollback,
        "rollback_state": record["rollback_state"],
        "only_if_ran": record["acked_at"] is None and record["last_seq"] < 0,
    }
    return {
        "params": {},
        "health_checks": [],
        "rollback": None,
        "rollback_of": target,
        "deadline_seconds": seconds,
    }, seconds


async def request_rollback(server: DeployServer, record: dict[str, Any]) -> dict[str, Any]:
    """Record and send a ``deploy.rollback`` for ``record``.

    :raises RollbackRefused: see :func:`rollback_request`.
    :raises ClientBusy: the client runs another deployment.
    """
    request, seconds = rollback_request(server, record)
    return await server.submit(
        client_id=record["client_id"],
        command_type=COMMAND_ROLLBACK,
        request=request,
        deadline=time.time() + seconds,
        rollback_of=record["deploy_id"],
    )


def agent_left_it_unrolled(record: dict[str, Any]) -> bool:
    """A finished deployment that failed, wanted a rollback, and got none from its agent."""
    return (
        record["command_type"] != COMMAND_ROLLBACK
        and record["status"] in (DeployStatus.FAILED.value, DeployStatus.TIMEOUT.value)
        and bool(record["request"].get("rollback"))
        and record["rollback"] is None
        and not record["rolled_back_by"]
        and (record["rollback_wanted"] or record["agent_status"] is not None)
    )
