"""What an agent may name on the wire: the deployments sent to it and their artifacts.

Every agent message that names a deployment (an acknowledgement, a status report, a
callback, any plugin event carrying a ``deploy_id``) or asks for an artifact is checked here
against the authenticated client id of its connection, before anything is stored.

:class:`OwnershipRecords` is part of :class:`~deploy_core.server.records.RecordStore`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deploy_core.server.db import deploy_artifacts, deployments

#: Payload fields that name a deployment; the core checks them for any event.
DEPLOYMENT_FIELDS = ("deploy_id", "callback_id")


def named_deployments(payload: dict[str, Any]) -> list[str]:
    """The deployment ids a payload names in its top-level :data:`DEPLOYMENT_FIELDS`.

    A value that is not a string is named too (as its ``repr``): it cannot be owned, so a
    malformed name is refused like a foreign one.
    """
    named = []
    for key in DEPLOYMENT_FIELDS:
        if key in payload and payload[key] is not None:
            value = payload[key]
            named.append(value if isinstance(value, str) else repr(value)[:80])
    return named


class OwnershipRecords:
    """Ownership queries of the server's database (mixed into ``RecordStore``)."""

    engine: Engine

    def not_owned(self, client_id: str, deploy_ids: Iterable[str]) -> list[str]:
        """Those of ``deploy_ids`` that are not deployments of ``client_id``, in order."""
        wanted = list(dict.fromkeys(deploy_ids))
        if not wanted:
            return []
        with self.engine.connect() as conn:
            owned = set(
                conn.execute(
                    sa.select(deployments.c.deploy_id).where(
                        deployments.c.deploy_id.in_(wanted),
                        deployments.c.client_id == client_id,
                    )
                ).scalars()
            )
        return [d for d in wanted if d not in owned]

    def may_fetch(self, client_id: str, sha256: str) -> bool:
        """Whether a deployment referencing artifact ``sha256`` was sent to ``client_id``.

        Sent means dispatched (or already acknowledged or reported on): a deployment still
        waiting for its agent gives no right to its package yet.
        """
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(deployments.c.deploy_id)
                .join(deploy_artifacts, deploy_artifacts.c.deploy_id == deployments.c.deploy_id)
                .where(
                    deploy_artifacts.c.sha256 == sha256,
                    deployments.c.client_id == client_id,
                    sa.or_(
                        deployments.c.dispatched_at.is_not(None),
                        deployments.c.acked_at.is_not(None),
                    ),
                )
                .limit(1)
            ).first()
        return row is not None
