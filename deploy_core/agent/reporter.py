"""Turns a deployment's reports and log lines into outbox messages.

Log lines are batched: they travel with the next status report, or with a progress report
of the current status when the batch is full (:data:`MAX_BATCH_LINES` lines or
:data:`MAX_BATCH_BYTES` bytes) or has waited ``flush_interval`` seconds.  While the outbox
holds more than :data:`MAX_UNACKED_BYTES` the server has not acknowledged,
:meth:`OutboxReporter.wait_for_room` waits: a script's output is read no faster than the
server takes it.

A script's output arrives a chunk at a time (:meth:`OutboxReporter.log_lines`) and travels as
:class:`~deploy_core.models.LogBlock` objects, one string for many lines, so a line costs the
agent and the server a split and a join, not a model of its own.  Once a batch holds a block, the
single lines of the batch travel as blocks too, so their order is kept.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any

from deploy_core.agent.journal import Journal, log_failure
from deploy_core.models import EVENT_STATUS, DeployStatus, DeployStatusReport, LogBlock, LogLine

# A report carries at most 1000 lines (DeployStatusReport.logs) and 256 blocks.
MAX_BATCH_LINES = 1000
MAX_BATCH_BLOCKS = 200
MAX_BATCH_BYTES = 256 * 1024
# Bytes each line adds to a report beyond its text (timestamp, stream, stage, JSON).
LINE_OVERHEAD = 64
# The outbox may hold this much before a running script's output is no longer read (and at
# most a quarter of the deployment's log budget, so the journal stays well under twice it).
MAX_UNACKED_BYTES = 4 * 1024 * 1024
# How often wait_for_room looks again while the outbox is full.
ROOM_POLL = 0.02


class OutboxReporter:
    """The :class:`~deploy_core.agent.context.Reporter` of a running deployment."""

    def __init__(
        self,
        journal: Journal,
        *,
        deploy_id: str,
        command_type: str,
        wake: Callable[[], None],
        flush_interval: float = 0.2,
        max_unacked_bytes: int | None = None,
    ) -> None:
        """:param max_unacked_bytes: how much the outbox may hold before
        :meth:`wait_for_room` waits; by default :data:`MAX_UNACKED_BYTES`, at most a quarter
        of the log budget the server sent with the command (at least one batch)."""
        self.journal = journal
        self.deploy_id = deploy_id
        self.command_type = command_type
        self.wake = wake
        self.flush_interval = flush_interval
        if max_unacked_bytes is None:
            max_unacked_bytes = MAX_UNACKED_BYTES
            entry = journal.get(deploy_id)
            budget = entry.command.log_budget_bytes if entry is not None else None
            if budget is not None:
                max_unacked_bytes = max(MAX_BATCH_BYTES, min(max_unacked_bytes, budget // 4))
        self.max_unacked_bytes = max_unacked_bytes
        # The batch: single lines and blocks (their JSON form), in the order they came.
        self._lines: list[LogLine | dict[str, Any]] = []
        self._blocks = 0
        self._bytes = 0
        self._last = (DeployStatus.PENDING, 0, "", "")
        self._flusher: asyncio.TimerHandle | None = None

    def report(self, status: DeployStatus, progress: int, stage: str, message: str) -> None:
        """Write a status report (with the batched log lines) to the outbox: committed by
        the journal's writer while the caller goes on, sent once it is on disk."""
        self._last = (status, progress, stage, message)
        self._emit(status, progress, stage, message, durable=True)

    def log(self, line: LogLine) -> None:
        """Batch one log line."""
        self._lines.append(line)
        self._bytes += len(line.line) + LINE_OVERHEAD
        self._added()

    def log_lines(self, stream: str, stage: str, lines: list[str]) -> None:
        """Batch many lines of one stream as blocks of at most :data:`MAX_BATCH_BYTES`.

        Only for a server that knows :class:`~deploy_core.models.LogBlock` (one that sent a
        log budget with the command)."""
        # ends[i]: the length of lines[0..i] joined by newlines, so lines[a..b] take
        # ends[b] - ends[a - 1] - 1 characters: blocks are cut by bisection, not line by line.
        ends = list(itertools.accumulate(map(len, lines), lambda total, n: total + n + 1))
        start = 0
        while start < len(lines):
            room = MAX_BATCH_BYTES - self._bytes - LINE_OVERHEAD
            before = ends[start - 1] if start else -1
            stop = bisect.bisect_right(ends, before + room, start)
            if stop == start:
                if self._lines:
                    self.flush()
                    continue
                stop = start + 1  # one line longer than a whole batch
            text = "\n".join(lines[start:stop])
            self._lines.append({"ts": time.time(), "stream": stream, "stage": stage, "text": text})
            self._blocks += 1
            self._bytes += len(text) + LINE_OVERHEAD
            start = stop
            self._added()

    def _added(self) -> None:
        if (
            len(self._lines) >= MAX_BATCH_LINES
            or self._blocks >= MAX_BATCH_BLOCKS
            or self._bytes >= MAX_BATCH_BYTES
        ):
            self.flush()
        elif self._flusher is None:
            with contextlib.suppress(RuntimeError):  # no running loop: flushed by the next report
                self._flusher = asyncio.get_running_loop().call_later(
                    self.flush_interval, self.flush
                )

    async def wait_for_room(self) -> None:
        """Return once the outbox holds no more than ``max_unacked_bytes`` (the server
        acknowledges what it has stored).  While the agent is disconnected this waits until
        the deadline's end: the script blocks on its output, which is the point."""
        while self.journal.outbox_bytes() > self.max_unacked_bytes:
            # What the server acknowledged leaves the count once its delete commits: that
            # must not wait for company (Journal.submit_ack) while the script waits for room.
            self.journal.flush()
            await asyncio.sleep(ROOM_POLL)

    def flush(self) -> None:
        """Send batched lines now, with a report of the current status."""
        if self._lines:
            status, progress, stage, _message = self._last
            self._emit(status, progress, stage, "", durable=False)

    def _emit(
        self, status: DeployStatus, progress: int, stage: str, message: str, *, durable: bool
    ) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        lines, self._lines, self._bytes = self._lines, [], 0
        logs: list[LogLine] = []
        blocks: list[LogBlock] = []
        if self._blocks:
            blocks = [
                LogBlock.model_construct(**entry)
                if isinstance(entry, dict)
                else LogBlock.model_construct(
                    ts=entry.ts, stream=entry.stream, stage=entry.stage, text=entry.line
                )
                for entry in lines
            ]
        else:
            logs = [entry for entry in lines if isinstance(entry, LogLine)]
        self._blocks = 0
        report = DeployStatusReport(
            deploy_id=self.deploy_id,
            command_type=self.command_type,
            status=status,
            progress=progress,
            stage=stage,
            message=message[:4096],
            logs=logs,
            log_blocks=blocks,
            seq=0,  # replaced by the journal's sequence number
        )
        written = self.journal.submit_report(
            self.deploy_id,
            f"st-{uuid.uuid4().hex}",
            EVENT_STATUS,
            report.model_dump(mode="json"),
            stage,
            durable=durable,
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop here: wait for the disk
            written.result()
            self.wake()
            return
        # The event loop goes on (the script starts meanwhile); the outbox's sender is woken
        # once the report is committed, in a group with whatever else was written meanwhile.
        log_failure(written, f"the status report of {self.deploy_id}")

        def wake(_done: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                loop.call_soon_threadsafe(self.wake)

        written.add_done_callback(wake)
