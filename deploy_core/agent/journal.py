"""The agent's durable memory: the deployments it accepted and the messages it owes the
server (DESIGN §3: journal and outbox).

A command is journaled before it is acknowledged, and marked started before it runs, so a
restarted agent never runs a ``deploy_id`` twice and knows which one it was in the middle of.
Status reports and callbacks are written to the outbox in the same transaction that gives
them their sequence number, and stay there until the server acknowledges them.

The journal holds secrets for as long as a deployment runs (its command's ``secret_env``):
the files are private (0600), deleted content is overwritten (``secure_delete``), and a
finished deployment's secret values are removed from its stored command.

Every write goes through one writer thread that commits in groups: what is queued while a
commit is in flight goes into the next transaction (one fsync), and each write is released
(its future done) only after its transaction committed; a lone write is committed at once,
with no timer.  The ``submit_*`` methods return that future without waiting, so the event
loop does not stop for the disk; the plain methods wait for it ("committed on return").
Writes commit in the order they were submitted, so waiting for one write means every write
submitted before it is on disk too.  Reads use a second connection and never wait for a
commit in flight.

The outbox's sender does not read back what was just written: each committed outbox row is
also put in an in-memory feed (:meth:`Journal.committed`), in order, before its write is
released.  The sender reads the database only when the feed cannot answer: after a
reconnection or a resend (it starts again from the oldest unacknowledged event), or after
the feed overflowed (:data:`FEED_MAX`, e.g. while disconnected).

An acknowledgement's delete (:meth:`Journal.submit_ack`) waits up to :data:`ACK_LINGER` for
another write to share its transaction: a report travelling alone then costs its agent one
transaction, not two.  Those deletes are the one exception to the order above (they touch
only rows nothing else writes, so their order does not matter); asking for one's result, and
:meth:`Journal.flush`, hand them over at once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from asyncio import _get_running_loop as asyncio_running_loop
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy_core.models import DeployCommand
from deploy_core.private import private_database

log = logging.getLogger(__name__)

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
# Writes committed in one transaction at most (the rest go in the next).
MAX_GROUP = 256
# Seconds the writer thread waits for work before it ends.
WRITER_IDLE = 10.0
# Rounds of the event loop a write made on it waits, at most, for more to join its group
# (only while other callbacks are ready: an idle loop hands it over at once).
TICK_HOPS = 16
# Committed outbox messages the in-memory feed holds at most, and their bytes (as stored);
# past either it is emptied and the sender reads the database until it has caught up (a long
# disconnection, a flood of output).
FEED_MAX = 1024
FEED_MAX_BYTES = 4 * 1024 * 1024
# Seconds an acknowledgement's delete waits, at most, for another write to join (on an event
# loop; elsewhere it is handed over at once).
ACK_LINGER = 0.25


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
    """SQLite-backed journal and outbox (safe to share between threads; see the module's
    docstring for the writer thread and the ``submit_*`` methods)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Guards the read connection and the outbox's byte count.
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
        # The feed (see the module's text): every outbox row committed with a sequence number
        # above _feed_from, in order, guarded by _lock.  Rows already there are read back.
        (newest,) = self._db.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()
        self._feed: deque[OutboxMessage] = deque()
        self._feed_from = int(newest)
        self._feed_bytes = 0
        # What the writer's transaction in progress inserted into the outbox (writer only).
        self._inserted: list[tuple[int, str, str | None, str, str]] = []
        self._read = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._queue: list[_Write] = []
        # Writes made on the event loop's thread, queued when the loop's step is over.
        self._tick: list[_Write] = []
        self._tick_loop: Any = None
        # Acknowledgements' deletes waiting for company (ACK_LINGER), handed over with the next
        # write or by a timer.
        self._lazy: list[_Write] = []
        self._ready = threading.Condition(threading.Lock())
        self._closing = False
        #: Transactions committed by the writer, and the writes they held (for tests and
        #: benchmarks: writes per transaction).
        self.commits = 0
        self.writes = 0
        # Started by the first write; it ends after WRITER_IDLE seconds without one (an idle
        # agent holds no thread for its journal).
        self._writer: threading.Thread | None = None

    def close(self) -> None:
        """Commit what was submitted, then close the database."""
        with self._ready:
            if self._closing:
                return
            self._closing = True
            self._hand_over()
            self._notify_writer()
            writer = self._writer
        if writer is not None:
            writer.join()
        with self._lock:
            self._read.close()
        self._db.close()

    # ------------------------------------------------------------------ the writer

    def _submit(
        self,
        apply: Callable[[sqlite3.Connection], Any] | None,
        *,
        durable: bool = True,
        size: int = 0,
        checkpoint: Callable[[], bool] | None = None,
        committed: Callable[[Any], None] | None = None,
        at_once: bool = False,
        lazy: bool = False,
    ) -> Future[Any]:
        """Queue one write for the writer; its future is done once it is committed (with
        ``apply``'s result) or failed.  ``size``: bytes it adds to the outbox (counted now,
        so back-pressure sees what is queued too).  ``checkpoint``: asked after the commit
        whether the WAL must be cut back now; ``committed``: called with the result once
        committed, before the future is done.

        Submitted on a thread running an event loop, a write is held until the loop has
        nothing else ready (at most :data:`TICK_HOPS` rounds), so what one step of the agent
        writes goes in one transaction; ``at_once`` hands it (and what is held) to the
        writer now, for a write the caller is about to wait for while other work goes on
        (the disk's time overlaps with it).  Asking the future for its result hands it over
        too, so waiting for it on the loop's own thread cannot hang.  ``lazy`` (on a loop):
        held until another write is handed over, or :data:`ACK_LINGER` seconds."""
        write = _Write(self, apply, durable, size, checkpoint, committed)
        loop = None if at_once else asyncio_running_loop()
        linger = False
        with self._ready:
            if self._closing:
                raise RuntimeError(f"the journal {self.path} is closed")
            if lazy and loop is not None:
                self._lazy.append(write)
                linger = len(self._lazy) == 1
                schedule = False
            elif loop is not None and (not self._tick or self._tick_loop is loop):
                self._tick.append(write)
                self._tick_loop = loop
                schedule = len(self._tick) == 1
            else:
                self._hand_over()
                self._queue.append(write)
                self._notify_writer()
                schedule = False
        if schedule:
            assert loop is not None
            loop.call_soon(self._end_of_tick, loop, 0)
        elif linger:
            assert loop is not None
            loop.call_later(ACK_LINGER, self._end_of_linger)
        if size:
            self._grew(size)
        return write.future

    def _hand_over(self) -> None:
        """Move the writes held for the end of the loop's step, and the lingering
        acknowledgements, to the writer's queue (the caller holds ``_ready``)."""
        for held in (self._lazy, self._tick):
            self._move(held)

    def _move(self, held: list[_Write]) -> None:
        """Move ``held`` (emptied) to the writer's queue, if it holds anything (the caller
        holds ``_ready``)."""
        if held:
            self._queue.extend(held)
            held.clear()
            self._notify_writer()

    def _end_of_linger(self) -> None:
        with self._ready:
            self._move(self._lazy)  # empty if handed over already (a write, a flush, close)

    def _notify_writer(self) -> None:
        """Wake the writer, or start one (the caller holds ``_ready``)."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="journal", daemon=True)
            self._writer.start()
        self._ready.notify()

    def _end_of_tick(self, loop: Any, hops: int) -> None:
        # Other callbacks ready to run may write too (a task woken by the one that wrote):
        # let them, a bounded number of rounds.
        if hops < TICK_HOPS and getattr(loop, "_ready", None):
            loop.call_soon(self._end_of_tick, loop, hops + 1)
            return
        with self._ready:
            self._hand_over()

    def flush(self) -> None:
        """Hand what is held for the end of the event loop's step, and the lingering
        acknowledgements, to the writer now."""
        with self._ready:
            self._hand_over()

    def barrier(self) -> Future[None]:
        """A future done once every write submitted before it is committed; handed to the
        writer at once, with what is held (whoever asks for a barrier waits for it)."""
        return self._submit(None, durable=False, at_once=True)

    def _write_loop(self) -> None:
        while True:
            with self._ready:
                if not self._queue and not self._closing:
                    self._ready.wait(WRITER_IDLE)
                if not self._queue:  # idle (or closing): the next write starts another
                    self._writer = None
                    return
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            try:
                self._commit(group)
            except BaseException as exc:  # the writer goes on; nobody waits forever
                log.exception("journal: the writer failed")
                for write in group:
                    self._release(write, None, exc)

    def _commit(self, group: list[_Write]) -> None:
        """Apply ``group`` in one transaction (each write in its own savepoint, so one that
        fails fails alone), commit, then release each write."""
        results: list[tuple[_Write, Any, BaseException | None]] = []
        work = [w for w in group if w.apply is not None]
        failed: BaseException | None = None
        if work:
            durable = any(w.durable for w in work)
            db = self._db
            try:
                if not durable:
                    db.execute("PRAGMA synchronous=NORMAL")
                db.execute("BEGIN IMMEDIATE")
                self._inserted.clear()
                for write in work:
                    assert write.apply is not None
                    db.execute("SAVEPOINT w")
                    inserted = len(self._inserted)
                    try:
                        result = write.apply(db)
                    except Exception as exc:
                        db.execute("ROLLBACK TO w")
                        db.execute("RELEASE w")
                        del self._inserted[inserted:]
                        results.append((write, None, exc))
                    else:
                        db.execute("RELEASE w")
                        results.append((write, result, None))
                db.execute("COMMIT")
                # Before any write is released: whoever it wakes finds its rows in the feed.
                self._publish()
            except Exception as exc:  # nothing of the group is stored
                self._inserted.clear()
                failed = exc
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        log.exception("journal: rollback failed")
            finally:
                if not durable:
                    try:
                        db.execute("PRAGMA synchronous=FULL")
                    except sqlite3.Error:
                        log.exception("journal: cannot restore synchronous=FULL")
            self.commits += 1
            self.writes += len(work)
            done = [w for w, _result, error in results if error is None]
            if failed is None and any(w.checkpoint is not None and w.checkpoint() for w in done):
                # The old versions of the command's page must not linger in the WAL file
                # either (only then: the checkpoint costs several fsyncs).
                try:
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    log.exception("journal: checkpoint failed")
        if failed is not None:
            for write in group:
                self._release(write, None, failed)
            return
        for write, result, error in results:
            self._release(write, result, error)
        for write in group:
            if write.apply is None:
                self._release(write, None, None)

    def _release(self, write: _Write, result: Any, error: BaseException | None) -> None:
        if write.future.done():
            return
        if error is not None:
            if write.size:
                self._grew(-write.size)
            write.future.set_exception(error)
            return
        if write.committed is not None:
            try:
                write.committed(result)
            except Exception:
                log.exception("journal: after a commit")
        write.future.set_result(result)

    # ------------------------------------------------------------------ deployments

    def accept(self, command: DeployCommand) -> bool:
        """Journal a command; ``False`` when this ``deploy_id`` was seen before."""
        return bool(self.submit_accept(command).result())

    def submit_accept(self, command: DeployCommand, *, at_once: bool = False) -> Future[bool]:
        """:meth:`accept`, not waited for (``at_once``: see :meth:`_submit`)."""
        text = command.model_dump_json()

        def apply(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "INSERT OR IGNORE INTO deployments (deploy_id, command_type, command, state,"
                " accepted_at) VALUES (?, ?, ?, ?, ?)",
                (command.deploy_id, command.command_type, text, ACCEPTED, time.time()),
            )
            return bool(cur.rowcount)

        return self._submit(apply, at_once=at_once)

    def known(self, deploy_id: str) -> bool:
        """Whether a committed write journaled ``deploy_id`` (in any state)."""
        with self._lock:
            row = self._read.execute(
                "SELECT 1 FROM deployments WHERE deploy_id = ?", (deploy_id,)
            ).fetchone()
        return row is not None

    def submit_started(self, deploy_id: str) -> Future[None]:
        """:meth:`mark_started`, not waited for."""
        at = time.time()

        def apply(db: sqlite3.Connection) -> None:
            # Only from accepted: a finished deployment never becomes started again (it
            # would be taken for an interrupted one by the next agent).
            db.execute(
                "UPDATE deployments SET state = ?, started_at = ? WHERE deploy_id = ?"
                " AND state = ?",
                (STARTED, at, deploy_id, ACCEPTED),
            )

        return self._submit(apply)

    def mark_started(self, deploy_id: str) -> None:
        """The deployment is about to run: from now on a restart must not run it again."""
        self.submit_started(deploy_id).result()

    def set_stage(self, deploy_id: str, stage: str) -> None:
        """Remember the stage a deployment reached."""

        def apply(db: sqlite3.Connection) -> None:
            db.execute("UPDATE deployments SET stage = ? WHERE deploy_id = ?", (stage, deploy_id))

        self._submit(apply).result()

    def set_rollback_state(self, deploy_id: str, state: dict[str, Any] | None) -> None:
        """Keep what the rollback strategy prepared."""
        text = json.dumps(state) if state is not None else None

        def apply(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deployments SET rollback_state = ? WHERE deploy_id = ?",
                (text, deploy_id),
            )

        self._submit(apply).result()

    def submit_run(
        self, deploy_id: str, record: dict[str, Any], *, at_once: bool = False
    ) -> Future[None]:
        """:meth:`record_run`, not waited for: committed when the future is done
        (``at_once``: see :meth:`_submit`)."""
        record = dict(record)

        def apply(db: sqlite3.Connection) -> None:
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

        return self._submit(apply, at_once=at_once)

    def record_run(self, deploy_id: str, record: dict[str, Any]) -> None:
        """Add or replace (by its ``run`` name) what identifies the processes of one script
        run of the deployment (:class:`~deploy_core.agent.tracking.RunRecord`); committed
        when this returns, so it is there before the child runs."""
        self.submit_run(deploy_id, record).result()

    def runs(self, deploy_id: str) -> list[dict[str, Any]]:
        """The run records of a deployment, in the order they started."""
        with self._lock:
            row = self._read.execute(
                "SELECT processes FROM deployments WHERE deploy_id = ?", (deploy_id,)
            ).fetchone()
        return list(json.loads(row[0])) if row else []

    def run_cgroups(self) -> set[str]:
        """The cgroup of every run record kept, of any deployment."""
        with self._lock:
            rows = self._read.execute(
                "SELECT processes FROM deployments WHERE processes != '[]'"
            ).fetchall()
        return {r["cgroup"] for (text,) in rows for r in json.loads(text) if r.get("cgroup")}

    def with_runs(self) -> list[str]:
        """Deployments that still have run records (running, or a service left running)."""
        with self._lock:
            rows = self._read.execute(
                "SELECT deploy_id FROM deployments WHERE processes != '[]' ORDER BY accepted_at"
            ).fetchall()
        return [r[0] for r in rows]

    def get(self, deploy_id: str) -> JournalEntry | None:
        """One journaled deployment."""
        with self._lock:
            row = self._read.execute(
                "SELECT deploy_id, command, state, stage, rollback_state, final_status, progress"
                " FROM deployments WHERE deploy_id = ?",
                (deploy_id,),
            ).fetchone()
        return _entry(row) if row else None

    def in_state(self, state: str) -> list[JournalEntry]:
        """Deployments in ``state`` (accepted, started or finished), oldest first."""
        with self._lock:
            rows = self._read.execute(
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
        text = json.dumps(payload)
        self._submit(
            lambda db: self._insert(db, msg_id, deploy_id, name, text), size=len(text)
        ).result()

    def submit_report(
        self,
        deploy_id: str,
        msg_id: str,
        name: str,
        payload: dict[str, Any],
        stage: str,
        *,
        durable: bool = True,
    ) -> Future[int]:
        """:meth:`enqueue_report`, not waited for: the future gives the sequence number once
        the report is committed (and so may be sent)."""
        progress = int(payload.get("progress", 0))
        # The sequence number is only known in the transaction: it is put in front of the
        # payload's text there, so the payload is serialised once, here.
        body = json.dumps({k: v for k, v in payload.items() if k != "seq"})
        rest = body[1:] if body == "{}" else ", " + body[1:]
        size = len('{"seq": 0') + len(rest)  # one digit; corrected once the number is known

        def apply(db: sqlite3.Connection) -> int:
            (seq,) = db.execute(
                "UPDATE deployments SET report_seq = report_seq + 1, stage = ?,"
                " progress = max(progress, ?) WHERE deploy_id = ? RETURNING report_seq",
                (stage, progress, deploy_id),
            ).fetchone()
            self._insert(db, msg_id, deploy_id, name, f'{{"seq": {int(seq)}{rest}')
            return int(seq)

        def count_digits(seq: int) -> None:
            self._grew(len(str(seq)) - 1)

        return self._submit(apply, durable=durable, size=size, committed=count_digits)

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
        return int(
            self.submit_report(deploy_id, msg_id, name, payload, stage, durable=durable).result()
        )

    def submit_finish(
        self, deploy_id: str, status: str, msg_id: str, name: str, payload: dict[str, Any]
    ) -> Future[None]:
        """:meth:`finish`, not waited for: the callback may be sent once the future is done."""
        text = json.dumps(payload)
        holder: dict[str, bool] = {}

        def apply(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT command FROM deployments WHERE deploy_id = ?", (deploy_id,)
            ).fetchone()
            command = json.loads(row[0]) if row else {}
            holder["secrets"] = bool(command.get("secret_env"))
            if holder["secrets"]:
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
            self._insert(db, msg_id, deploy_id, name, text)

        # Only when the command held secrets does the transaction end with a checkpoint.  At
        # once (with the last report and run records held): the deployment's end waits for
        # it, and nothing else of the deployment comes to join it.
        return self._submit(
            apply, size=len(text), checkpoint=lambda: holder.get("secrets", False), at_once=True
        )

    def finish(
        self, deploy_id: str, status: str, msg_id: str, name: str, payload: dict[str, Any]
    ) -> None:
        """Mark a deployment finished and add its callback to the outbox, atomically.

        The stored command loses its secret values (their names stay): nothing needs them
        after the end, and a journal must not keep them at rest."""
        self.submit_finish(deploy_id, status, msg_id, name, payload).result()

    def _insert(
        self,
        db: sqlite3.Connection,
        msg_id: str,
        deploy_id: str | None,
        name: str,
        text: str,
    ) -> None:
        cur = db.execute(
            "INSERT INTO outbox (msg_id, deploy_id, name, payload, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (msg_id, deploy_id, name, text, time.time()),
        )
        assert cur.lastrowid is not None
        self._inserted.append((cur.lastrowid, msg_id, deploy_id, name, text))

    def _publish(self) -> None:
        """Put what the committed transaction inserted into the outbox in the feed (writer
        thread, before the writes are released)."""
        if not self._inserted:
            return
        messages = [
            OutboxMessage(seq, msg_id, deploy_id, name, json.loads(text), size=len(text))
            for seq, msg_id, deploy_id, name, text in self._inserted
        ]
        self._inserted.clear()
        with self._lock:
            self._feed.extend(messages)
            self._feed_bytes += sum(m.size for m in messages)
            if len(self._feed) > FEED_MAX or self._feed_bytes > FEED_MAX_BYTES:
                # Nobody takes them (now): read back when needed.
                self._feed_from = self._feed[-1].seq
                self._feed.clear()
                self._feed_bytes = 0

    def committed(self, *, after: int, limit: int) -> list[OutboxMessage] | None:
        """What :meth:`pending` would return, from the in-memory feed, without a read;
        ``None`` when the feed cannot tell (rows from before it: read the database).  Rows
        up to ``after`` leave the feed: a caller that goes back to an earlier position (to
        send everything unacknowledged again) reads the database."""
        with self._lock:
            if after < self._feed_from:
                return None
            feed = self._feed
            while feed and feed[0].seq <= after:
                gone = feed.popleft()
                self._feed_from = gone.seq
                self._feed_bytes -= gone.size
            return [feed[i] for i in range(min(limit, len(feed)))]

    def _grew(self, size: int) -> None:
        with self._lock:
            self._outbox_bytes += size

    def pending(self, *, after: int = 0, limit: int = 500) -> list[OutboxMessage]:
        """Unacknowledged events in order, after outbox position ``after`` (committed ones
        only: an event is sent only once it is on disk)."""
        with self._lock:
            rows = self._read.execute(
                "SELECT seq, msg_id, deploy_id, name, payload FROM outbox WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [
            OutboxMessage(r[0], r[1], r[2], r[3], json.loads(r[4]), size=len(r[4])) for r in rows
        ]

    def submit_ack(self, msg_id: str) -> Future[int | None]:
        """:meth:`ack`, not waited for (on an event loop it waits up to
        :data:`ACK_LINGER` for another write to join); the future gives the bytes dropped
        (``None``: there was no such event)."""
        return self.submit_acks([msg_id])

    def submit_acks(self, msg_ids: list[str]) -> Future[int | None]:
        """:meth:`submit_ack` for many events at once (one ACK naming them all, capability
        ``ack_refs``): one write; the future gives the bytes dropped in all (``None``: none
        of them was there)."""
        ids = list(msg_ids)

        def apply(db: sqlite3.Connection) -> int | None:
            dropped: int | None = None
            for msg_id in ids:
                row = db.execute(
                    "DELETE FROM outbox WHERE msg_id = ? RETURNING length(payload)", (msg_id,)
                ).fetchone()
                if row is not None:
                    dropped = (dropped or 0) + int(row[0])
            return dropped

        def dropped(size: int | None) -> None:
            if size:
                self._grew(-size)

        return self._submit(apply, durable=False, committed=dropped, lazy=True)

    def ack(self, msg_id: str) -> bool:
        """The server has the event: drop it from the outbox.  Not waited for on disk: an
        acknowledgement lost to a power cut only makes the event go again, and the server
        drops what it already has.  On an event loop the delete waits (up to
        :data:`ACK_LINGER`) for another write's transaction; a wait for its result, as here,
        hands it over at once."""
        return self.submit_ack(msg_id).result() is not None

    def outbox_size(self) -> int:
        """How many events wait for acknowledgement."""
        with self._lock:
            (count,) = self._read.execute("SELECT count(*) FROM outbox").fetchone()
        return int(count)

    def outbox_bytes(self) -> int:
        """Bytes of the events waiting for acknowledgement, or queued to be written (kept in
        memory, cheap)."""
        return self._outbox_bytes


def log_failure(future: Future[Any], what: str) -> None:
    """Log it if the write behind ``future`` fails (for a write nobody waits for)."""

    def check(done: Future[Any]) -> None:
        error = done.exception()
        if error is not None:
            log.error("journal: %s was not stored: %s", what, error)

    future.add_done_callback(check)


class _WriteFuture(Future[Any]):
    """A write's future: asking for its result hands held writes to the writer first."""

    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self._journal = journal

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._journal.flush()
        return super().result(timeout)


class _Write:
    """One queued write: ``apply`` runs in the writer's transaction (``None``: a barrier)."""

    __slots__ = ("apply", "checkpoint", "committed", "durable", "future", "size")

    def __init__(
        self,
        journal: Journal,
        apply: Callable[[sqlite3.Connection], Any] | None,
        durable: bool,
        size: int,
        checkpoint: Callable[[], bool] | None,
        committed: Callable[[Any], None] | None = None,
    ) -> None:
        self.apply = apply
        self.committed = committed
        self.durable = durable
        self.size = size
        self.checkpoint = checkpoint
        self.future: Future[Any] = _WriteFuture(journal)


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
