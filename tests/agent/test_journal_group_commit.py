"""The agent's journal commits in groups through one writer thread: many writers share a
transaction, a write that fails fails alone, reads never see (or wait for) what is not
committed, and what a writer was told is committed survives a SIGKILL of the agent.  Real
SQLite files, real threads, a real process killed mid-flood."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from deploy_core.agent import journal as journal_module
from deploy_core.agent.journal import Journal
from deploy_core.models import DeployCommand

WAIT = 30.0


def command(deploy_id: str) -> DeployCommand:
    return DeployCommand(
        deploy_id=deploy_id, command_type="deploy.test", params={}, expires_at=time.time() + 60
    )


def report(n: int) -> dict[str, object]:
    return {"status": "executing", "progress": n, "message": f"report {n}", "seq": 0}


def held(journal: Journal) -> tuple[threading.Event, Future[object]]:
    """Keep the writer busy inside a transaction until the event is set; what is submitted
    meanwhile goes into the next group."""
    release = threading.Event()
    entered = threading.Event()

    def hold(_db: sqlite3.Connection) -> None:
        entered.set()
        release.wait(WAIT)

    future = journal._submit(hold, at_once=True)
    assert entered.wait(WAIT)
    return release, future


def stored_payloads(path: Path) -> list[dict[str, object]]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT payload FROM outbox ORDER BY seq").fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def test_writes_queued_meanwhile_share_one_transaction(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        journal.accept(command("d1"))
        release, first = held(journal)
        commits = journal.commits
        futures = [
            journal.submit_report("d1", f"st-{n}", "status", report(n), "executing")
            for n in range(100)
        ]
        # Not committed yet: not readable, so not sendable.
        assert journal.pending() == []
        assert not any(f.done() for f in futures)
        release.set()
        first.result(WAIT)
        assert [f.result(WAIT) for f in futures] == list(range(100))
        assert journal.commits - commits == 2  # the held one, then all 100 in one
        sent = journal.pending(limit=1000)
        assert [m.msg_id for m in sent] == [f"st-{n}" for n in range(100)]
        assert [m.payload["seq"] for m in sent] == list(range(100))
        assert [m.payload["progress"] for m in sent] == list(range(100))
        assert journal.outbox_bytes() == sum(m.size for m in sent)
    finally:
        journal.close()


def test_a_failing_write_fails_alone_in_its_group(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        journal.accept(command("d1"))
        commits = journal.commits
        release, first = held(journal)
        before = journal.submit_report("d1", "st-a", "status", report(1), "executing")
        # No such deployment: the report cannot get a sequence number.
        bad = journal.submit_report("nope", "st-bad", "status", report(2), "executing")
        # The same message id twice: the outbox refuses the second.
        dup = journal.submit_report("d1", "st-a", "status", report(3), "executing")

        def half_done(db: sqlite3.Connection) -> None:
            journal._insert(db, "ev-half", "d1", "status", "{}")
            raise ValueError("this write fails after its insert")

        # A write that did part of its work before it failed leaves none of it.
        half = journal._submit(half_done, at_once=True)
        after = journal.submit_finish("d1", "success", "cb-1", "callback", {"ok": True})
        release.set()
        first.result(WAIT)
        assert before.result(WAIT) == 0
        with pytest.raises(TypeError):
            bad.result(WAIT)
        with pytest.raises(sqlite3.IntegrityError):
            dup.result(WAIT)
        with pytest.raises(ValueError):
            half.result(WAIT)
        after.result(WAIT)
        assert [m.msg_id for m in journal.pending()] == ["st-a", "cb-1"]
        assert [m.msg_id for m in journal.committed(after=0, limit=10) or []] == ["st-a", "cb-1"]
        assert journal.commits == commits + 2  # the held write's, then one for the rest
        entry = journal.get("d1")
        assert entry is not None and entry.state == "finished"
        # The refused duplicate's report did not take a number: the next one is 1.
        assert journal.enqueue_report("d1", "st-c", "status", report(4), "executing") == 1
        assert journal.outbox_bytes() == sum(m.size for m in journal.pending())
    finally:
        journal.close()


def test_many_threads_write_at_once_and_nothing_is_lost_or_reordered(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    threads, per_thread = 8, 150
    try:
        for t in range(threads):
            journal.accept(command(f"d{t}"))
        errors: list[BaseException] = []

        def write(t: int) -> None:
            try:
                for n in range(per_thread):
                    if n % 3 == 0:  # some wait for the disk, the rest do not
                        journal.enqueue_report(f"d{t}", f"st-{t}-{n}", "status", report(n), "x")
                    else:
                        journal.submit_report(f"d{t}", f"st-{t}-{n}", "status", report(n), "x")
                journal.barrier().result(WAIT)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        workers = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT * 4)
        assert not errors and not any(w.is_alive() for w in workers)
        sent = journal.pending(limit=threads * per_thread + 1)
        assert len(sent) == threads * per_thread
        for t in range(threads):
            mine = [m for m in sent if m.deploy_id == f"d{t}"]
            assert [m.msg_id for m in mine] == [f"st-{t}-{n}" for n in range(per_thread)]
            assert [m.payload["seq"] for m in mine] == list(range(per_thread))
        assert journal.writes >= threads * (per_thread + 1)
        print(f"{journal.writes} writes in {journal.commits} transactions")
    finally:
        journal.close()
    # Closed and opened again: the same.
    again = Journal(tmp_path / "journal.db")
    try:
        assert again.outbox_size() == threads * per_thread
    finally:
        again.close()


def test_close_commits_what_was_submitted(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    journal.accept(command("d1"))
    for n in range(50):
        journal.submit_report("d1", f"st-{n}", "status", report(n), "executing")
    journal.submit_run("d1", {"run": "r1", "state": "running"})
    journal.close()
    with pytest.raises(RuntimeError, match="closed"):
        journal.submit_started("d1")
    again = Journal(tmp_path / "journal.db")
    try:
        assert [m.payload["seq"] for m in again.pending()] == list(range(50))
        assert again.runs("d1") == [{"run": "r1", "state": "running"}]
    finally:
        again.close()


async def test_the_event_loop_does_not_wait_for_a_commit(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        journal.accept(command("d1"))
        release, first = held(journal)
        # Submitting and reading while the writer is inside a transaction: neither blocks.
        written = journal.submit_report("d1", "st-1", "status", report(1), "executing")
        assert journal.get("d1") is not None
        assert journal.pending() == []
        release.set()
        assert await asyncio.wait_for(asyncio.wrap_future(written), WAIT) == 0
        await asyncio.wait_for(asyncio.wrap_future(first), WAIT)
        assert [m.msg_id for m in journal.pending()] == ["st-1"]
    finally:
        journal.close()


async def test_what_one_step_of_the_event_loop_writes_is_one_transaction(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        journal.accept(command("d1"))
        commits, writes = journal.commits, journal.writes
        # The started mark, the first report, then a wait for the report.
        marked = journal.submit_started("d1")
        first = journal.submit_report("d1", "st-1", "status", report(1), "executing")

        async def another_task() -> None:  # woken meanwhile, it writes too
            journal.submit_run("d1", {"run": "r1", "state": "running"})

        await asyncio.gather(another_task(), asyncio.wrap_future(first))
        assert marked.done() and first.result() == 0
        assert (journal.commits - commits, journal.writes - writes) == (1, 3)
        entry = journal.get("d1")
        assert entry is not None and entry.state == "started"
        assert journal.runs("d1") == [{"run": "r1", "state": "running"}]
        # Waiting for a held write on the loop's own thread hands it over (no hang).
        assert journal.submit_report("d1", "st-2", "status", report(2), "x").result(WAIT) == 1
        # at_once: handed over now, with what was held before it, in its order.
        held_report = journal.submit_report("d1", "st-3", "status", report(3), "x")
        now = journal.submit_run("d1", {"run": "r2", "state": "running"}, at_once=True)
        await asyncio.wait_for(asyncio.wrap_future(now), WAIT)
        assert held_report.done() and held_report.result() == 2
        # A barrier is handed over at once too (whoever asks for one waits for it), with
        # what was held: the executor's started mark and first report, in one commit.  It
        # commits while this loop does not turn (held to the end of the step, it would
        # not: concurrent.futures.wait does not hand it over, as asking its result does).
        commits = journal.commits
        held_report = journal.submit_report("d1", "st-4", "status", report(4), "x")
        barrier = journal.barrier()
        assert concurrent.futures.wait([barrier], timeout=WAIT).not_done == set()
        assert held_report.done() and journal.commits == commits + 1
        # So does a callback's write (the deployment's end waits for it), with what is held.
        held_report = journal.submit_report("d1", "st-5", "status", report(5), "x")
        finish = journal.submit_finish("d1", "success", "cb-1", "callback", {"ok": True})
        assert concurrent.futures.wait([finish], timeout=WAIT).not_done == set()
        assert held_report.done() and journal.commits == commits + 2
    finally:
        journal.close()


def test_the_writer_thread_ends_when_idle_and_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "WRITER_IDLE", 0.05)
    journal = Journal(tmp_path / "journal.db")
    try:
        journal.accept(command("d1"))
        end = time.monotonic() + WAIT
        while any(t.name == "journal" for t in threading.enumerate()):
            assert time.monotonic() < end, "the idle writer thread never ended"
            time.sleep(0.02)
        assert journal.enqueue_report("d1", "st-1", "status", report(1), "x") == 0
        assert [m.msg_id for m in journal.pending()] == ["st-1"]
    finally:
        journal.close()


FLOOD = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    from deploy_core.agent.journal import Journal
    from deploy_core.models import DeployCommand

    journal = Journal(Path(sys.argv[1]))
    threads = 4
    for t in range(threads):
        journal.accept(DeployCommand(deploy_id=f"d{t}", command_type="deploy.test",
                                     params={}, expires_at=time.time() + 600))
    lock = threading.Lock()

    def told(msg_id):
        def done(future):
            if future.exception() is None:
                with lock:  # one whole line per acknowledged write
                    sys.stdout.write(msg_id + "\\n")
                    sys.stdout.flush()
        return done

    def flood(t):
        for n in range(100_000):
            msg_id = f"st-{t}-{n}"
            payload = {"status": "executing", "progress": n % 100, "message": "x" * 200}
            journal.submit_report(f"d{t}", msg_id, "status", payload, "x").add_done_callback(
                told(msg_id))
            if n % 50 == 49:
                journal.barrier().result(30)

    workers = [threading.Thread(target=flood, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    """
)


def test_what_was_acknowledged_survives_a_sigkill_mid_batch(tmp_path: Path) -> None:
    """A real process floods its journal from four threads and prints each report once its
    future says committed; it is killed with SIGKILL in the middle.  Every report it printed
    is in the journal, each deployment's numbers have no gap, and the journal opens clean."""
    path = tmp_path / "journal.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    told: list[str] = []
    try:
        while len(told) < 3000:
            line = proc.stdout.readline()
            if not line:
                break
            told.append(line.decode().strip())
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        rest, err = proc.communicate(timeout=WAIT)
    assert len(told) >= 3000, err.decode()[-2000:]
    told += [line for line in rest.decode().splitlines() if line.startswith("st-")]
    assert proc.returncode == -signal.SIGKILL
    payloads = {}
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        for msg_id, deploy_id, payload in db.execute(
            "SELECT msg_id, deploy_id, payload FROM outbox ORDER BY seq"
        ):
            payloads[msg_id] = (deploy_id, json.loads(payload)["seq"])
    finally:
        db.close()
    missing = [m for m in told if m not in payloads]
    assert not missing, f"{len(missing)} acknowledged reports lost, e.g. {missing[:5]}"
    assert len(payloads) >= len(told)
    for t in range(4):
        seqs = sorted(seq for deploy_id, seq in payloads.values() if deploy_id == f"d{t}")
        assert seqs == list(range(len(seqs)))
    print(f"{len(told)} acknowledged before the kill, {len(payloads)} in the journal")
    # The agent would open it again and go on.
    journal = Journal(path)
    try:
        assert journal.outbox_size() == len(payloads)
    finally:
        journal.close()


def test_the_feed_gives_what_was_committed_without_a_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outbox's sender takes what was just committed from memory (Journal.committed);
    # what it returns must be exactly what a read of the database returns.
    journal = Journal(tmp_path / "journal.db")
    try:
        journal.accept(command("d1"))
        assert journal.committed(after=0, limit=10) == []
        journal.enqueue_report("d1", "st-1", "status", report(1), "executing")

        def broken(db: sqlite3.Connection) -> None:
            journal._insert(db, "ev-gone", "d1", "status", "{}")
            raise ValueError("this write fails after its insert")

        failed = journal._submit(broken, at_once=True)
        journal.finish("d1", "success", "cb-1", "command.callback", {"ok": True})
        with pytest.raises(ValueError):
            failed.result(WAIT)
        fed = journal.committed(after=0, limit=10)
        assert fed == journal.pending()  # the failed write's row is in neither
        assert [m.msg_id for m in fed] == ["st-1", "cb-1"]
        assert fed[0].payload["seq"] == 0 and fed[1].payload == {"ok": True}
        assert journal.committed(after=fed[0].seq, limit=1) == fed[1:]
        # Gone from the feed once passed: going back to an earlier position needs a read.
        assert journal.committed(after=0, limit=10) is None
        assert journal.committed(after=fed[1].seq, limit=10) == []
    finally:
        journal.close()
    # A journal opened again feeds only what it commits: the rows before it are read.
    again = Journal(tmp_path / "journal.db")
    try:
        assert again.committed(after=0, limit=10) is None
        newest = again.pending()[-1].seq
        again.enqueue("ev-2", "bench.event", {"n": 2})
        assert [m.msg_id for m in again.committed(after=newest, limit=10) or []] == ["ev-2"]
    finally:
        again.close()


def test_a_feed_nobody_takes_overflows_to_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "FEED_MAX", 5)
    journal = Journal(tmp_path / "journal.db")
    try:
        for n in range(4):
            journal.enqueue(f"ev-{n}", "bench.event", {"n": n})
        assert len(journal.committed(after=0, limit=100) or []) == 4
        for n in range(4, 8):  # 8 > FEED_MAX: held in the database only
            journal.enqueue(f"ev-{n}", "bench.event", {"n": n})
        assert len(journal._feed) <= 5
        assert journal.committed(after=0, limit=100) is None
        rows = journal.pending(limit=100)
        assert [m.payload["n"] for m in rows] == list(range(8))
        # Caught up by reading: what comes next is fed again.
        journal.enqueue("ev-8", "bench.event", {"n": 8})
        assert journal.committed(after=rows[-1].seq, limit=100) == journal.pending(
            after=rows[-1].seq
        )
        # Bytes bound it too: two large events overflow it at once.
        monkeypatch.setattr(journal_module, "FEED_MAX_BYTES", 3000)
        newest = journal.pending(limit=100)[-1].seq
        journal.enqueue("ev-big-1", "bench.event", {"x": "a" * 2000})
        assert [m.msg_id for m in journal.committed(after=newest, limit=100) or []] == ["ev-big-1"]
        journal.enqueue("ev-big-2", "bench.event", {"x": "b" * 2000})
        assert journal.committed(after=newest, limit=100) is None
        assert journal._feed_bytes == 0
    finally:
        journal.close()


async def test_an_acknowledgement_rides_with_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A report travelling alone used to cost two transactions: its own and its ACK's delete.
    monkeypatch.setattr(journal_module, "ACK_LINGER", 300.0)
    journal = Journal(tmp_path / "journal.db")
    try:
        journal.accept(command("d1"))
        await asyncio.wrap_future(journal.submit_report("d1", "st-1", "s", report(1), "x"))
        await asyncio.wrap_future(journal.submit_report("d1", "st-2", "s", report(2), "x"))
        commits = journal.commits
        acked = journal.submit_ack("st-1")
        for _ in range(5):  # a few rounds of the loop: the delete waits for company
            await asyncio.sleep(0.01)
        assert not acked.done() and journal.outbox_size() == 2
        third = journal.submit_report("d1", "st-3", "s", report(3), "x")
        await asyncio.wrap_future(third)
        assert acked.done() and acked.result() > 0
        assert journal.commits - commits == 1  # the delete and the report: one transaction
        assert [m.msg_id for m in journal.pending()] == ["st-2", "st-3"]
        # Asked for its result, a lingering delete is handed over at once.
        assert journal.submit_ack("st-2").result(5) is not None
        # ... and one with nothing to ride with is committed after ACK_LINGER.
        monkeypatch.setattr(journal_module, "ACK_LINGER", 0.05)
        alone = journal.submit_ack("st-3")
        assert await asyncio.wait_for(asyncio.wrap_future(alone), WAIT) is not None
        assert journal.outbox_size() == 0 and journal.outbox_bytes() == 0
    finally:
        journal.close()
