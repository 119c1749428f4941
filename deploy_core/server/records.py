"""Deployment records, status history, logs and the per-client lock (SPEC deploy-19, -22).

This is the one place where a deployment's status moves.  Agent reports carry a per-deploy
``seq``: a report is applied only when its ``seq`` is newer than the last applied one, and
nothing moves a finished record, so late and duplicate reports never move it backwards.  A
deployment finishes once, by the agent's callback or by the server's watchdog, and finishing
releases the client's lock in the same transaction.

The methods are synchronous (SQLAlchemy Core); the async server calls them in a thread.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from deploy_core.models import DeployCallbackPayload, DeployStatus, DeployStatusReport
from deploy_core.server import locks, log_chunks
from deploy_core.server.clients import ClientRecords
from deploy_core.server.db import (
    bulk_insert,
    client_locks,
    clients,
    deploy_artifacts,
    deploy_log_chunks,
    deploy_secrets,
    deployments,
    status_history,
)
from deploy_core.server.locks import ClientBusy
from deploy_core.server.ownership import OwnershipRecords
from deploy_core.server.rows import DeploymentRow, HistoryRow, LockRow, LogLineRow
from deploy_core.server.secret_box import SecretBox, is_sealed
from deploy_core.server.targets import TargetRecords

# How often create_deployment tries when the client's lock changes hands under it.
LOCK_ATTEMPTS = 3
DEFAULT_MAX_LOG_BYTES = 10 * 1024 * 1024
# LogLine.line's limit, which lines of a LogBlock are held to as well.
MAX_LINE_CHARS = 8192
TRUNCATION_MARKER = (
    "[log truncated: this deployment reached its limit of {limit} bytes; further output is dropped]"
)


def _block_lines(text: str) -> list[str]:
    """A :class:`~deploy_core.models.LogBlock`'s lines, each at most as long as a
    :class:`~deploy_core.models.LogLine` may be."""
    lines = text.split("\n")
    if max(map(len, lines)) > MAX_LINE_CHARS:
        lines = [line[:MAX_LINE_CHARS] for line in lines]
    return lines


@dataclass(frozen=True)
class Applied:
    """What applying an agent message did: whether it changed the record, the record after,
    and the status before."""

    applied: bool
    record: DeploymentRow | None
    previous: str | None


@dataclass(frozen=True, slots=True)
class NewDeployment:
    """One deployment for :meth:`RecordStore.create_deployments` (the arguments of
    :meth:`RecordStore.create_deployment`, less ``rollback_of``)."""

    deploy_id: str
    client_id: str
    command_type: str
    request: dict[str, Any]
    deadline: float
    secret_env: dict[str, str] | None = None
    target: str | None = None
    artifacts: Sequence[str] = ()
    dispatched: bool = False

    def as_kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class RecordStore(ClientRecords, OwnershipRecords, TargetRecords):
    """Everything the server stores about deployments (and, through
    :class:`~deploy_core.server.clients.ClientRecords`, about clients; through
    :class:`~deploy_core.server.ownership.OwnershipRecords`, what each agent may name;
    through :class:`~deploy_core.server.targets.TargetRecords`, what is live where)."""

    def __init__(
        self,
        engine: Engine,
        *,
        server_id: str = "server",
        max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
        secret_box: SecretBox | None = None,
    ) -> None:
        """:param secret_box: seals ``secret_env`` in the database (the server's comes from
        its state directory); ``None``: a key that lives only as long as this store."""
        self.engine = engine
        self.server_id = server_id
        self.max_log_bytes = max_log_bytes
        self.secret_box = secret_box if secret_box is not None else SecretBox()

    # ------------------------------------------------------------------ deployments

    def create_deployment(
        self,
        *,
        deploy_id: str,
        client_id: str,
        command_type: str,
        request: dict[str, Any],
        deadline: float,
        rollback_of: str | None = None,
        secret_env: dict[str, str] | None = None,
        target: str | None = None,
        artifacts: Sequence[str] = (),
        dispatched: bool = False,
    ) -> DeploymentRow:
        """Insert a ``pending`` record and take the client's lock, atomically, in one
        transaction that also reads the record back.

        ``dispatched``: the agent is connected and the command is sent as soon as this
        returns, so the record is marked dispatched in the same transaction (a server that
        dies in between claims it sent a command it did not: the agent gets it again when it
        connects, as any unacknowledged one).

        ``secret_env`` is kept apart from the record, sealed, and deleted when it finishes.
        ``target`` names what the deployment changes on its host
        (:meth:`~deploy_core.registry.DeployType.target_key`); ``artifacts`` are the
        SHA-256s it may fetch.

        :raises ClientBusy: another deployment holds the client's lock.
        :raises sqlalchemy.exc.IntegrityError: the record itself was refused, e.g. its
            ``deploy_id`` is taken.
        :raises RuntimeError: the lock changed hands on every one of :data:`LOCK_ATTEMPTS`
            tries (a storm of deployments on one client).
        """
        for _ in range(LOCK_ATTEMPTS):
            now = time.time()
            try:
                with self.engine.begin() as conn:
                    locks.acquire(
                        conn,
                        client_id=client_id,
                        deploy_id=deploy_id,
                        owner=self.server_id,
                        now=now,
                        deadline=deadline,
                    )
                    self._insert_deployment(
                        conn,
                        now=now,
                        deploy_id=deploy_id,
                        client_id=client_id,
                        command_type=command_type,
                        request=request,
                        deadline=deadline,
                        rollback_of=rollback_of,
                        secret_env=secret_env,
                        target=target,
                        artifacts=artifacts,
                        dispatched=dispatched,
                    )
                    record = self._get(conn, deploy_id)
                break
            except locks.LockRaced:
                continue  # the next attempt sees who holds it, or takes it if freed
        else:
            with self.engine.connect() as conn:
                current = locks.holder(conn, client_id)
            if current is None:
                raise RuntimeError(
                    f"could not take the lock of client {client_id} in {LOCK_ATTEMPTS} "
                    "attempts (other deployments kept taking and freeing it); submit again"
                )
            raise ClientBusy(client_id, current.deploy_id, current.acquired_at)
        assert record is not None
        return record

    def create_deployments(
        self, specs: Sequence[NewDeployment]
    ) -> tuple[list[DeploymentRow], dict[str, ClientBusy]]:
        """Many :meth:`create_deployment` in one transaction, with a handful of statements
        whatever their number (a rollout starting a batch of hundreds): the created records,
        and by client id the clients that were busy (their deployments not created). A
        deployment whose id exists already is neither: it was created before (a rollout
        trying a chunk again).

        The records and the locks of all the others commit together, or none of them: when
        anything is refused (a lock taken meanwhile, a ``deploy_id`` taken) nothing is kept
        and :meth:`create_deployment` is used for each instead, whose answer for each one is
        then that one's own.  One spec per client.

        :raises ValueError: two specs name the same client or the same deployment id."""
        if len({s.client_id for s in specs}) != len(specs):
            raise ValueError("create_deployments takes one deployment per client")
        if len({s.deploy_id for s in specs}) != len(specs):
            raise ValueError("create_deployments takes distinct deployment ids")
        if not specs:
            return [], {}
        try:
            return self._create_together(specs)
        except (locks.LockRaced, IntegrityError):
            pass
        created: list[DeploymentRow] = []
        busy: dict[str, ClientBusy] = {}
        for spec in specs:
            try:
                created.append(self.create_deployment(**spec.as_kwargs()))
            except ClientBusy as exc:
                if exc.deploy_id != spec.deploy_id:
                    busy[spec.client_id] = exc
                # else it exists already and holds its client's lock.
            except IntegrityError:
                # Its id is taken: the deployment exists already (a rollout trying again).
                continue
        return created, busy

    def _create_together(
        self, specs: Sequence[NewDeployment]
    ) -> tuple[list[DeploymentRow], dict[str, ClientBusy]]:
        now = time.time()
        with self.engine.begin() as conn:
            held = locks.acquire_many(
                conn,
                {s.client_id: (s.deploy_id, s.deadline) for s in specs},
                owner=self.server_id,
                now=now,
            )
            mine = {s.client_id: s.deploy_id for s in specs}
            busy = {
                cid: ClientBusy(cid, lock.deploy_id, lock.acquired_at)
                for cid, lock in held.items()
                if lock.deploy_id != mine[cid]  # else it exists already and holds the lock
            }
            todo = [s for s in specs if s.client_id not in held]
            if not todo:
                return [], busy
            conn.execute(
                deployments.insert(),
                [
                    {
                        "deploy_id": s.deploy_id,
                        "client_id": s.client_id,
                        "command_type": s.command_type,
                        "status": DeployStatus.PENDING.value,
                        "stage": "pending",
                        "progress": 0,
                        "last_seq": -1,
                        "request": s.request,
                        "rollback_of": None,
                        "rollback_wanted": False,
                        "deadline": s.deadline,
                        "created_at": now,
                        "updated_at": now,
                        "target": s.target,
                        "dispatched_at": now if s.dispatched else None,
                    }
                    for s in todo
                ],
            )
            artifacts = [
                {"deploy_id": s.deploy_id, "sha256": sha}
                for s in todo
                for sha in sorted(set(s.artifacts))
            ]
            if artifacts:
                conn.execute(deploy_artifacts.insert(), artifacts)
            secrets = [
                {"deploy_id": s.deploy_id, "secret_env": self.secret_box.seal(s.secret_env)}
                for s in todo
                if s.secret_env
            ]
            if secrets:
                conn.execute(deploy_secrets.insert(), secrets)
            conn.execute(
                status_history.insert(),
                [
                    {
                        "deploy_id": s.deploy_id,
                        "seq": None,
                        "status": DeployStatus.PENDING.value,
                        "stage": "pending",
                        "progress": 0,
                        "message": "accepted by the server",
                        "source": "server",
                        "ts": now,
                    }
                    for s in todo
                ],
            )
            rows = conn.execute(
                sa.select(deployments).where(
                    deployments.c.deploy_id.in_([s.deploy_id for s in todo])
                )
            )
            by_id = {r.deploy_id: DeploymentRow.from_row(r) for r in rows}
        return [by_id[s.deploy_id] for s in todo], busy

    def _insert_deployment(
        self,
        conn: Connection,
        *,
        now: float,
        deploy_id: str,
        client_id: str,
        command_type: str,
        request: dict[str, Any],
        deadline: float,
        rollback_of: str | None,
        secret_env: dict[str, str] | None,
        target: str | None,
        artifacts: Sequence[str],
        dispatched: bool = False,
    ) -> None:
        """The ``pending`` record, its artifacts, sealed secrets and first history line; a
        rollback's original learns who undoes it."""
        conn.execute(
            _INSERT_DEPLOYMENT,
            {
                "deploy_id": deploy_id,
                "client_id": client_id,
                "command_type": command_type,
                "status": DeployStatus.PENDING.value,
                "stage": "pending",
                "progress": 0,
                "last_seq": -1,
                "request": request,
                "rollback_of": rollback_of,
                "rollback_wanted": False,
                "deadline": deadline,
                "created_at": now,
                "updated_at": now,
                "target": target,
                "dispatched_at": now if dispatched else None,
            },
        )
        if artifacts:
            conn.execute(
                deploy_artifacts.insert(),
                [{"deploy_id": deploy_id, "sha256": sha} for sha in sorted(set(artifacts))],
            )
        if secret_env:
            conn.execute(
                deploy_secrets.insert().values(
                    deploy_id=deploy_id, secret_env=self.secret_box.seal(secret_env)
                )
            )
        if rollback_of is not None:
            conn.execute(
                deployments.update()
                .where(deployments.c.deploy_id == rollback_of)
                .values(rolled_back_by=deploy_id, rollback_wanted=False)
            )
        _history(
            conn,
            deploy_id=deploy_id,
            status=DeployStatus.PENDING.value,
            stage="pending",
            progress=0,
            message="accepted by the server",
            source="server",
            ts=now,
        )

    def lock_holder(self, client_id: str) -> LockRow | None:
        """The lock row of ``client_id``, if one is held."""
        with self.engine.connect() as conn:
            return locks.holder(conn, client_id)

    def locks(self) -> list[LockRow]:
        """Every lock currently held."""
        with self.engine.connect() as conn:
            return locks.held(conn)

    def get(self, deploy_id: str) -> DeploymentRow | None:
        """One deployment record."""
        with self.engine.connect() as conn:
            return self._get(conn, deploy_id)

    def get_many(self, deploy_ids: Sequence[str]) -> list[DeploymentRow]:
        """The records of ``deploy_ids`` that exist, in no particular order."""
        wanted = list(dict.fromkeys(deploy_ids))
        if not wanted:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(_BY_IDS, {"ids": wanted})
            return [DeploymentRow.from_row(r) for r in rows]

    def _get(self, conn: Connection, deploy_id: str) -> DeploymentRow | None:
        row = conn.execute(_GET, {"deploy_id": deploy_id}).first()
        return DeploymentRow.from_row(row) if row else None

    def history(self, deploy_id: str) -> list[HistoryRow]:
        """The status history of a deployment, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(status_history)
                .where(status_history.c.deploy_id == deploy_id)
                .order_by(status_history.c.id)
            )
            return [HistoryRow.from_row(r) for r in rows]

    def logs(self, deploy_id: str, *, after: int = 0, limit: int = 1000) -> list[LogLineRow]:
        """Log lines of a deployment in order, after line id ``after``."""
        with self.engine.connect() as conn:
            return log_chunks.read(conn, deploy_id, after=after, limit=limit)

    def list_for_client(
        self, client_id: str, *, limit: int = 50, offset: int = 0
    ) -> tuple[list[DeploymentRow], int]:
        """A client's deployments, newest first, and how many there are in all."""
        with self.engine.connect() as conn:
            total = conn.execute(
                sa.select(sa.func.count())
                .select_from(deployments)
                .where(deployments.c.client_id == client_id)
            ).scalar_one()
            rows = conn.execute(
                sa.select(deployments)
                .where(deployments.c.client_id == client_id)
                .order_by(deployments.c.created_at.desc(), deployments.c.deploy_id)
                .limit(limit)
                .offset(offset)
            )
            return [DeploymentRow.from_row(r) for r in rows], int(total)

    def list_all(
        self,
        *,
        status: str | None = None,
        client_id: str | None = None,
        unfinished: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[DeploymentRow], int]:
        """Deployments of every client, newest first, optionally filtered; and the total."""
        where = []
        if status is not None:
            where.append(deployments.c.status == status)
        if client_id is not None:
            where.append(deployments.c.client_id == client_id)
        if unfinished:
            where.append(deployments.c.finished_at.is_(None))
        with self.engine.connect() as conn:
            total = conn.execute(
                sa.select(sa.func.count()).select_from(deployments).where(*where)
            ).scalar_one()
            rows = conn.execute(
                sa.select(deployments)
                .where(*where)
                .order_by(deployments.c.created_at.desc(), deployments.c.deploy_id)
                .limit(limit)
                .offset(offset)
            )
            return [DeploymentRow.from_row(r) for r in rows], int(total)

    def apply_report(self, client_id: str, report: DeployStatusReport) -> Applied:
        """Apply a ``deploy.status`` report from ``client_id`` (SPEC deploy-21).

        History and logs of a new ``seq`` are always kept; the record's status moves only
        while it is not finished.
        """
        with self.engine.begin() as conn:
            return self.apply_report_in(conn, client_id, report)

    def apply_report_in(
        self, conn: Connection, client_id: str, report: DeployStatusReport
    ) -> Applied:
        """:meth:`apply_report` in the caller's transaction; the record's row is locked until
        that transaction ends."""
        return self.apply_reports_in(conn, [(client_id, report)])[0]

    def apply_reports_in(
        self, conn: Connection, reports: Sequence[tuple[str, DeployStatusReport]]
    ) -> list[Applied]:
        """Many ``(client_id, report)`` in the caller's transaction, with what applying them
        one after another would give, in few statements: one read (locking) of the records
        they name, one ``UPDATE`` per record (``executemany``) and one ``INSERT`` of their
        history lines, in order (server/ingest.py's batches).  A report's ``seq`` must be
        newer than the last applied; nothing moves a finished record's status (its history
        and logs are still kept)."""
        records = _locked(conn, {report.deploy_id for _client, report in reports})
        changed: dict[str, DeploymentRow] = {}
        lines: list[tuple[Any, ...]] = []
        results: list[Applied] = []
        for client_id, report in reports:
            record = records.get(report.deploy_id)
            if record is None or record.client_id != client_id:
                results.append(Applied(False, None, None))
                continue
            previous = record.status
            if report.seq <= record.last_seq:
                results.append(Applied(False, record, previous))
                continue
            moved = record.finished_at is None
            if moved:
                record = record.replaced(
                    last_seq=report.seq,
                    updated_at=time.time(),
                    status=report.status.value,
                    stage=report.stage,
                    progress=report.progress,
                )
            else:
                record = record.replaced(last_seq=report.seq, updated_at=time.time())
            message = report.message if moved else f"(after finish) {report.message}"
            lines.append((report.deploy_id, report.seq, report.status.value, report.stage,
                          report.progress, message, "agent", report.timestamp))  # fmt: skip
            if report.logs or report.log_blocks:
                record = self._store_logs(conn, record, report)
            # The next report of this deployment in the batch starts from this one.
            records[report.deploy_id] = changed[report.deploy_id] = record
            results.append(Applied(moved, record, previous))
        if changed:
            conn.execute(
                _MOVE,
                [{"key": key, **{c: getattr(r, c) for c in _MOVED}} for key, r in changed.items()],
            )
        bulk_insert(conn, status_history, _HISTORY_COLUMNS, lines)
        return results

    def _store_logs(
        self, conn: Connection, record: DeploymentRow, report: DeployStatusReport
    ) -> DeploymentRow:
        """Keep a report's log lines within the deployment's byte limit; past it, one marker
        line says the rest was dropped.  Returns ``record`` with its new byte count."""
        if record.log_truncated:
            return record
        budget = self.max_log_bytes - record.log_bytes
        kept: list[log_chunks.Entry] = []
        used = 0
        truncated = False
        entries = [(line.ts, line.stream, line.stage, [line.line]) for line in report.logs]
        entries += [(b.ts, b.stream, b.stage, _block_lines(b.text)) for b in report.log_blocks]
        for ts, stream, stage, lines in entries:
            size = len("\n".join(lines).encode()) - len(lines) + 1  # the lines, not newlines
            if used + size <= budget:
                used += size
                kept.append((ts, stream, stage, lines))
                continue
            fit = 0  # the limit falls inside: up to the line that does not fit
            for line in lines:
                size = len(line.encode())
                if used + size > budget:
                    break
                used += size
                fit += 1
            kept.append((ts, stream, stage, lines[:fit]))
            truncated = True
            break
        if truncated:
            marker = TRUNCATION_MARKER.format(limit=self.max_log_bytes)
            kept.append((time.time(), "server", report.stage, [marker]))
        log_chunks.append(conn, report.deploy_id, kept)
        conn.execute(
            deployments.update()
            .where(deployments.c.deploy_id == report.deploy_id)
            .values(log_bytes=record.log_bytes + used, log_truncated=truncated)
        )
        return record.replaced(log_bytes=record.log_bytes + used, log_truncated=truncated)

    def secret_env(self, deploy_id: str) -> dict[str, str]:
        """The secret environment of an unfinished deployment (empty when none)."""
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(deploy_secrets.c.secret_env).where(
                    deploy_secrets.c.deploy_id == deploy_id
                )
            ).scalar_one_or_none()
        return self.secret_box.open(value) if value else {}

    def seal_plaintext_secrets(self) -> int:
        """Seal the secret environments an older server stored in plaintext; returns how
        many rows it sealed."""
        sealed = 0
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(deploy_secrets)).all()
            for row in rows:
                if is_sealed(row.secret_env):
                    continue
                conn.execute(
                    deploy_secrets.update()
                    .where(deploy_secrets.c.deploy_id == row.deploy_id)
                    .values(secret_env=self.secret_box.seal(dict(row.secret_env)))
                )
                sealed += 1
        return sealed

    def finish(self, client_id: str, callback: DeployCallbackPayload) -> Applied:
        """Apply the agent's ``command.callback`` (SPEC deploy-20): the first finish wins and
        releases the lock.  A callback for a record the watchdog already finished is kept as
        the agent's truth (``agent_status``) beside the server's verdict."""
        with self.engine.begin() as conn:
            return self.finish_in(conn, client_id, callback)

    def finish_in(
        self, conn: Connection, client_id: str, callback: DeployCallbackPayload
    ) -> Applied:
        """:meth:`finish` in the caller's transaction (server/ingest.py)."""
        now = time.time()
        rec = conn.execute(
            sa.select(deployments)
            .where(
                deployments.c.deploy_id == callback.callback_id,
                deployments.c.client_id == client_id,
            )
            .with_for_update()
        ).first()
        if rec is None:
            return Applied(False, None, None)
        record = DeploymentRow.from_row(rec)
        previous = record.status
        if record.finished_at is not None:
            # Keep the first late callback, even one that agrees with the watchdog: a
            # record the agent finished already has agent_status, so repeats change nothing.
            if record.agent_status is None:
                late: dict[str, Any] = {"agent_status": callback.status.value}
                if callback.rollback_state is not None:
                    # What the agent prepared is what a manual rollback restores.
                    late["rollback_state"] = callback.rollback_state
                if callback.rollback is not None and record.rollback is None:
                    # The agent rolled back after the server's deadline: the record says
                    # so where a reader looks, not only in agent_status.
                    late["rollback"] = callback.rollback.model_dump(mode="json")
                conn.execute(
                    deployments.update()
                    .where(deployments.c.deploy_id == callback.callback_id)
                    .values(**late, updated_at=now)
                )
                _history(
                    conn,
                    deploy_id=callback.callback_id,
                    status=callback.status.value,
                    stage="callback",
                    progress=100,
                    message=f"late callback from the agent: {callback.status.value}"
                    f"{': ' + callback.error if callback.error else ''}",
                    source="agent",
                    ts=now,
                )
            return Applied(False, self._get(conn, callback.callback_id), previous)
        conn.execute(
            deployments.update()
            .where(deployments.c.deploy_id == callback.callback_id)
            .values(
                status=callback.status.value,
                stage=callback.status.value,
                progress=100,
                result=callback.result,
                error=callback.error,
                health=[h.model_dump(mode="json") for h in callback.health],
                rollback=callback.rollback.model_dump(mode="json") if callback.rollback else None,
                rollback_state=callback.rollback_state,
                agent_status=callback.status.value,
                updated_at=now,
                finished_at=now,
            )
        )
        _history(
            conn,
            deploy_id=callback.callback_id,
            status=callback.status.value,
            stage=callback.status.value,
            progress=100,
            message=callback.error or ("succeeded" if callback.success else "finished"),
            source="agent",
            ts=now,
        )
        self._release(conn, record.client_id, callback.callback_id)
        return Applied(True, self._get(conn, callback.callback_id), previous)

    def finish_many_in(
        self, conn: Connection, callbacks: Sequence[tuple[str, DeployCallbackPayload]]
    ) -> list[Applied]:
        """Many ``(client_id, callback)`` in the caller's transaction, with what
        :meth:`finish_in` one after another would give, in a few statements whatever their
        number (the ingest's batches, when a rollout's agents finish together): one locking
        read of the records, one ``UPDATE`` (``executemany``), one ``INSERT`` of the history
        lines, the locks and secrets freed in two ``DELETE``s, one read back.  The rare cases
        (a record finished already, the same deployment twice in the batch) go through
        :meth:`finish_in` in order."""
        named = sorted({cb.callback_id for _client, cb in callbacks})
        if len(named) != len(callbacks):
            return [self.finish_in(conn, client_id, cb) for client_id, cb in callbacks]
        records = _locked(conn, set(named))
        now = time.time()
        finishing: list[tuple[str, DeployCallbackPayload, DeploymentRow]] = []
        results: dict[str, Applied] = {}
        for client_id, cb in callbacks:
            record = records.get(cb.callback_id)
            if record is None or record.client_id != client_id:
                results[cb.callback_id] = Applied(False, None, None)
            elif record.finished_at is not None:
                results[cb.callback_id] = self.finish_in(conn, client_id, cb)
            else:
                finishing.append((client_id, cb, record))
        if finishing:
            conn.execute(
                _FINISH,
                [
                    {
                        "key": cb.callback_id,
                        "status": cb.status.value,
                        "stage": cb.status.value,
                        "progress": 100,
                        "result": cb.result,
                        "error": cb.error,
                        "health": [h.model_dump(mode="json") for h in cb.health],
                        "rollback": cb.rollback.model_dump(mode="json") if cb.rollback else None,
                        "rollback_state": cb.rollback_state,
                        "agent_status": cb.status.value,
                        "updated_at": now,
                        "finished_at": now,
                    }
                    for _client, cb, _record in finishing
                ],
            )
            lines = [
                (cb.callback_id, None, cb.status.value, cb.status.value, 100,
                 cb.error or ("succeeded" if cb.success else "finished"), "agent", now)
                for _client, cb, _record in finishing
            ]  # fmt: skip
            bulk_insert(conn, status_history, _HISTORY_COLUMNS, lines)
            ids = [cb.callback_id for _client, cb, _record in finishing]
            conn.execute(_FORGET_SECRETS, {"ids": ids})
            held = [{"client": r.client_id, "deploy": r.deploy_id} for _c, _cb, r in finishing]
            conn.execute(_FREE_LOCK, held)
            after = conn.execute(_BY_IDS, {"ids": ids})
            done = {row.deploy_id: DeploymentRow.from_row(row) for row in after}
            for _client, cb, record in finishing:
                results[cb.callback_id] = Applied(True, done[cb.callback_id], record.status)
        return [results[cb.callback_id] for _client, cb in callbacks]

    def expire(self, deploy_id: str, reason: str, *, rollback_wanted: bool = True) -> Applied:
        """The watchdog's verdict: mark an unfinished deployment ``timeout`` and free its
        client (SPEC deploy-31)."""
        now = time.time()
        with self.engine.begin() as conn:
            rec = conn.execute(
                sa.select(deployments).where(deployments.c.deploy_id == deploy_id).with_for_update()
            ).first()
            if rec is None or rec.finished_at is not None:
                return Applied(
                    False, DeploymentRow.from_row(rec) if rec else None, rec.status if rec else None
                )
            previous = rec.status
            # Sent counts: the agent may have run it even if its acknowledgement was lost; a
            # rollback of one it never ran is answered "nothing to undo" by the agent.
            executed = (
                rec.dispatched_at is not None or rec.acked_at is not None or rec.last_seq >= 0
            )
            conn.execute(
                deployments.update()
                .where(deployments.c.deploy_id == deploy_id)
                .values(
                    status=DeployStatus.TIMEOUT.value,
                    stage="timeout",
                    error=reason,
                    rollback_wanted=rollback_wanted and executed,
                    updated_at=now,
                    finished_at=now,
                )
            )
            _history(
                conn,
                deploy_id=deploy_id,
                status=DeployStatus.TIMEOUT.value,
                stage="timeout",
                progress=rec.progress,
                message=reason,
                source="server",
                ts=now,
            )
            self._release(conn, rec.client_id, deploy_id)
            return Applied(True, self._get(conn, deploy_id), previous)

    def overdue(self, now: float | None = None) -> list[DeploymentRow]:
        """Unfinished deployments past their deadline."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deployments).where(
                    deployments.c.finished_at.is_(None), deployments.c.deadline < now
                )
            )
            return [DeploymentRow.from_row(r) for r in rows]

    def undelivered(self, client_id: str) -> list[DeploymentRow]:
        """Unfinished deployments of ``client_id`` the agent has not acknowledged, oldest
        first: they are (re)sent when the agent connects."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deployments)
                .where(
                    deployments.c.client_id == client_id,
                    deployments.c.finished_at.is_(None),
                    deployments.c.acked_at.is_(None),
                )
                .order_by(deployments.c.created_at)
            )
            return [DeploymentRow.from_row(r) for r in rows]

    def prune(self, older_than: float, *, batch: int = 500) -> int:
        """Delete finished deployments that finished before ``older_than`` (epoch seconds),
        with their history, logs and secrets; unfinished ones are never touched.  Works in
        batches so a large clean-up does not hold one long transaction.  Returns how many
        deployments were deleted."""
        deleted = 0
        while True:
            with self.engine.begin() as conn:
                ids = list(
                    conn.execute(
                        sa.select(deployments.c.deploy_id)
                        .where(
                            deployments.c.finished_at.is_not(None),
                            deployments.c.finished_at < older_than,
                        )
                        .limit(batch)
                    ).scalars()
                )
                if not ids:
                    return deleted
                for table in (status_history, deploy_log_chunks, deploy_secrets, deploy_artifacts):
                    conn.execute(table.delete().where(table.c.deploy_id.in_(ids)))
                conn.execute(
                    deployments.update()
                    .where(deployments.c.rollback_of.in_(ids))
                    .values(rollback_of=None)
                )
                conn.execute(
                    deployments.update()
                    .where(deployments.c.rolled_back_by.in_(ids))
                    .values(rolled_back_by=None)
                )
                conn.execute(deployments.delete().where(deployments.c.deploy_id.in_(ids)))
                deleted += len(ids)

    def note(self, deploy_id: str, message: str) -> None:
        """Add a server's line to a deployment's history without moving its status (e.g.
        why a cascade of rollbacks stopped there)."""
        with self.engine.begin() as conn:
            record = self._get(conn, deploy_id)
            if record is None:
                return
            _history(
                conn,
                deploy_id=deploy_id,
                status=record.status,
                stage=record.stage,
                progress=record.progress,
                message=message,
                source="server",
                ts=time.time(),
            )

    def claim_dispatch(self, deploy_id: str) -> bool:
        """Mark an unfinished, never-sent deployment dispatched; ``False`` when it was sent
        already (by this replica or another), acknowledged or finished.  The one
        compare-and-set that makes a command announced to several replicas leave once
        (server/cluster_bus.py)."""
        with self.engine.begin() as conn:
            result = conn.execute(
                deployments.update()
                .where(
                    deployments.c.deploy_id == deploy_id,
                    deployments.c.dispatched_at.is_(None),
                    deployments.c.acked_at.is_(None),
                    deployments.c.finished_at.is_(None),
                )
                .values(dispatched_at=time.time())
            )
            return result.rowcount == 1

    def unsent_for_server(self) -> list[DeploymentRow]:
        """Unfinished deployments never sent whose agent this replica holds, oldest first:
        what a replica looks for when a notification may have been missed."""
        held = sa.select(clients.c.client_id).where(
            clients.c.server_id == self.server_id, clients.c.connected.is_(True)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deployments)
                .where(
                    deployments.c.client_id.in_(held),
                    deployments.c.finished_at.is_(None),
                    deployments.c.dispatched_at.is_(None),
                    deployments.c.acked_at.is_(None),
                )
                .order_by(deployments.c.created_at)
            )
            return [DeploymentRow.from_row(r) for r in rows]

    def mark_dispatched(self, deploy_id: str) -> None:
        """The command was handed to the transport."""
        self._set(deploy_id, dispatched_at=time.time())

    def mark_acked(self, client_id: str, deploy_id: str) -> bool:
        """Agent ``client_id`` acknowledged (journaled) the command; ``False`` (and nothing
        changed) when ``deploy_id`` is not a deployment of that client."""
        with self.engine.begin() as conn:
            return self.mark_acked_in(conn, client_id, deploy_id)

    @staticmethod
    def mark_acked_in(conn: Connection, client_id: str, deploy_id: str) -> bool:
        """:meth:`mark_acked` in the caller's transaction (server/ingest.py)."""
        owned = conn.execute(
            sa.select(deployments.c.acked_at).where(
                deployments.c.deploy_id == deploy_id, deployments.c.client_id == client_id
            )
        ).first()
        if owned is None:
            return False
        if owned.acked_at is None:
            conn.execute(
                deployments.update()
                .where(deployments.c.deploy_id == deploy_id)
                .values(acked_at=time.time())
            )
        return True

    @staticmethod
    def mark_acked_many_in(conn: Connection, acks: Sequence[tuple[str, str]]) -> list[bool]:
        """Many ``(client_id, deploy_id)`` :meth:`mark_acked_in` in two statements (the
        ingest's batch, when a rollout's agents acknowledge their commands together):
        whether each deployment is the client's."""
        named = sorted({deploy_id for _client, deploy_id in acks})
        rows = conn.execute(_ACK_READ, {"ids": named}).all()
        found = {row.deploy_id: row for row in rows}
        owned = [
            (row := found.get(deploy_id)) is not None and row.client_id == client_id
            for client_id, deploy_id in acks
        ]
        fresh = sorted(
            {
                d
                for (_c, d), mine in zip(acks, owned, strict=True)
                if mine and found[d].acked_at is None
            }
        )
        if fresh:
            conn.execute(_ACK, {"ids": fresh, "now": time.time()})
        return owned

    def _set(self, deploy_id: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                deployments.update().where(deployments.c.deploy_id == deploy_id).values(**values)
            )

    @staticmethod
    def _release(conn: Connection, client_id: str, deploy_id: str) -> None:
        """Free the client and forget the finished deployment's secrets."""
        conn.execute(deploy_secrets.delete().where(deploy_secrets.c.deploy_id == deploy_id))
        locks.release(conn, client_id, deploy_id)


# What a report changes in its record, and a history line's columns (apply_reports_in).
_MOVED = ("status", "stage", "progress", "last_seq", "updated_at")
# What a callback sets in a record it finishes (finish_many_in).
_FINISHED = (
    "status", "stage", "progress", "result", "error", "health", "rollback", "rollback_state",
    "agent_status", "updated_at", "finished_at",
)  # fmt: skip
_HISTORY_COLUMNS = ("deploy_id", "seq", "status", "stage", "progress", "message", "source", "ts")


def _locked(conn: Connection, deploy_ids: set[str]) -> dict[str, DeploymentRow]:
    """The records of ``deploy_ids`` that exist, read with a lock for update (PostgreSQL; in
    id order, so that two transactions take them in the same order)."""
    rows = conn.execute(_LOCKED, {"ids": sorted(deploy_ids)})
    return {row.deploy_id: DeploymentRow.from_row(row) for row in rows}


# The statements of the ingest's hot path, built once (building one cost more than running
# it, for a report or two): executed with their parameters.
_LOCKED = (
    sa.select(deployments)
    .where(deployments.c.deploy_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(deployments.c.deploy_id)
    .with_for_update()
)
_BY_IDS = sa.select(deployments).where(
    deployments.c.deploy_id.in_(sa.bindparam("ids", expanding=True))
)
_MOVE = (
    deployments.update()
    .where(deployments.c.deploy_id == sa.bindparam("key"))
    .values({name: sa.bindparam(name) for name in _MOVED})
)
_FINISH = (
    deployments.update()
    .where(deployments.c.deploy_id == sa.bindparam("key"))
    .values({name: sa.bindparam(name) for name in _FINISHED})
)
_FORGET_SECRETS = deploy_secrets.delete().where(
    deploy_secrets.c.deploy_id.in_(sa.bindparam("ids", expanding=True))
)
_FREE_LOCK = client_locks.delete().where(
    client_locks.c.client_id == sa.bindparam("client"),
    client_locks.c.deploy_id == sa.bindparam("deploy"),
)
_GET = sa.select(deployments).where(deployments.c.deploy_id == sa.bindparam("deploy_id"))
_INSERT_HISTORY = status_history.insert()
_INSERT_DEPLOYMENT = deployments.insert()
_ACK_READ = sa.select(
    deployments.c.deploy_id, deployments.c.client_id, deployments.c.acked_at
).where(deployments.c.deploy_id.in_(sa.bindparam("ids", expanding=True)))
_ACK = (
    deployments.update()
    .where(
        deployments.c.deploy_id.in_(sa.bindparam("ids", expanding=True)),
        deployments.c.acked_at.is_(None),
    )
    .values(acked_at=sa.bindparam("now"))
)


def _history(
    conn: Connection,
    *,
    deploy_id: str,
    status: str,
    stage: str,
    progress: int,
    message: str,
    source: str,
    ts: float,
    seq: int | None = None,
) -> None:
    """Add a line to a deployment's status history (``seq``: the agent report's, if any)."""
    conn.execute(
        _INSERT_HISTORY,
        {
            "deploy_id": deploy_id,
            "seq": seq,
            "status": status,
            "stage": stage,
            "progress": progress,
            "message": message,
            "source": source,
            "ts": ts,
        },
    )
