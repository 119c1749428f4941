"""The agent's durable memory: the deployments it accepted and the messages it owes the
server (DESIGN §3: journal and outbox).

A command is journaled before it is acknowledged, and marked started before it runs, so a
restarted agent never runs a ``deploy_id`` twice and knows which one it was in the middle of.
Status reports and callbacks are written to the outbox in the same transaction that gives
them their sequence number, and stay there until the server acknowledges them.

The journal holds secrets for as long as a deployment runs (its command's ``secret_env``):
the files are private (0600), deleted content is overwritten (``secure_delete``), and a
finished deployment's secret values are removed from its stored command.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy_core.models import DeployCommand
from deploy_core.private import private_database

ACCEPTED = "accepted"
STARTED = "started"
FINISHED = "finished"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    deploy_id TEXT PRIMARY KEY,
    command_type TEXT NOT NULL,
    command TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    report_seq INTEGER NOT NULL DEFAULT -1,
    progress INTEGER NOT NULL DEFAULT 0,
    rollback_state TEXT,
    final_status TEXT,
    accepted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    processes TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT NOT NULL UNIQUE,
    deploy_id TEXT,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


# Pages written to the WAL before it is copied into the database (SQLite's default is 1000)
# and the size the WAL file is cut back to after that (it would keep its largest size): the
# journal on disk stays near what the outbox holds, whatever a deployment prints.
WAL_AUTOCHECKPOINT_PAGES = 128
WAL_SIZE_LIMIT = 512 * 1024


@dataclass(frozen=True)
class OutboxMessage:
    """An event waiting for the server's acknowledgement."""

    seq: int
    msg_id: str
    deploy_id: str | None
    name: str
    payload: dict[str, Any]
    #: Bytes of the payload as stored (JSON).
    size: int = 0


@dataclass(frozen=True)
class JournalEntry:
    """One accepted deployment as the journal knows it."""

    deploy_id: str
    command: DeployCommand
    state: str
    stage: str
    rollback_state: dict[str, Any] | None
    final_status: str | None
    progress: int = 0


class Journal:
    """SQLite-backed journal and outbox (synchronous, safe to share between threads)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        private_database(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # Deleted rows (acknowledged events, removed secrets) are overwritten, not left in
        # free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        # FULL: a report the agent believes written survives a power cut.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        private_database(path)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(deployments)")}
        if "progress" not in columns:  # a journal written by 0.1.0 before this column
            self._db.execute(
                "ALTER TABLE deployments ADD COLUMN progress INTEGER NOT NULL DEFAULT 0"
            )
        if "processes" not in columns:  # a journal from before process tracking
            self._db.execute(
                "ALTER TABLE deployments ADD COLUMN processes TEXT NOT NULL DEFAULT '[]'"
            )
        (outbox_bytes,) = self._db.execute(
            "SELECT coalesce(sum(length(payload)), 0) FROM outbox"
        ).fetchone()
        self._outbox_bytes = int(outbox_bytes)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _tx(self, *, durable: bool = True) -> Any:
        return _Transaction(self, durable)

    # ------------------------------------------------------------------ deployments

    def accept(self, command: DeployCommand) -> bool:
        """Journal a command; ``False`` when this ``deploy_id`` was seen before."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO deployments (deploy_id, command_type, command, state,"
                " accepted_at) VALUES (?, ?, ?, ?, ?)",
                (
                    command.deploy_id,
                    command.command_type,
                    command.model_dump_json(),
                    ACCEPTED,
                    time.time(),
                ),
            )
            return bool(cur.rowcount)

    def mark_started(self, deploy_id: str) -> None:
        """The deployment is about to run: from now on a restart must not run it again."""
        with self._tx() as db:
            db.execute(
                "UPDATE deployments SET state = ?, started_at = ? WHERE deploy_id = ?",
                (STARTED, time.time(), deploy_id),
            )

    def set_stage(self, deploy_id: str, stage: str) -> None:
        """Remember the stage a deployment reached."""
        with self._tx() as db:
            db.execute("UPDATE deployments SET stage = ? WHERE deploy_id = ?", (stage, deploy_id))

    def set_rollback_state(self, deploy_id: str, state: dict[str, Any] | None) -> None:
        """Keep what the rollback strategy prepared."""
        with self._tx() as db:
            db.execute(
                "UPDATE deployments SET rollback_state = ? WHERE deploy_id = ?",
                (json.dumps(state) if state is not None else None, deploy_id),
            )

    def record_run(self, deploy_id: str, record: dict[str, Any]) -> None:
        """Add or replace (by its ``run`` name) what identifies the processes of one script
        run of the deployment (:class:`~deploy_core.agent.tracking.RunRecord`); committed
        when this returns, so it is there before the child runs."""
        with self._tx() as db:
            row = db.execute(
                "SELECT processes FROM deployments WHERE deploy_id = ?", (deploy_id,)
            ).fetchone()
            if row is None:
                return
            runs = [r for r in json.loads(row[0]) if r.get("run") != record["run"]]
            if record.get("state") != "ended":  # a run with nothing left needs no record
                runs.append(record)
            db.execute(
                "UPDATE deployments SET processes = ? WHERE deploy_id = ?",
                (json.dumps(runs), deploy_id),
            )

    def runs(self, deploy_id: str) -> list[dict[str, Any]]:
        """The run records of a deployment, in the order they started."""
        with self._lock:
            row = self._db.execute(
                "SELECT processes FROM deployments WHERE deploy_id = ?", (deploy_id,)
            ).fetchone()
        return list(json.loads(row[0])) if row else []

    def with_runs(self) -> list[str]:
        """Deployments that still have run records (running, or a service left running)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT deploy_id FROM deployments WHERE processes != '[]' ORDER BY accepted_at"
            ).fetchall()
        return [r[0] for r in rows]

    def get(self, deploy_id: str) -> JournalEntry | None:
        """One journaled deployment."""
        with self._lock:
            row = self._db.execute(
                "SELECT deploy_id, command, state, stage, rollback_state, final_status, progress"
                " FROM deployments WHERE deploy_id = ?",
                (deploy_id,),
            ).fetchone()
        return _entry(row) if row else None

    def in_state(self, state: str) -> list[JournalEntry]:
        """Deployments in ``state`` (accepted, started or finished), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT deploy_id, command, state, stage, rollback_state, final_status, progress"
                " FROM deployments WHERE state = ? ORDER BY accepted_at",
                (state,),
            ).fetchall()
        return [_entry(r) for r in rows]

    # ------------------------------------------------------------------ outbox

    def enqueue(
        self, msg_id: str, name: str, payload: dict[str, Any], *, deploy_id: str | None = None
    ) -> None:
        """Add an event to the outbox."""
        with self._tx() as db:
            size = self._insert(db, msg_id, deploy_id, name, payload)
        self._grew(size)

    def enqueue_report(
        self,
        deploy_id: str,
        msg_id: str,
        name: str,
        payload: dict[str, Any],
        stage: str,
        *,
        durable: bool = True,
    ) -> int:
        """Give a status report the deployment's next sequence number and add it to the
        outbox, in one transaction.  Returns the sequence number used.

        :param durable: wait for the disk (``synchronous=FULL``).  ``False`` for a batch of
            log lines that moves nothing: it survives a crash of the agent, and the next
            durable write takes it to the disk; a power cut may lose it."""
        with self._tx(durable=durable) as db:
            (seq,) = db.execute(
                "UPDATE deployments SET report_seq = report_seq + 1, stage = ?,"
                " progress = max(progress, ?) WHERE deploy_id = ? RETURNING report_seq",
                (stage, int(payload.get("progress", 0)), deploy_id),
            ).fetchone()
            size = self._insert(db, msg_id, deploy_id, name, {**payload, "seq": seq})
        self._grew(size)
        return int(seq)

    def finish(
        self, deploy_id: str, status: str, msg_id: str, name: str, payload: dict[str, Any]
    ) -> None:
        """Mark a deployment finished and add its callback to the outbox, atomically.

        The stored command loses its secret values (their names stay): nothing needs them
        after the end, and a journal must not keep them at rest."""
        with self._tx() as db:
            row = db.execute(
                "SELECT command FROM deployments WHERE deploy_id = ?", (deploy_id,)
            ).fetchone()
            command = json.loads(row[0]) if row else {}
            had_secrets = bool(command.get("secret_env"))
            if had_secrets:
                command["secret_env"] = {}
            db.execute(
                "UPDATE deployments SET state = ?, final_status = ?, finished_at = ?,"
                " command = coalesce(?, command) WHERE deploy_id = ?",
                (
                    FINISHED,
                    status,
                    time.time(),
                    json.dumps(command) if row else None,
                    deploy_id,
                ),
            )
            size = self._insert(db, msg_id, deploy_id, name, payload)
        self._grew(size)
        if had_secrets:
            # The old versions of the command's page must not linger in the WAL file either.
            # (Only then: the checkpoint costs several fsyncs, ~13 ms here, and the callback
            # waits for it before it is sent.)
            with self._lock:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @staticmethod
    def _insert(
        db: sqlite3.Connection,
        msg_id: str,
        deploy_id: str | None,
        name: str,
        payload: dict[str, Any],
    ) -> int:
        text = json.dumps(payload)
        db.execute(
            "INSERT INTO outbox (msg_id, deploy_id, name, payload, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (msg_id, deploy_id, name, text, time.time()),
        )
        return len(text)

    def _grew(self, size: int) -> None:
        with self._lock:
            self._outbox_bytes += size

    def pending(self, *, after: int = 0, limit: int = 500) -> list[OutboxMessage]:
        """Unacknowledged events in order, after outbox position ``after``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, msg_id, deploy_id, name, payload FROM outbox WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [
            OutboxMessage(r[0], r[1], r[2], r[3], json.loads(r[4]), size=len(r[4])) for r in rows
        ]

    def ack(self, msg_id: str) -> bool:
        """The server has the event: drop it from the outbox.  Not waited for on disk: an
        acknowledgement lost to a power cut only makes the event go again, and the server
        drops what it already has."""
        with self._tx(durable=False) as db:
            row = db.execute(
                "DELETE FROM outbox WHERE msg_id = ? RETURNING length(payload)", (msg_id,)
            ).fetchone()
        if row is None:
            return False
        with self._lock:
            self._outbox_bytes -= int(row[0])
        return True

    def outbox_size(self) -> int:
        """How many events wait for acknowledgement."""
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(count)

    def outbox_bytes(self) -> int:
        """Bytes of the events waiting for acknowledgement (kept in memory, cheap)."""
        return self._outbox_bytes


class _Transaction:
    def __init__(self, journal: Journal, durable: bool) -> None:
        self.journal = journal
        self.durable = durable

    def __enter__(self) -> sqlite3.Connection:
        self.journal._lock.acquire()
        if not self.durable:
            self.journal._db.execute("PRAGMA synchronous=NORMAL")
        self.journal._db.execute("BEGIN IMMEDIATE")
        return self.journal._db

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.journal._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            if not self.durable:
                self.journal._db.execute("PRAGMA synchronous=FULL")
            self.journal._lock.release()


def _entry(row: Any) -> JournalEntry:
    return JournalEntry(
        deploy_id=row[0],
        command=DeployCommand.model_validate_json(row[1]),
        state=row[2],
        stage=row[3],
        rollback_state=json.loads(row[4]) if row[4] else None,
        final_status=row[5],
        progress=row[6],
    )
