"""Rollbacks the server asks for: by an operator (SPEC deploy-25) or by itself when a
deployment failed and its agent did not roll back (SPEC deploy-20, deploy-31).

Either way the rollback is a deployment of its own, of command type ``deploy.rollback``,
that takes the client's lock like any other and links to the deployment it undoes.

A rollback never silently undoes a newer deployment (issue 10 §3): when deployments made
after the one to undo are still in place on the same target
(:meth:`~deploy_core.server.targets.TargetRecords.newer_in_place`), the rollback is refused
(:class:`RollbackSuperseded`, ``409`` at the API) naming them, unless ``cascade`` asks to
roll them back first: then the newest is rolled back now and each rollback, when it ends
``rolled_back``, asks for the next one (its request's ``cascade`` lists what is left), each
linked to the deployment it undoes.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Any

from deploy_core.models import COMMAND_ROLLBACK, UNDONE_STATUSES, DeployStatus
from deploy_core.server.locks import ClientBusy
from deploy_core.server.rows import DeploymentRow

if TYPE_CHECKING:
    from deploy_core.server.deployments import Deployments

log = logging.getLogger(__name__)

# What a rollback deployment may take beyond its strategy's own timeout and the checks.
ROLLBACK_MARGIN = 60.0


class RollbackRefused(Exception):
    """The deployment cannot be rolled back; the message says why."""


class RollbackSuperseded(RollbackRefused):
    """Newer deployments of the same target are still in place; ``newer`` lists their ids,
    newest first, ``target`` names the target."""

    def __init__(self, record: DeploymentRow, newer: list[DeploymentRow]) -> None:
        self.newer = [n.deploy_id for n in newer]
        self.target = record.target
        listed = ", ".join(f"{n.deploy_id} ({n.status})" for n in newer)
        super().__init__(
            f"deployment {record.deploy_id} was followed on target {record.target} by "
            f"{listed}; rolling it back would silently undo "
            f"{'that one' if len(newer) == 1 else 'those'}. Roll back {self.newer[0]} first, "
            'or ask with {"cascade": true} to roll back the newer ones first, newest first'
        )


def rollback_request(
    deployments: Deployments, record: DeploymentRow
) -> tuple[dict[str, Any], float]:
    """The request of a ``deploy.rollback`` undoing ``record`` and its deadline in seconds.

    :raises RollbackRefused: nothing to roll back to, or it was rolled back already.
    """
    deploy_id = record.deploy_id
    if record.command_type == COMMAND_ROLLBACK:
        raise RollbackRefused(f"deployment {deploy_id} is itself a rollback")
    if record.finished_at is None:
        raise RollbackRefused(
            f"deployment {deploy_id} is still {record.status}; wait for it to finish"
        )
    if record.rolled_back_by:
        raise RollbackRefused(
            f"deployment {deploy_id} was already rolled back by {record.rolled_back_by}"
        )
    if record.status in UNDONE_STATUSES:
        raise RollbackRefused(f"deployment {deploy_id} already ended {record.status}")
    request = record.request
    rollback = request.get("rollback")
    if not rollback:
        raise RollbackRefused(
            f"deployment {deploy_id} has no restorable state: it was made without a rollback "
            "strategy"
        )
    strategy = deployments.plugins.rollback_strategies.get(rollback["strategy"])
    if strategy is None:
        raise RollbackRefused(f"this server has no {rollback['strategy']!r} rollback strategy")
    # Without a callback (watchdog timeout) the agent's journal may still hold the state.
    unknown = record.acked_at is not None and record.agent_status is None
    if strategy.needs_state and record.rollback_state is None and not unknown:
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
        "command_type": record.command_type,
        "params": request.get("params", {}),
        "health_checks": checks,
        "rollback": rollback,
        "rollback_state": record.rollback_state,
        "only_if_ran": record.acked_at is None and record.last_seq < 0,
    }
    return {
        "params": {},
        "health_checks": [],
        "rollback": None,
        "rollback_of": target,
        "deadline_seconds": seconds,
    }, seconds


async def request_rollback(
    deployments: Deployments, record: DeploymentRow, *, cascade: bool = False
) -> DeploymentRow:
    """Record and send a ``deploy.rollback`` for ``record`` — or, with ``cascade``, for the
    newest of the deployments in place after it on its target, the rest to follow.

    :returns: the rollback deployment sent now; :func:`cascade_order` says what it and its
        followers undo.
    :raises RollbackSuperseded: newer deployments are in place and ``cascade`` is false.
    :raises RollbackRefused: see :func:`rollback_request` (for any deployment of the chain).
    :raises ClientBusy: the client runs another deployment.
    """
    newer = await deployments.db(deployments.records.newer_in_place, record)
    if newer and not cascade:
        raise RollbackSuperseded(record, newer)
    chain = [*newer, record]
    # Every link is checked before the first is sent: a chain that cannot finish is refused
    # whole instead of stopping half-way.
    for link in chain:
        rollback_request(deployments, link)
        await _check_restorable(deployments, link)
    return await _submit_rollback(deployments, chain[0], [link.deploy_id for link in chain[1:]])


async def _check_restorable(deployments: Deployments, record: DeploymentRow) -> None:
    """Ask the strategy whether what it saved for ``record`` is still there (a snapshot a
    later success pruned is not): refuse now rather than fail on the agent."""
    rollback = record.request.get("rollback") or {}
    strategy = deployments.plugins.rollback_strategies.get(str(rollback.get("strategy")))
    if strategy is None or strategy.restorable is None:
        return
    later = await deployments.db(deployments.records.finished_after, record)
    # The contract hands a strategy ``{column: value}`` dicts (RollbackStrategy.restorable),
    # copies: what it does with them cannot reach the rows the server goes on with.
    reason = strategy.restorable(
        copy.deepcopy(record.as_dict()), [copy.deepcopy(row.as_dict()) for row in later]
    )
    if reason:
        raise RollbackRefused(f"deployment {record.deploy_id} cannot be rolled back: {reason}")


def cascade_order(rollback: DeploymentRow) -> list[str]:
    """The deployments a rollback deployment and the ones it will ask for undo, in order."""
    return [rollback.rollback_of, *(rollback.request.get("cascade") or [])]


async def continue_cascade(deployments: Deployments, rollback: DeploymentRow) -> None:
    """A rollback deployment finished: if it was part of a cascade and undid its deployment,
    ask for the next rollback of the chain (errors are logged, the chain stops)."""
    rest: list[str] = list(rollback.request.get("cascade") or [])
    if not rest or rollback.command_type != COMMAND_ROLLBACK:
        return
    if rollback.status != DeployStatus.ROLLED_BACK.value:
        why = f"this rollback ended {rollback.status}"
        await _stop_cascade(deployments, rollback, rest, why)
        return
    record = await deployments.db(deployments.records.get, rest[0])
    if record is None:
        await _stop_cascade(deployments, rollback, rest, f"deployment {rest[0]} no longer exists")
        return
    try:
        # Something deployed on the target while the chain ran is not undone either.
        newer = await deployments.db(deployments.records.newer_in_place, record)
        if newer:
            raise RollbackSuperseded(record, newer)
        await _check_restorable(deployments, record)
        nxt = await _submit_rollback(deployments, record, rest[1:])
    except (RollbackRefused, ClientBusy) as exc:
        await _stop_cascade(deployments, rollback, rest, str(exc))
        return
    log.info("cascade: rollback %s of %s asked for", nxt.deploy_id, rest[0])


async def _stop_cascade(
    deployments: Deployments, rollback: DeploymentRow, rest: list[str], why: str
) -> None:
    """Say in the rollback's history (and the log) that the chain stops there, and what it
    leaves in place."""
    message = f"cascade stopped: {why}; not rolled back: {', '.join(rest)}"
    log.warning("rollback %s: %s", rollback.deploy_id, message)
    await deployments.db(deployments.records.note, rollback.deploy_id, message)


async def _submit_rollback(
    deployments: Deployments, record: DeploymentRow, then: list[str]
) -> DeploymentRow:
    request, seconds = rollback_request(deployments, record)
    if then:
        request["cascade"] = then
    return await deployments.submit(
        client_id=record.client_id,
        command_type=COMMAND_ROLLBACK,
        request=request,
        deadline=time.time() + seconds,
        rollback_of=record.deploy_id,
    )


def agent_left_it_unrolled(record: DeploymentRow) -> bool:
    """A finished deployment that failed, wanted a rollback, and got none from its agent."""
    return (
        record.command_type != COMMAND_ROLLBACK
        and record.status in (DeployStatus.FAILED.value, DeployStatus.TIMEOUT.value)
        and bool(record.request.get("rollback"))
        and record.rollback is None
        and not record.rolled_back_by
        and (record.rollback_wanted or record.agent_status is not None)
    )
