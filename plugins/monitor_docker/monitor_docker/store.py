"""Server side: monitor samples, a current-state row per (client, container), and the last
report of each client, in the plugin's own tables (SPEC deploy-27).

Samples older than the retention (``retention`` of the server configuration's
``[plugins.monitor_docker]`` table, else ``DEPLOY_MONITOR_DOCKER_RETENTION``: seconds, or
``7d``, ``12h``, ``30m``; default 7 days) are deleted whenever a batch is stored.  A batch is a
complete picture of one agent's containers, so the current rows of a client are replaced by
each newer batch; a batch that only reports an engine error keeps the last known rows.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from monitor_docker.models import MonitorBatch

if TYPE_CHECKING:
    from deploy_core.plugin import ServerServices

SAMPLES = "docker_monitor_samples"
CURRENT = "docker_monitor_current"
CLIENTS = "docker_monitor_clients"

PLUGIN = "monitor_docker"  # the entry point's name: its [plugins.monitor_docker] settings
ENV_RETENTION = "DEPLOY_MONITOR_DOCKER_RETENTION"
DEFAULT_RETENTION = 7 * 86400.0
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000
#: ``GET …/series``: points per container's series, by default and at most; the most
#: containers given a series in one answer.
DEFAULT_POINTS = 120
MAX_POINTS = 500
MAX_SERIES = 200

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``"604800"``, ``"7d"``, ``"12h"``, ``"30m"`` or ``"45s"`` in seconds.

    :raises ValueError: naming the text.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration like 604800, 7d, 12h or 30m")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def retention_from(env: Mapping[str, str], settings: Mapping[str, Any] | None = None) -> float:
    """The retention in seconds: ``settings["retention"]`` (the plugin's server settings),
    else ``DEPLOY_MONITOR_DOCKER_RETENTION`` of ``env``, else 7 days."""
    configured = (settings or {}).get("retention")
    if configured is not None:
        return parse_duration(str(configured))
    raw = env.get(ENV_RETENTION)
    return parse_duration(raw) if raw else DEFAULT_RETENTION


def define_tables(metadata: sa.MetaData) -> None:
    """Define the plugin's tables on ``metadata`` (once; a second call changes nothing)."""
    if SAMPLES in metadata.tables:
        return
    sa.Table(
        SAMPLES,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("container_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("logical_name", sa.String(255)),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("health", sa.String(16)),
        sa.Column("cpu_percent", sa.Float),
        sa.Column("memory_usage", sa.BigInteger),
        sa.Column("memory_limit", sa.BigInteger),
        sa.Column("restarts", sa.Integer, nullable=False, default=0),
        # A batch the agent sends again (lost ack) adds nothing.
        sa.UniqueConstraint("client_id", "container_id", "ts", name="uq_docker_monitor_sample"),
        sa.Index("ix_docker_monitor_samples_client_ts", "client_id", "ts"),
        sa.Index("ix_docker_monitor_samples_ts", "ts"),
    )
    sa.Table(
        CURRENT,
        metadata,
        sa.Column("client_id", sa.String(64), primary_key=True),
        sa.Column("container_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("logical_name", sa.String(255)),
        sa.Column("image", sa.String(512), nullable=False, default=""),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("health", sa.String(16)),
        sa.Column("exit_code", sa.Integer),
        sa.Column("started_at", sa.String(64)),
        sa.Column("restarts", sa.Integer, nullable=False, default=0),
        sa.Column("cpu_percent", sa.Float),
        sa.Column("memory_usage", sa.BigInteger),
        sa.Column("memory_limit", sa.BigInteger),
        sa.Column("managed", sa.Boolean, nullable=False, default=False),
        sa.Column("ts", sa.Float, nullable=False),
    )
    sa.Table(
        CLIENTS,
        metadata,
        sa.Column("client_id", sa.String(64), primary_key=True),
        sa.Column("last_report", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("interval", sa.Float, nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("containers", sa.Integer, nullable=False, default=0),
    )


@dataclass(frozen=True)
class MonitorTables:
    """The plugin's three tables."""

    samples: sa.Table
    current: sa.Table
    clients: sa.Table

    @classmethod
    def of(cls, metadata: sa.MetaData) -> MonitorTables:
        """The tables defined on ``metadata`` (defining them if needed)."""
        define_tables(metadata)
        return cls(metadata.tables[SAMPLES], metadata.tables[CURRENT], metadata.tables[CLIENTS])


def iso(ts: float | None) -> str | None:
    """``2026-01-02T03:04:05.678Z`` for seconds since the epoch."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def _insert_on_conflict(
    conn: Connection, table: sa.Table
) -> sqlite.Insert | postgresql.Insert | None:
    """An INSERT that can say what to do on a conflict, where the dialect has one; others
    take the portable, slower path."""
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return None


def _insert_new(conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows``, skipping those that break a unique constraint (resent batches)."""
    if not rows:
        return
    insert = _insert_on_conflict(conn, table)
    if insert is not None:
        conn.execute(insert.on_conflict_do_nothing(), list(rows))
        return
    for row in rows:
        try:
            with conn.begin_nested():
                conn.execute(table.insert(), row)
        except sa.exc.IntegrityError:
            pass


def _upsert(conn: Connection, table: sa.Table, row: dict[str, Any], key: str) -> None:
    insert = _insert_on_conflict(conn, table)
    if insert is not None:
        stmt = insert.values(**row)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[key], set_={k: v for k, v in row.items() if k != key}
            )
        )
        return
    updated = conn.execute(table.update().where(table.c[key] == row[key]).values(**row))
    if updated.rowcount == 0:
        conn.execute(table.insert().values(**row))


class MonitorStore:
    """Reads and writes the monitor tables of one database."""

    def __init__(
        self, engine: Engine, tables: MonitorTables, *, retention: float = DEFAULT_RETENTION
    ) -> None:
        self.engine = engine
        self.t = tables
        self.retention = retention

    def store(self, client_id: str, batch: MonitorBatch, *, now: float) -> int:
        """Keep one batch; prune what is past the retention.  Returns the samples pruned."""
        t = self.t
        samples = [
            {
                "client_id": client_id,
                "container_id": c.id,
                "name": c.name,
                "logical_name": c.logical_name,
                "ts": batch.ts,
                "state": c.state,
                "health": c.health,
                "cpu_percent": c.cpu_percent,
                "memory_usage": c.memory_usage,
                "memory_limit": c.memory_limit,
                "restarts": c.restarts,
            }
            for c in batch.containers
        ]
        with self.engine.begin() as conn:
            _insert_new(conn, t.samples, samples)
            last = conn.execute(
                sa.select(t.clients.c.last_report).where(t.clients.c.client_id == client_id)
            ).scalar()
            if last is None or batch.ts >= last:
                if batch.error is None:
                    conn.execute(t.current.delete().where(t.current.c.client_id == client_id))
                    if batch.containers:
                        conn.execute(
                            t.current.insert(),
                            [
                                {**c.model_dump(exclude={"id"}), "container_id": c.id}
                                | {"client_id": client_id, "ts": batch.ts}
                                for c in batch.containers
                            ],
                        )
                _upsert(
                    conn,
                    t.clients,
                    {
                        "client_id": client_id,
                        "last_report": batch.ts,
                        "received_at": now,
                        "interval": batch.interval,
                        "scope": batch.scope,
                        "error": batch.error,
                        "containers": len(batch.containers),
                    },
                    "client_id",
                )
            pruned = conn.execute(t.samples.delete().where(t.samples.c.ts < now - self.retention))
        return int(pruned.rowcount or 0)

    def _report(self, client_id: str, client: sa.RowMapping | None) -> dict[str, Any]:
        """What both answers say first: the client's last report (``None`` before any)."""
        return {
            "client_id": client_id,
            "last_report": iso(client["last_report"]) if client else None,
            "last_report_ts": client["last_report"] if client else None,
            "received_at": iso(client["received_at"]) if client else None,
            "interval": client["interval"] if client else None,
            "scope": client["scope"] if client else None,
            "error": client["error"] if client else None,
            "retention_seconds": self.retention,
        }

    def view(
        self,
        client_id: str,
        *,
        since: float | None = None,
        until: float | None = None,
        container: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> dict[str, Any]:
        """What ``GET /api/docker/monitor/{client_id}`` answers: the client's last report,
        the current state of each container, and with ``since``/``until`` the samples."""
        t = self.t
        with self.engine.connect() as conn:
            client = (
                conn.execute(sa.select(t.clients).where(t.clients.c.client_id == client_id))
                .mappings()
                .first()
            )
            current = (
                conn.execute(
                    sa.select(t.current)
                    .where(t.current.c.client_id == client_id)
                    .order_by(t.current.c.name)
                )
                .mappings()
                .all()
            )
            samples = None
            if since is not None or until is not None:
                query = sa.select(t.samples).where(t.samples.c.client_id == client_id)
                if since is not None:
                    query = query.where(t.samples.c.ts >= since)
                if until is not None:
                    query = query.where(t.samples.c.ts <= until)
                if container:
                    query = query.where(
                        sa.or_(
                            t.samples.c.name == container,
                            t.samples.c.logical_name == container,
                            t.samples.c.container_id.startswith(container),
                        )
                    )
                query = query.order_by(t.samples.c.ts, t.samples.c.name).limit(limit + 1)
                samples = conn.execute(query).mappings().all()
        view: dict[str, Any] = {
            **self._report(client_id, client),
            "containers": [_render_current(row) for row in current],
        }
        if samples is not None:
            view["samples"] = [_render_sample(row) for row in samples[:limit]]
            view["truncated"] = len(samples) > limit
        return view

    def series(
        self,
        client_id: str,
        *,
        now: float,
        points: int = DEFAULT_POINTS,
        since: float | None = None,
        include_all: bool = False,
    ) -> dict[str, Any]:
        """What ``GET /api/docker/monitor/{client_id}/series`` answers: each current
        container (managed ones only unless ``include_all``; at most :data:`MAX_SERIES`, by
        name) with its CPU % and memory over the retained window (or from ``since``), as at
        most ``points`` points.

        A container's span (its first to its last sample in the window) is cut into
        ``points`` equal buckets; a point is a bucket's last sample time and the mean CPU %
        and memory of the container's samples in it.  A bucket without samples (the agent was
        away) has no point, so a gap stays a gap; while the samples are further apart than a
        bucket (fewer than ``points`` intervals so far), the points are the samples.  Each
        container is its own series: a redeployment makes a new container, whose series
        starts afresh.
        """
        t = self.t
        start = now - self.retention if since is None else max(since, now - self.retention)
        with self.engine.connect() as conn:
            client = (
                conn.execute(sa.select(t.clients).where(t.clients.c.client_id == client_id))
                .mappings()
                .first()
            )
            query = sa.select(t.current).where(t.current.c.client_id == client_id)
            if not include_all:
                query = query.where(t.current.c.managed.is_(True))
            current = conn.execute(query.order_by(t.current.c.name)).mappings().all()
            shown = current[:MAX_SERIES]
            ids = [row["container_id"] for row in shown]
            points_of: dict[str, dict[str, list[Any]]] = {
                cid: {"ts": [], "cpu_percent": [], "memory_usage": []} for cid in ids
            }
            counts: dict[str, int] = dict.fromkeys(ids, 0)
            if ids:
                s = t.samples.c
                in_window = sa.and_(
                    s.client_id == client_id, s.ts >= start, s.container_id.in_(ids)
                )
                bounds = (
                    sa.select(
                        s.container_id.label("cid"),
                        sa.func.min(s.ts).label("first"),
                        (sa.func.max(s.ts) - sa.func.min(s.ts)).label("span"),
                    )
                    .where(in_window)
                    .group_by(s.container_id)
                    .subquery()
                )
                # The bucket of a sample: its share of its container's span, in ``points``
                # steps (the last sample's share is 1: put in the last bucket).
                share = sa.func.coalesce(
                    (s.ts - bounds.c.first) * points / sa.func.nullif(bounds.c.span, 0), 0.0
                )
                if conn.dialect.name == "postgresql":
                    floored = sa.func.least(sa.func.floor(share), points - 1)
                else:  # a cast truncates, which floors a share that is never negative
                    floored = sa.func.min(sa.cast(share, sa.Integer), points - 1)
                bucket = floored.label("bucket")
                rows = conn.execute(
                    sa.select(
                        s.container_id,
                        sa.func.max(s.ts).label("ts"),
                        sa.func.avg(s.cpu_percent).label("cpu"),
                        sa.func.avg(s.memory_usage).label("memory"),
                        sa.func.count().label("n"),
                    )
                    .join(bounds, bounds.c.cid == s.container_id)
                    .where(in_window)
                    .group_by(s.container_id, bucket)
                    .order_by(s.container_id, bucket)
                ).all()
                for cid, ts, cpu, memory, n in rows:
                    series = points_of[cid]
                    series["ts"].append(float(ts))
                    series["cpu_percent"].append(None if cpu is None else round(float(cpu), 3))
                    series["memory_usage"].append(None if memory is None else int(memory))
                    counts[cid] += int(n)
        return {
            **self._report(client_id, client),
            "since": start,
            "until": now,
            "points": points,
            "truncated": len(current) > len(shown),
            "containers": [
                _render_current(row)
                | {"samples": counts[row["container_id"]], "series": points_of[row["container_id"]]}
                for row in shown
            ],
        }


def _render_current(row: sa.RowMapping) -> dict[str, Any]:
    return {
        "id": row["container_id"],
        "name": row["name"],
        "logical_name": row["logical_name"],
        "image": row["image"],
        "state": row["state"],
        "health": row["health"],
        "exit_code": row["exit_code"],
        "started_at": row["started_at"],
        "restarts": row["restarts"],
        "cpu_percent": row["cpu_percent"],
        "memory_usage": row["memory_usage"],
        "memory_limit": row["memory_limit"],
        "managed": bool(row["managed"]),
        "updated_at": iso(row["ts"]),
        "updated_ts": row["ts"],
    }


def _render_sample(row: sa.RowMapping) -> dict[str, Any]:
    return {
        "container_id": row["container_id"],
        "name": row["name"],
        "logical_name": row["logical_name"],
        "timestamp": iso(row["ts"]),
        "ts": row["ts"],
        "state": row["state"],
        "health": row["health"],
        "cpu_percent": row["cpu_percent"],
        "memory_usage": row["memory_usage"],
        "memory_limit": row["memory_limit"],
        "restarts": row["restarts"],
    }


def store_for(services: ServerServices) -> MonitorStore:
    """The store of a running server: its database, the tables the core created from
    :func:`define_tables` on the plugins' metadata, the configured retention."""
    retention = retention_from(os.environ, services.plugin_config(PLUGIN))
    return MonitorStore(services.engine, MonitorTables.of(services.metadata), retention=retention)
