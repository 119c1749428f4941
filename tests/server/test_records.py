"""Deployment records, status history, logs, the per-client lock and clients
(SPEC deploy-19 … deploy-22, deploy-31, deploy-33).

Every test runs against a fresh SQLite database and a fresh PostgreSQL schema.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from deploy_core.models import (
    DeployCallbackPayload,
    DeployStatus,
    DeployStatusReport,
    HealthCheckResult,
    LogLine,
    RollbackResult,
)
from deploy_core.server.clients import AlreadyEnrolled
from deploy_core.server.db import client_locks, make_engine, upgrade
from deploy_core.server.locks import LOCK_GRACE, ClientBusy
from deploy_core.server.records import Applied, NewDeployment, RecordStore
from deploy_core.server.rows import ClientRow, DeploymentRow

SHELL = "deploy.shell"


@pytest.fixture
def store(db_url: str) -> Iterator[RecordStore]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield RecordStore(engine, server_id="s1")
    engine.dispose()


def create(
    store: RecordStore,
    deploy_id: str,
    client_id: str = "web-1",
    *,
    deadline: float | None = None,
    rollback_of: str | None = None,
) -> DeploymentRow:
    return store.create_deployment(
        deploy_id=deploy_id,
        client_id=client_id,
        command_type=SHELL,
        request={"params": {"script": "echo hi"}},
        deadline=time.time() + 600 if deadline is None else deadline,
        rollback_of=rollback_of,
    )


def report(
    deploy_id: str,
    seq: int,
    status: DeployStatus = DeployStatus.SCRIPT_RUNNING,
    *,
    progress: int = 50,
    message: str = "",
    logs: list[str] | None = None,
) -> DeployStatusReport:
    return DeployStatusReport(
        deploy_id=deploy_id,
        command_type=SHELL,
        status=status,
        progress=progress,
        stage=status.value,
        message=message or f"report {seq}",
        logs=[LogLine(line=line, stage=status.value) for line in logs or []],
        seq=seq,
    )


def callback(
    deploy_id: str,
    status: DeployStatus = DeployStatus.SUCCESS,
    *,
    error: str | None = None,
    result: dict[str, Any] | None = None,
) -> DeployCallbackPayload:
    return DeployCallbackPayload(
        callback_id=deploy_id,
        command_type=SHELL,
        deploy_type="shell",
        status=status,
        success=status is DeployStatus.SUCCESS,
        result=result,
        error=error,
    )


def record_of(store: RecordStore, deploy_id: str) -> DeploymentRow:
    record = store.get(deploy_id)
    assert record is not None, f"no record {deploy_id}"
    return record


def record_in(applied: Applied) -> DeploymentRow:
    assert applied.record is not None, applied
    return applied.record


def client_of(store: RecordStore, client_id: str) -> ClientRow:
    client = store.get_client(client_id)
    assert client is not None, f"no client {client_id}"
    return client


def locked_by(store: RecordStore, client_id: str) -> str | None:
    """The deploy_id holding ``client_id``'s lock, if any."""
    holder = store.lock_holder(client_id)
    return None if holder is None else str(holder.deploy_id)


def run_together(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` in ``n`` threads released at once; each returns its value or its
    exception.  Bounded: a stuck thread fails the test instead of hanging it."""
    barrier = threading.Barrier(n, timeout=10)
    results: list[Any] = [None] * n

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in 30 s"
    return results


# --------------------------------------------------------------------------- create and lock


def test_create_records_pending_with_one_server_history_row_and_takes_the_lock(
    store: RecordStore,
) -> None:
    before = time.time()
    record = create(store, "d1")

    assert record.deploy_id == "d1"
    assert record.client_id == "web-1"
    assert record.status == DeployStatus.PENDING.value
    assert record.progress == 0
    assert record.last_seq == -1
    assert record.request == {"params": {"script": "echo hi"}}
    assert record.finished_at is None
    assert record.rollback_wanted is False
    assert before <= record.created_at <= time.time()
    assert store.get("d1") == record

    history = store.history("d1")
    assert [(h.status, h.source, h.seq) for h in history] == [("pending", "server", None)]

    holder = store.lock_holder("web-1")
    assert holder is not None
    assert holder.deploy_id == "d1"
    assert holder.owner == "s1"
    assert holder.expires_at == pytest.approx(record.deadline + LOCK_GRACE)


def test_second_deployment_for_busy_client_raises_client_busy_naming_the_first(
    store: RecordStore,
) -> None:
    create(store, "d1")

    with pytest.raises(ClientBusy) as info:
        create(store, "d2")

    assert info.value.deploy_id == "d1"
    assert info.value.client_id == "web-1"
    message = str(info.value)
    assert "d1" in message
    assert "busy" in message
    assert "web-1" in message
    # Refused means nothing was written for it.
    assert store.get("d2") is None
    assert store.history("d2") == []
    assert locked_by(store, "web-1") == "d1"


def test_busy_client_does_not_block_another_client(store: RecordStore) -> None:
    create(store, "d1", "web-1")

    record = create(store, "d2", "web-2")

    assert record.status == "pending"
    assert {lock.client_id: lock.deploy_id for lock in store.locks()} == {
        "web-1": "d1",
        "web-2": "d2",
    }


def test_stale_lock_past_deadline_and_grace_is_taken_over(store: RecordStore) -> None:
    create(store, "d1", deadline=time.time() - LOCK_GRACE - 5)

    record = create(store, "d2")

    assert record.status == "pending"
    assert locked_by(store, "web-1") == "d2"
    # The watchdog expiring the old deployment later must not free the new one's lock.
    assert store.expire("d1", "deadline passed").applied
    assert locked_by(store, "web-1") == "d2"


def test_lock_past_deadline_but_within_grace_still_holds(store: RecordStore) -> None:
    create(store, "d1", deadline=time.time() - 1)

    with pytest.raises(ClientBusy, match="d1"):
        create(store, "d2")


def test_lock_left_behind_by_a_finished_deployment_is_stale(store: RecordStore) -> None:
    create(store, "d1")
    assert store.finish("web-1", callback("d1")).applied
    # A lock row that outlived its deployment, e.g. written back by a replica that crashed.
    with store.engine.begin() as conn:
        conn.execute(
            client_locks.insert().values(
                client_id="web-1",
                deploy_id="d1",
                owner="s2",
                acquired_at=time.time(),
                expires_at=time.time() + 3600,
            )
        )

    record = create(store, "d2")

    assert record.status == "pending"
    assert locked_by(store, "web-1") == "d2"


def test_concurrent_creates_for_one_client_let_exactly_one_through(store: RecordStore) -> None:
    results = run_together(8, lambda i: create(store, f"d{i}"))

    made = [r for r in results if isinstance(r, DeploymentRow)]
    busy = [r for r in results if isinstance(r, ClientBusy)]
    assert len(made) == 1, results
    assert len(busy) == 7, results
    winner = made[0].deploy_id
    assert {b.deploy_id for b in busy} == {winner}
    assert locked_by(store, "web-1") == winner
    records, total = store.list_for_client("web-1")
    assert total == 1
    assert [r.deploy_id for r in records] == [winner]


def test_concurrent_creates_for_different_clients_all_succeed(store: RecordStore) -> None:
    results = run_together(6, lambda i: create(store, f"d{i}", f"web-{i}"))

    assert all(isinstance(r, DeploymentRow) for r in results), results
    assert len(store.locks()) == 6


def test_duplicate_deploy_id_fails_instead_of_retrying_forever(store: RecordStore) -> None:
    create(store, "d1", "web-1")

    with pytest.raises(sa.exc.IntegrityError):
        create(store, "d1", "web-2")

    assert store.lock_holder("web-2") is None
    assert record_of(store, "d1").client_id == "web-1"


def spec(deploy_id: str, client_id: str, **extra: Any) -> NewDeployment:
    return NewDeployment(
        deploy_id=deploy_id,
        client_id=client_id,
        command_type=SHELL,
        request={"params": {"script": "true"}},
        deadline=time.time() + 600,
        **extra,
    )


def test_many_created_together_match_one_by_one_and_busy_clients_are_left_alone(
    store: RecordStore,
) -> None:
    """A rollout's chunk: every free client's deployment, lock, history, artifacts and sealed
    secrets as create_deployment writes them; a busy client's deployment is not created and
    its holder keeps the lock; a stale lock is taken over."""
    create(store, "held", "web-2")
    create(store, "old", "web-3", deadline=time.time() - LOCK_GRACE - 5)
    specs = [
        spec(f"r{i}", f"web-{i}", artifacts=["b" * 64, "a" * 64], secret_env={"K": "v"})
        for i in range(1, 41)
    ]

    created, busy = store.create_deployments(specs)

    assert [r.deploy_id for r in created] == [f"r{i}" for i in range(1, 41) if i != 2]
    assert set(busy) == {"web-2"}
    assert busy["web-2"].deploy_id == "held"
    assert store.get("r2") is None and store.history("r2") == []
    assert locked_by(store, "web-2") == "held"
    assert locked_by(store, "web-3") == "r3"
    for record in created:
        assert record.status == "pending" and record.last_seq == -1
        assert record.dispatched_at is None
        assert store.get(record.deploy_id) == record
        assert [(h.status, h.source) for h in store.history(record.deploy_id)] == [
            ("pending", "server")
        ]
        assert locked_by(store, record.client_id) == record.deploy_id
        assert store.secret_env(record.deploy_id) == {"K": "v"}
    with store.engine.connect() as conn:
        shas = conn.execute(
            sa.text("SELECT sha256 FROM deploy_artifacts WHERE deploy_id = 'r1' ORDER BY sha256")
        ).scalars()
        assert list(shas) == ["a" * 64, "b" * 64]


def test_many_with_an_id_taken_fall_back_to_one_by_one(store: RecordStore) -> None:
    """A deployment id that exists (a rollout trying a chunk again after a crash) spoils the
    shared transaction; each is then created on its own, the existing one left as it was."""
    first = create(store, "r1", "web-1")

    created, busy = store.create_deployments(
        [spec("r1", "web-1"), spec("r2", "web-2"), spec("r3", "web-3")]
    )

    assert busy == {}
    assert [r.deploy_id for r in created] == ["r2", "r3"]
    assert store.get("r1") == first
    assert [h.status for h in store.history("r1")] == ["pending"]
    # Also when it is the only one: its lock is its own, so the client is not busy.
    assert store.create_deployments([spec("r1", "web-1")]) == ([], {})


def test_many_refuses_two_deployments_for_one_client(store: RecordStore) -> None:
    with pytest.raises(ValueError, match="one deployment per client"):
        store.create_deployments([spec("r1", "web-1"), spec("r2", "web-1")])
    with pytest.raises(ValueError, match="distinct deployment ids"):
        store.create_deployments([spec("r1", "web-1"), spec("r1", "web-2")])
    assert store.get("r1") is None and store.locks() == []
    assert store.create_deployments([]) == ([], {})


def test_many_racing_single_creates_let_exactly_one_per_client_through(
    store: RecordStore,
) -> None:
    """Chunks of 20 clients and single creates for the same clients, all at once: each
    client ends with exactly one deployment, holding its lock."""
    clients = [f"web-{i}" for i in range(20)]

    def work(i: int) -> Any:
        if i % 2:
            return store.create_deployments([spec(f"m{i}-{c}", c) for c in clients])
        return [create(store, f"s{i}-{c}", c) for c in clients[i // 2 :: 3]]

    results = run_together(6, work)

    assert not [r for r in results if isinstance(r, Exception) and not isinstance(r, ClientBusy)]
    for client in clients:
        records, total = store.list_for_client(client)
        assert total == 1, (client, records)
        assert locked_by(store, client) == records[0].deploy_id


def _finishing_cases(store: RecordStore, prefix: str) -> list[tuple[str, DeployCallbackPayload]]:
    """Deployments in every state a callback can meet, and the callbacks: success with a
    result; a failure with health, a rollback and its state; one finished by the watchdog
    already (a late callback); another client's; an unknown id."""
    for i in range(1, 4):
        store.create_deployment(
            deploy_id=f"{prefix}{i}",
            client_id=f"{prefix}-web-{i}",
            command_type=SHELL,
            request={"params": {"script": "true"}},
            deadline=time.time() + 600,
            secret_env={"TOKEN": "s3cret"},
        )
    assert store.expire(f"{prefix}3", "deadline passed").applied
    failed = DeployCallbackPayload(
        callback_id=f"{prefix}2",
        command_type=SHELL,
        deploy_type="shell",
        status=DeployStatus.ROLLED_BACK,
        success=False,
        error="health check failed",
        health=[HealthCheckResult(success=False, check_type="http", error="503", attempts=3)],
        rollback=RollbackResult(success=True, strategy="snapshot", message="restored"),
        rollback_state={"snapshot": "/var/lib/x"},
    )
    return [
        (f"{prefix}-web-1", callback(f"{prefix}1", result={"exit_code": 0})),
        (f"{prefix}-web-2", failed),
        (f"{prefix}-web-3", callback(f"{prefix}3")),
        (f"{prefix}-web-1", callback(f"{prefix}2")),  # not its deployment
        (f"{prefix}-web-1", callback(f"{prefix}404")),
    ]


def _finished_state(store: RecordStore, prefix: str, applied: list[Applied]) -> Any:
    def strip(value: Any) -> Any:
        text = repr(value).replace(prefix, "P")
        return re.sub(r"\d{9,}\.\d+", "T", text)

    records = [record_of(store, f"{prefix}{i}").as_dict() for i in range(1, 4)]
    for record in records:
        assert record["finished_at"] is not None
        for key in ("created_at", "updated_at", "finished_at", "deadline", "dispatched_at"):
            record.pop(key, None)
    history = [
        [
            (h.status, h.stage, h.progress, h.message, h.source, h.seq)
            for h in store.history(f"{prefix}{i}")
        ]
        for i in range(1, 4)
    ]
    secrets = [store.secret_env(f"{prefix}{i}") for i in range(1, 4)]
    locks_left = sorted(
        lock.deploy_id for lock in store.locks() if lock.deploy_id.startswith(prefix)
    )
    answers = [(a.applied, a.previous, a.record.deploy_id if a.record else None) for a in applied]
    return strip((records, history, secrets, locks_left, answers))


def test_callbacks_finished_together_match_one_by_one(store: RecordStore) -> None:
    """finish_many_in (the ingest's batch of callbacks) leaves records, histories, locks and
    secrets as finish_in one after another does, and answers each callback the same."""
    singles = _finishing_cases(store, "alpha")
    together = _finishing_cases(store, "omega")

    with store.engine.begin() as conn:
        one_by_one = [store.finish_in(conn, client_id, cb) for client_id, cb in singles]
    with store.engine.begin() as conn:
        many = store.finish_many_in(conn, together)

    assert _finished_state(store, "omega", many) == _finished_state(store, "alpha", one_by_one)
    assert [a.applied for a in many] == [True, True, False, False, False]
    assert record_of(store, "omega2").health == [
        HealthCheckResult(success=False, check_type="http", error="503", attempts=3).model_dump(
            mode="json"
        )
    ]
    assert record_of(store, "omega1").result == {"exit_code": 0}
    assert store.lock_holder("omega-web-1") is None and store.lock_holder("omega-web-2") is None


def test_the_same_deployment_twice_in_one_batch_is_finished_once(store: RecordStore) -> None:
    create(store, "d1", "web-1")

    with store.engine.begin() as conn:
        first, second = store.finish_many_in(
            conn, [("web-1", callback("d1")), ("web-1", callback("d1", DeployStatus.FAILED))]
        )

    assert first.applied and not second.applied
    assert record_of(store, "d1").status == "success"
    # As finish_in does: the agent's own status is kept, a repeat changes nothing.
    assert [h.status for h in store.history("d1")] == ["pending", "success"]


def test_acks_marked_together_keep_the_first_time_and_refuse_other_clients(
    store: RecordStore,
) -> None:
    for i in range(1, 4):
        create(store, f"d{i}", f"web-{i}")
    store.mark_acked("web-1", "d1")
    first = record_of(store, "d1").acked_at
    assert first is not None

    with store.engine.begin() as conn:
        owned = store.mark_acked_many_in(
            conn,
            [("web-1", "d1"), ("web-2", "d2"), ("web-1", "d3"), ("web-3", "nope"), ("web-2", "d2")],
        )

    assert owned == [True, True, False, False, True]
    assert record_of(store, "d1").acked_at == first  # acknowledged again: the first time stays
    assert record_of(store, "d2").acked_at is not None
    assert record_of(store, "d3").acked_at is None  # web-1 may not acknowledge web-3's


def test_rollback_deployment_marks_the_original_rolled_back(store: RecordStore) -> None:
    create(store, "d1")
    store.mark_acked("web-1", "d1")
    store.expire("d1", "deadline passed")
    assert record_of(store, "d1").rollback_wanted is True

    create(store, "r1", rollback_of="d1")

    original = record_of(store, "d1")
    assert original.rolled_back_by == "r1"
    assert original.rollback_wanted is False
    assert record_of(store, "r1").rollback_of == "d1"


# --------------------------------------------------------------------------- callbacks


def test_finish_sets_result_and_releases_lock_so_next_deployment_starts(
    store: RecordStore,
) -> None:
    create(store, "d1")

    applied = store.finish("web-1", callback("d1", result={"exit_code": 0}))

    assert applied.applied
    assert applied.previous == "pending"
    record = record_in(applied)
    assert record.status == "success"
    assert record.progress == 100
    assert record.result == {"exit_code": 0}
    assert record.agent_status == "success"
    assert record.finished_at is not None
    assert store.get("d1") == record
    assert store.history("d1")[-1].status == "success"
    assert store.lock_holder("web-1") is None

    assert create(store, "d2").status == "pending"


def test_second_callback_is_not_applied(store: RecordStore) -> None:
    create(store, "d1")
    first = store.finish("web-1", callback("d1", result={"exit_code": 0})).record
    create(store, "d2")
    history = store.history("d1")

    again = store.finish("web-1", callback("d1", DeployStatus.FAILED, error="boom"))

    assert not again.applied
    assert again.record == first
    assert record_of(store, "d1").status == "success"
    assert store.history("d1") == history
    # Nor does it touch the lock the next deployment now holds.
    assert locked_by(store, "web-1") == "d2"


def test_failed_callback_keeps_error_health_and_rollback(store: RecordStore) -> None:
    create(store, "d1")
    payload = callback("d1", DeployStatus.ROLLED_BACK, error="health check failed")
    payload.health = [HealthCheckResult(success=False, check_type="http", error="503")]
    payload.rollback = RollbackResult(success=True, strategy="snapshot")

    record = record_in(store.finish("web-1", payload))

    assert record.status == "rolled_back"
    assert record.error == "health check failed"
    assert record.health is not None and record.health[0]["error"] == "503"
    assert record.rollback is not None and record.rollback["strategy"] == "snapshot"
    assert store.history("d1")[-1].message == "health check failed"
    assert store.lock_holder("web-1") is None


def test_callback_from_another_client_is_not_applied(store: RecordStore) -> None:
    create(store, "d1", "web-1")

    applied = store.finish("web-2", callback("d1"))

    assert not applied.applied
    assert applied.record is None
    assert record_of(store, "d1").status == "pending"
    assert locked_by(store, "web-1") == "d1"


# --------------------------------------------------------------------------- status reports


def test_reports_apply_in_seq_order_with_history_and_logs(store: RecordStore) -> None:
    create(store, "d1")
    steps = [
        (DeployStatus.EXECUTING, 10, ["preparing"]),
        (DeployStatus.SCRIPT_RUNNING, 40, ["line 1", "line 2"]),
        (DeployStatus.HEALTH_CHECK, 90, ["GET /health 200"]),
    ]
    previous = "pending"
    for seq, (status, progress, logs) in enumerate(steps):
        applied = store.apply_report(
            "web-1", report("d1", seq, status, progress=progress, logs=logs)
        )
        assert applied.applied
        assert applied.previous == previous
        assert record_in(applied).status == status.value
        assert record_in(applied).progress == progress
        assert record_in(applied).last_seq == seq
        previous = status.value

    history = store.history("d1")
    assert [(h.seq, h.status, h.source) for h in history] == [
        (None, "pending", "server"),
        (0, "executing", "agent"),
        (1, "script_running", "agent"),
        (2, "health_check", "agent"),
    ]
    lines = store.logs("d1")
    assert [line.line for line in lines] == ["preparing", "line 1", "line 2", "GET /health 200"]
    assert [line.line for line in store.logs("d1", after=lines[1].id)] == [
        "line 2",
        "GET /health 200",
    ]
    assert len(store.logs("d1", limit=2)) == 2


def test_duplicate_seq_is_not_applied(store: RecordStore) -> None:
    create(store, "d1")
    store.apply_report(
        "web-1", report("d1", 0, DeployStatus.SCRIPT_RUNNING, progress=40, logs=["once"])
    )

    again = store.apply_report(
        "web-1", report("d1", 0, DeployStatus.EXECUTING, progress=5, logs=["twice"])
    )

    assert not again.applied
    assert record_in(again).status == "script_running"
    assert record_in(again).progress == 40
    assert len(store.history("d1")) == 2
    assert [line.line for line in store.logs("d1")] == ["once"]


def test_older_seq_does_not_move_status_or_progress_back(store: RecordStore) -> None:
    create(store, "d1")
    store.apply_report("web-1", report("d1", 5, DeployStatus.HEALTH_CHECK, progress=90))

    late = store.apply_report("web-1", report("d1", 3, DeployStatus.SCRIPT_RUNNING, progress=30))

    assert not late.applied
    record = record_of(store, "d1")
    assert record.status == "health_check"
    assert record.progress == 90
    assert record.last_seq == 5
    assert [h.seq for h in store.history("d1")] == [None, 5]


def test_report_after_finish_is_kept_in_history_but_status_stays_the_callbacks(
    store: RecordStore,
) -> None:
    create(store, "d1")
    store.apply_report("web-1", report("d1", 0))
    store.finish("web-1", callback("d1", DeployStatus.FAILED, error="exit 1"))

    late = store.apply_report(
        "web-1",
        report("d1", 1, DeployStatus.HEALTH_CHECK, progress=90, message="checking", logs=["tail"]),
    )

    assert not late.applied
    record = record_of(store, "d1")
    assert record.status == "failed"
    assert record.progress == 100
    last = store.history("d1")[-1]
    assert last.seq == 1
    assert last.status == "health_check"
    assert last.message == "(after finish) checking"
    assert [line.line for line in store.logs("d1")] == ["tail"]


def test_report_for_another_clients_deployment_is_not_applied(store: RecordStore) -> None:
    create(store, "d1", "web-1")

    applied = store.apply_report("web-2", report("d1", 0, logs=["forged"]))

    assert not applied.applied
    assert applied.record is None
    assert record_of(store, "d1").status == "pending"
    assert len(store.history("d1")) == 1
    assert store.logs("d1") == []


def test_report_for_unknown_deployment_returns_no_record(store: RecordStore) -> None:
    applied = store.apply_report("web-1", report("nope", 0))

    assert applied == Applied(False, None, None)


def test_concurrent_duplicate_reports_are_applied_once(store: RecordStore) -> None:
    create(store, "d1")

    results = run_together(6, lambda i: store.apply_report("web-1", report("d1", 0)))

    assert [r.applied for r in results].count(True) == 1, results
    assert [h.seq for h in store.history("d1")] == [None, 0]


# --------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize("acked", [True, False])
def test_expire_marks_timeout_releases_lock_and_wants_rollback_once_it_may_have_run(
    store: RecordStore, acked: bool
) -> None:
    # A report from the agent means it ran, acknowledged or not.
    create(store, "d1")
    store.apply_report("web-1", report("d1", 0, progress=60))
    if acked:
        store.mark_acked("web-1", "d1")

    applied = store.expire("d1", "no report for 300 s")

    assert applied.applied
    assert applied.previous == "script_running"
    record = record_in(applied)
    assert record.status == "timeout"
    assert record.error == "no report for 300 s"
    assert record.finished_at is not None
    assert record.rollback_wanted is True
    last = store.history("d1")[-1]
    assert (last.status, last.source, last.message, last.progress) == (
        "timeout",
        "server",
        "no report for 300 s",
        60,
    )
    assert store.lock_holder("web-1") is None


@pytest.mark.parametrize("sent", [True, False])
def test_expire_wants_a_rollback_only_if_the_command_may_have_reached_the_agent(
    store: RecordStore, sent: bool
) -> None:
    create(store, "d1")
    if sent:
        store.mark_dispatched("d1")
    record = record_in(store.expire("d1", "deadline passed"))
    assert record.rollback_wanted is sent


def test_expire_without_rollback_wanted_never_asks_for_one(store: RecordStore) -> None:
    create(store, "d1")
    store.mark_acked("web-1", "d1")

    assert record_in(store.expire("d1", "deadline", rollback_wanted=False)).rollback_wanted is False


def test_expire_does_not_touch_a_finished_deployment(store: RecordStore) -> None:
    create(store, "d1")
    store.finish("web-1", callback("d1"))

    applied = store.expire("d1", "deadline")

    assert not applied.applied
    assert record_in(applied).status == "success"
    assert record_in(applied).error is None
    assert store.expire("nope", "deadline") == Applied(False, None, None)


def test_late_callback_after_expire_keeps_timeout_and_records_agent_status(
    store: RecordStore,
) -> None:
    create(store, "d1")
    store.expire("d1", "deadline passed")

    late = store.finish("web-1", callback("d1", DeployStatus.SUCCESS))

    assert not late.applied
    record = record_of(store, "d1")
    assert record.status == "timeout"
    assert record.agent_status == "success"
    assert record.error == "deadline passed"
    last = store.history("d1")[-1]
    assert last.source == "agent"
    assert last.status == "success"
    assert "late callback" in last.message

    # A second late callback changes nothing more.
    rows = len(store.history("d1"))
    store.finish("web-1", callback("d1", DeployStatus.FAILED, error="boom"))
    assert record_of(store, "d1").agent_status == "success"
    assert len(store.history("d1")) == rows


def test_late_timeout_callback_after_expire_is_still_recorded(store: RecordStore) -> None:
    # The agent's own timeout (its script ran too long) agrees with the watchdog's verdict;
    # the agent's word and its error must still be kept.
    create(store, "d1")
    store.expire("d1", "deadline passed")

    payload = callback("d1", DeployStatus.TIMEOUT, error="script killed after 300 s")
    payload.rollback_state = {"snapshot": "/var/lib/deploy/snap-1"}
    store.finish("web-1", payload)

    record = record_of(store, "d1")
    assert record.status == "timeout"
    assert record.agent_status == "timeout"
    # A manual rollback later needs what the agent prepared.
    assert record.rollback_state == {"snapshot": "/var/lib/deploy/snap-1"}
    last = store.history("d1")[-1]
    assert "late callback" in last.message
    assert "script killed after 300 s" in last.message


def test_concurrent_callback_and_expire_finish_once(store: RecordStore) -> None:
    create(store, "d1")
    store.mark_acked("web-1", "d1")

    def work(i: int) -> Any:
        if i == 0:
            return store.finish("web-1", callback("d1"))
        return store.expire("d1", "deadline passed")

    results = run_together(2, work)

    assert [r.applied for r in results].count(True) == 1, results
    record = record_of(store, "d1")
    assert record.status in {"success", "timeout"}
    finishing = [h for h in store.history("d1") if h.status in {"success", "timeout"}]
    # The winner's row, plus a "late callback" row if the watchdog won.
    assert finishing[0].status == record.status
    assert store.lock_holder("web-1") is None


def test_overdue_lists_only_unfinished_deployments_past_their_deadline(
    store: RecordStore,
) -> None:
    now = time.time()
    create(store, "late", "web-1", deadline=now - 10)
    create(store, "early", "web-2", deadline=now + 600)
    create(store, "done", "web-3", deadline=now - 10)
    store.finish("web-3", callback("done"))

    assert [r.deploy_id for r in store.overdue()] == ["late"]
    assert sorted(r.deploy_id for r in store.overdue(now + 601)) == ["early", "late"]
    assert store.overdue(now - 3600) == []


def test_undelivered_lists_unacked_unfinished_deployments_oldest_first(
    store: RecordStore,
) -> None:
    create(store, "a")
    store.expire("a", "deadline")  # finished: never resent
    create(store, "b")
    create(store, "c", "web-2")  # another client's

    assert [r.deploy_id for r in store.undelivered("web-1")] == ["b"]

    store.mark_dispatched("b")
    dispatched = record_of(store, "b").dispatched_at
    assert dispatched is not None
    # Dispatched is not delivered: only the agent's ack is.
    assert [r.deploy_id for r in store.undelivered("web-1")] == ["b"]

    store.mark_acked("web-1", "b")
    assert store.undelivered("web-1") == []
    assert [r.deploy_id for r in store.undelivered("web-2")] == ["c"]


def test_undelivered_orders_by_creation(store: RecordStore) -> None:
    # Two unfinished deployments of one client exist when a stale lock was taken over.
    create(store, "first", deadline=time.time() - LOCK_GRACE - 5)
    create(store, "second")

    assert [r.deploy_id for r in store.undelivered("web-1")] == ["first", "second"]


def test_mark_acked_keeps_the_first_ack_time(store: RecordStore) -> None:
    create(store, "d1")
    store.mark_acked("web-1", "d1")
    first = record_of(store, "d1").acked_at
    assert first is not None

    time.sleep(0.01)
    store.mark_acked("web-1", "d1")

    assert record_of(store, "d1").acked_at == first


def test_list_for_client_is_newest_first_with_total_and_paging(store: RecordStore) -> None:
    for i in range(5):
        create(store, f"d{i}")
        store.finish("web-1", callback(f"d{i}"))
    create(store, "other", "web-2")

    page, total = store.list_for_client("web-1")
    assert total == 5
    assert [r.deploy_id for r in page] == ["d4", "d3", "d2", "d1", "d0"]

    page, total = store.list_for_client("web-1", limit=2, offset=1)
    assert total == 5
    assert [r.deploy_id for r in page] == ["d3", "d2"]

    page, total = store.list_for_client("web-1", limit=2, offset=4)
    assert [r.deploy_id for r in page] == ["d0"]
    assert store.list_for_client("nobody") == ([], 0)


# --------------------------------------------------------------------------- clients


def test_enroll_stores_the_key_and_refuses_a_taken_id(store: RecordStore) -> None:
    store.enroll("web-1", "aa" * 32)

    with pytest.raises(AlreadyEnrolled, match="web-1"):
        store.enroll("web-1", "bb" * 32)

    assert store.agent_key("web-1") == "aa" * 32
    assert store.agent_key("web-2") is None
    client = client_of(store, "web-1")
    assert client.connected is False
    assert client.enrolled_at is not None
    assert store.get_client("web-2") is None


def test_connect_disconnect_and_heartbeats_are_recorded(store: RecordStore) -> None:
    store.enroll("web-1", "k1")

    store.set_connected("web-1", remote="10.0.0.5:4433", capabilities={"types": [SHELL]})
    client = client_of(store, "web-1")
    assert client.connected is True
    assert client.server_id == "s1"
    assert client.remote == "10.0.0.5:4433"
    assert client.capabilities == {"types": [SHELL]}
    assert client.connected_since is not None

    store.touch_clients({"web-1": 12345.0})
    assert client_of(store, "web-1").last_seen == 12345.0
    store.touch_clients({})  # nothing to record is fine

    store.set_disconnected("web-1", last_seen=23456.0)
    client = client_of(store, "web-1")
    assert client.connected is False
    assert client.last_seen == 23456.0
    assert client.disconnected_since is not None


def test_another_server_cannot_disconnect_an_agent_it_does_not_hold(
    store: RecordStore,
) -> None:
    store.enroll("web-1", "k1")
    store.set_connected("web-1", remote="r", capabilities={})
    other = RecordStore(store.engine, server_id="s2")

    other.set_disconnected("web-1", last_seen=1.0)
    other.mark_all_disconnected()

    assert client_of(store, "web-1").connected is True


def test_mark_all_disconnected_clears_only_this_servers_agents(store: RecordStore) -> None:
    other = RecordStore(store.engine, server_id="s2")
    for client_id, server in (("web-1", store), ("web-2", store), ("web-3", other)):
        store.enroll(client_id, f"key-{client_id}")
        server.set_connected(client_id, remote="r", capabilities={})

    store.mark_all_disconnected()

    connected = {c.client_id: c.connected for c in store.list_clients()}
    assert connected == {"web-1": False, "web-2": False, "web-3": True}
    assert client_of(store, "web-1").disconnected_since is not None


def test_list_clients_never_returns_agent_keys(store: RecordStore) -> None:
    for client_id in ("web-2", "web-1", "db-1"):
        store.enroll(client_id, f"secret-{client_id}")

    everyone = store.list_clients()
    some = store.list_clients(["web-1", "nope"])

    assert [c.client_id for c in everyone] == ["db-1", "web-1", "web-2"]
    assert [c.client_id for c in some] == ["web-1"]
    for client in [*everyone, *some, client_of(store, "db-1")]:
        assert "agent_key" not in client.as_dict()
        assert not any("secret" in str(value) for value in client.as_dict().values())
