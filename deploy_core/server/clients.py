"""Enrolled agents: their keys, revocation, and whether and where they are connected.

An agent is enrolled with the public half of a key pair it made itself (``public_key``,
hex); the server holds no secret of it. Rows of agents enrolled before that hold the shared
key the server issued them (``agent_key``) until the agent upgrades
(:meth:`ClientRecords.set_public_key`), which clears it.

:class:`ClientRecords` is part of :class:`~deploy_core.server.records.RecordStore`; it lives
here so each file holds one kind of record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from deploy_core.server.db import clients
from deploy_core.server.rows import ClientCredentials, ClientRow

#: The heartbeat flush's statement, run with many parameter sets (touch_clients).
_TOUCH = (
    clients.update()
    .where(clients.c.client_id == sa.bindparam("cid"))
    .values(last_seen=sa.bindparam("ts"))
)


class AlreadyEnrolled(Exception):
    """A client id is taken by an enrolled agent."""


def _enrolled_key(conn: Connection, client_id: str) -> str | None:
    """The public key ``client_id`` is enrolled with, as ``conn`` sees it now."""
    key: str | None = conn.execute(
        sa.select(clients.c.public_key).where(clients.c.client_id == client_id)
    ).scalar_one_or_none()
    return key


class ClientRecords:
    """Client rows of the server's database (mixed into ``RecordStore``)."""

    engine: Engine
    server_id: str

    def agent_key(self, client_id: str) -> str | None:
        """The enrolled agent's shared key (hex), or ``None`` (none, or not enrolled)."""
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(clients.c.agent_key).where(clients.c.client_id == client_id)
            ).scalar_one_or_none()

    def client_credentials(self, client_id: str) -> ClientCredentials | None:
        """The enrolled agent's ``public_key`` and/or shared ``agent_key`` (hex, each
        ``None`` when it has none) and ``revoked_at``, or ``None`` when not enrolled."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(clients.c.public_key, clients.c.agent_key, clients.c.revoked_at).where(
                    clients.c.client_id == client_id
                )
            ).first()
        return ClientCredentials.from_row(row) if row else None

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

    def enroll(
        self,
        client_id: str,
        agent_key: str | None = None,
        *,
        public_key: str | None = None,
        spend: Callable[[Connection], None] | None = None,
    ) -> bool:
        """Record an enrolled agent, by its public key (or, for tests of older rows, by a
        shared key), in one transaction with ``spend`` (the join-token use it costs).

        Idempotent for a public key: when ``client_id`` is enrolled with the same one,
        nothing changes and ``spend`` is not called.

        :returns: whether a row was added.
        :raises AlreadyEnrolled: the id is taken by another key.
        :raises Exception: what ``spend`` raised (nothing is recorded then).
        """
        if (agent_key is None) == (public_key is None):
            raise ValueError("enroll needs exactly one of agent_key and public_key")
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    taken = conn.execute(
                        sa.select(clients.c.public_key).where(clients.c.client_id == client_id)
                    ).first()
                    if taken is not None:
                        if public_key is not None and taken.public_key == public_key:
                            return False
                        raise AlreadyEnrolled(client_id)
                    if spend is not None:
                        try:
                            spend(conn)
                        except Exception:
                            # A concurrent try with this same key may have spent the last
                            # use and committed meanwhile (PostgreSQL's statements see what
                            # committed since the transaction began): that try enrolled it.
                            if public_key is not None and _enrolled_key(conn, client_id) == (
                                public_key
                            ):
                                return False
                            raise
                    conn.execute(
                        clients.insert().values(
                            client_id=client_id,
                            agent_key=agent_key,
                            public_key=public_key,
                            enrolled_at=time.time(),
                            connected=False,
                        )
                    )
                    return True
            except IntegrityError:
                # Another enrollment of this id committed first; look again (once).
                if attempt:
                    raise AlreadyEnrolled(client_id) from None
        raise AssertionError("unreachable")

    def set_public_key(self, client_id: str, public_key: str) -> bool:
        """An agent enrolled with a shared key now has a key pair: keep its public key and
        forget the shared key. ``False`` when the agent has no shared key (any more)."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    clients.update()
                    .where(clients.c.client_id == client_id, clients.c.agent_key.is_not(None))
                    .values(public_key=public_key, agent_key=None)
                ).rowcount
            )

    def set_connected(
        self,
        client_id: str,
        *,
        remote: str,
        capabilities: dict[str, Any],
        labels: dict[str, str] | None = None,
    ) -> None:
        """The agent connected to this server, with these capabilities and labels (checked
        by the caller: deploy_core/labels.py)."""
        with self.engine.begin() as conn:
            self.set_connected_in(
                conn, client_id, remote=remote, capabilities=capabilities, labels=labels
            )

    def set_connected_in(
        self,
        conn: Connection,
        client_id: str,
        *,
        remote: str,
        capabilities: dict[str, Any],
        labels: dict[str, str] | None = None,
    ) -> None:
        """:meth:`set_connected` in the caller's transaction (the server's ingest commits
        many agents' in one, server/ingest.py)."""
        now = time.time()
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
                labels=labels or {},
            )
        )

    def set_disconnected(self, client_id: str, *, last_seen: float) -> None:
        """The agent's connection to this server ended."""
        with self.engine.begin() as conn:
            self.set_disconnected_in(conn, client_id, last_seen=last_seen)

    def set_disconnected_in(self, conn: Connection, client_id: str, *, last_seen: float) -> None:
        """:meth:`set_disconnected` in the caller's transaction (server/ingest.py)."""
        conn.execute(
            clients.update()
            .where(clients.c.client_id == client_id, clients.c.server_id == self.server_id)
            .values(connected=False, disconnected_since=time.time(), last_seen=last_seen)
        )

    def touch_clients(self, seen: dict[str, float]) -> None:
        """Record last-seen times of connected agents (heartbeats), in one transaction and
        one statement run for all of them (executemany: one compiled ``UPDATE``, not one
        built and compiled per agent)."""
        if not seen:
            return
        with self.engine.begin() as conn:
            conn.execute(_TOUCH, [{"cid": cid, "ts": ts} for cid, ts in seen.items()])

    def connected_here(self) -> list[str]:
        """The clients recorded as connected to this server."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(clients.c.client_id).where(
                        clients.c.server_id == self.server_id, clients.c.connected.is_(True)
                    )
                ).scalars()
            )

    def mark_gone(self, client_ids: Sequence[str], *, connected_before: float) -> list[str]:
        """Mark disconnected those of ``client_ids`` still recorded as connected to this
        server since before ``connected_before`` (a client that connected again meanwhile is
        left alone); returns the ids changed."""
        changed: list[str] = []
        now = time.time()
        with self.engine.begin() as conn:
            for start in range(0, len(client_ids), 500):
                chunk = list(client_ids[start : start + 500])
                where = (
                    clients.c.client_id.in_(chunk),
                    clients.c.server_id == self.server_id,
                    clients.c.connected.is_(True),
                    clients.c.connected_since < connected_before,
                )
                changed += conn.execute(sa.select(clients.c.client_id).where(*where)).scalars()
                conn.execute(
                    clients.update().where(*where).values(connected=False, disconnected_since=now)
                )
        return changed

    def mark_all_disconnected(self) -> None:
        """At start-up: this server holds no connections yet."""
        with self.engine.begin() as conn:
            conn.execute(
                clients.update()
                .where(clients.c.server_id == self.server_id, clients.c.connected.is_(True))
                .values(connected=False, disconnected_since=time.time())
            )

    def get_client(self, client_id: str) -> ClientRow | None:
        """One client, without its key."""
        with self.engine.connect() as conn:
            row = conn.execute(_ONE_CLIENT, {"client_id": client_id}).first()
        return ClientRow.from_row(row) if row else None

    def list_clients(self, ids: Sequence[str] | None = None) -> list[ClientRow]:
        """Known clients, without their keys, by id; ``credential`` says what the agent
        signs in with: ``public_key`` (its own key pair) or ``shared_key`` (a secret the
        server issued before key pairs, until the agent next connects and upgrades)."""
        query = _client_select()
        if ids is not None:
            query = query.where(clients.c.client_id.in_(list(ids)))
        with self.engine.connect() as conn:
            return [ClientRow.from_row(r) for r in conn.execute(query)]

    def page_clients(self, where: ClientFilter, *, after: str | None, limit: int) -> ClientPage:
        """One page of the clients ``where`` matches, by id (keyset paging: the ids after
        ``after``), with how many match in all."""
        conditions = where.conditions()
        query = _client_select()
        if after is not None:
            query = query.where(clients.c.client_id > after)
        query = query.where(*conditions).limit(limit + 1)
        count = sa.select(sa.func.count()).select_from(clients).where(*conditions)
        with self.engine.connect() as conn:
            rows = [ClientRow.from_row(r) for r in conn.execute(query)]
            total = int(conn.execute(count).scalar_one())
        more = len(rows) > limit
        return ClientPage(rows[:limit], total, rows[limit - 1].client_id if more else None)

    def summarize_clients(self, where: ClientFilter) -> dict[str, Any]:
        """Counts, in SQL: ``total`` matching ``where``; ``states``, how many of those are
        in each state counting every state (``where.state`` aside, so each state's count
        says what choosing it would list)."""
        others = ClientFilter(q=where.q, labels=where.labels).conditions()
        state = _state_expr()
        by_state = sa.select(state, sa.func.count()).where(*others).group_by(state)
        pairs = _label_pairs(self.engine.dialect.name)
        count = sa.func.count().label("n")
        by_label = (
            sa.select(pairs.c.key, pairs.c.value, count)
            .select_from(clients.join(pairs, sa.true()))
            .where(*where.conditions())
            .group_by(pairs.c.key, pairs.c.value)
            .order_by(count.desc(), pairs.c.key, pairs.c.value)
            .limit(MAX_LABEL_COUNTS + 1)
        )
        with self.engine.connect() as conn:
            states = {name: 0 for name in CLIENT_STATES}
            for name, n in conn.execute(by_state):
                states[name] = int(n)
            label_rows = conn.execute(by_label).all()
        labels: dict[str, dict[str, int]] = {}
        for key, value, n in sorted(label_rows[:MAX_LABEL_COUNTS], key=lambda r: (r[0], -r[2])):
            labels.setdefault(key, {})[value] = int(n)
        total = states[where.state] if where.state else sum(states.values())
        return {
            "total": total,
            "states": states,
            "labels": labels,
            "labels_truncated": len(label_rows) > MAX_LABEL_COUNTS,
        }

    def clients_fingerprint(self) -> tuple[Any, ...]:
        """A value that changes whenever a client enrolls, connects, disconnects, is revoked
        or forgotten (one aggregate row, not every client's): what a live feed compares to
        know the client list changed without reading it."""
        stamps = (
            clients.c.enrolled_at
            + sa.func.coalesce(clients.c.connected_since, 0.0)
            + sa.func.coalesce(clients.c.disconnected_since, 0.0)
            + sa.func.coalesce(clients.c.revoked_at, 0.0)
        )
        # Summed as whole milliseconds: a sum of floats depends on the order the database
        # reads the rows in, which an UPDATE of other columns may change (PostgreSQL).
        millis = sa.cast(sa.func.round(stamps * 1000), sa.BigInteger)
        query = sa.select(
            sa.func.count(),
            sa.func.sum(sa.case((clients.c.connected.is_(True), 1), else_=0)),
            sa.func.sum(millis),
            sa.func.max(clients.c.connected_since),
            sa.func.max(clients.c.disconnected_since),
        )
        with self.engine.connect() as conn:
            return tuple(conn.execute(query).one())


#: A client's state as the API names it: revoked (whatever its last connection did), else
#: connected or disconnected.
CLIENT_STATES = ("connected", "disconnected", "revoked")
#: A summary counts at most this many label key/value pairs (the most common first).
MAX_LABEL_COUNTS = 500


def _label_pairs(dialect: str) -> sa.TableValuedAlias:
    """Each client's labels as rows ``(key, value)``, joined to its row: SQLite's
    ``json_each``, PostgreSQL's ``json_each_text`` (no labels, or anything but an object
    there: no rows — PostgreSQL's would fail the whole query on a JSON null)."""
    if dialect == "postgresql":
        only = sa.case((sa.func.json_typeof(clients.c.labels) == "object", clients.c.labels))
        pg = sa.func.json_each_text(only).table_valued("key", "value")
        return pg.render_derived("label_pairs")
    only = sa.case((sa.func.json_type(clients.c.labels) == "object", clients.c.labels))
    return sa.func.json_each(only).table_valued("key", "value").alias("label_pairs")


def _state_expr() -> sa.ColumnElement[str]:
    return sa.case(
        (clients.c.revoked_at.is_not(None), "revoked"),
        (clients.c.connected.is_(True), "connected"),
        else_="disconnected",
    )


def _client_select() -> sa.Select[Any]:
    """Clients without their keys, ordered by id, with ``credential``: what the agent signs
    in with."""
    cols = [c for c in clients.c if c.name != "agent_key"]
    credential = sa.case(
        (clients.c.public_key.is_not(None), "public_key"), else_="shared_key"
    ).label("credential")
    return sa.select(*cols, credential).order_by(clients.c.client_id)


# Built once: the read of every POST /api/deploy (a statement built cost more than the query).
_ONE_CLIENT = _client_select().where(clients.c.client_id == sa.bindparam("client_id"))


@dataclass(frozen=True)
class ClientFilter:
    """Which clients a listing shows: a state, a case-insensitive substring of the id or
    the address the agent connected from, and labels it must all have (key, value)."""

    state: str | None = None
    q: str | None = None
    labels: tuple[tuple[str, str], ...] = ()

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        found: list[sa.ColumnElement[bool]] = []
        if self.state is not None:
            found.append(_state_expr() == self.state)
        if self.q:
            needle = self.q.lower()
            found.append(
                sa.or_(
                    sa.func.lower(clients.c.client_id).contains(needle, autoescape=True),
                    sa.func.lower(sa.func.coalesce(clients.c.remote, "")).contains(
                        needle, autoescape=True
                    ),
                )
            )
        for key, value in self.labels:
            found.append(clients.c.labels[key].as_string() == value)
        return found


class ClientPage(NamedTuple):
    """A page of clients: its rows, how many match in all, and the id the next page starts
    after (``None`` on the last page)."""

    rows: list[ClientRow]
    total: int
    last_id: str | None
