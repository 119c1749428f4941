"""The stores' rows (server/rows.py): frozen, and shown by the API exactly as the column
dicts they replaced were.

The reference renderers below are the API's code from before the rows, kept verbatim: each
test builds a real record in SQLite and in PostgreSQL, reads it back the old way (``{column:
value}`` of a plain select) and the new way (the store's row), and compares the JSON bytes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deploy_core.models import (
    DeployCallbackPayload,
    DeployStatus,
    DeployStatusReport,
    HealthCheckResult,
    LogLine,
    RollbackResult,
)
from deploy_core.server import db
from deploy_core.server.records import RecordStore
from deploy_core.server.rollbacks import RollbackRefused, _check_restorable
from deploy_core.server.rows import (
    ApiTokenRow,
    ClientCredentials,
    ClientRow,
    DeploymentRow,
    HistoryRow,
    JoinTokenRow,
    LockRow,
    LogLineRow,
    Row,
    iso_time,
)
from deploy_core.server.tokens import TokenStore

# --------------------------------------------------------------------------- the old way


def old_iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def old_render_record(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "deploy_id": record["deploy_id"],
        "client_id": record["client_id"],
        "command_type": record["command_type"],
        "status": record["status"],
        "stage": record["stage"],
        "progress": record["progress"],
        "finished": record["finished_at"] is not None,
        "result": record["result"],
        "error": record["error"],
        "health": record["health"],
        "rollback": record["rollback"],
        "rollback_of": record["rollback_of"],
        "rolled_back_by": record["rolled_back_by"],
        "agent_status": record["agent_status"],
        "request": record["request"],
        "created_at": old_iso_time(record["created_at"]),
        "updated_at": old_iso_time(record["updated_at"]),
        "finished_at": old_iso_time(record["finished_at"]),
        "deadline": old_iso_time(record["deadline"]),
        "updated_ts": record["updated_at"],
    }


def old_render_history(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": row["status"],
        "stage": row["stage"],
        "progress": row["progress"],
        "message": row["message"],
        "source": row["source"],
        "seq": row["seq"],
        "timestamp": old_iso_time(row["ts"]),
    }


def old_render_log(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "timestamp": old_iso_time(row["ts"]),
        "stream": row["stream"],
        "stage": row["stage"],
        "line": row["line"],
    }


def old_render_client(row: dict[str, Any], connected_here: bool) -> dict[str, Any]:
    caps = row.get("capabilities") or {}
    return {
        "client_id": row["client_id"],
        "connected": bool(row["connected"]),
        "connected_here": connected_here,
        "connected_since": old_iso_time(row["connected_since"]) if row["connected"] else None,
        "disconnected_since": None if row["connected"] else old_iso_time(row["disconnected_since"]),
        "last_seen": old_iso_time(row["last_seen"]),
        "remote": row["remote"],
        "enrolled_at": old_iso_time(row["enrolled_at"]),
        "revoked_at": old_iso_time(row.get("revoked_at")),
        "credential": row["credential"],
        "plugins": caps.get("plugins", {}),
        "capabilities": caps,
        "labels": labels if isinstance(labels := row.get("labels"), dict) else {},
    }


def old_with_iso(row: dict[str, Any], *fields: str) -> dict[str, Any]:
    return {k: old_iso_time(v) if k in fields else v for k, v in row.items()}


def same_json(new: Any, old: Any) -> None:
    """The bytes the API sends: same keys, same order, same values."""
    assert json.dumps(new) == json.dumps(old)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> RecordStore:
    """A store holding two clients and, on web-1, one finished deployment with everything a
    record can carry (result, health, rollback, its state, logs) and one still running."""
    store = RecordStore(engine, server_id="s1")
    store.enroll("web-1", public_key="ab" * 32)
    store.enroll("old-1", "cd" * 32)
    store.set_connected(
        "web-1",
        remote="10.0.0.5:4433",
        capabilities={"plugins": {"deploy_shell": "1.0"}, "deploy_types": ["deploy.shell"]},
        labels={"role": "web", "zone": "b"},
    )
    store.create_deployment(
        deploy_id="d1",
        client_id="web-1",
        command_type="deploy.shell",
        request={"params": {"script": "echo ü"}, "rollback": {"strategy": "snapshot"}},
        deadline=time.time() + 600,
        target="deploy.shell:/srv/app",
    )
    store.mark_dispatched("d1")
    store.mark_acked("web-1", "d1")
    store.apply_report(
        "web-1",
        DeployStatusReport(
            deploy_id="d1",
            command_type="deploy.shell",
            status=DeployStatus.SCRIPT_RUNNING,
            progress=40,
            stage="script_running",
            message="running",
            logs=[LogLine(line="hello"), LogLine(line="oops", stream="stderr")],
            seq=0,
        ),
    )
    store.finish(
        "web-1",
        DeployCallbackPayload(
            callback_id="d1",
            command_type="deploy.shell",
            deploy_type="shell",
            status=DeployStatus.ROLLED_BACK,
            success=False,
            result={"exit_code": 0, "stdout_tail": "hi\n"},
            error="health check failed",
            health=[HealthCheckResult(success=False, check_type="http", error="503")],
            rollback=RollbackResult(success=True, strategy="snapshot"),
            rollback_state={"snapshot": "/var/lib/snap-1"},
        ),
    )
    store.create_deployment(
        deploy_id="d2",
        client_id="web-1",
        command_type="deploy.shell",
        request={"params": {"script": "sleep 1"}},
        deadline=time.time() + 600,
    )
    return store


def raw(engine: Engine, query: sa.Select[Any]) -> list[dict[str, Any]]:
    """Rows the old way: a plain select, each as ``{column: value}``."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


# --------------------------------------------------------------------------- the API shapes


def test_a_deployment_row_shows_as_the_api_showed_its_record(
    engine: Engine, store: RecordStore
) -> None:
    old = raw(engine, sa.select(db.deployments).order_by(db.deployments.c.deploy_id))
    new = [store.get("d1"), store.get("d2")]
    assert len(old) == 2 and all(isinstance(r, DeploymentRow) for r in new)
    for old_row, new_row in zip(old, new, strict=True):
        assert new_row is not None
        same_json(new_row.to_api(), old_render_record(old_row))
        # What a rollback strategy's restorable is handed: the columns, as before.
        assert new_row.as_dict() == old_row
    assert old[0]["health"] and old[0]["rollback"] and old[0]["result"]  # not all empty


def test_lists_show_the_same_records(engine: Engine, store: RecordStore) -> None:
    old = raw(engine, sa.select(db.deployments).order_by(db.deployments.c.created_at.desc()))
    page, total = store.list_all()
    assert total == 2
    same_json([r.to_api() for r in page], [old_render_record(r) for r in old])
    mine, _ = store.list_for_client("web-1")
    same_json([r.to_api() for r in mine], [old_render_record(r) for r in old])


def test_history_and_log_rows_show_as_before(engine: Engine, store: RecordStore) -> None:
    old_history = raw(
        engine,
        sa.select(db.status_history)
        .where(db.status_history.c.deploy_id == "d1")
        .order_by(db.status_history.c.id),
    )
    history = store.history("d1")
    assert len(history) == 3 and all(isinstance(h, HistoryRow) for h in history)
    same_json([h.to_api() for h in history], [old_render_history(h) for h in old_history])
    lines = store.logs("d1")
    assert all(isinstance(line, LogLineRow) for line in lines)
    # Each of the two lines came alone, so its chunk holds it alone: the old line dicts.
    chunks = raw(engine, sa.select(db.deploy_log_chunks).order_by("first_line"))
    old_lines = [
        {
            "id": c["first_line"],
            "deploy_id": c["deploy_id"],
            "ts": c["ts"],
            "stream": c["stream"],
            "stage": c["stage"],
            "line": c["text"],
        }
        for c in chunks
    ]
    assert [line["line"] for line in old_lines] == ["hello", "oops"]
    assert [line.as_dict() for line in lines] == old_lines
    same_json([line.to_api() for line in lines], [old_render_log(r) for r in old_lines])


@pytest.mark.parametrize("here", [True, False])
def test_client_rows_show_as_before(engine: Engine, store: RecordStore, here: bool) -> None:
    cols = [c for c in db.clients.c if c.name != "agent_key"]
    credential = sa.case(
        (db.clients.c.public_key.is_not(None), "public_key"), else_="shared_key"
    ).label("credential")
    old = raw(engine, sa.select(*cols, credential).order_by(db.clients.c.client_id))
    new = store.list_clients()
    assert [c.client_id for c in new] == ["old-1", "web-1"]
    assert [c.connected for c in new] == [False, True]
    same_json(
        [c.to_api(connected_here=here) for c in new],
        [old_render_client(c, here) for c in old],
    )
    one = store.get_client("web-1")
    assert isinstance(one, ClientRow)
    same_json(one.to_api(connected_here=here), old_render_client(old[1], here))


def test_credential_and_lock_rows(store: RecordStore) -> None:
    assert store.client_credentials("web-1") == ClientCredentials("ab" * 32, None, None)
    assert store.client_credentials("old-1") == ClientCredentials(None, "cd" * 32, None)
    assert store.client_credentials("nobody") is None
    lock = store.lock_holder("web-1")
    assert isinstance(lock, LockRow)
    assert (lock.client_id, lock.deploy_id, lock.owner) == ("web-1", "d2", "s1")
    assert store.locks() == [lock]


def test_token_rows_show_as_before(engine: Engine) -> None:
    tokens = TokenStore(engine, admin_token="x" * 40)
    tokens.create_api_token("ci", "deploy")
    tokens.verify(tokens.create_api_token("ops", "admin"))  # sets last_used
    tokens.create_join_token(ttl=60, uses=2, note="rack 4")
    tokens.create_join_token()
    old_api = raw(
        engine,
        sa.select(
            db.api_tokens.c.name,
            db.api_tokens.c.scope,
            db.api_tokens.c.created_at,
            db.api_tokens.c.last_used,
        ).order_by(db.api_tokens.c.name),
    )
    api = tokens.list_api_tokens()
    assert all(isinstance(t, ApiTokenRow) for t in api)
    assert api[1].last_used is not None and api[0].last_used is None
    same_json(
        [t.to_api() for t in api], [old_with_iso(t, "created_at", "last_used") for t in old_api]
    )
    cols = [c for c in db.join_tokens.c if c.name != "token_hash"]
    old_join = raw(engine, sa.select(*cols).order_by(db.join_tokens.c.created_at))
    join = tokens.list_join_tokens()
    assert all(isinstance(t, JoinTokenRow) for t in join)
    same_json(
        [t.to_api() for t in join],
        [old_with_iso(t, "created_at", "expires_at") for t in old_join],
    )


# --------------------------------------------------------------------------- frozen


ROW_CLASSES = [
    ApiTokenRow,
    ClientCredentials,
    ClientRow,
    DeploymentRow,
    HistoryRow,
    JoinTokenRow,
    LockRow,
    LogLineRow,
]


def test_every_row_class_is_listed_here() -> None:
    # By name: ``slots=True`` makes a new class, and the one it replaced may linger.
    assert {c.__name__ for c in Row.__subclasses__()} == {c.__name__ for c in ROW_CLASSES}


@pytest.mark.parametrize("cls", ROW_CLASSES, ids=lambda c: c.__name__)
def test_rows_are_frozen_and_slotted(cls: type[Row]) -> None:
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    row = cls.from_row({name: None for name in names})
    for name in names:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(row, name, "changed")
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        row.surprise = 1  # type: ignore[attr-defined]
    assert not hasattr(row, "__dict__")
    assert row.as_dict() == dict.fromkeys(names)


@pytest.mark.parametrize("cls", ROW_CLASSES, ids=lambda c: c.__name__)
def test_replaced_gives_what_dataclasses_replace_gives(cls: type[Row]) -> None:
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    row = cls.from_row({name: f"old-{name}" for name in names})
    for changes in ({}, {names[0]: "new"}, {name: f"new-{name}" for name in names[::2]}):
        copy = row.replaced(**changes)
        assert copy == dataclasses.replace(row, **changes)  # type: ignore[type-var]
        assert type(copy) is cls and copy is not row
    assert row.as_dict() == {name: f"old-{name}" for name in names}  # unchanged
    with pytest.raises(TypeError, match="no field 'not_a_column'"):
        row.replaced(**{names[0]: "x", "not_a_column": 1})


def test_api_times_are_the_same_from_the_cache() -> None:
    for ts in (0.0, 1_796_586_000.0, 1_796_586_000.5, 1_796_586_000.123456):
        assert iso_time(ts) == iso_time(ts) == old_iso_time(ts)
    assert iso_time(None) is None


def test_a_stored_row_cannot_be_changed(store: RecordStore) -> None:
    record = store.get("d1")
    assert record is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "success"  # type: ignore[misc]
    assert store.get("d1") == record


def test_from_row_ignores_other_columns_and_refuses_missing_ones() -> None:
    columns = {"client_id": "c", "deploy_id": "d", "owner": "o", "acquired_at": 1.0}
    lock = LockRow.from_row({**columns, "expires_at": 2.0, "added_by_a_migration": "x"})
    assert lock == LockRow("c", "d", "o", 1.0, 2.0)
    with pytest.raises(KeyError, match="expires_at"):
        LockRow.from_row(columns)


# --------------------------------------------------------------------------- plugins' view


async def test_a_strategys_restorable_gets_column_dicts_it_cannot_change_rows_through(
    store: RecordStore,
) -> None:
    """``RollbackStrategy.restorable`` is plugin code: it gets ``{column: value}`` dicts, as
    before the rows, and copies of them."""
    store.finish(
        "web-1",
        DeployCallbackPayload(
            callback_id="d2",
            command_type="deploy.shell",
            deploy_type="shell",
            status=DeployStatus.SUCCESS,
            success=True,
        ),
    )
    seen: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []

    def restorable(record: dict[str, Any], later: list[dict[str, Any]]) -> str | None:
        seen.append((copy_of(record), [copy_of(r) for r in later]))
        record["request"]["rollback"]["strategy"] = "tampered"
        record["status"] = "tampered"
        return "pruned"

    async def run(fn: Any, *args: Any) -> Any:
        return fn(*args)

    deployments = types.SimpleNamespace(
        plugins=types.SimpleNamespace(
            rollback_strategies={"snapshot": types.SimpleNamespace(restorable=restorable)}
        ),
        records=store,
        db=run,
    )
    first = store.get("d1")
    assert first is not None
    with pytest.raises(RollbackRefused, match="cannot be rolled back: pruned"):
        await _check_restorable(deployments, first)  # type: ignore[arg-type]
    ((record, later),) = seen
    assert type(record) is dict and record == first.as_dict()
    assert [type(r) for r in later] == [dict] and later[0]["deploy_id"] == "d2"
    assert later == [r.as_dict() for r in store.finished_after(first)]
    assert first.request["rollback"]["strategy"] == "snapshot" and first.status == "rolled_back"
    assert store.get("d1") == first


def copy_of(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value))  # type: ignore[no-any-return]
