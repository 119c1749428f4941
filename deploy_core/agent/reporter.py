"""Turns a deployment's reports and log lines into outbox messages.

Log lines are batched: they travel with the next status report, or with a progress report
of the current status when the batch is full (:data:`MAX_BATCH_LINES` lines or
:data:`MAX_BATCH_BYTES` bytes) or has waited ``flush_interval`` seconds.  While the outbox
holds more than :data:`MAX_UNACKED_BYTES` the server has not acknowledged,
:meth:`OutboxReporter.wait_for_room` waits: a script's output is read no faster than the
server takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

from deploy_core.agent.journal import Journal
from deploy_core.models import EVENT_STATUS, DeployStatus, DeployStatusReport, LogLine

# A report carries at most 1000 lines (DeployStatusReport.logs).
MAX_BATCH_LINES = 1000
MAX_BATCH_BYTES = 64 * 1024
# Bytes each line adds to a report beyond its text (timestamp, stream, stage, JSON).
LINE_OVERHEAD = 64
# The outbox may hold this much before a running script's output is no longer read.
MAX_UNACKED_BYTES = 1024 * 1024
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
        max_unacked_bytes: int = MAX_UNACKED_BYTES,
    ) -> None:
        self.journal = journal
        self.deploy_id = deploy_id
        self.command_type = command_type
        self.wake = wake
        self.flush_interval = flush_interval
        self.max_unacked_bytes = max_unacked_bytes
        self._lines: list[LogLine] = []
        self._bytes = 0
        self._last = (DeployStatus.PENDING, 0, "", "")
        self._flusher: asyncio.TimerHandle | None = None

    def report(self, status: DeployStatus, progress: int, stage: str, message: str) -> None:
        """Write a status report (with the batched log lines) to the outbox."""
        self._last = (status, progress, stage, message)
        self._emit(status, progress, stage, message, durable=True)

    def log(self, line: LogLine) -> None:
        """Batch one log line."""
        self._lines.append(line)
        self._bytes += len(line.line) + LINE_OVERHEAD
        if len(self._lines) >= MAX_BATCH_LINES or self._bytes >= MAX_BATCH_BYTES:
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
        report = DeployStatusReport(
            deploy_id=self.deploy_id,
            command_type=self.command_type,
            status=status,
            progress=progress,
            stage=stage,
            message=message[:4096],
            logs=lines,
            seq=0,  # replaced by the journal's sequence number
        )
        self.journal.enqueue_report(
            self.deploy_id,
            f"st-{uuid.uuid4().hex}",
            EVENT_STATUS,
            report.model_dump(mode="json"),
            stage,
            durable=durable,
        )
        self.wake()
