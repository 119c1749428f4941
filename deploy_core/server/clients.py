"""Enrolled agents: their keys, revocation, and whether and where they are connected.

:class:`ClientRecords` is part of :class:`~deploy_core.server.records.RecordStore`; it lives
here so each file holds one kind of record.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from deploy_core.server.db import clients


class AlreadyEnrolled(Exception):
    """A client id is taken by an enrolled agent."""


def _row(row: Any) -> dict[str, Any]:
    return dict(row._mapping)


class ClientRecords:
    """Client rows of the server's database (mixed into ``RecordStore``)."""

    engine: Engine
    server_id: str

    def agent_key(self, client_id: str) -> str | None:
        """The enrolled agent's key (hex), or ``None``."""
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(clients.c.agent_key).where(clients.c.client_id == client_id)
            ).scalar_one_or_none()

    def client_credentials(self, client_id: str) -> dict[str, Any] | None:
        """The enrolled agent's key (hex) and revocation time, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(clients.c.agent_key, clients.c.revoked_at).where(
                    clients.c.client_id == client_id
                )
            ).first()
        return _row(row) if row else None

    def revoke_client(self, client_id: str) -> bool:
        """Mark a client revoked: its agent is refused from now on."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    clients.update()
                    .where(clients.c.client_id == client_id)
                    .values(revoked_at=time.time(), connected=False, disconnected_since=time.time())
                ).rowcount
            )

    def forget_client(self, client_id: str) -> bool:
        """Delete a client's enrolment so its id can enroll again (its deployments stay)."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(clients.delete().where(clients.c.client_id == client_id)).rowcount
            )

    def enroll(self, client_id: str, agent_key: str) -> None:
        """Record a newly enrolled agent.

        :raises AlreadyEnrolled: the id is taken.
        """
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    clients.insert().values(
                        client_id=client_id,
                        agent_key=agent_key,
                        enrolled_at=time.time(),
                        connected=False,
                    )
                )
        except IntegrityError:
            raise AlreadyEnrolled(client_id) from None

    def set_connected(self, client_id: str, *, remote: str, capabilities: dict[str, Any]) -> None:
        """The agent connected to this server."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                clients.update()
                .where(clients.c.client_id == client_id)
                .values(
                    connected=True,
                    server_id=self.server_id,
                    connected_since=now,
                    last_seen=now,
                    remote=remote,
                    capabilities=capabilities,
                )
            )

    def set_disconnected(self, client_id: str, *, last_seen: float) -> None:
        """The agent's connection to this server ended."""
        with self.engine.begin() as conn:
            conn.execute(
                clients.update()
                .where(clients.c.client_id == client_id, clients.c.server_id == self.server_id)
                .values(connected=False, disconnected_since=time.time(), last_seen=last_seen)
            )

    def touch_clients(self, seen: dict[str, float]) -> None:
        """Record last-seen times of connected agents (heartbeats), in one transaction."""
        if not seen:
            return
        with self.engine.begin() as conn:
            for client_id, ts in seen.items():
                conn.execute(
                    clients.update().where(clients.c.client_id == client_id).values(last_seen=ts)
                )

    def mark_all_disconnected(self) -> None:
        """At start-up: this server holds no connections yet."""
        with self.engine.begin() as conn:
            conn.execute(
                clients.update()
                .where(clients.c.server_id == self.server_id, clients.c.connected.is_(True))
                .values(connected=False, disconnected_since=time.time())
            )

    def get_client(self, client_id: str) -> dict[str, Any] | None:
        """One client, without its key."""
        rows = self.list_clients([client_id])
        return rows[0] if rows else None

    def list_clients(self, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Known clients, without their keys, by id."""
        cols = [c for c in clients.c if c.name != "agent_key"]
        query = sa.select(*cols).order_by(clients.c.client_id)
        if ids is not None:
            query = query.where(clients.c.client_id.in_(list(ids)))
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query)]
