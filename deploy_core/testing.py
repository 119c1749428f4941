"""Test helpers for Deploy Center and its plugin authors (a pytest plugin).

Installed as a pytest plugin by ``deploy-core``, so these fixtures are available in any test
suite once ``deploy-core`` is installed:

- ``deploy_context`` — a factory for a :class:`~deploy_core.agent.context.DeployContext`
  whose reports and logs are recorded in memory, for testing an executor, probe or rollback
  strategy directly.
- ``deploy_center`` — a real server (QUIC + HTTP API on loopback, SQLite) and real agent
  processes, for end-to-end tests; see :class:`DeployCenter`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deploy_core.agent.context import DeployContext
from deploy_core.models import DeployCommand, DeployStatus, LogLine


@dataclass
class RecordingReporter:
    """Keeps every report and log line a context sends, in order."""

    reports: list[tuple[DeployStatus, int, str, str]] = field(default_factory=list)
    logs: list[LogLine] = field(default_factory=list)

    def report(self, status: DeployStatus, progress: int, stage: str, message: str) -> None:
        """Record one report."""
        self.reports.append((status, progress, stage, message))

    def log(self, line: LogLine) -> None:
        """Record one log line."""
        self.logs.append(line)

    @property
    def statuses(self) -> list[str]:
        """The statuses reported, in order."""
        return [r[0].value for r in self.reports]

    def lines(self, stream: str | None = None) -> list[str]:
        """The log lines' text, optionally only one stream's."""
        return [entry.line for entry in self.logs if stream is None or entry.stream == stream]


def make_context(
    data_dir: Path,
    *,
    command_type: str = "deploy.test",
    params: dict[str, Any] | None = None,
    deploy_id: str | None = None,
    timeout: float = 600.0,
) -> tuple[DeployContext, RecordingReporter]:
    """A context for one made-up deployment, with a :class:`RecordingReporter`."""
    reporter = RecordingReporter()
    command = DeployCommand(
        deploy_id=deploy_id or f"test-{time.monotonic_ns()}",
        command_type=command_type,
        params=params or {},
        expires_at=time.time() + timeout,
    )
    return DeployContext(command=command, reporter=reporter, data_dir=data_dir), reporter


@pytest.fixture
def deploy_context(
    tmp_path: Path,
) -> Iterator[Callable[..., tuple[DeployContext, RecordingReporter]]]:
    """Factory: ``ctx, reporter = deploy_context(params={...})``."""

    def factory(**kwargs: Any) -> tuple[DeployContext, RecordingReporter]:
        return make_context(tmp_path / "agent-data", **kwargs)

    yield factory
