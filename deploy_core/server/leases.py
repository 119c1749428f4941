"""Duty leases: a background duty (the watchdog, retention, ...) runs on one replica at a time
among the servers sharing one database (docs/cluster.md#duties-and-leases).

A duty has one row in ``leases`` (``duty``, ``holder``, ``expires_at``).  A server takes or
renews it with one compare-and-set statement — ``INSERT ... ON CONFLICT (duty) DO UPDATE ...
WHERE holder = me OR expires_at < now`` — which SQLite and PostgreSQL both run atomically, so
two servers never both succeed.  :class:`Leases` keeps a server's leases: :meth:`Leases.keep`
tries every duty every ``seconds / 4``, and a duty's loop asks :meth:`Leases.holds` (no
database round trip) before each pass.  A server believes it holds a lease until ``seconds``
after the clock reading taken *before* its statement, so it stops believing no later than the
row says; a dead holder's duty is taken within ``seconds`` plus one try interval after its last
renewal.  Expiry compares the servers' clocks: they must agree to well under ``seconds`` (NTP).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from deploy_core.server.db import leases
from deploy_core.server.db_health import OutageLog

log = logging.getLogger(__name__)

#: How long a lease lasts unless renewed (seconds).
LEASE_SECONDS = 15.0
#: The duties the server itself runs under a lease.
WATCHDOG = "watchdog"
RETENTION = "retention"


def upsert(conn: Connection, table: sa.Table) -> Any:
    """The dialect's ``INSERT`` with ``on_conflict_do_update`` (SQLite and PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"leases need SQLite or PostgreSQL, not {conn.dialect.name}")


def acquire(conn: Connection, duty: str, holder: str, seconds: float, now: float) -> bool:
    """Take ``duty``'s lease for ``holder`` until ``now + seconds``, or renew it; ``False``
    while another holder's lease has not expired.  One statement: atomic on both databases."""
    stmt = upsert(conn, leases).values(duty=duty, holder=holder, expires_at=now + seconds)
    stmt = stmt.on_conflict_do_update(
        index_elements=[leases.c.duty],
        set_={"holder": stmt.excluded.holder, "expires_at": stmt.excluded.expires_at},
        where=sa.or_(leases.c.holder == holder, leases.c.expires_at < now),
    )
    # RETURNING, not rowcount: psycopg's rowcount for an upsert is not dependable here.
    return conn.execute(stmt.returning(leases.c.duty)).first() is not None


def release(conn: Connection, holder: str, duties: Iterable[str] | None = None) -> None:
    """Give up ``holder``'s leases (those of ``duties``, or all): another server takes them on
    its next try instead of after the expiry."""
    stmt = leases.delete().where(leases.c.holder == holder)
    if duties is not None:
        stmt = stmt.where(leases.c.duty.in_(list(duties)))
    conn.execute(stmt)


def current(conn: Connection, now: float) -> dict[str, dict[str, Any]]:
    """Every unexpired lease: duty -> ``{"holder", "expires_at"}``."""
    rows = conn.execute(sa.select(leases).where(leases.c.expires_at >= now)).mappings()
    return {r["duty"]: {"holder": r["holder"], "expires_at": r["expires_at"]} for r in rows}


class Leases:
    """The leases one server keeps for its duties."""

    def __init__(
        self,
        engine: Engine,
        holder: str,
        duties: Iterable[str],
        *,
        seconds: float = LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not seconds > 0:
            raise ValueError(f"a lease lasts more than 0 seconds, not {seconds!r}")
        self.engine = engine
        self.holder = holder
        self.duties = tuple(duties)
        self.seconds = seconds
        self.clock = clock
        # duty -> until when this server may run it (its own clock).
        self._until: dict[str, float] = {}
        self.outage = OutageLog(log, "leases")

    def holds(self, duty: str) -> bool:
        """Whether this server may run a pass of ``duty`` now."""
        return self.clock() < self._until.get(duty, 0.0)

    def held(self) -> list[str]:
        """The duties this server holds now."""
        return [d for d in self.duties if self.holds(d)]

    def try_all(self) -> list[str]:
        """Take or renew every duty's lease (one statement each); returns those held."""
        for duty in self.duties:
            before = self.clock()
            try:
                with self.engine.begin() as conn:
                    got = acquire(conn, duty, self.holder, self.seconds, before)
            except Exception as exc:
                # Unknown outcome: keep believing only what the last success allows.
                if not self.outage.failed(exc):
                    log.exception("could not renew the %s lease", duty)
                continue
            self.outage.ok()
            if got:
                if not self.holds(duty):
                    log.info("server %s now runs the %s duty", self.holder, duty)
                self._until[duty] = before + self.seconds
            elif self._until.pop(duty, None) is not None:
                log.warning("server %s lost the %s duty to another server", self.holder, duty)
        return self.held()

    def release_all(self) -> None:
        """Give every lease up (a server that stops cleanly)."""
        self._until.clear()
        with self.engine.begin() as conn:
            release(conn, self.holder, self.duties)

    async def keep(self) -> None:
        """Try every duty every ``seconds / 4`` until cancelled."""
        while True:
            await asyncio.sleep(self.seconds / 4)
            await asyncio.to_thread(self.try_all)
