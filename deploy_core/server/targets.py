"""Targets: what each deployment changes on its host, and which deployment is live there.

A deploy type names its target from its parameters (``DeployType.target``: a directory, a
container name); the key is prefixed with the type's name, and a type that names none has
one target per client.  A rollback deployment carries the target of the deployment it undoes.

The live deployment of a target is its newest finished deployment whose changes are still in
place: it succeeded (or failed without undoing itself) and nothing rolled it back.  A
rollback of anything older would undo it silently, so :mod:`deploy_core.server.rollbacks`
refuses that unless asked to roll back the newer ones first (``cascade``).

:class:`TargetRecords` is part of :class:`~deploy_core.server.records.RecordStore`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Engine

from deploy_core.models import COMMAND_ROLLBACK, UNDONE_STATUSES, DeployStatus
from deploy_core.server.db import deployments
from deploy_core.server.rows import DeploymentRow

if TYPE_CHECKING:
    from deploy_core.plugins import DeployPlugins


def deployment_scope(
    plugins: DeployPlugins, command_type: str, request: dict[str, Any]
) -> tuple[str, list[str]]:
    """The target key and the artifact SHA-256s of a deployment about to be recorded.

    A rollback has its original's target and fetches nothing.  Parameters that no longer
    validate (a plugin changed its model) give the type's own target and no artifacts.
    """
    if command_type == COMMAND_ROLLBACK:
        original = request.get("rollback_of") or {}
        target, _ = deployment_scope(
            plugins, str(original.get("command_type", "")), {"params": original.get("params")}
        )
        return target, []
    deploy_type = plugins.deploy_types.get(command_type)
    if deploy_type is None:
        return command_type, []
    try:
        params = deploy_type.params.model_validate(request.get("params") or {})
    except ValidationError:
        return deploy_type.name, []
    return deploy_type.target_key(params), deploy_type.artifact_ids(params)


def _undone() -> sa.ColumnElement[bool]:
    """A deployment whose changes are gone: it ended undone itself, or a rollback of it
    finished ``rolled_back``."""
    undoer = deployments.alias("undoer")
    rolled_back = (
        sa.select(undoer.c.deploy_id)
        .where(
            undoer.c.deploy_id == deployments.c.rolled_back_by,
            undoer.c.status == DeployStatus.ROLLED_BACK.value,
        )
        .exists()
    )
    return sa.or_(deployments.c.status.in_(sorted(UNDONE_STATUSES)), rolled_back)


def _in_place() -> sa.ColumnElement[bool]:
    """A finished deployment (not a rollback) whose changes may still be on its target: it
    succeeded, or failed after it started, and nothing undid it."""
    ran = sa.or_(deployments.c.acked_at.is_not(None), deployments.c.last_seq >= 0)
    return sa.and_(
        deployments.c.command_type != COMMAND_ROLLBACK,
        deployments.c.finished_at.is_not(None),
        sa.or_(deployments.c.status == DeployStatus.SUCCESS.value, ran),
        sa.not_(_undone()),
    )


class TargetRecords:
    """Live-target queries of the server's database (mixed into ``RecordStore``)."""

    engine: Engine

    def newer_in_place(self, record: DeploymentRow) -> list[DeploymentRow]:
        """Deployments of ``record``'s client and target made after it whose changes may
        still be in place, newest first: a rollback of ``record`` would undo them too."""
        if record.target is None:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deployments)
                .where(
                    deployments.c.client_id == record.client_id,
                    deployments.c.target == record.target,
                    deployments.c.created_at > record.created_at,
                    _in_place(),
                )
                .order_by(deployments.c.created_at.desc(), deployments.c.deploy_id)
            )
            return [DeploymentRow.from_row(r) for r in rows]

    def finished_after(self, record: DeploymentRow) -> list[DeploymentRow]:
        """Finished deployments (not rollbacks) of ``record``'s client made after it, oldest
        first: what a rollback strategy's ``restorable`` judges by."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deployments)
                .where(
                    deployments.c.client_id == record.client_id,
                    deployments.c.created_at > record.created_at,
                    deployments.c.command_type != COMMAND_ROLLBACK,
                    deployments.c.finished_at.is_not(None),
                )
                .order_by(deployments.c.created_at, deployments.c.deploy_id)
            )
            return [DeploymentRow.from_row(r) for r in rows]

    def live_deployments(self, client_id: str) -> list[DeploymentRow]:
        """Per target of ``client_id``, the newest deployment that succeeded and was not
        undone: what runs there now, as far as the server knows.  Sorted by target."""
        newest = (
            sa.select(
                deployments.c.target,
                sa.func.max(deployments.c.created_at).label("created_at"),
            )
            .where(
                deployments.c.client_id == client_id,
                deployments.c.target.is_not(None),
                deployments.c.status == DeployStatus.SUCCESS.value,
                _in_place(),
            )
            .group_by(deployments.c.target)
            .subquery()
        )
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deployments)
                .join(
                    newest,
                    sa.and_(
                        deployments.c.target == newest.c.target,
                        deployments.c.created_at == newest.c.created_at,
                    ),
                )
                .where(deployments.c.client_id == client_id)
                .order_by(deployments.c.target, deployments.c.deploy_id)
            )
            live: dict[str, DeploymentRow] = {}
            for row in rows:
                live.setdefault(row.target, DeploymentRow.from_row(row))
        return list(live.values())
