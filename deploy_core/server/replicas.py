"""Replica heartbeats: each server writes a row in ``replicas`` every heartbeat interval, and
``GET /api/cluster`` lists them with the duties and agents each holds (docs/cluster.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deploy_core.server import leases
from deploy_core.server.db import clients, replicas, row_dict

#: A replica whose last heartbeat is older than this many of its intervals is stale.
STALE_AFTER_INTERVALS = 3
#: Rows of replicas not heard of for this long (seconds) are deleted by the others' heartbeats.
FORGET_AFTER = 7 * 86400.0


class Replicas:
    """The ``replicas`` rows, written by one server and read by any."""

    def __init__(
        self, engine: Engine, server_id: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.server_id = server_id
        self.clock = clock

    def beat(
        self,
        *,
        api_url: str,
        quic_address: str,
        started_at: float,
        interval: float,
        agents_connected: int,
    ) -> None:
        """Write this server's row (insert or update) and forget long-gone replicas."""
        now = self.clock()
        values = {
            "api_url": api_url[:300],
            "quic_address": quic_address[:300],
            "started_at": started_at,
            "last_seen": now,
            "heartbeat_interval": interval,
            "agents_connected": agents_connected,
        }
        with self.engine.begin() as conn:
            stmt = leases.upsert(conn, replicas).values(server_id=self.server_id, **values)
            conn.execute(
                stmt.on_conflict_do_update(index_elements=[replicas.c.server_id], set_=values)
            )
            conn.execute(replicas.delete().where(replicas.c.last_seen < now - FORGET_AFTER))

    def remove(self) -> None:
        """Delete this server's row (a clean stop: it is gone, not stale)."""
        with self.engine.begin() as conn:
            conn.execute(replicas.delete().where(replicas.c.server_id == self.server_id))

    def listing(self) -> dict[str, Any]:
        """Every replica row with ``live``, its duties and the agents it holds (newest
        first), and every unexpired lease."""
        now = self.clock()
        with self.engine.connect() as conn:
            rows = [
                row_dict(r)
                for r in conn.execute(
                    sa.select(replicas).order_by(replicas.c.started_at.desc())
                ).fetchall()
            ]
            held: dict[str | None, int] = dict(
                conn.execute(
                    sa.select(clients.c.server_id, sa.func.count())
                    .where(clients.c.connected.is_(True))
                    .group_by(clients.c.server_id)
                ).fetchall()
            )
            duties = leases.current(conn, now)
        for row in rows:
            age = now - row["last_seen"]
            row["live"] = age <= STALE_AFTER_INTERVALS * row["heartbeat_interval"]
            row["agents_held"] = int(held.get(row["server_id"], 0))
            row["duties"] = sorted(d for d, v in duties.items() if v["holder"] == row["server_id"])
        return {"now": now, "replicas": rows, "duties": duties}
