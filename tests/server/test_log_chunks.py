"""Output at rest in chunks (deploy_core.server.log_chunks): one row per block of lines,
every line with an id of its own; reading by ``after``/``limit`` across chunk boundaries;
per-line rows of revision 0005 migrated with their ids, and back on downgrade.

Every test runs against a fresh SQLite database and a fresh PostgreSQL schema.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from deploy_core.models import (
    DeployCallbackPayload,
    DeployStatus,
    DeployStatusReport,
    LogBlock,
    LogLine,
)
from deploy_core.server.db import deploy_log_chunks, make_engine, migrations_config, upgrade
from deploy_core.server.records import TRUNCATION_MARKER, RecordStore


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _deployment(store: RecordStore, deploy_id: str) -> None:
    store.create_deployment(
        deploy_id=deploy_id,
        client_id=f"c-{deploy_id}",
        command_type="deploy.shell",
        request={"params": {}},
        deadline=time.time() + 600,
    )


def _report(deploy_id: str, seq: int, **fields: Any) -> DeployStatusReport:
    return DeployStatusReport.model_validate(
        {
            "deploy_id": deploy_id,
            "command_type": "deploy.shell",
            "status": DeployStatus.SCRIPT_RUNNING,
            "progress": 10,
            "seq": seq,
            **fields,
        }
    )


def _chunks(engine: sa.Engine, deploy_id: str) -> list[tuple[int, int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                deploy_log_chunks.c.first_line,
                deploy_log_chunks.c.line_count,
                deploy_log_chunks.c.stream,
            )
            .where(deploy_log_chunks.c.deploy_id == deploy_id)
            .order_by(deploy_log_chunks.c.first_line)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def test_each_block_is_one_row_and_its_lines_get_consecutive_ids(engine: sa.Engine) -> None:
    upgrade(engine)
    store = RecordStore(engine)
    _deployment(store, "d1")
    big = "\n".join(f"out {i}" for i in range(3000))
    store.apply_report(
        "c-d1",
        _report(
            "d1",
            0,
            log_blocks=[LogBlock(stream="stdout", text=big), LogBlock(stream="stderr", text="e")],
        ),
    )
    store.apply_report("c-d1", _report("d1", 1, log_blocks=[LogBlock(text="x\ny")]))

    assert _chunks(engine, "d1") == [(1, 3000, "stdout"), (3001, 1, "stderr"), (3002, 2, "stdout")]
    lines = store.logs("d1", limit=10000)
    assert [line.id for line in lines] == list(range(1, 3004))
    assert [line.line for line in lines] == [f"out {i}" for i in range(3000)] + ["e", "x", "y"]
    assert [line.stream for line in lines[2999:]] == ["stdout", "stderr", "stdout", "stdout"]


def test_pages_by_after_and_limit_match_the_whole_log_at_every_cut(engine: sa.Engine) -> None:
    upgrade(engine)
    store = RecordStore(engine)
    _deployment(store, "d1")
    for seq, size in enumerate([5, 1, 7, 3]):
        text = "\n".join(f"{seq}.{i}" for i in range(size))
        store.apply_report("c-d1", _report("d1", seq, log_blocks=[LogBlock(text=text)]))
    whole = store.logs("d1")
    assert len(whole) == 16

    for after in range(0, 18):
        for limit in (1, 2, 4, 9, 1000):
            expected = [line for line in whole if line.id > after][:limit]
            assert store.logs("d1", after=after, limit=limit) == expected, (after, limit)
    # Reading on with each page's last id walks the whole log once.
    seen: list[str] = []
    after = 0
    for _ in range(20):
        page = store.logs("d1", after=after, limit=3)
        if not page:
            break
        seen += [line.line for line in page]
        after = page[-1].id
    assert seen == [line.line for line in whole]


def test_single_lines_sent_together_share_a_chunk_and_a_line_with_a_newline_stays_one(
    engine: sa.Engine,
) -> None:
    upgrade(engine)
    store = RecordStore(engine)
    _deployment(store, "d1")
    ts = 1_700_000_000.5
    store.apply_report(
        "c-d1",
        _report(
            "d1",
            0,
            logs=[
                LogLine(ts=ts, line="one"),
                LogLine(ts=ts, line="two"),
                LogLine(ts=ts, line="three\nstill three"),
                LogLine(ts=ts, line="four"),
                LogLine(ts=ts + 1, stream="agent", line="later"),
            ],
        ),
    )

    assert _chunks(engine, "d1") == [(1, 3, "stdout"), (4, 1, "stdout"), (5, 1, "agent")]
    lines = store.logs("d1")
    assert [(line.id, line.line) for line in lines] == [
        (1, "one"),
        (2, "two"),
        (3, "three\nstill three"),
        (4, "four"),
        (5, "later"),
    ]
    assert [line.ts for line in lines] == [ts, ts, ts, ts, ts + 1]
    assert store.logs("d1", after=2, limit=1)[0].line == "three\nstill three"


def test_single_lines_fill_a_chunk_no_bigger_than_a_block(engine: sa.Engine) -> None:
    upgrade(engine)
    store = RecordStore(engine, max_log_bytes=10 << 20)
    _deployment(store, "d1")
    sent = [f"{i:04d}" + "x" * 7996 for i in range(40)]  # 320,000 characters, one timestamp
    store.apply_report("c-d1", _report("d1", 0, logs=[LogLine(ts=5.0, line=t) for t in sent]))

    chunks = _chunks(engine, "d1")
    assert len(chunks) == 2 and sum(count for _, count, _ in chunks) == 40
    with engine.connect() as conn:
        longest = conn.execute(sa.select(sa.func.max(sa.func.length(deploy_log_chunks.c.text))))
        assert longest.scalar_one() <= 256 * 1024
    assert [line.line for line in store.logs("d1")] == sent


def test_the_truncation_marker_is_a_server_line_after_the_cut(engine: sa.Engine) -> None:
    upgrade(engine)
    store = RecordStore(engine, max_log_bytes=15)
    _deployment(store, "d1")
    store.apply_report("c-d1", _report("d1", 0, log_blocks=[LogBlock(text="12345\n" * 4)]))

    assert _chunks(engine, "d1") == [(1, 3, "stdout"), (4, 1, "server")]
    assert [line.line for line in store.logs("d1")] == [
        "12345",
        "12345",
        "12345",
        TRUNCATION_MARKER.format(limit=15),
    ]


def test_lines_of_0005_keep_their_ids_after_upgrade_and_come_back_on_downgrade(
    engine: sa.Engine,
) -> None:
    upgrade(engine, "0005")
    store = RecordStore(engine)
    for deploy_id in ("a", "b"):
        _deployment(store, deploy_id)
    old_lines = [
        ("a", "stdout", "first of a"),
        ("b", "stderr", "first of b"),
        ("a", "stdout", "second of a\nwith a newline"),
        ("a", "agent", "third of a"),
    ]
    with engine.begin() as conn:
        for deploy_id, stream, line in old_lines:
            conn.execute(
                sa.text(
                    "INSERT INTO deploy_logs (deploy_id, ts, stream, stage, line)"
                    " VALUES (:d, 1.5, :s, 'script_running', :l)"
                ),
                {"d": deploy_id, "s": stream, "l": line},
            )
        ids = conn.execute(sa.text("SELECT id FROM deploy_logs ORDER BY id")).scalars().all()

    upgrade(engine)

    a = store.logs("a")
    assert [(line.id, line.stream, line.line) for line in a] == [
        (ids[0], "stdout", "first of a"),
        (ids[2], "stdout", "second of a\nwith a newline"),
        (ids[3], "agent", "third of a"),
    ]
    assert [line.line for line in store.logs("a", after=ids[0])] == [
        "second of a\nwith a newline",
        "third of a",
    ]
    assert [(line.id, line.line) for line in store.logs("b")] == [(ids[1], "first of b")]
    # New output goes after the migrated lines.
    store.apply_report("c-a", _report("a", 0, log_blocks=[LogBlock(text="new 1\nnew 2")]))
    after_upgrade = [(line.id, line.line) for line in store.logs("a", after=ids[3])]
    assert after_upgrade == [(ids[3] + 1, "new 1"), (ids[3] + 2, "new 2")]

    command.downgrade(migrations_config(engine), "0005")

    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT deploy_id, stream, line FROM deploy_logs ORDER BY id")
        ).all()
    assert [tuple(row) for row in rows] == [
        ("a", "stdout", "first of a"),
        ("a", "stdout", "second of a\nwith a newline"),
        ("a", "agent", "third of a"),
        ("a", "stdout", "new 1"),
        ("a", "stdout", "new 2"),
        ("b", "stderr", "first of b"),
    ]
    assert "deploy_log_chunks" not in sa.inspect(engine).get_table_names()


def test_prune_deletes_the_chunks_of_a_finished_deployment(engine: sa.Engine) -> None:
    upgrade(engine)
    store = RecordStore(engine)
    for deploy_id in ("old", "live"):
        _deployment(store, deploy_id)
        store.apply_report(
            f"c-{deploy_id}", _report(deploy_id, 0, log_blocks=[LogBlock(text="a\nb")])
        )
    store.finish(
        "c-old",
        DeployCallbackPayload(
            callback_id="old",
            command_type="deploy.shell",
            deploy_type="shell",
            status=DeployStatus.SUCCESS,
            success=True,
        ),
    )

    assert store.prune(time.time()) == 1

    assert _chunks(engine, "old") == []
    assert _chunks(engine, "live") == [(1, 2, "stdout")]
