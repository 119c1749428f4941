"""Output past the log budget (issue 10 §4, "Bounded memory under any output volume").

A run streams lines up to its budget, then only keeps a tail that it sends at the end after
a marker naming how many bytes were left out; back-pressure from the reporter stops the
reading of the child's pipes, so the child blocks instead of the agent buffering.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from deploy_core.agent.context import DeployContext
from deploy_core.agent.journal import Journal
from deploy_core.agent.process import OutputBudget, run_process
from deploy_core.agent.reporter import MAX_BATCH_BYTES, OutboxReporter
from deploy_core.models import DeployCommand, DeployStatus
from deploy_core.testing import RecordingReporter

SEQ = "seq 1 100000"  # 588895 bytes, one number a line


def _seq_bytes(first: int, last: int) -> int:
    return sum(len(str(n)) + 1 for n in range(first, last + 1))


async def test_a_run_streams_its_head_then_the_tail_after_a_marker() -> None:
    lines: list[tuple[str, str]] = []
    budget = OutputBudget(20_000, tail_bytes=5_000)
    result = await run_process(
        ["sh", "-c", SEQ],
        timeout=30,
        on_line=lambda stream, line: lines.append((stream, line)),
        output_budget=budget,
    )
    assert result.exit_code == 0
    (marker,) = [i for i, (stream, _) in enumerate(lines) if stream == "agent"]
    head = [int(line) for _, line in lines[:marker]]
    tail = [int(line) for _, line in lines[marker + 1 :]]
    assert head == list(range(1, len(head) + 1))
    assert tail == list(range(100001 - len(tail), 100001))
    assert budget.streamed == _seq_bytes(1, len(head)) <= 20_000
    assert _seq_bytes(len(head) + 1, 100000) == budget.dropped
    kept = _seq_bytes(100001 - len(tail), 100000)
    assert 4_000 < kept <= 5_000
    left_out = budget.dropped - kept
    assert lines[marker][1].startswith(f"[output truncated: {left_out} bytes left out after")
    assert result.stdout_tail.endswith("99999\n100000\n")  # the result's tail is untouched


async def test_the_deployment_budget_is_shared_by_its_runs(tmp_path: Path) -> None:
    reporter = RecordingReporter()
    command = DeployCommand(
        deploy_id="budget-1",
        command_type="deploy.test",
        expires_at=time.time() + 60,
        log_budget_bytes=100_000,
    )
    ctx = DeployContext(command=command, reporter=reporter, data_dir=tmp_path)
    for _ in range(3):
        assert (await ctx.run(["sh", "-c", SEQ], timeout=30)).exit_code == 0
    total = sum(len(line.line.encode()) for line in reporter.logs)
    assert total <= 100_000  # what the server keeps: it never has to cut
    markers = [i for i, line in enumerate(reporter.logs) if line.stream == "agent"]
    assert len(markers) == 3  # each run that overflowed says so, even with no room left
    first_tail = [line.line for line in reporter.logs[markers[0] + 1 : markers[1]]]
    assert first_tail[-1] == "100000" and len(first_tail) > 1000
    assert reporter.logs[-1].line.startswith("[output truncated")


async def test_a_reporter_without_room_blocks_the_child(tmp_path: Path) -> None:
    room = asyncio.Event()
    done = tmp_path / "done"

    async def pace() -> None:
        await room.wait()

    lines: list[str] = []
    run = asyncio.create_task(
        run_process(
            ["sh", "-c", f"yes 'line of output' | head -c 20000000; touch {done}"],
            timeout=60,
            on_line=lambda _s, line: lines.append(line),
            output_budget=OutputBudget(None),
            pace=pace,
        )
    )
    await asyncio.sleep(1.0)
    assert not done.exists()  # the pipe is full and nobody reads it: the child waits
    read_while_blocked = len(lines)
    # A chunk or two (the pipe and the reader hold 1 MiB each), not the 20 MB.
    assert read_while_blocked * 15 < 3_000_000
    room.set()
    result = await asyncio.wait_for(run, 60)
    assert result.exit_code == 0 and done.exists()
    assert len(lines) == 20_000_000 // 15 + 1


async def test_the_outbox_reporter_waits_for_acknowledgements(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    command = DeployCommand(
        deploy_id="room-1", command_type="deploy.test", expires_at=time.time() + 60
    )
    journal.accept(command)
    reporter = OutboxReporter(
        journal,
        deploy_id="room-1",
        command_type="deploy.test",
        wake=lambda: None,
        max_unacked_bytes=10_000,
    )
    for n in range(3):
        reporter.report(DeployStatus.EXECUTING, n, "executing", "x" * 5_000)
    assert journal.outbox_bytes() > 10_000
    waiting = asyncio.create_task(reporter.wait_for_room())
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await asyncio.wrap_future(journal.barrier())  # the reports are committed in the background
    for msg in journal.pending():
        journal.ack(msg.msg_id)
    await asyncio.wait_for(waiting, 5)
    assert journal.outbox_bytes() == 0
    journal.close()


def test_many_lines_become_bounded_blocks_in_order(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    command = DeployCommand(
        deploy_id="blocks-1",
        command_type="deploy.test",
        expires_at=time.time() + 60,
        log_budget_bytes=10_000_000,
    )
    journal.accept(command)
    reporter = OutboxReporter(
        journal, deploy_id="blocks-1", command_type="deploy.test", wake=lambda: None
    )
    lines = [f"line {n} " + "x" * (n % 50) for n in range(20_000)]
    reporter.log_lines("stdout", "script_running", lines[:7])
    reporter.log_lines("stderr", "script_running", ["an error"])
    reporter.log_lines("stdout", "script_running", lines[7:])
    reporter.flush()
    payloads = [msg.payload for msg in journal.pending(limit=10_000)]
    assert all(len(json.dumps(p)) < MAX_BATCH_BYTES + 8192 for p in payloads)
    blocks = [block for p in payloads for block in p["log_blocks"]]
    assert all(not p["logs"] for p in payloads)
    got = [(block["stream"], line) for block in blocks for line in block["text"].split("\n")]
    assert got == [
        *(("stdout", line) for line in lines[:7]),
        ("stderr", "an error"),
        *(("stdout", line) for line in lines[7:]),
    ]
    journal.close()
