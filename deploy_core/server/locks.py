"""Client locks: at most one unfinished deployment per client (SPEC deploy-22).

A lock is a ``client_locks`` row naming the deployment that holds the client.  Every function
here works on the caller's connection, inside the caller's transaction, so taking the lock
and inserting the deployment that holds it commit (or fail) together.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from deploy_core.server.db import client_locks, deployments
from deploy_core.server.rows import LockRow

# How long a lock outlives its deployment's deadline before another deployment may take it.
LOCK_GRACE = 60.0


class ClientBusy(Exception):
    """The client already runs a deployment (SPEC deploy-22)."""

    def __init__(self, client_id: str, deploy_id: str, since: float) -> None:
        self.client_id = client_id
        self.deploy_id = deploy_id
        self.since = since
        ago = max(0.0, time.time() - since)
        super().__init__(
            f"client {client_id} is busy with deployment {deploy_id} (started {ago:.0f} s ago); "
            "wait for it to finish or roll it back"
        )


class LockRaced(Exception):
    """Another transaction took the lock between this one's look and its insert; the
    caller's transaction is spoilt, and a new one may try again."""


def holder(conn: Connection, client_id: str) -> LockRow | None:
    """The lock row of ``client_id``, if one is held."""
    row = conn.execute(_HOLDER, {"client_id": client_id}).first()
    return LockRow.from_row(row) if row else None


# Built once (the path of every POST /api/deploy): executed with their parameters.
_HOLDER = sa.select(client_locks).where(client_locks.c.client_id == sa.bindparam("client_id"))
# A lock whose deployment finished, or whose expiry passed, is stale.
_HOLDER_FINISHED = (
    sa.select(deployments.c.deploy_id)
    .where(
        deployments.c.deploy_id == client_locks.c.deploy_id,
        deployments.c.finished_at.is_not(None),
    )
    .exists()
)
_CLEAR_STALE = client_locks.delete().where(
    client_locks.c.client_id == sa.bindparam("client_id"),
    sa.or_(client_locks.c.expires_at < sa.bindparam("now"), _HOLDER_FINISHED),
)
_TAKE = client_locks.insert()


def held(conn: Connection) -> list[LockRow]:
    """Every lock currently held."""
    return [LockRow.from_row(r) for r in conn.execute(sa.select(client_locks))]


def acquire(
    conn: Connection,
    *,
    client_id: str,
    deploy_id: str,
    owner: str,
    now: float,
    deadline: float,
) -> None:
    """Take ``client_id``'s lock for ``deploy_id`` until ``deadline`` (plus
    :data:`LOCK_GRACE`).  A lock whose deployment finished, or whose expiry passed, is
    stale and cleared first.

    :raises ClientBusy: an unfinished deployment holds the client.
    :raises LockRaced: another transaction took the lock meanwhile: leave this transaction
        and try again in a new one.
    """
    conn.execute(_CLEAR_STALE, {"client_id": client_id, "now": now})
    current = holder(conn, client_id)
    if current is not None:
        raise ClientBusy(client_id, current.deploy_id, current.acquired_at)
    try:
        conn.execute(
            _TAKE,
            {
                "client_id": client_id,
                "deploy_id": deploy_id,
                "owner": owner,
                "acquired_at": now,
                "expires_at": deadline + LOCK_GRACE,
            },
        )
    except IntegrityError as exc:
        raise LockRaced(f"the lock of client {client_id} was taken meanwhile") from exc


#: Clients per statement in :func:`acquire_many` (inside SQLite's bound-parameter limit).
_MANY_CHUNK = 500


def acquire_many(
    conn: Connection, wanted: Mapping[str, tuple[str, float]], *, owner: str, now: float
) -> dict[str, LockRow]:
    """:func:`acquire` for many clients at once, in a few statements: ``wanted`` maps each
    client id to the deployment id that takes its lock and that deployment's deadline.
    Returns the locks held by unfinished deployments, by client id: those clients are busy
    and their locks are not taken; every other client's is.

    :raises LockRaced: another transaction took one of the locks meanwhile: leave this
        transaction (nothing of it may be kept) and try again in a new one.
    """
    ids = list(wanted)
    busy: dict[str, LockRow] = {}
    for first in range(0, len(ids), _MANY_CHUNK):
        chunk = ids[first : first + _MANY_CHUNK]
        conn.execute(
            client_locks.delete().where(
                client_locks.c.client_id.in_(chunk),
                sa.or_(client_locks.c.expires_at < now, _HOLDER_FINISHED),
            )
        )
        rows = conn.execute(sa.select(client_locks).where(client_locks.c.client_id.in_(chunk)))
        busy.update((r.client_id, LockRow.from_row(r)) for r in rows)
    free = [cid for cid in ids if cid not in busy]
    if free:
        try:
            conn.execute(
                client_locks.insert(),
                [
                    {
                        "client_id": cid,
                        "deploy_id": wanted[cid][0],
                        "owner": owner,
                        "acquired_at": now,
                        "expires_at": wanted[cid][1] + LOCK_GRACE,
                    }
                    for cid in free
                ],
            )
        except IntegrityError as exc:
            raise LockRaced("a client's lock was taken meanwhile") from exc
    return busy


def release(conn: Connection, client_id: str, deploy_id: str) -> None:
    """Free ``client_id`` if ``deploy_id`` holds it (a lock another deployment took since
    stays)."""
    conn.execute(
        client_locks.delete().where(
            client_locks.c.client_id == client_id, client_locks.c.deploy_id == deploy_id
        )
    )
