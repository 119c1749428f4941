"""The server's Prometheus metrics (docs/operating.md lists them all).

Each :class:`~deploy_core.server.app.DeployServer` has its own :class:`ServerMetrics` with its
own ``CollectorRegistry`` (never the process-wide one: tests run several servers in one
process).  What the server already holds is read when Prometheus scrapes (connected agents,
the transport's counts, unfinished deployments in the database); deployments are followed by
observing the record changes the server publishes to its listeners
(:class:`~deploy_core.server.callbacks.Listeners`).  Other parts report through one call:

- ``metrics.ingest_batch(size, seconds)``: the status-event ingest committed ``size`` events
  in one transaction that took ``seconds``;
- ``metrics.http_request(...)``: done by the HTTP middleware (server/http/metrics.py);
- ``metrics.watch_expiries(fn)``: wraps the watchdog's ``expired`` callback to count timeouts.

Label values come only from small sets (deploy types, statuses, route templates, message
kinds); :class:`LabelGuard` folds anything past a bound into ``"other"``, so no agent or API
caller can grow the series without limit.  No deploy id or client id is ever a label value.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from deploy_core import __version__
from deploy_core.logs import bind
from deploy_core.models import COMMAND_ROLLBACK, DeployStatus
from deploy_core.server.db import clients, deployments
from deploy_core.server.db_health import is_outage

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer

log = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX = "deploy_center"
#: Deployments last from seconds (a script) to many minutes (an image pull and checks).
DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
#: A status can last from milliseconds (pending while connected) to the whole deployment.
STATUS_BUCKETS = (0.01, 0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 300, 1800, float("inf"))
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, float("inf"))
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf"))
#: Distinct values one label may take before the rest are counted as ``"other"``.
MAX_LABEL_VALUES = 64
OTHER = "other"
# Deployments followed at once (a replica may see one start and never its end when another
# replica finishes it), and finished ones remembered so a late re-publish counts nothing.
MAX_FOLLOWED = 100_000
MAX_REMEMBERED = 10_000


class LabelGuard:
    """Bounds a label's values: the first :data:`MAX_LABEL_VALUES` distinct ones pass, later
    new ones become ``"other"``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: Any) -> str:
        text = str(value)[:64] if value is not None else "none"
        if text in self._seen:
            return text
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(text)
        return text


@dataclass
class _Followed:
    """What the metrics remember of a deployment while it runs."""

    kind: str
    status: str
    since: float


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class ServerMetrics:
    """One server's metrics: its registry, the instruments others report to, and what is
    read at scrape time."""

    def __init__(self, server: DeployServer) -> None:
        self.server = server
        self.registry = CollectorRegistry()
        r = self.registry
        self._type = LabelGuard()
        self._strategy = LabelGuard()
        self._route = LabelGuard(limit=256)
        self.deployments_started = Counter(
            f"{PREFIX}_deployments_started",
            "Deployments submitted on this server, by deploy type (command type).",
            ["type"],
            registry=r,
        )
        self.deployments_finished = Counter(
            f"{PREFIX}_deployments_finished",
            "Deployments that reached a final status on this server, by type and status.",
            ["type", "status"],
            registry=r,
        )
        self.deployment_duration = Histogram(
            f"{PREFIX}_deployment_duration_seconds",
            "Time from submission to final status, by deploy type.",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.status_duration = Histogram(
            f"{PREFIX}_deployment_status_duration_seconds",
            "Time a deployment spent in one status (its stage: pending, pulling, health_check, "
            "...) before the next, by deploy type and that status.",
            ["type", "status"],
            buckets=STATUS_BUCKETS,
            registry=r,
        )
        self.watchdog_timeouts = Counter(
            f"{PREFIX}_watchdog_timeouts",
            "Deployments the server's watchdog finished as timeout (deadline passed without a "
            "final report), by deploy type.",
            ["type"],
            registry=r,
        )
        self.rollbacks = Counter(
            f"{PREFIX}_rollbacks",
            "Rollbacks started: trigger 'agent' (the agent rolled back within the deployment, "
            "e.g. after a failed health check) or 'server' (a deploy.rollback the server sent: "
            "asked through the API, or after an agent left a failure unrolled), by strategy.",
            ["trigger", "strategy"],
            registry=r,
        )
        self.ingest_batch_size = Histogram(
            f"{PREFIX}_ingest_batch_size",
            "Status events committed per database transaction by the event ingest.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.ingest_commit = Histogram(
            f"{PREFIX}_ingest_commit_seconds",
            "Time to commit one batch of status events.",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.http_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "HTTP API requests by method, route template (not the raw path) and status code.",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        info = Gauge(
            f"{PREFIX}_build_info", "Always 1; the server's version.", ["version"], registry=r
        )
        info.labels(version=__version__).set(1)
        self._scraped = _ScrapeCollector(self)
        r.register(self._scraped)
        self._followed: OrderedDict[str, _Followed] = OrderedDict()
        self._finished: OrderedDict[str, None] = OrderedDict()
        server.listeners.observe(self.record_changed)

    # ------------------------------------------------------------------ reported by others

    def ingest_batch(self, size: int, seconds: float) -> None:
        """The status-event ingest committed ``size`` events in one transaction of
        ``seconds`` (server/ingest.py calls this once per commit)."""
        self.ingest_batch_size.observe(size)
        self.ingest_commit.observe(seconds)

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered (server/http/metrics.py)."""
        method = method if method in _METHODS else OTHER
        self.http_duration.labels(method, self._route(route), str(status)).observe(seconds)

    def watch_expiries(self, expired: Callable[[T], Awaitable[None]]) -> Callable[[T], Any]:
        """``expired`` (the watchdog's callback), counting each deployment it is called
        for as a watchdog timeout."""

        async def counted(applied: Any) -> None:
            record = getattr(applied, "record", None)
            if record is None:
                await expired(applied)
                return
            self.watchdog_timeouts.labels(self._type(record.command_type)).inc()
            # What follows the expiry (a rollback asked for) logs with the deployment's ids.
            bind(deploy_id=record.deploy_id, client_id=record.client_id)
            try:
                await expired(applied)
            finally:
                bind(deploy_id=None, client_id=None)

        return counted

    # ------------------------------------------------------------------ record changes

    def record_changed(self, view: dict[str, Any]) -> None:
        """Follow one published record change (a view: ``DeploymentRow.to_api`` of
        server/rows.py): starts, status changes, finishes and rollbacks.  Never raises into
        the publisher."""
        try:
            self._follow(view)
        except Exception:
            log.exception("metrics could not follow a change of %s", view.get("deploy_id"))

    def _follow(self, view: dict[str, Any]) -> None:
        deploy_id = view["deploy_id"]
        if deploy_id in self._finished:
            return
        kind = self._type(view["command_type"])
        status = str(view["status"])
        now = view.get("updated_ts") or time.time()
        followed = self._followed.get(deploy_id)
        if followed is None:
            followed = _Followed(kind, status, now)
            self._followed[deploy_id] = followed
            while len(self._followed) > MAX_FOLLOWED:
                self._followed.popitem(last=False)
            if status == DeployStatus.PENDING.value and not view["finished"]:
                self.deployments_started.labels(kind).inc()
                if view["command_type"] == COMMAND_ROLLBACK:
                    target = (view.get("request") or {}).get("rollback_of") or {}
                    self._rollback("server", target.get("rollback"))
        elif followed.status != status:
            self.status_duration.labels(kind, followed.status).observe(
                max(0.0, now - followed.since)
            )
            followed.status, followed.since = status, now
        if not view["finished"]:
            return
        del self._followed[deploy_id]
        self._finished[deploy_id] = None
        while len(self._finished) > MAX_REMEMBERED:
            self._finished.popitem(last=False)
        self.deployments_finished.labels(kind, status).inc()
        created = _epoch(view.get("created_at"))
        finished = _epoch(view.get("finished_at")) or now
        if created is not None:
            self.deployment_duration.labels(kind).observe(max(0.0, finished - created))
        if view.get("rollback") and view["command_type"] != COMMAND_ROLLBACK:
            self._rollback("agent", (view.get("request") or {}).get("rollback"))

    def _rollback(self, trigger: str, spec: Any) -> None:
        strategy = spec.get("strategy") if isinstance(spec, dict) else None
        self.rollbacks.labels(trigger, self._strategy(strategy)).inc()

    # ------------------------------------------------------------------ exposition

    async def exposition(self) -> bytes:
        """The text format of every metric, with the database's counts read just now (left
        out while the database is unreachable: the rest, and the fencing gauges, still are)."""
        try:
            self._scraped.database = await asyncio.to_thread(self._read_database)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._scraped.database = None
        return generate_latest(self.registry)

    def _read_database(self) -> _DatabaseCounts:
        """Unfinished deployments by type and status and enrolled agents, from the database
        all replicas share."""
        with self.server.engine.connect() as conn:
            unfinished = conn.execute(
                sa.select(deployments.c.command_type, deployments.c.status, sa.func.count())
                .where(deployments.c.finished_at.is_(None))
                .group_by(deployments.c.command_type, deployments.c.status)
            ).all()
            known = conn.execute(
                sa.select(clients.c.revoked_at.is_not(None), sa.func.count()).group_by(
                    clients.c.revoked_at.is_not(None)
                )
            ).all()
        return _DatabaseCounts(
            unfinished=[(str(t), str(s), int(n)) for t, s, n in unfinished],
            enrolled=sum(int(n) for revoked, n in known if not revoked),
            revoked=sum(int(n) for revoked, n in known if revoked),
        )


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass
class _DatabaseCounts:
    unfinished: list[tuple[str, str, int]]
    enrolled: int
    revoked: int


class _ScrapeCollector(Collector):
    """What is read when Prometheus scrapes: the transport's counts, connected agents,
    live subscribers, and the database's counts fetched by :meth:`ServerMetrics.exposition`."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.database: _DatabaseCounts | None = None

    def describe(self) -> list[Metric]:
        return []  # collected only at scrape time: registering must not call collect()

    def collect(self) -> Iterator[Metric]:
        server = self.metrics.server
        transport = getattr(server, "transport", None)
        if transport is not None:
            yield from self._transport(transport)
        subscribers = GaugeMetricFamily(
            f"{PREFIX}_live_subscribers",
            "Open --wait long-polls and live-feed subscriptions on this server.",
        )
        subscribers.add_metric([], server.listeners.count())
        yield subscribers
        health = getattr(server, "db_health", None)
        if health is not None:
            fenced = GaugeMetricFamily(
                f"{PREFIX}_database_fenced",
                "1 while this replica is fenced: its database has not answered for longer "
                "than its lease, and it refuses new work (docs/cluster.md).",
            )
            fenced.add_metric([], 1 if health.check() else 0)
            yield fenced
            silent = GaugeMetricFamily(
                f"{PREFIX}_database_unreachable_seconds",
                "Seconds since the database last answered this replica, while it does not "
                "(0 while it does).",
            )
            silent.add_metric([], health.unreachable_for())
            yield silent
        bus = getattr(server, "bus", None)
        if bus is not None:
            yield from _bus_metrics(bus)
        database = self.database
        if database is None:
            return
        active = GaugeMetricFamily(
            f"{PREFIX}_deployments_active",
            "Unfinished deployments in the database (all replicas), by type and status.",
            labels=["type", "status"],
        )
        guard, counts = LabelGuard(), Tally[tuple[str, str]]()
        for kind, status, count in database.unfinished:
            counts[guard(kind), guard(status)] += count
        for labels, count in sorted(counts.items()):
            active.add_metric(list(labels), count)
        yield active
        known = GaugeMetricFamily(
            f"{PREFIX}_agents_known",
            "Agents enrolled in the database (all replicas), by state.",
            labels=["state"],
        )
        known.add_metric(["enrolled"], database.enrolled)
        known.add_metric(["revoked"], database.revoked)
        yield known

    def _transport(self, transport: Any) -> Iterator[Metric]:
        stats = transport.stats
        connected = GaugeMetricFamily(
            f"{PREFIX}_agents_connected", "Agents connected to this server now."
        )
        connected.add_metric([], len(transport.sessions))
        yield connected
        handshakes = GaugeMetricFamily(
            f"{PREFIX}_agent_handshakes_in_progress",
            "Agent connections in their QUIC/TLS handshake or authentication now.",
        )
        handshakes.add_metric([], transport.handshakes.in_progress)
        yield handshakes
        connects = CounterMetricFamily(
            f"{PREFIX}_agent_connects", "Agent connections authenticated (on_connect)."
        )
        connects.add_metric([], stats.connects)
        yield connects
        yield _by(
            CounterMetricFamily(
                f"{PREFIX}_agent_disconnects",
                "Authenticated agent connections that ended, by reason: agent (it closed the "
                "connection or the network lost it), server, idle_timeout, replaced.",
                labels=["reason"],
            ),
            stats.disconnects,
        )
        refusals = dict(stats.refusals)
        refusals["busy"] = transport.handshakes.refused
        yield _by(
            CounterMetricFamily(
                f"{PREFIX}_agent_refusals",
                "Agent connections refused, by reason: auth, busy (handshake limit), "
                "unavailable (database unreachable), handshake_timeout, protocol, flood, "
                "internal.",
                labels=["reason"],
            ),
            refusals,
        )
        messages = CounterMetricFamily(
            f"{PREFIX}_quic_messages",
            "Control-stream messages, by direction (received, sent) and kind.",
            labels=["direction", "kind"],
        )
        size = CounterMetricFamily(
            f"{PREFIX}_quic_message_bytes",
            "Framed bytes of control-stream messages, by direction and kind.",
            labels=["direction", "kind"],
        )
        for direction, count, volume in (
            ("received", stats.messages_received, stats.bytes_received),
            ("sent", stats.messages_sent, stats.bytes_sent),
        ):
            for kind in sorted(count):
                messages.add_metric([direction, kind], count[kind])
                size.add_metric([direction, kind], volume[kind])
        yield messages
        yield size
        artifacts = CounterMetricFamily(
            f"{PREFIX}_artifact_bytes_served",
            "Artifact bytes sent to agents on QUIC file streams.",
        )
        artifacts.add_metric([], transport.artifact_bytes_sent())
        yield artifacts
        gate = transport.transfers
        transfers = GaugeMetricFamily(
            f"{PREFIX}_file_transfers",
            "Artifact transfers on QUIC file streams now: active (sending) and waiting (in "
            "line for one of --max-file-transfers).",
            labels=["state"],
        )
        transfers.add_metric(["active"], gate.active)
        transfers.add_metric(["waiting"], gate.waiting)
        yield transfers
        held = GaugeMetricFamily(
            f"{PREFIX}_file_transfer_bytes_buffered",
            "Artifact bytes sent past the agents' credits, which the server may still hold.",
        )
        held.add_metric([], gate.buffered)
        yield held


def _by(family: CounterMetricFamily, counts: dict[str, int]) -> CounterMetricFamily:
    for label, value in sorted(counts.items()):
        family.add_metric([label], value)
    return family


def _bus_metrics(bus: Any) -> Iterator[Metric]:
    """The cluster bus of a replica on PostgreSQL (server/cluster_bus.py)."""
    listening = GaugeMetricFamily(
        f"{PREFIX}_cluster_bus_listening",
        "1 while this replica listens for the other replicas' notifications (PostgreSQL "
        "LISTEN); 0 while its listening connection is being re-established.",
    )
    listening.add_metric([], 1 if bus.listening.is_set() else 0)
    yield listening
    notes = CounterMetricFamily(
        f"{PREFIX}_cluster_bus_notifications",
        "Cluster bus notifications: sent (NOTIFY payloads), received (well-formed, from any "
        "replica), malformed (ignored), dropped (not sent: the re-scans catch up).",
        labels=["outcome"],
    )
    for outcome in ("sent", "received", "malformed", "dropped"):
        notes.add_metric([outcome], getattr(bus, outcome))
    yield notes
