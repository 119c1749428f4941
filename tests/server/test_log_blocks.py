"""Log blocks (many lines in one string) read back as lines, in order with single lines,
within the deployment's log budget (how they are stored: test_log_chunks.py)."""

from __future__ import annotations

import time
from pathlib import Path

from deploy_core.models import DeployStatus, DeployStatusReport, LogBlock, LogLine
from deploy_core.server import db
from deploy_core.server.records import TRUNCATION_MARKER, RecordStore


def _store(tmp_path: Path, max_log_bytes: int) -> RecordStore:
    engine = db.make_engine(db.sqlite_url(tmp_path / "server.db"))
    db.upgrade(engine)
    store = RecordStore(engine, max_log_bytes=max_log_bytes)
    store.create_deployment(
        deploy_id="d1",
        client_id="c1",
        command_type="deploy.shell",
        request={"params": {}},
        deadline=time.time() + 60,
    )
    return store


def _report(seq: int, **fields: object) -> DeployStatusReport:
    return DeployStatusReport.model_validate(
        {
            "deploy_id": "d1",
            "command_type": "deploy.shell",
            "status": DeployStatus.SCRIPT_RUNNING,
            "progress": 10,
            "seq": seq,
            **fields,
        }
    )


def test_blocks_become_lines_after_the_single_lines(tmp_path: Path) -> None:
    store = _store(tmp_path, 10_000)
    report = _report(
        0,
        logs=[LogLine(line="first")],
        log_blocks=[
            LogBlock(stream="stdout", stage="s", text="a\nb\n\nc"),
            LogBlock(stream="stderr", stage="s", text="x" * 9000),
        ],
    )
    store.apply_report("c1", report)
    rows = store.logs("d1")
    assert [(r.stream, r.line) for r in rows] == [
        ("stdout", "first"),
        ("stdout", "a"),
        ("stdout", "b"),
        ("stdout", ""),
        ("stdout", "c"),
        ("stderr", "x" * 8192),  # held to a LogLine's length
    ]


def test_a_block_past_the_budget_is_cut_at_a_line_with_the_marker(tmp_path: Path) -> None:
    store = _store(tmp_path, 25)
    store.apply_report("c1", _report(0, log_blocks=[LogBlock(text="0123456789\n" * 5)]))
    store.apply_report("c1", _report(1, log_blocks=[LogBlock(text="more")]))
    lines = [r.line for r in store.logs("d1")]
    assert lines == ["0123456789", "0123456789", TRUNCATION_MARKER.format(limit=25)]
    record = store.get("d1")
    assert record is not None and record.log_bytes == 20
