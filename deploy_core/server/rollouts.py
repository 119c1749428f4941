"""Rollouts: one deployment sent to many clients, in batches, with a canary, a failure budget
and a rollback of everything when it fails (issue 14, docs/rollouts.md).

A rollout is a state machine in the database (``rollouts``, ``rollout_targets``,
``rollout_history``).  :meth:`Rollouts.run` is one asyncio task per server that moves every
unfinished rollout along: it starts the targets' deployments through
:class:`~deploy_core.server.deployments.Deployments` (each its own record, lock, callbacks,
checks and rollback), wakes when a deployment finishes (it listens to record changes like
the live feed does) and looks again every :data:`RESCAN_INTERVAL` seconds whatever happens.
Only the holder of the ``rollouts`` duty lease (server/leases.py) drives, so replicas on one
database never drive twice; a server restarted drives on from what the database says.

A target's deployment id is chosen and committed (state ``starting``) before its deployment
is created with that id, and the truth about a target is whether that deployment exists:
a driver that died in between creates it on its next pass, never a second one.

The driver works on the records' dict rows through :class:`RolloutStore` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from deploy_core.durations import human_duration
from deploy_core.models import DeployStatus
from deploy_core.server.callbacks import Listeners
from deploy_core.server.db import (
    clients,
    deployments,
    rollout_history,
    rollout_targets,
    rollouts,
    row_dict,
)
from deploy_core.server.db_health import OutageLog, is_outage
from deploy_core.server.deployments import Deployments
from deploy_core.server.leases import acquire, release
from deploy_core.server.locks import ClientBusy
from deploy_core.server.records import NewDeployment
from deploy_core.server.rollbacks import RollbackRefused, request_rollback
from deploy_core.server.rows import iso_time
from deploy_core.server.secret_box import SecretBox
from deploy_core.server.targets import deployment_scope

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Rollout statuses (docs/rollouts.md#statuses).
PENDING = "pending"
RUNNING = "running"
PAUSED = "paused"
SUCCEEDED = "succeeded"
FAILED = "failed"
ABORTED = "aborted"
ROLLING_BACK = "rolling_back"
ROLLED_BACK = "rolled_back"
ACTIVE = (PENDING, RUNNING, PAUSED, ROLLING_BACK)
FINAL = (SUCCEEDED, FAILED, ABORTED, ROLLED_BACK)
STATUSES = ACTIVE + FINAL

# What paused a rollout.
PAUSED_BY_OPERATOR = "operator"
PAUSED_FOR_CANARY = "canary"

# Target states: stored ones, and the ones the API shows (``starting`` shows as ``waiting``
# until its deployment exists, then as ``running``/``done``).
T_WAITING = "waiting"
T_STARTING = "starting"
T_RUNNING = "running"
T_DONE = "done"
T_SKIPPED = "skipped"
T_FAILED = "failed"
ENDED = (T_DONE, T_SKIPPED, T_FAILED)

# Deployment statuses that count against max_failures.
FAILURE_STATUSES = frozenset(
    s.value
    for s in (
        DeployStatus.FAILED,
        DeployStatus.TIMEOUT,
        DeployStatus.ROLLED_BACK,
        DeployStatus.ROLLBACK_FAILED,
    )
)
MAX_TARGETS = 10_000
# The driver looks at every unfinished rollout at least this often (seconds), events or not.
RESCAN_INTERVAL = 1.0
# Passes woken by finished deployments start at most this often (seconds).
MIN_PASS_GAP = 0.5
# The lease: how long it lasts, and how often the holder renews it during a long pass.
LEASE_NAME = "rollouts"
LEASE_SECONDS = 15.0
RENEW_EVERY = 3.0
# Targets started together: their ids committed in one transaction, then their deployments
# created in one more, then sent.
START_CHUNK = 256
# A chunk after the first starts once at most START_CHUNK commands of this server await their
# agents' ACK (Dispatcher.room), or after this many seconds of waiting in any case.
START_PACING_TIMEOUT = 10.0


class RolloutConflict(Exception):
    """A control action that does not apply to the rollout as it is (``409``)."""


# --------------------------------------------------------------------------- strategy


def percent_of(value: int | str, total: int, *, round_up: bool) -> int:
    """``value`` as a count: an integer as it is, ``"p%"`` as ``p`` percent of ``total``,
    rounded up (sizes) or down (failure budgets)."""
    if isinstance(value, int):
        return value
    share = total * float(value.rstrip("%")) / 100
    # 12 x 25 % is 3.0000000000000004 in floating point: round to 9 places first.
    share = round(share, 9)
    return math.ceil(share) if round_up else math.floor(share)


def resolve_strategy(asked: dict[str, Any], total: int) -> dict[str, Any]:
    """The strategy a request asked for (validated by the HTTP model) turned into numbers for
    ``total`` targets (docs/rollouts.md#strategies-side-by-side).

    :raises ValueError: a canary that leaves no target after it.
    """
    canary = percent_of(asked.get("canary", 0), total, round_up=True)
    if canary and canary >= total:
        raise ValueError(
            f"canary {asked.get('canary')} is {canary} of {total} targets: it must leave at "
            "least one target after it"
        )
    rest = total - canary
    batch_asked = asked.get("batch_size")
    parallel_asked = asked.get("max_parallel")
    if batch_asked is not None:
        batch_size = max(1, percent_of(batch_asked, total, round_up=True))
    else:
        batch_size = max(1, rest)
    if parallel_asked is not None:
        max_parallel = max(1, percent_of(parallel_asked, total, round_up=True))
    elif batch_asked is not None:
        max_parallel = batch_size
    else:
        max_parallel = 1
    return {
        "batch_size": batch_size,
        "max_parallel": max_parallel,
        "canary": canary,
        "canary_action": asked.get("canary_action", "pause"),
        "max_failures": percent_of(asked.get("max_failures", 0), total, round_up=False),
        "on_failure": asked.get("on_failure", "stop"),
        "progress_deadline": asked.get("progress_deadline"),
        "busy": asked.get("busy", "wait"),
        "busy_timeout": asked.get("busy_timeout", 600.0),
        "offline_timeout": asked.get("offline_timeout", 300.0),
    }


def plan_batches(total: int, strategy: dict[str, Any]) -> list[int]:
    """The batch index of each of ``total`` targets, in order: the canary first (batch 0,
    when there is one), then batches of ``batch_size``."""
    canary = strategy["canary"]
    size = strategy["batch_size"]
    first = 1 if canary else 0
    return [0 if i < canary else first + (i - canary) // size for i in range(total)]


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class Target:
    """A target as the driver and the API see it: its row, and its deployment's state."""

    row: dict[str, Any]

    @property
    def client_id(self) -> str:
        return str(self.row["client_id"])

    @property
    def batch(self) -> int:
        return int(self.row["batch"])

    @property
    def status(self) -> str | None:
        """The deployment's status, ``None`` before it exists."""
        value = self.row["d_status"]
        return None if value is None else str(value)

    @property
    def state(self) -> str:
        """``waiting``, ``running``, ``done``, ``skipped`` or ``failed``: a deployment that
        exists decides, whatever the row says (a race with an abort, a restart)."""
        if self.row["d_status"] is not None:
            return T_DONE if self.row["d_finished_at"] is not None else T_RUNNING
        if self.row["state"] in (T_SKIPPED, T_FAILED):
            return str(self.row["state"])
        if self.row["state"] == T_RUNNING:
            return T_DONE  # its deployment was deleted since (retention): nothing to wait for
        return T_WAITING

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def failed(self) -> bool:
        return self.state == T_FAILED or (self.state == T_DONE and self.status in FAILURE_STATUSES)

    @property
    def succeeded(self) -> bool:
        return self.state == T_DONE and self.status == DeployStatus.SUCCESS.value


class RolloutStore:
    """The rollout tables (synchronous SQLAlchemy Core; the driver calls it in a thread)."""

    def __init__(self, engine: Engine, secret_box: SecretBox) -> None:
        self.engine = engine
        self.secret_box = secret_box

    # ------------------------------------------------------------------ retention

    def prune(self, older_than: float, *, batch: int = 500) -> int:
        """Delete rollouts that finished before ``older_than`` (epoch seconds), with their
        targets and history; unfinished ones are never touched.  In batches, so a large
        clean-up holds no long transaction.  Returns how many rollouts were deleted.  (The
        deployments they made are pruned by their own age, RecordStore.prune.)"""
        deleted = 0
        while True:
            with self.engine.begin() as conn:
                ids = list(
                    conn.execute(
                        sa.select(rollouts.c.rollout_id)
                        .where(rollouts.c.finished_at < older_than)
                        .limit(batch)
                    ).scalars()
                )
                if not ids:
                    return deleted
                for table in (rollout_targets, rollout_history):
                    conn.execute(table.delete().where(table.c.rollout_id.in_(ids)))
                conn.execute(rollouts.delete().where(rollouts.c.rollout_id.in_(ids)))
            deleted += len(ids)

    # ------------------------------------------------------------------ creation

    def create(
        self,
        *,
        kind: str,
        command_type: str,
        request: dict[str, Any],
        deadline_seconds: float,
        secret_env: dict[str, str],
        selector: dict[str, str] | None,
        strategy: dict[str, Any],
        strategy_asked: dict[str, Any],
        client_ids: Sequence[str],
        created_by: str,
    ) -> dict[str, Any]:
        """Record a ``pending`` rollout with its targets, batched; returns its row."""
        rollout_id = uuid.uuid4().hex
        batches = plan_batches(len(client_ids), strategy)
        now = time.time()
        batch_count = (batches[-1] + 1) if batches else 0
        with self.engine.begin() as conn:
            conn.execute(
                rollouts.insert().values(
                    rollout_id=rollout_id,
                    status=PENDING,
                    kind=kind,
                    command_type=command_type,
                    request=request,
                    deadline_seconds=deadline_seconds,
                    secret_env=self.secret_box.seal(secret_env) if secret_env else None,
                    selector=selector,
                    strategy=strategy,
                    strategy_asked=strategy_asked,
                    total=len(client_ids),
                    batch_count=batch_count,
                    current_batch=0,
                    created_by=created_by,
                    created_at=now,
                    updated_at=now,
                )
            )
            conn.execute(
                rollout_targets.insert(),
                [
                    {
                        "rollout_id": rollout_id,
                        "position": i,
                        "client_id": cid,
                        "batch": batch,
                        "state": T_WAITING,
                    }
                    for i, (cid, batch) in enumerate(zip(client_ids, batches, strict=True))
                ],
            )
            _history(
                conn,
                rollout_id,
                PENDING,
                f"{len(client_ids)} targets in {batch_count} "
                f"batch{'es' if batch_count != 1 else ''}",
                now,
            )
        row = self.get(rollout_id)
        assert row is not None
        return row

    # ------------------------------------------------------------------ reading

    def get(self, rollout_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(rollouts).where(rollouts.c.rollout_id == rollout_id)
            ).first()
        return row_dict(row) if row else None

    def active(self) -> list[dict[str, Any]]:
        """Every rollout not final, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(rollouts)
                .where(rollouts.c.status.in_(ACTIVE))
                .order_by(rollouts.c.created_at)
            )
            return [row_dict(r) for r in rows]

    def page(
        self,
        *,
        status: str | None,
        active: bool,
        limit: int,
        offset: int,
        client_id: str | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """Rollouts (those with ``client_id`` among their targets), newest first, and how
        many match."""
        conditions = []
        if status is not None:
            conditions.append(rollouts.c.status == status)
        if active:
            conditions.append(rollouts.c.status.in_(ACTIVE))
        if client_id is not None:
            conditions.append(
                rollouts.c.rollout_id.in_(
                    sa.select(rollout_targets.c.rollout_id).where(
                        rollout_targets.c.client_id == client_id
                    )
                )
            )
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(rollouts)
                .where(*conditions)
                .order_by(rollouts.c.created_at.desc(), rollouts.c.rollout_id)
                .limit(limit)
                .offset(offset)
            )
            items = [row_dict(r) for r in rows]
            total = conn.execute(
                sa.select(sa.func.count()).select_from(rollouts).where(*conditions)
            ).scalar_one()
        return items, int(total)

    def targets(self, rollout_ids: Sequence[str]) -> dict[str, list[Target]]:
        """The targets of each rollout, in order, each with its deployment's and its
        rollback's state (one query)."""
        dep = deployments.alias("d")
        rb = deployments.alias("rb")
        query = (
            sa.select(
                rollout_targets,
                dep.c.status.label("d_status"),
                dep.c.error.label("d_error"),
                dep.c.finished_at.label("d_finished_at"),
                dep.c.created_at.label("d_created_at"),
                dep.c.rolled_back_by.label("d_rolled_back_by"),
                rb.c.status.label("rb_status"),
                rb.c.finished_at.label("rb_finished_at"),
            )
            .select_from(
                rollout_targets.outerjoin(
                    dep, dep.c.deploy_id == rollout_targets.c.deploy_id
                ).outerjoin(rb, rb.c.deploy_id == rollout_targets.c.rollback_id)
            )
            .where(rollout_targets.c.rollout_id.in_(list(rollout_ids)))
            .order_by(rollout_targets.c.rollout_id, rollout_targets.c.position)
        )
        found: dict[str, list[Target]] = {rid: [] for rid in rollout_ids}
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                found[row.rollout_id].append(Target(row_dict(row)))
        return found

    def history(self, rollout_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(rollout_history)
                .where(rollout_history.c.rollout_id == rollout_id)
                .order_by(rollout_history.c.id)
            )
            return [row_dict(r) for r in rows]

    def secret_env(self, row: dict[str, Any]) -> dict[str, str]:
        stored = row.get("secret_env")
        return self.secret_box.open(stored) if stored else {}

    def client_states(self, client_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``connected`` and ``revoked_at`` of these clients (missing: forgotten)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(clients.c.client_id, clients.c.connected, clients.c.revoked_at).where(
                    clients.c.client_id.in_(list(client_ids))
                )
            )
            return {r.client_id: row_dict(r) for r in rows}

    # ------------------------------------------------------------------ changes

    def transition(
        self,
        rollout_id: str,
        expected: Sequence[str],
        status: str,
        message: str,
        **values: Any,
    ) -> dict[str, Any] | None:
        """Move the rollout to ``status`` if it is in one of ``expected`` now (so the
        driver and an operator never undo each other); a history line when the status
        changes.  Returns the row after, or ``None`` when it was not in ``expected``."""
        now = time.time()
        if status in FINAL:
            values.setdefault("finished_at", now)
            values["secret_env"] = None
        with self.engine.begin() as conn:
            current = conn.execute(
                sa.select(rollouts.c.status).where(rollouts.c.rollout_id == rollout_id)
            ).scalar_one_or_none()
            if current is None or current not in expected:
                return None
            conn.execute(
                rollouts.update()
                .where(rollouts.c.rollout_id == rollout_id, rollouts.c.status == current)
                .values(status=status, updated_at=now, **values)
            )
            if current != status or message:
                _history(conn, rollout_id, status, message, now)
            if status == ABORTED or status in FINAL:
                conn.execute(
                    rollout_targets.update()
                    .where(
                        rollout_targets.c.rollout_id == rollout_id,
                        rollout_targets.c.state.in_((T_WAITING, T_STARTING)),
                    )
                    .values(state=T_SKIPPED, error=f"not started: the rollout ended {status}")
                )
        return self.get(rollout_id)

    def update(self, rollout_id: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                rollouts.update()
                .where(rollouts.c.rollout_id == rollout_id)
                .values(updated_at=time.time(), **values)
            )

    def set_target(self, rollout_id: str, position: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                rollout_targets.update()
                .where(
                    rollout_targets.c.rollout_id == rollout_id,
                    rollout_targets.c.position == position,
                )
                .values(**values)
            )

    def choose_deploy_ids(self, rollout_id: str, chosen: dict[int, str], now: float) -> None:
        """Targets about to start (by position): their deployment ids, in one transaction
        committed before any of those deployments is created."""
        with self.engine.begin() as conn:
            for position, deploy_id in chosen.items():
                conn.execute(
                    rollout_targets.update()
                    .where(
                        rollout_targets.c.rollout_id == rollout_id,
                        rollout_targets.c.position == position,
                    )
                    .values(
                        state=T_STARTING,
                        deploy_id=deploy_id,
                        waiting_since=sa.func.coalesce(rollout_targets.c.waiting_since, now),
                    )
                )

    def mark_running(self, rollout_id: str, positions: Sequence[int], now: float) -> None:
        """Targets whose deployments were created."""
        if not positions:
            return
        with self.engine.begin() as conn:
            conn.execute(
                rollout_targets.update()
                .where(
                    rollout_targets.c.rollout_id == rollout_id,
                    rollout_targets.c.position.in_(list(positions)),
                )
                .values(state=T_RUNNING, started_at=now)
            )

    def skip_waiting(self, rollout_id: str, why: str) -> None:
        """Targets not started yet will not be: ``skipped``."""
        with self.engine.begin() as conn:
            conn.execute(
                rollout_targets.update()
                .where(
                    rollout_targets.c.rollout_id == rollout_id,
                    rollout_targets.c.state.in_((T_WAITING, T_STARTING)),
                )
                .values(state=T_SKIPPED, error=why)
            )

    # ------------------------------------------------------------------ the lease

    def take_lease(self, owner: str, seconds: float = LEASE_SECONDS) -> bool:
        """Take or renew the driver's lease; ``False`` while another owner holds it."""
        with self.engine.begin() as conn:
            return acquire(conn, LEASE_NAME, owner, seconds, time.time())

    def release_lease(self, owner: str) -> None:
        with self.engine.begin() as conn:
            release(conn, owner, [LEASE_NAME])


def _history(conn: Connection, rollout_id: str, status: str, message: str, ts: float) -> None:
    conn.execute(
        rollout_history.insert().values(
            rollout_id=rollout_id, status=status, message=message, ts=ts
        )
    )


# --------------------------------------------------------------------------- views


def count_failures(targets: Sequence[Target]) -> int:
    return sum(t.failed for t in targets)


def counts(targets: Sequence[Target], final: bool) -> dict[str, int]:
    """Targets by deployment status, or ``waiting``/``skipped``/``not_started``."""
    found: dict[str, int] = {}
    for t in targets:
        state = t.state
        if t.status is not None:
            key = t.status
        elif state == T_FAILED:
            key = "not_started"
        elif state == T_WAITING and final:
            key = T_SKIPPED
        else:
            key = state
        found[key] = found.get(key, 0) + 1
    return dict(sorted(found.items()))


def render_target(t: Target, final: bool) -> dict[str, Any]:
    state = t.state
    if state == T_WAITING and final:
        state = T_SKIPPED
    return {
        "client_id": t.client_id,
        "deploy_id": t.row["deploy_id"] if t.status is not None else None,
        "state": state,
        "status": t.status,
        "error": t.row["d_error"] if t.status is not None else t.row["error"],
        "started_at": iso_time(t.row["started_at"] or t.row["d_created_at"]),
        "finished_at": iso_time(t.row["d_finished_at"]),
        "rollback_id": t.row["rollback_id"],
        "rollback_status": t.row["rb_status"],
        "rollback_error": t.row["rollback_error"],
    }


def render_summary(row: dict[str, Any], targets: Sequence[Target]) -> dict[str, Any]:
    """A rollout as ``GET /api/rollouts`` lists it (and the live feed sends it)."""
    final = row["status"] in FINAL
    return {
        "rollout_id": row["rollout_id"],
        "status": row["status"],
        "paused_for": row["paused_for"] if row["status"] == PAUSED else None,
        "reason": row["reason"],
        "type": row["kind"],
        "command_type": row["command_type"],
        "created_by": row["created_by"],
        "created_at": iso_time(row["created_at"]),
        "updated_at": iso_time(row["updated_at"]),
        "finished_at": iso_time(row["finished_at"]),
        "selector": row["selector"],
        "strategy": row["strategy"],
        "strategy_asked": row["strategy_asked"],
        "total": row["total"],
        "failures": count_failures(targets),
        "max_failures": row["strategy"]["max_failures"],
        "batch_count": row["batch_count"],
        "current_batch": row["current_batch"],
        "counts": counts(targets, final),
    }


def render_rollout(
    row: dict[str, Any], targets: Sequence[Target], history: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """A rollout as ``GET /api/rollouts/{id}`` shows it."""
    final = row["status"] in FINAL
    by_batch: dict[int, list[Target]] = {}
    for t in targets:
        by_batch.setdefault(t.batch, []).append(t)
    batches = []
    for index in sorted(by_batch):
        members = by_batch[index]
        if all(t.ended for t in members):
            state = T_DONE
        elif any(t.state != T_WAITING for t in members):
            state = T_RUNNING
        else:
            state = T_WAITING
        starts = [t.row["d_created_at"] for t in members if t.row["d_created_at"]]
        ends = [t.row["d_finished_at"] for t in members if t.row["d_finished_at"]]
        batches.append(
            {
                "index": index,
                "canary": index == 0 and bool(row["strategy"]["canary"]),
                "state": state,
                "started_at": iso_time(min(starts)) if starts else None,
                "finished_at": iso_time(max(ends)) if state == T_DONE and ends else None,
                "targets": [render_target(t, final) for t in members],
            }
        )
    request = {k: v for k, v in row["request"].items() if k != "rollback_plan"}
    return {
        **render_summary(row, targets),
        "batches": batches,
        "history": [
            {"status": h["status"], "message": h["message"], "ts": iso_time(h["ts"])}
            for h in history
        ],
        "request": request,
    }


# --------------------------------------------------------------------------- the driver


class RolloutFeed:
    """Fan-out of rollout summaries to live subscribers (the newest matters: a full queue
    drops its oldest).  As with :class:`~deploy_core.server.callbacks.Listeners`, a
    ``remote`` summary was changed on another replica and reaches only the subscribers that
    want those."""

    def __init__(self, queue_size: int = 1000) -> None:
        self._queues: dict[asyncio.Queue[dict[str, Any]], bool] = {}
        self._queue_size = queue_size
        #: Called with the rollout id of every summary published here first (the cluster
        #: bus tells the other replicas).
        self.on_local: Callable[[str], None] | None = None

    def publish(self, summary: dict[str, Any], *, remote: bool = False) -> None:
        if not remote and self.on_local is not None:
            self.on_local(summary["rollout_id"])
        for queue, wants_remote in list(self._queues.items()):
            if remote and not wants_remote:
                continue
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(summary)

    def wants_remote(self) -> bool:
        """Whether anyone here listens for other replicas' rollout changes."""
        return any(self._queues.values())

    @contextlib.asynccontextmanager
    async def subscribe(
        self, *, remote: bool = True
    ) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self._queue_size)
        self._queues[queue] = remote
        try:
            yield queue
        finally:
            self._queues.pop(queue, None)


class Rollouts:
    """The rollouts of a server: the store, the control actions the API calls, and the
    driver task (:meth:`run`)."""

    def __init__(
        self,
        store: RolloutStore,
        deployments: Deployments,
        listeners: Listeners,
        *,
        owner: str,
        rescan_interval: float = RESCAN_INTERVAL,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.store = store
        self.deployments = deployments
        self.listeners = listeners
        self.owner = owner
        self.rescan_interval = rescan_interval
        self.lease_seconds = lease_seconds
        # Renewed well within the lease (a quarter of it at most), as the duty leases are.
        self.renew_every = min(RENEW_EVERY, lease_seconds / 4)
        self.feed = RolloutFeed()
        self._wake = asyncio.Event()
        self._published: dict[str, dict[str, Any]] = {}
        self._renewed = 0.0
        self.holding = False
        self.outage = OutageLog(log, "rollout driver")

    async def db(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def wake(self) -> None:
        """Look at the rollouts now rather than at the next rescan."""
        self._wake.set()

    # ------------------------------------------------------------------ API side

    async def view(self, rollout_id: str) -> dict[str, Any] | None:
        row = await self.db(self.store.get, rollout_id)
        if row is None:
            return None
        targets = (await self.db(self.store.targets, [rollout_id]))[rollout_id]
        history = await self.db(self.store.history, rollout_id)
        return render_rollout(row, targets, history)

    async def summaries(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        targets = await self.db(self.store.targets, [r["rollout_id"] for r in rows])
        return [render_summary(r, targets[r["rollout_id"]]) for r in rows]

    async def control(self, rollout_id: str, action: str, caller: str) -> dict[str, Any]:
        """``pause``, ``resume``, ``promote`` or ``abort``.

        :raises LookupError: no such rollout.
        :raises RolloutConflict: the action does not apply now (the message says why).
        """
        row = await self.db(self.store.get, rollout_id)
        if row is None:
            raise LookupError(rollout_id)
        status = row["status"]
        if status in FINAL:
            raise RolloutConflict(f"rollout {rollout_id} already ended {status}")
        by = f"by {caller}"
        after: dict[str, Any] | None
        if action == "pause":
            if status not in (PENDING, RUNNING):
                raise RolloutConflict(
                    f"rollout {rollout_id} is {status}: only a pending or "
                    "running rollout can be paused"
                )
            after = await self.db(
                self.store.transition, rollout_id, (PENDING, RUNNING), PAUSED,
                f"paused {by}", paused_for=PAUSED_BY_OPERATOR,
            )  # fmt: skip
        elif action == "resume":
            if status != PAUSED:
                raise RolloutConflict(f"rollout {rollout_id} is {status}, not paused")
            if row["paused_for"] == PAUSED_FOR_CANARY:
                raise RolloutConflict(
                    f"rollout {rollout_id} is paused after its canary batch: promote it to go on"
                )
            after = await self.db(
                self.store.transition, rollout_id, (PAUSED,), RUNNING, f"resumed {by}",
                paused_for=None,
            )  # fmt: skip
        elif action == "promote":
            if status != PAUSED or row["paused_for"] != PAUSED_FOR_CANARY:
                raise RolloutConflict(
                    f"rollout {rollout_id} is {status}"
                    + (f" ({row['paused_for']})" if status == PAUSED else "")
                    + ": only a rollout paused after its canary batch can be promoted"
                )
            after = await self.db(
                self.store.transition, rollout_id, (PAUSED,), RUNNING, f"canary promoted {by}",
                paused_for=None, current_batch=1, batch_started_at=time.time(),
            )  # fmt: skip
        elif action == "abort":
            after = await self.db(
                self.store.transition, rollout_id, ACTIVE, ABORTED, f"aborted {by}",
                reason=f"aborted {by}",
            )  # fmt: skip
        else:
            raise ValueError(f"unknown action {action!r}")
        if after is None:  # the driver moved it meanwhile
            now = await self.db(self.store.get, rollout_id)
            raise RolloutConflict(
                f"rollout {rollout_id} changed meanwhile (now {now and now['status']}); look again"
            )
        self.wake()
        await self.publish(rollout_id)
        view = await self.view(rollout_id)
        assert view is not None
        return view

    # ------------------------------------------------------------------ the driver

    async def run(self) -> None:
        """Drive every unfinished rollout while this server holds the lease."""
        # Only this replica's changes wake it early: taking every replica's would make each
        # replica read every changed record off the cluster bus; the rescan every second
        # catches a target finished through another replica.
        async with self.listeners.subscribe("*", remote=False) as changes:
            watcher = asyncio.create_task(self._watch(changes), name="rollout-watch")
            try:
                loop = asyncio.get_running_loop()
                while True:
                    began = loop.time()
                    self._wake.clear()
                    try:
                        await self.drive_once()
                        self.outage.ok()
                    except Exception as exc:
                        if not self.outage.failed(exc):
                            log.exception("rollout driver pass failed")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.rescan_interval)
                    # A pass reads every target of every unfinished rollout: the finishes of a
                    # fleet-wide batch (hundreds a second) share passes instead of each
                    # starting one.
                    await asyncio.sleep(max(0.0, began + MIN_PASS_GAP - loop.time()))
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
                if self.holding:
                    with contextlib.suppress(Exception):
                        await self.db(self.store.release_lease, self.owner)

    async def _watch(self, changes: asyncio.Queue[dict[str, Any]]) -> None:
        """Wake the driver when a deployment finishes (any: it may be a target)."""
        while True:
            record = await changes.get()
            if record.get("finished_at") is not None:
                self._wake.set()

    async def _renew(self) -> bool:
        self.holding = await self.db(self.store.take_lease, self.owner, self.lease_seconds)
        self._renewed = time.monotonic()
        return self.holding

    async def _keep_lease(self) -> None:
        """Renew the lease during a long pass; stop the pass when it was lost."""
        if time.monotonic() - self._renewed > self.renew_every and not await self._renew():
            raise LeaseLost

    async def drive_once(self) -> None:
        """One pass over every unfinished rollout (when this server holds the lease; with
        none unfinished the lease is left alone: no write every second for nothing)."""
        rows = await self.db(self.store.active)
        if not rows:
            return
        fresh = self.holding and time.monotonic() - self._renewed < self.renew_every
        if not fresh and not await self._renew():
            return
        for row in rows:
            try:
                await self._step(row)
            except LeaseLost:
                log.warning("rollout lease lost to another server; it drives from now on")
                return
            except Exception as exc:
                if is_outage(exc):
                    raise  # the rest of the pass would fail the same way: the loop logs it
                log.exception("rollout %s: driver step failed", row["rollout_id"])
            await self.publish(row["rollout_id"])

    async def publish(self, rollout_id: str, *, remote: bool = False) -> None:
        """Send the rollout's summary to live subscribers if it changed since last sent;
        ``remote``: another replica changed it (the cluster bus said so)."""
        row = await self.db(self.store.get, rollout_id)
        if row is None:
            return
        targets = (await self.db(self.store.targets, [rollout_id]))[rollout_id]
        summary = render_summary(row, targets)
        compare = {k: v for k, v in summary.items() if k != "updated_at"}
        if self._published.get(rollout_id) != compare:
            self._published[rollout_id] = compare
            self.feed.publish(summary, remote=remote)
        if row["status"] in FINAL:
            self._published.pop(rollout_id, None)

    async def _step(self, row: dict[str, Any]) -> None:
        rid = row["rollout_id"]
        strategy = row["strategy"]
        if row["status"] == PENDING:
            moved = await self.db(
                self.store.transition, rid, (PENDING,), RUNNING, "started",
                batch_started_at=time.time(),
            )  # fmt: skip
            if moved is None:
                return
            row = moved
        targets = (await self.db(self.store.targets, [rid]))[rid]
        status = row["status"]
        failures = count_failures(targets)
        if status in (RUNNING, PAUSED) and row["reason"] is None:
            why = None
            if failures > strategy["max_failures"]:
                why = (
                    f"{failures} target{'s' if failures != 1 else ''} failed, more than "
                    f"max_failures {strategy['max_failures']}"
                )
            elif self._past_deadline(row, targets):
                why = (
                    f"batch {row['current_batch']} did not finish within its progress "
                    f"deadline of {human_duration(strategy['progress_deadline'])}"
                )
            if why is not None:
                await self._failing(row, why)
                return
        if status == ROLLING_BACK:
            await self._roll_back(row, targets)
            return
        if row["reason"] is not None:
            # Stopping (on_failure: stop): nothing new starts; fail once nothing runs.
            if not any(t.state == T_RUNNING for t in targets):
                await self.db(self.store.transition, rid, (RUNNING, PAUSED), FAILED, row["reason"])
            return
        if all(t.ended for t in targets):
            await self.db(
                self.store.transition, rid, (RUNNING, PAUSED), SUCCEEDED,
                f"every batch done ({failures} failed, max_failures "
                f"{strategy['max_failures']})",
            )  # fmt: skip
            return
        if status != RUNNING:
            return
        current = row["current_batch"]
        batch = [t for t in targets if t.batch == current]
        while batch and all(t.ended for t in batch) and current + 1 < row["batch_count"]:
            if current == 0 and strategy["canary"] and strategy["canary_action"] == "pause":
                await self.db(
                    self.store.transition, rid, (RUNNING,), PAUSED,
                    "canary batch done: promote the rollout to go on",
                    paused_for=PAUSED_FOR_CANARY,
                )  # fmt: skip
                return
            current += 1
            await self.db(
                self.store.update, rid, current_batch=current, batch_started_at=time.time()
            )
            batch = [t for t in targets if t.batch == current]
        await self._start_batch(row, batch)

    def _past_deadline(self, row: dict[str, Any], targets: Sequence[Target]) -> bool:
        deadline = row["strategy"]["progress_deadline"]
        started = row["batch_started_at"]
        if deadline is None or started is None or row["status"] != RUNNING:
            return False
        batch = [t for t in targets if t.batch == row["current_batch"]]
        return time.time() - started > deadline and not all(t.ended for t in batch)

    async def _failing(self, row: dict[str, Any], why: str) -> None:
        """Over the failure budget or past a deadline: start nothing more; with
        ``on_failure: rollback`` undo the targets that succeeded."""
        rid = row["rollout_id"]
        log.warning("rollout %s: %s", rid, why)
        await self.db(self.store.skip_waiting, rid, f"not started: {why}")
        if row["strategy"]["on_failure"] == "rollback":
            await self.db(
                self.store.transition, rid, (RUNNING, PAUSED), ROLLING_BACK,
                f"{why}; rolling back the targets that succeeded", reason=why,
            )  # fmt: skip
        else:
            await self.db(self.store.update, rid, reason=why)
            await self.db(self.store.transition, rid, (RUNNING, PAUSED), row["status"], why)

    async def _start_batch(self, row: dict[str, Any], batch: list[Target]) -> None:
        """Start waiting targets of the current batch while it has free slots, a chunk at a
        time: each chunk's deployment ids are committed in one transaction before any of its
        deployments is created, and the chunk's deployments are submitted together."""
        rid = row["rollout_id"]
        strategy = row["strategy"]
        running = sum(t.state == T_RUNNING for t in batch)
        slots = strategy["max_parallel"] - running
        waiting = [t for t in batch if t.state == T_WAITING]
        if slots <= 0 or not waiting:
            return
        states = await self.db(self.store.client_states, [t.client_id for t in waiting])
        secret_env = self.store.secret_env(row) if row["secret_env"] else None
        for first in range(0, len(waiting), START_CHUNK):
            if slots <= 0:
                return
            await self._keep_lease()
            # An operator may have paused or aborted it meanwhile.
            current = await self.db(self.store.get, rid)
            if current is None or current["status"] != RUNNING or current["reason"]:
                return
            ready: list[Target] = []
            for target in waiting[first : first + START_CHUNK]:
                if len(ready) >= slots:
                    break
                if await self._reachable(row, target, states.get(target.client_id)):
                    ready.append(target)
            if not ready:
                continue
            if first and not await self.deployments.dispatcher.room(
                START_CHUNK, START_PACING_TIMEOUT
            ):
                log.info("rollout %s: commands still unacknowledged after %g s; starting more",
                         rid, START_PACING_TIMEOUT)  # fmt: skip
            now = time.time()
            chosen = {t.row["position"]: t.row["deploy_id"] or uuid.uuid4().hex for t in ready}
            # Chosen and kept before the deployments exist: a restart reuses them.
            await self.db(self.store.choose_deploy_ids, rid, chosen, now)
            started = await self._submit_chunk(row, ready, chosen, now, secret_env)
            positions = [t.row["position"] for t, ok in zip(ready, started, strict=True) if ok]
            await self.db(self.store.mark_running, rid, positions, now)
            slots -= len(positions)

    async def _reachable(
        self, row: dict[str, Any], target: Target, client: dict[str, Any] | None
    ) -> bool:
        """Whether a target's client can be sent its deployment now; a revoked or forgotten
        one is skipped, an offline one waits up to ``offline_timeout`` and then fails."""
        rid = row["rollout_id"]
        position = target.row["position"]
        if client is None or client["revoked_at"] is not None:
            why = "revoked" if client else "no longer enrolled"
            await self.db(self.store.set_target, rid, position, state=T_SKIPPED, error=why)
            return False
        if client["connected"]:
            return True
        now = time.time()
        waited = now - (target.row["waiting_since"] or now)
        limit = row["strategy"]["offline_timeout"]
        if waited > limit:
            await self.db(
                self.store.set_target, rid, position, state=T_FAILED,
                error=f"offline for {human_duration(waited)} (offline_timeout "
                f"{human_duration(limit)})",
            )  # fmt: skip
        elif target.row["waiting_since"] is None:
            await self.db(self.store.set_target, rid, position, waiting_since=now)
        return False

    async def _submit_chunk(
        self,
        row: dict[str, Any],
        ready: list[Target],
        chosen: dict[int, str],
        now: float,
        secret_env: dict[str, str] | None,
    ) -> list[bool]:
        """Create the deployments of ``ready`` (their ids ``chosen`` by position) in one
        transaction and send them; whether each started (see :meth:`_submit`). Were the
        chunk refused as a whole, each target is submitted on its own."""
        deployments = self.deployments
        try:
            scope, artifacts = deployment_scope(
                deployments.plugins, row["command_type"], row["request"]
            )
            specs = [
                NewDeployment(
                    deploy_id=chosen[t.row["position"]],
                    client_id=t.client_id,
                    command_type=row["command_type"],
                    request=row["request"],
                    deadline=now + row["deadline_seconds"],
                    secret_env=secret_env,
                    target=scope,
                    artifacts=artifacts,
                    dispatched=deployments.dispatcher.session_for(t.client_id) is not None,
                )
                for t in ready
            ]
            created, busy = await self.db(deployments.records.create_deployments, specs)
        except Exception as exc:
            if is_outage(exc):
                raise
            log.warning("rollout %s: a chunk of %d could not start together (%s); one by one",
                        row["rollout_id"], len(ready), exc)  # fmt: skip
            submits = (
                self._submit(row, t, chosen[t.row["position"]], now, secret_env) for t in ready
            )
            return list(await asyncio.gather(*submits))
        marked = {spec.deploy_id: spec.dispatched for spec in specs}
        for record in created:
            deployments.record_changed(record, None)
        for record in created:
            await deployments.dispatcher.dispatch(record, marked=marked[record.deploy_id])
        started = []
        for target in ready:
            refused = busy.get(target.client_id)
            if refused is not None:
                await self._busy(row, target, refused, now)
            started.append(refused is None)
        return started

    async def _busy(self, row: dict[str, Any], target: Target, exc: ClientBusy, now: float) -> None:
        """A target's client is busy: skip it, or fail it once it waited ``busy_timeout``
        (until then the next pass tries again)."""
        rid = row["rollout_id"]
        position = target.row["position"]
        strategy = row["strategy"]
        waited = now - (target.row["waiting_since"] or now)
        if strategy["busy"] == "skip":
            await self.db(
                self.store.set_target, rid, position, state=T_SKIPPED,
                error=f"busy with {exc.deploy_id}",
            )  # fmt: skip
        elif waited > strategy["busy_timeout"]:
            await self.db(
                self.store.set_target, rid, position, state=T_FAILED,
                error=f"busy with {exc.deploy_id} for {human_duration(waited)} "
                f"(busy_timeout {human_duration(strategy['busy_timeout'])})",
            )  # fmt: skip

    async def _submit(
        self,
        row: dict[str, Any],
        target: Target,
        deploy_id: str,
        now: float,
        secret_env: dict[str, str] | None,
    ) -> bool:
        """Create one target's deployment with the id chosen for it; whether it started
        (a busy client: skipped, or tried again next pass until ``busy_timeout``)."""
        rid = row["rollout_id"]
        position = target.row["position"]
        try:
            await self.deployments.submit(
                client_id=target.client_id,
                command_type=row["command_type"],
                request=row["request"],
                deadline=now + row["deadline_seconds"],
                secret_env=secret_env,
                deploy_id=deploy_id,
            )
        except ClientBusy as exc:
            await self._busy(row, target, exc, now)
            return False
        except IntegrityError:
            log.info("rollout %s: deployment %s of %s exists already", rid, deploy_id,
                     target.client_id)  # fmt: skip
        except Exception as exc:
            if is_outage(exc):
                raise  # not the target's fault: the next pass tries it again with the same id
            log.exception("rollout %s: could not start %s", rid, target.client_id)
            await self.db(
                self.store.set_target, rid, position, state=T_FAILED,
                error=f"could not start: {exc}",
            )  # fmt: skip
            return False
        return True

    async def _roll_back(self, row: dict[str, Any], targets: list[Target]) -> None:
        """Roll back every target that succeeded, newest first, at most ``max_parallel``
        at once, once nothing of the rollout runs any more; then end."""
        rid = row["rollout_id"]
        if any(t.state == T_RUNNING for t in targets):
            return
        done = [t for t in targets if t.succeeded]
        done.sort(key=lambda t: t.row["d_finished_at"], reverse=True)
        in_flight = sum(1 for t in done if t.row["rollback_id"] and t.row["rb_finished_at"] is None)
        slots = row["strategy"]["max_parallel"] - in_flight
        for t in done:
            if t.row["rollback_id"] or t.row["rollback_error"]:
                continue
            position = t.row["position"]
            if t.row["d_rolled_back_by"]:  # asked for before a restart, or by someone else
                await self.db(
                    self.store.set_target, rid, position, rollback_id=t.row["d_rolled_back_by"]
                )
                continue
            if slots <= 0:
                return
            await self._keep_lease()
            record = await self.db(self.deployments.records.get, t.row["deploy_id"])
            if record is None:
                await self.db(
                    self.store.set_target, rid, position, rollback_error="deployment gone"
                )
                continue
            try:
                rollback = await request_rollback(self.deployments, record)
            except ClientBusy:
                return  # its client runs something else: next pass
            except RollbackRefused as exc:
                await self.db(self.store.set_target, rid, position, rollback_error=str(exc))
                continue
            await self.db(self.store.set_target, rid, position, rollback_id=rollback.deploy_id)
            slots -= 1
        # Everything asked for: end once every rollback ended.
        targets = (await self.db(self.store.targets, [rid]))[rid]
        done = [t for t in targets if t.succeeded]
        if any(t.row["rollback_id"] and t.row["rb_finished_at"] is None for t in done):
            return
        if any(not t.row["rollback_id"] and not t.row["rollback_error"] for t in done):
            return
        bad = [
            f"{t.client_id} ({t.row['rollback_error'] or t.row['rb_status']})"
            for t in done
            if t.row["rollback_error"] or t.row["rb_status"] != DeployStatus.ROLLED_BACK.value
        ]
        if bad:
            await self.db(
                self.store.transition, rid, (ROLLING_BACK,), FAILED,
                f"{row['reason']}; not rolled back: {', '.join(bad)}",
            )  # fmt: skip
        else:
            await self.db(
                self.store.transition, rid, (ROLLING_BACK,), ROLLED_BACK,
                f"{len(done)} target{'s' if len(done) != 1 else ''} rolled back",
            )  # fmt: skip


class LeaseLost(Exception):
    """Another server took the driver's lease."""
